"""Standard Webhooks signatures: HMAC-SHA256 over ``{id}.{timestamp}.{body}`` with a whsec_ key."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

# Secrets are written "whsec_<base64 key>" (Standard Webhooks); the prefix is optional,
# as in the reference implementation.
SECRET_PREFIX = "whsec_"
# The only signature scheme of the specification's symmetric variant.
SCHEME = "v1"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret; ValueError if it is not non-empty base64."""
    encoded = secret.removeprefix(SECRET_PREFIX).strip()
    # The reference implementation accepts unpadded base64; so do we.
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("signing secret is not base64 (expected whsec_<base64>)") from None
    if not key:
        raise ValueError("signing secret is empty")
    return key


def sign(secret: str, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one request: ``v1,<base64 HMAC-SHA256>``.

    The signed content is ``{msg_id}.{timestamp_s}.`` followed by exactly the body
    bytes that are sent. ValueError if the secret is not valid.
    """
    content = f"{msg_id}.{timestamp_s}.".encode() + body
    digest = hmac.new(secret_key(secret), content, hashlib.sha256).digest()
    return f"{SCHEME},{base64.b64encode(digest).decode('ascii')}"
