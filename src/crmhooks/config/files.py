"""TLS files named by the config: they must exist and parse, as the ssl module will load them."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from crmhooks.config.problems import Problems, join

# A problem found in a file: ("ca" | "cert" | "key", message).
_Found = tuple[str, str] | None


class _EncryptedKey(Exception):
    """Raised by the password callback: OpenSSL asks for one only for an encrypted key."""


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal: never in a server.
    raise _EncryptedKey


class FileChecks:
    """Checks CA files and certificate/key pairs; each file is parsed once per load.

    Errors name the key and the path, never a password or the file's content.
    """

    __slots__ = ("_cache", "_problems")

    def __init__(self, problems: Problems) -> None:
        self._problems = problems
        self._cache: dict[tuple[str, ...], _Found] = {}

    def ca_file(self, path: str, file: str) -> None:
        """``file`` holds at least one PEM CA certificate."""
        found = self._cached(("ca", file), lambda: _ca_problem(file))
        if found is not None:
            self._problems.add(path, found[1])

    def cert_and_key(self, section: str, cert_key: str, cert: str, key_key: str, key: str) -> None:
        """Both set or both empty; when set, a PEM certificate and its unencrypted key."""
        if bool(cert) != bool(key):
            missing, present = (key_key, cert_key) if cert else (cert_key, key_key)
            self._problems.add(join(section, missing), f"required with {present}")
            return
        if not cert:
            return
        found = self._cached(("pair", cert, key), lambda: _pair_problem(cert, key))
        if found is not None:
            which, message = found
            self._problems.add(join(section, cert_key if which == "cert" else key_key), message)

    def _cached(self, key: tuple[str, ...], check: Callable[[], _Found]) -> _Found:
        if key not in self._cache:
            self._cache[key] = check()
        return self._cache[key]


def _unreadable(file: str) -> str | None:
    try:
        with Path(file).open("rb") as f:
            f.read(1)
    except OSError as exc:
        return f"cannot read {file}: {exc.strerror or exc}"
    return None


def _ca_problem(file: str) -> _Found:
    problem = _unreadable(file)
    if problem is not None:
        return "ca", problem
    try:
        ssl.create_default_context(cafile=file)
    except ssl.SSLError as exc:
        return "ca", f"{file} holds no PEM CA certificate ({exc.reason or exc})"
    return None


def _pair_problem(cert: str, key: str) -> _Found:
    for which, file in (("cert", cert), ("key", key)):
        problem = _unreadable(file)
        if problem is not None:
            return which, problem
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:
        return "cert", f"{cert} holds no PEM certificate ({exc.reason or exc})"
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        return "key", f"{key} is encrypted; crmhooks needs an unencrypted PEM key"
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "key", f"{key} is not the key of the certificate in {cert}"
        return "key", f"{key} holds no PEM private key ({exc.reason or exc})"
    return None
