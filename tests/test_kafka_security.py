"""The processor over the secured listeners of scripts/kafka-local (SASL_SSL with
SCRAM-SHA-512, SASL_PLAINTEXT with PLAIN, SSL with a client certificate), and the
clear one-line errors of `crmhooks run` for a wrong password and an unknown CA.

scripts/test starts its broker with these listeners and exports their addresses
(``scripts/kafka-local secure-env``). Against another broker (a developer's
CRMHOOKS_BOOTSTRAP_SERVERS) without them the tests are skipped, saying so; in CI
(CI set) they fail instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme

from crmhooks.config import (
    AllOf,
    BodySpec,
    Condition,
    Config,
    DeliverySettings,
    KafkaSettings,
    OrgSettings,
    Rule,
    StoreSettings,
    Webhook,
)
from crmhooks.errors import KafkaIOError
from crmhooks.kafka_io import read_topic
from tests.crash_support import crash_config_toml
from tests.support import (
    event,
    produce,
    receiver,
    running,
    unique_kafka,
    wait_for_records,
)

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parent.parent


def secured(variable: str) -> str:
    value = os.environ.get(variable)
    if value:
        return value
    reason = (
        f"{variable} is not set: the broker under test has no secured listeners "
        "(scripts/test starts one that has; by hand: scripts/kafka-local start --secure, "
        "then eval $(scripts/kafka-local secure-env))"
    )
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def over(listener: str, **settings: Any) -> KafkaSettings:
    """Topics of their own, through the secured listener in ``listener``."""
    return dataclasses.replace(unique_kafka(), bootstrap_servers=secured(listener), **settings)


def sasl(listener: str, mechanism: str, protocol: str) -> KafkaSettings:
    return over(
        listener,
        security_protocol=protocol,
        sasl_mechanism=mechanism,
        sasl_username=secured("CRMHOOKS_TEST_KAFKA_USERNAME"),
        sasl_password=secured("CRMHOOKS_TEST_KAFKA_PASSWORD"),
        ssl_ca_file=secured("CRMHOOKS_TEST_KAFKA_CA") if protocol == "SASL_SSL" else "",
    )


def instant_config(kafka: KafkaSettings, url: str, tmp_path: Path) -> Config:
    webhook = Webhook(
        name="Hook",
        url=f"{url}/hook",
        module="Potentials",
        body=BodySpec(format="json", template='{"deal": "${Potentials.Potential Name}"}'),
    )
    rule = Rule(
        id="on-close",
        module="Potentials",
        trigger="create_or_edit",
        criteria=AllOf((Condition("Stage", "is", "Closed Won"),)),
        instant="Hook",
    )
    return Config(
        kafka=kafka,
        store=StoreSettings(path=str(tmp_path / "crmhooks.db")),
        delivery=DeliverySettings(allow_private_networks=True),
        orgs={"org-acme": OrgSettings("org-acme", users=12, time_zone="UTC")},
        webhooks={"Hook": webhook},
        rules=(rule,),
    )


async def delivers_over(kafka: KafkaSettings, tmp_path: Path) -> None:
    """Topics created, events produced, the processor consuming and delivering, results
    read back: every client crmhooks makes, through this listener."""
    async with receiver() as rx:
        config = instant_config(kafka, rx.url, tmp_path)
        async with running(config):
            await produce(config, event(1), event(2))
            results = await wait_for_records(
                config,
                kafka.results_topic,
                lambda rs: sum(r["status"] == "delivered" for r in rs) == 2,
            )
        assert {r["event_id"] for r in results} == {"evt-1", "evt-2"}
        assert len(rx.on("/hook")) == 2


async def test_the_processor_delivers_over_sasl_ssl_with_scram_sha_512(tmp_path: Path) -> None:
    await delivers_over(sasl("CRMHOOKS_TEST_SASL_SSL", "SCRAM-SHA-512", "SASL_SSL"), tmp_path)


async def test_the_processor_delivers_over_sasl_plaintext_with_plain(tmp_path: Path) -> None:
    await delivers_over(sasl("CRMHOOKS_TEST_SASL_PLAINTEXT", "PLAIN", "SASL_PLAINTEXT"), tmp_path)


async def test_the_processor_delivers_over_ssl_with_a_client_certificate(tmp_path: Path) -> None:
    kafka = over(
        "CRMHOOKS_TEST_SSL",
        security_protocol="SSL",
        ssl_ca_file=secured("CRMHOOKS_TEST_KAFKA_CA"),
        ssl_cert_file=secured("CRMHOOKS_TEST_KAFKA_CLIENT_CERT"),
        ssl_key_file=secured("CRMHOOKS_TEST_KAFKA_CLIENT_KEY"),
    )
    await delivers_over(kafka, tmp_path)


async def test_reading_a_topic_with_a_wrong_password_names_the_cause() -> None:
    kafka = dataclasses.replace(
        sasl("CRMHOOKS_TEST_SASL_SSL", "SCRAM-SHA-512", "SASL_SSL"),
        sasl_password="not-the-password",
    )
    with pytest.raises(KafkaIOError, match="refused the SASL credentials") as caught:
        async for _ in read_topic(kafka, kafka.results_topic):
            pass
    assert "not-the-password" not in str(caught.value)
    assert "not-the-password" not in repr(kafka)


async def test_mutual_tls_without_a_client_certificate_is_refused_clearly() -> None:
    kafka = over(
        "CRMHOOKS_TEST_SSL", security_protocol="SSL", ssl_ca_file=secured("CRMHOOKS_TEST_KAFKA_CA")
    )
    with pytest.raises(KafkaIOError, match=r"Kafka at 127\.0\.0\.1:\d+"):
        async for _ in read_topic(kafka, kafka.results_topic):
            pass


async def run_crmhooks(
    kafka: KafkaSettings, overrides: dict[str, str], tmp_path: Path
) -> tuple[int, str, float]:
    """`crmhooks run` with ``overrides`` in its config file's [kafka] table: its exit
    status, its stderr, and how long it ran (killed after 30 s)."""
    config_path = tmp_path / "crmhooks.toml"
    toml = crash_config_toml(
        kafka,
        tmp_path / "crmhooks.db",
        "http://127.0.0.1:9",
        ["org-acme"],
        offset="1h",
        retry_delay_s=1.0,
    )
    keys = "".join(f"{k} = {orjson.dumps(v).decode()}\n" for k, v in overrides.items())
    config_path.write_text(toml.replace("[kafka]\n", f"[kafka]\n{keys}", 1))
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "crmhooks.cli",
        "run",
        "--config",
        str(config_path),
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CRMHOOKS_BOOTSTRAP_SERVERS": kafka.bootstrap_servers},
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace"), time.monotonic() - start


def the_error_line(stderr: str) -> str:
    """The last line: cli.main's one-line error (aiokafka's log may come before)."""
    return stderr.strip().splitlines()[-1]


async def test_a_wrong_password_is_one_clear_line_and_exit_1_at_once(tmp_path: Path) -> None:
    kafka = sasl("CRMHOOKS_TEST_SASL_SSL", "SCRAM-SHA-512", "SASL_SSL")
    overrides = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": kafka.sasl_username,
        "sasl_password": "wrong-password-123",
        "ssl_ca_file": kafka.ssl_ca_file,
    }
    status, stderr, took_s = await run_crmhooks(kafka, overrides, tmp_path)
    assert status == 1, stderr
    assert took_s < 15.0, stderr
    line = the_error_line(stderr)
    assert line.startswith("crmhooks: Kafka at 127.0.0.1:"), stderr
    assert "refused the SASL credentials (SCRAM-SHA-512, user 'crmhooks')" in line
    assert "wrong-password-123" not in stderr


async def test_an_unknown_ca_is_one_clear_line_and_exit_1_at_once(tmp_path: Path) -> None:
    kafka = sasl("CRMHOOKS_TEST_SASL_SSL", "SCRAM-SHA-512", "SASL_SSL")
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    overrides = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": kafka.sasl_username,
        "sasl_password": kafka.sasl_password,
        "ssl_ca_file": str(other_ca),
    }
    status, stderr, took_s = await run_crmhooks(kafka, overrides, tmp_path)
    assert status == 1, stderr
    assert took_s < 15.0, stderr
    line = the_error_line(stderr)
    assert line.startswith("crmhooks: Kafka at 127.0.0.1:"), stderr
    assert "TLS certificate not trusted" in line
    assert kafka.sasl_password not in stderr
