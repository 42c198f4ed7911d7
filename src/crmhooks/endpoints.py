"""What the transport needs per webhook besides the request: signing secret, auth,
TLS, and the secrets to keep out of every text it writes.

The processor builds one ``Endpoint`` per webhook and config snapshot and passes
it with each ``Transport.send``; everything costly (the SSL context, the list of
texts to scrub) is made then, once, not per delivery.
"""

from __future__ import annotations

import functools
import os
import re
import ssl
from dataclasses import dataclass, field
from urllib.parse import quote, quote_plus

from crmhooks.auth import Auth

# Shorter values are not scrubbed: a secret of 1-3 characters is guessed in no
# time anyway, and replacing every "a" or "40" would make each text unreadable.
MIN_SCRUB_CHARS = 4
SCRUBBED = "***"
# Characters a receiver could use to forge or hide log lines and terminal output:
# C0 controls (CR, LF, NUL, ESC, ...), DEL, C1 controls, the Unicode line and
# paragraph separators, and the bidirectional overrides ("Trojan Source").
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED_ESCAPES = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


@dataclass(frozen=True, slots=True)
class ClientTls:
    """TLS towards one receiver: a client certificate (mutual TLS), a private CA.

    ``client_key_file`` may be omitted when the certificate file holds the key.
    Without ``ca_file`` the receiver's certificate is checked against the system
    store; with it, against that CA only. Verification is never turned off.
    Made once per config snapshot: it builds (or finds in a cache, keyed by the
    files' paths and modification times) the ``ssl.SSLContext``, so a renewed
    certificate is used from the next config reload on. ValueError names a file
    that cannot be read or used.
    """

    client_cert_file: str | None = None
    client_key_file: str | None = None
    ca_file: str | None = None
    context: ssl.SSLContext = field(init=False, repr=False, compare=False)
    # Connections are pooled by origin and this: one made with another client
    # certificate or CA is never reused. A context lives as long as a connection
    # made with it (the connection refers to it), so its id stays unique meanwhile.
    identity: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.client_key_file and not self.client_cert_file:
            raise ValueError("client_key_file without client_cert_file")
        if not (self.client_cert_file or self.ca_file):
            raise ValueError("neither client_cert_file nor ca_file")
        context = _receiver_context(
            self.client_cert_file or None,
            self.client_key_file or None,
            self.ca_file or None,
            _signature(self.client_cert_file, self.client_key_file, self.ca_file),
        )
        object.__setattr__(self, "context", context)
        object.__setattr__(self, "identity", f"tls{id(context)}")


def token_endpoint_context(tls: ClientTls | None) -> ssl.SSLContext | None:
    """The context for a webhook's OAuth2 token endpoint; None: the system store.

    The token endpoint is checked against the system store and, when the webhook
    has one, its private CA too (a public token server for a private receiver,
    or both private); the receiver's client certificate is not offered to it.
    """
    if tls is None or not tls.ca_file:
        return None
    return _token_context(tls.ca_file, _signature(tls.ca_file))


def _signature(*paths: str | None) -> tuple[tuple[int, int, int], ...]:
    """What tells a changed file from the one a cached context was built from."""
    stamps: list[tuple[int, int, int]] = []
    for path in paths:
        if not path:
            stamps.append((0, 0, 0))
            continue
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
        stamps.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
    return tuple(stamps)


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal, blocking the process.
    raise ValueError("the private key is encrypted; give it without a passphrase")


# Building a context reads and parses the files (and the system store: ~ms).
@functools.lru_cache(maxsize=64)
def _receiver_context(
    cert: str | None, key: str | None, ca: str | None, signature: object
) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"ca_file {ca}: {_reason(exc)}") from None
    _strict(context)
    if cert is not None:
        try:
            context.load_cert_chain(cert, key, password=_no_password)
        except (OSError, ssl.SSLError) as exc:
            files = cert if key is None else f"{cert} / {key}"
            raise ValueError(f"client certificate {files}: {_reason(exc)}") from None
    return context


@functools.lru_cache(maxsize=16)
def _token_context(ca: str, signature: object) -> ssl.SSLContext:
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"ca_file {ca}: {_reason(exc)}") from None
    _strict(context)
    return context


def _strict(context: ssl.SSLContext) -> None:
    # create_default_context's own settings; stated, so no later change can relax them.
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Everything per webhook the transport needs besides the rendered request.

    ``secret``: Standard Webhooks signing key (``whsec_…``). ``auth``: the
    ``Authorization`` to send (it replaces a template's and the URL's user:pass).
    ``tls``: client certificate and private CA. ``scrub``: secret values (from
    ``${env:}``/``${file:}``, header values, custom parameters, ...) that no text
    the transport writes may contain, even when the receiver echoes them; the
    auth and signing secrets are added by the endpoint itself.
    """

    secret: str | None = field(default=None, repr=False)
    auth: Auth | None = None
    tls: ClientTls | None = None
    scrub: frozenset[str] = field(default=frozenset(), repr=False)
    # Every text to replace by ***, encoded forms too, the longest first: made once.
    secrets: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = set(self.scrub)
        if self.secret is not None:
            values.add(self.secret)
        if self.auth is not None:
            values.update(self.auth.secrets)
        object.__setattr__(self, "secrets", scrub_list(values))

    def __repr__(self) -> str:
        signed = "signed" if self.secret is not None else "unsigned"
        auth = type(self.auth).__name__ if self.auth is not None else "no auth"
        return f"Endpoint({signed}, {auth}, tls={self.tls!r})"


def scrub_list(values: set[str] | frozenset[str]) -> tuple[str, ...]:
    """The texts to scrub for ``values``: each as is and URL-encoded, the longest first."""
    texts: set[str] = set()
    for value in values:
        if len(value) < MIN_SCRUB_CHARS:
            continue
        texts.update((value, quote(value, safe=""), quote_plus(value, safe="")))
    return tuple(sorted(texts, key=len, reverse=True))


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every one of ``secrets`` (from ``scrub_list``) shown as ***."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, SCRUBBED)
    return text


# The endpoint of a webhook with no secret, auth or TLS options.
PLAIN = Endpoint()


@functools.lru_cache(maxsize=1024)
def signing_only(secret: str | None) -> Endpoint:
    """The endpoint of a webhook with at most a signing secret, made once per secret."""
    return PLAIN if secret is None else Endpoint(secret=secret)


def escape_controls(text: str) -> str:
    """``text`` with control characters written as escapes (``\\r``, ``\\x1b``, ...).

    Applied to what a receiver sends back before it enters an outcome's error,
    so that no log line or terminal showing it can be split or recoloured.
    """
    if _CONTROLS.search(text) is None:
        return text
    return _CONTROLS.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
