"""Mutual TLS and private CAs against real TLS receivers on 127.0.0.1 (a CA made at test time)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from crmhooks.clock import FakeClock
from crmhooks.config import DeliverySettings
from crmhooks.delivery import HttpTransport
from crmhooks.endpoints import PLAIN, ClientTls, Endpoint
from crmhooks.templates import RenderedRequest
from tests.net_support import Pki, make_pki, recorder

NOW_MS = 1_764_320_400_000


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def settings() -> DeliverySettings:
    return DeliverySettings(allow_private_networks=True, connect_timeout_s=2.0, total_timeout_s=3.0)


def post(url: str) -> RenderedRequest:
    return RenderedRequest("POST", url, {}, b"{}", url)


async def test_mutual_tls_with_the_client_certificate(pki: Pki) -> None:
    tls = ClientTls(pki.client_cert_file, pki.client_key_file, pki.ca_file)
    context = pki.server_context(require_client_cert=True)
    async with recorder(tls=context) as rec, HttpTransport(settings(), FakeClock(NOW_MS)) as t:
        url = f"https://127.0.0.1:{rec.port}/hook"
        for n in range(3):
            assert (await t.send(f"a{n}", post(url), Endpoint(tls=tls))).delivered
        assert t.connections_opened == 1
    peer = rec.seen[0].peer_cert
    assert peer is not None
    assert "crmhooks-client@example.test" in str(peer["subjectAltName"])


async def test_a_webhook_without_the_certificate_is_refused(pki: Pki) -> None:
    """The receiver requires a client certificate: a TLS connection_error, nothing delivered."""
    context = pki.server_context(require_client_cert=True)
    async with recorder(tls=context) as rec, HttpTransport(settings(), FakeClock(NOW_MS)) as t:
        url = f"https://127.0.0.1:{rec.port}/hook"
        outcome = await t.send("a", post(url), Endpoint(tls=ClientTls(ca_file=pki.ca_file)))
    assert outcome.error_class == "connection_error"
    assert outcome.error is not None
    # TLS 1.3: the server checks the certificate after the handshake and closes
    # (asyncio's loop); or the alert reaches us as a TLS error (uvloop).
    assert outcome.error.startswith(
        ("server closed the new TLS connection before responding", "TLS error:")
    ), outcome.error
    assert rec.seen == []


async def test_connections_are_never_shared_across_tls_identities(pki: Pki) -> None:
    """A webhook without the client certificate must not ride a connection made with it."""
    with_cert = Endpoint(tls=ClientTls(pki.client_cert_file, pki.client_key_file, pki.ca_file))
    without = Endpoint(tls=ClientTls(ca_file=pki.ca_file))
    context = pki.server_context(require_client_cert=True)
    async with recorder(tls=context) as rec, HttpTransport(settings(), FakeClock(NOW_MS)) as t:
        url = f"https://127.0.0.1:{rec.port}/hook"
        assert (await t.send("a1", post(url), with_cert)).delivered  # now idle in the pool
        refused = await t.send("a2", post(url), without)
        assert refused.error_class == "connection_error"
        assert (await t.send("a3", post(url), with_cert)).delivered
        assert t.connections_opened == 2  # a1's connection served a3
    assert [s.headers["webhook-id"] for s in rec.seen] == ["a1", "a3"]


async def test_the_private_ca_is_needed_and_the_system_store_is_the_default(pki: Pki) -> None:
    context = pki.server_context(require_client_cert=False)
    async with recorder(tls=context) as rec, HttpTransport(settings(), FakeClock(NOW_MS)) as t:
        url = f"https://127.0.0.1:{rec.port}/hook"
        untrusted = await t.send("a", post(url), PLAIN)
        trusted = await t.send("b", post(url), Endpoint(tls=ClientTls(ca_file=pki.ca_file)))
    assert untrusted.error_class == "connection_error"
    assert untrusted.error is not None
    assert untrusted.error.startswith("TLS certificate error:")
    assert trusted.delivered


async def test_the_certificate_names_the_host(tmp_path: Path) -> None:
    """Verification is never off: a certificate for another name is refused."""
    pki = make_pki(tmp_path, "other.example")
    context = pki.server_context(require_client_cert=False)
    async with recorder(tls=context) as rec, HttpTransport(settings(), FakeClock(NOW_MS)) as t:
        url = f"https://127.0.0.1:{rec.port}/hook"
        outcome = await t.send("a", post(url), Endpoint(tls=ClientTls(ca_file=pki.ca_file)))
    assert outcome.error_class == "connection_error"
    assert outcome.error is not None
    assert "TLS certificate error" in outcome.error
    assert "127.0.0.1" in outcome.error


def test_contexts_are_built_once_per_file_set_and_again_when_a_file_changes(pki: Pki) -> None:
    first = ClientTls(pki.client_cert_file, pki.client_key_file, pki.ca_file)
    second = ClientTls(pki.client_cert_file, pki.client_key_file, pki.ca_file)
    assert first.context is second.context
    assert first.identity == second.identity
    assert ClientTls(ca_file=pki.ca_file).identity != first.identity
    context = first.context
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    renewed = pki.ca.issue_cert("crmhooks-client@example.test")
    Path(pki.client_cert_file).write_bytes(b"".join(b.bytes() for b in renewed.cert_chain_pems))
    Path(pki.client_key_file).write_bytes(renewed.private_key_pem.bytes())
    assert ClientTls(pki.client_cert_file, pki.client_key_file, pki.ca_file).context is not context


def test_unusable_files_are_named(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ValueError, match=r"missing\.pem: cannot read"):
        ClientTls(missing, None, pki.ca_file)
    with pytest.raises(ValueError, match=r"ca_file .*client\.key"):
        ClientTls(ca_file=pki.client_key_file)
    other = trustme.CA().issue_cert("x.test")
    wrong_key = tmp_path / "wrong.key"
    other.private_key_pem.write_to_path(str(wrong_key))
    with pytest.raises(ValueError, match=r"client certificate .*client\.pem / .*wrong\.key"):
        ClientTls(pki.client_cert_file, str(wrong_key))
    with pytest.raises(ValueError, match="client_key_file without client_cert_file"):
        ClientTls(client_key_file=pki.client_key_file)


def test_an_encrypted_key_is_refused_not_prompted_for(pki: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(pki.client_key_file).read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(ValueError, match="encrypted"):
        ClientTls(pki.client_cert_file, str(encrypted))
