"""The suspension's config fingerprint: changes with the config, never with a secret."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import orjson

from crmhooks.settings import BasicAuth, BearerAuth, BodySpec, OAuth2Auth, Rule, Webhook
from crmhooks.store import fingerprint
from crmhooks.store.suspensions import _canonical

SECRET = "whsec_" + "A" * 43
HOOK = Webhook(
    name="Hook",
    url="https://crm:url-pass-1@hooks.example.com/crm/${env:HOOK_PATH}",
    module="Potentials",
    secret=SECRET,
    body=BodySpec(format="json", template='{"deal": "${Potentials.Potential Name}"}'),
    entity_params={"id": "${Potentials.Potential Id}"},
    custom_params={"api_key": "k-123", "region": "eu"},
    secret_params=frozenset({"api_key", "region", "zone"}),
    headers={"X-Api-Key": "literal-key-1", "X-Deal": "${Potentials.Potential Name}"},
    auth=BasicAuth(username="crm", password="basic-pass-1"),
    env_values={"env:HOOK_PATH": "path-secret-1"},
)
RULE = Rule(id="rule", module="Potentials", instant="Hook")


def rotated(hook: Webhook, n: int) -> Webhook:
    """``hook`` with every secret value changed (the n-th rotation)."""
    return dataclasses.replace(
        hook,
        url=hook.url.replace("url-pass-1", f"url-pass-{n}"),
        secret="whsec_" + chr(ord("A") + n) * 43,
        custom_params={"api_key": f"k-{n}", "region": f"region-{n}"},
        headers={**hook.headers, "X-Api-Key": f"literal-key-{n}"},
        auth=BasicAuth(username="crm", password=f"basic-pass-{n}"),
        env_values={"env:HOOK_PATH": f"path-secret-{n}"},
    )


def test_no_secret_value_is_in_what_is_hashed() -> None:
    """Every value ``Webhook.secret_values`` names (what crmhooks scrubs from its
    output) is masked, wherever it stands: here in the URL, a header, the auth, a
    custom parameter, a reference's value, the signing secret."""
    secrets = tuple(sorted(HOOK.secret_values(), key=len, reverse=True))
    assert len(secrets) == 7
    text = orjson.dumps([_canonical(RULE, secrets), _canonical(HOOK, secrets)]).decode()
    assert [s for s in secrets if s in text] == []
    assert "https://crm:***@hooks.example.com/crm/${env:HOOK_PATH}" in text


def test_secrets_do_not_change_it_and_every_other_part_does() -> None:
    base = fingerprint(RULE, HOOK)
    assert len(base) == 32  # a 16-digit fingerprint of an older version never equals one
    assert fingerprint(RULE, rotated(HOOK, 2)) == base
    for token_auth in (
        BearerAuth(token="token-1"),
        OAuth2Auth(token_url="https://auth.example.com/t", client_id="c", client_secret="s-1"),
    ):
        with_token = dataclasses.replace(HOOK, auth=token_auth)
        renewed = dataclasses.replace(
            HOOK,
            auth=dataclasses.replace(token_auth, token="token-2")
            if isinstance(token_auth, BearerAuth)
            else dataclasses.replace(token_auth, client_secret="s-2"),
        )
        assert fingerprint(RULE, renewed) == fingerprint(RULE, with_token) != base
    for changed in (
        dataclasses.replace(HOOK, url=HOOK.url.replace("/crm/", "/other/")),
        dataclasses.replace(HOOK, method="GET"),
        dataclasses.replace(HOOK, secret=None),  # having a secret at all counts
        dataclasses.replace(HOOK, entity_params={"id": "${Potentials.Amount}"}),
        dataclasses.replace(HOOK, headers={**HOOK.headers, "X-Deal": "${Potentials.Stage}"}),
        dataclasses.replace(HOOK, secret_params=frozenset({"api_key"})),
        dataclasses.replace(HOOK, auth=None),
    ):
        assert fingerprint(RULE, changed) != base, changed
    assert fingerprint(dataclasses.replace(RULE, fields=("Stage",)), HOOK) != base
    assert fingerprint(None, HOOK) != base
    assert fingerprint(RULE, None) != base


def test_it_is_the_same_in_every_process(tmp_path: Path) -> None:
    """Not ``repr``: a frozenset's order (``secret_params``) follows the string hash,
    which changes from one process to the next."""
    script = tmp_path / "fp.py"
    script.write_text(
        "from tests.test_fingerprint import HOOK, RULE\n"
        "from crmhooks.store import fingerprint\n"
        "print(fingerprint(RULE, HOOK))\n",
        encoding="utf-8",
    )
    root = Path(__file__).resolve().parent.parent
    found = set()
    for seed in ("1", "2", "3", "4"):
        env = {
            **os.environ,
            "PYTHONHASHSEED": seed,
            "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)]),
        }
        ran = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=env, check=True
        )
        found.add(ran.stdout.strip())
    assert found == {fingerprint(RULE, HOOK)}
