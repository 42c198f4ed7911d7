"""An organisation's document as crmhooks shows it (``config get``, a dead letter of a
refused one): every secret as ``***`` (SPEC §3.1, §3.2), even in a document that
does not validate.

Secrets are found where a webhook keeps them, by key, whatever else is wrong with
the document: ``secret``, every ``custom_params`` value, every ``headers`` value
without a placeholder, the ``auth`` password, token and client secret, and the
password of a URL. Each such value is then masked wherever else it appears in the
document (a body template, a description), longest first, as ``store.fingerprint``
does; ``extra`` adds the values a decoded document knows (``secret_values``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

REDACTED = "***"
_AUTH_SECRETS = ("password", "token", "client_secret")


def document_secrets(raw: Any) -> set[str]:
    """The secret values a document's webhooks hold, found by key (see the docstring)."""
    found: set[str] = set()
    hooks = raw.get("webhooks") if isinstance(raw, Mapping) else None
    if not isinstance(hooks, list):
        return found
    for hook in hooks:
        if not isinstance(hook, Mapping):
            continue
        _add(found, hook.get("secret"))
        for key in ("custom_params", "headers"):
            params = hook.get(key)
            if isinstance(params, Mapping):
                for value in params.values():
                    if key == "custom_params" or (isinstance(value, str) and "${" not in value):
                        _add(found, value)
        auth = hook.get("auth")
        if isinstance(auth, Mapping):
            for key in _AUTH_SECRETS:
                _add(found, auth.get(key))
        url = hook.get("url")
        if isinstance(url, str):
            password = _url_password(url)
            _add(found, password)  # as written (percent-encoded) and as sent
            _add(found, None if password is None else unquote(password))
    return found


def masked_document(raw: Any, extra: Iterable[str] = ()) -> Any:
    """``raw`` (a parsed document) with every secret value as ``***``.

    Names are left as they are (the organisation's id, webhook names, rule ids, keys,
    modules, operators: ``_NAMES``): a secret that happens to be part of one (a
    custom parameter ``zc_ownername = "globex"`` in ``org-globex``) must not hide
    which document or item is shown. Every other string has each secret value masked
    wherever it appears in it."""
    secrets = tuple(sorted(document_secrets(raw) | {s for s in extra if s}, key=len, reverse=True))
    return _masked(raw, secrets, None)


def mask_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` as ``***`` (longest first)."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _add(found: set[str], value: Any) -> None:
    if isinstance(value, str) and value:
        found.add(value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        found.add(str(value))  # a number written where a string belongs: still secret


def _url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


# Keys whose values name things rather than hold data: never masked (see masked_document).
_NAMES = frozenset(
    {"id", "name", "module", "instant", "webhook", "org", "method", "format", "param",
     "type", "trigger", "repeat", "field", "op", "relative_to", "offset", "at", "time_zone",
     "fields"}
)  # fmt: skip


# Mappings whose keys are the tenant's own names (parameters, headers): none of their
# values is a name, whatever its key.
_DATA_MAPS = frozenset({"custom_params", "entity_params", "headers"})


def _masked(value: Any, secrets: tuple[str, ...], key: str | None, data: bool = False) -> Any:
    """``value`` masked; ``key``: the key it is found under (None in an array or at the
    top); ``data``: it is a value of one of ``_DATA_MAPS``."""
    if isinstance(value, str):
        if not data and key in _NAMES:
            return value
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, Mapping):
        inner = key in _DATA_MAPS
        return {str(k): _masked(v, secrets, str(k), inner) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v, secrets, key, data) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool) and str(value) in secrets:
        return REDACTED
    return value
