"""Standard Webhooks signatures, checked with the reference ``standardwebhooks`` package."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from crmhooks.clock import FakeClock
from crmhooks.config import DeliverySettings
from crmhooks.delivery import HttpTransport
from crmhooks.endpoints import Endpoint
from crmhooks.signing import secret_key, sign
from crmhooks.templates import RenderedRequest

KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()


class Receiver:
    """Records the headers and raw body of every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self.server = TestServer(app, host="127.0.0.1", port=0)

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        return web.Response(status=500 if len(self.requests) == 1 else 200)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/hook"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    await rec.server.start_server()
    try:
        yield rec
    finally:
        await rec.server.close()


async def test_signature_verifies_across_a_retry(receiver: Receiver) -> None:
    # standardwebhooks rejects timestamps more than 5 minutes from the real time.
    clock = FakeClock(time.time_ns() // 1_000_000)
    body = '{"deal": "Big deal", "amount": 25000, "note": "ü"}'.encode()
    request = RenderedRequest(
        "POST",
        receiver.url(),
        # A template header of the same name must not survive.
        {"Content-Type": "application/json", "webhook-signature": "v1,forged"},
        body,
        receiver.url(),
    )
    settings = DeliverySettings(allow_private_networks=True, total_timeout_s=2.0)
    async with HttpTransport(settings, clock) as transport:
        first = await transport.send("evt-1:rule:Hook", request, Endpoint(secret=SECRET))
        clock.advance(2_000)  # the retry, later
        second = await transport.send("evt-1:rule:Hook", request, Endpoint(secret=SECRET))
    assert (first.error_class, second.error_class) == ("server_error", None)

    (h1, b1), (h2, b2) = receiver.requests
    assert b1 == b2 == body
    assert h1["webhook-id"] == h2["webhook-id"] == "evt-1:rule:Hook"
    assert int(h2["webhook-timestamp"]) == int(h1["webhook-timestamp"]) + 2
    assert h1["webhook-signature"] != h2["webhook-signature"]
    hook = Webhook(SECRET)
    assert hook.verify(b1, h1) == {"deal": "Big deal", "amount": 25000, "note": "ü"}
    assert hook.verify(b2, h2) is not None
    with pytest.raises(WebhookVerificationError):
        hook.verify(b1 + b" ", h1)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"another key").decode()).verify(b1, h1)
    with pytest.raises(WebhookVerificationError):
        hook.verify(b1, {**h1, "webhook-id": "evt-2:rule:Hook"})


def test_known_vector() -> None:
    # The example of the Standard Webhooks specification (spec/standard-webhooks.md).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    msg_id = "msg_p5jXN8AQM9LWM0D4loKWxJek"
    body = b'{"test": 2432232314}'
    assert sign(secret, msg_id, 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


@given(
    key=st.binary(min_size=1, max_size=64),
    msg_id=st.text(min_size=1, max_size=40),
    timestamp_s=st.integers(min_value=0, max_value=4_000_000_000),
    body=st.text(max_size=200),
    prefixed=st.booleans(),
    padded=st.booleans(),
)
def test_matches_the_reference_implementation(
    key: bytes, msg_id: str, timestamp_s: int, body: str, prefixed: bool, padded: bool
) -> None:
    encoded = base64.b64encode(key).decode()
    if not padded:
        encoded = encoded.rstrip("=")
    secret = ("whsec_" if prefixed else "") + encoded
    reference = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp_s, UTC), body)
    assert sign(secret, msg_id, timestamp_s, body.encode()) == reference
    assert secret_key(secret) == key


@pytest.mark.parametrize("secret", ["whsec_", "", "whsec_not base64!", "whsec_a", "whsec_####"])
def test_invalid_secrets(secret: str) -> None:
    with pytest.raises(ValueError, match="signing secret"):
        sign(secret, "id", 1, b"")
