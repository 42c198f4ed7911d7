"""Reloading the config file while running (SPEC §3.1): valid → in force, invalid →
refused with every error logged, settings only a restart applies kept, the file and
its secret files watched."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from crmhooks.config import load_config
from crmhooks.metrics import Metrics
from crmhooks.reload import Reloader, keep_restart_only, restart_only_changes
from crmhooks.snapshot import LiveConfig

TOML = """
[kafka]
group_id = "{group}"

[delivery]
retry_delays_s = [{delay}]
total_timeout_s = {timeout}

[[webhooks]]
name = "Hook"
url = "{url}"
module = "Leads"
custom_params = {{ apikey = "${{file:{secret}}}" }}

[[rules]]
id = "r1"
module = "Leads"
instant = "Hook"
"""


def write(path: Path, secret: Path, **values: Any) -> None:
    fields = {"group": "g1", "delay": 900, "timeout": 15, "url": "https://a.example.com/"}
    fields.update(values)
    path.write_text(TOML.format(secret=secret, **fields), encoding="utf-8")
    # A new modification time even within the file system's time granularity.
    stamp = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    secret = tmp_path / "apikey"
    secret.write_text("key-1\n")
    path = tmp_path / "crmhooks.toml"
    write(path, secret)
    return path, secret


def reloader(path: Path) -> tuple[Reloader, LiveConfig, list[str | None], Metrics]:
    live = LiveConfig.of(load_config(path, {}))
    changed: list[str | None] = []
    metrics = Metrics(process_metrics=False)
    return Reloader(path, live, changed.append, metrics, env=lambda: {}), live, changed, metrics


def apikey(live: LiveConfig) -> str:
    target = live.current.target("org-acme", "Hook")
    assert target is not None
    return target.webhook.custom_params["apikey"]


def test_a_valid_change_is_in_force_and_swept_for(files: tuple[Path, Path]) -> None:
    path, secret = files
    r, live, changed, metrics = reloader(path)
    write(path, secret, url="https://b.example.com/", delay=60)
    assert r.reload()
    target = live.current.target("org-acme", "Hook")
    assert target is not None
    assert target.webhook.url == "https://b.example.com/"
    assert live.current.config.delivery.retry_delays_s == (60.0,)
    assert changed == [None]
    assert metrics.config_reloads["applied"] == 1


def test_an_invalid_change_is_refused_with_every_error_and_the_old_config_stays(
    files: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    path, secret = files
    r, live, changed, metrics = reloader(path)
    before = live.current
    path.write_text(
        TOML.format(secret=secret, group="g1", delay=-1, timeout=15, url="ftp://x")
        + '\n[[rules]]\nid = "r1"\nmodule = "Leads"\n',
        encoding="utf-8",
    )
    with caplog.at_level(logging.ERROR):
        assert not r.reload()
    assert live.current is before
    assert changed == []
    assert metrics.config_reloads["refused"] == 1
    for item in ("delivery.retry_delays_s[0]", "webhooks[Hook].url", "rules[r1].id"):
        assert item in caplog.text


def test_a_rotated_secret_file_is_read_again(files: tuple[Path, Path]) -> None:
    path, secret = files
    r, live, _, _ = reloader(path)
    assert apikey(live) == "key-1"
    secret.write_text("key-2\n")
    assert r.reload()
    assert apikey(live) == "key-2"
    secret.unlink()  # a missing secret is a config error: refused, key-2 stays
    assert not r.reload()
    assert apikey(live) == "key-2"


def test_settings_only_a_restart_applies_keep_their_value_with_a_warning(
    files: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    path, secret = files
    r, live, _, _ = reloader(path)
    write(path, secret, group="g2", timeout=30, delay=60)
    with caplog.at_level(logging.WARNING):
        assert r.reload()
    now = live.current.config
    assert (now.kafka.group_id, now.delivery.total_timeout_s) == ("g1", 15.0)
    assert now.delivery.retry_delays_s == (60.0,)  # read live: applied
    assert "kafka.group_id changed; it applies at the next restart" in caplog.text
    assert "delivery.total_timeout_s changed" in caplog.text
    new = load_config(path, {})
    assert restart_only_changes(keep_restart_only(live.current.config, new), new) == [
        "kafka.group_id",
        "delivery.total_timeout_s",
    ]


async def test_the_file_and_its_secret_files_are_watched(files: tuple[Path, Path]) -> None:
    path, secret = files
    r, live, _, _ = reloader(path)
    assert not r._look()  # nothing changed since the start
    os.utime(path, ns=(1, 1))  # touched, content the same: no reload
    assert not r._look()
    write(path, secret, url="https://c.example.com/")
    assert r._look()
    assert not r._look()
    secret.write_text("key-3\n")
    stamp = secret.stat().st_mtime_ns + 1_000_000_000
    os.utime(secret, ns=(stamp, stamp))
    assert r._look()
    assert apikey(live) == "key-1"  # looking does not reload; the loop does
