"""``[[webhooks]]``: the checks of one decoded webhook, and the Webhook value it becomes."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping

from crmhooks.config.context import Context
from crmhooks.config.network import CONTROL_RE, url_problems
from crmhooks.config.problems import join
from crmhooks.config.references import NOT_HERE, has_reference
from crmhooks.config.shapes import (
    AuthShape,
    BasicAuthShape,
    BearerAuthShape,
    BodyShape,
    OAuth2AuthShape,
    TlsShape,
    WebhookShape,
)
from crmhooks.modules import UNSUPPORTED_MODULES
from crmhooks.settings import (
    AuthSpec,
    BasicAuth,
    BearerAuth,
    BodySpec,
    OAuth2Auth,
    TlsSpec,
    Webhook,
)

_NAME_RE = re.compile(r"[A-Za-z0-9]+")
_PARAM_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# RFC 7230 §3.2.6 token: what a header name may be.
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A ${Module.Field} placeholder (not a secret reference) in a literal.
_PLACEHOLDER_RE = re.compile(r"\$\{(?!env:|file:)[^}]*\}")
_SECRET_PREFIX = "whsec_"

# Headers crmhooks owns (lower case), and why a webhook may not set them.
_RESERVED_HEADERS: Mapping[str, str] = {
    "host": "crmhooks sets it from the URL",
    "content-length": "crmhooks sets it from the body",
    "transfer-encoding": "crmhooks sends a body of known length",
    "connection": "crmhooks manages its connections",
    # Hop-by-hop headers (RFC 7230 §6.1) and what only a proxy may see.
    "keep-alive": "crmhooks manages its connections",
    "upgrade": "crmhooks speaks HTTP/1.1 only",
    "te": "crmhooks sends a body of known length",
    "trailer": "crmhooks sends no trailers",
    "proxy-authorization": "it would go to the proxy, not the receiver",
    "proxy-connection": "crmhooks manages its connections",
    # The response is read as sent: a compressed one would not be understood.
    "accept-encoding": "crmhooks reads responses uncompressed",
    # A receiver answering 100-continue would stall the request.
    "expect": "crmhooks sends the body at once",
}


def build_webhook(label: str, shape: WebhookShape, ctx: Context) -> Webhook | None:
    """Every check of one webhook (each problem named under ``label``); None if any failed."""
    before = len(ctx.problems)
    add = ctx.problems.add
    limits = ctx.limits
    if not _NAME_RE.fullmatch(shape.name) or len(shape.name) > limits.name_chars:
        add(
            join(label, "name"),
            f"must be 1 to {limits.name_chars} letters or digits (A-Z, a-z, 0-9)",
        )
    if len(shape.description) > limits.description_chars:
        add(join(label, "description"), f"longer than {limits.description_chars} characters")
    if has_reference(shape.description):
        add(join(label, "description"), NOT_HERE)
    if len(shape.url) > limits.url_chars:
        add(join(label, "url"), f"longer than {limits.url_chars} characters")
    for message in url_problems(shape.url, placeholders=True):
        add(join(label, "url"), message)
    method = shape.method.upper()
    if method not in ("POST", "GET"):
        add(join(label, "method"), "must be POST or GET")
    module = check_module(join(label, "module"), shape.module, ctx)
    org = check_org(label, shape.org, ctx)
    env_values: dict[str, str] = {}
    refs = ctx.references
    refs.collect(join(label, "url"), shape.url, env_values)
    secret = _secret(join(label, "secret"), shape.secret, ctx)
    body = _body(join(label, "body"), shape.body, ctx, env_values)
    entity = _entity_params(label, shape.entity_params, ctx, env_values)
    custom, secret_params = _custom_params(label, shape.custom_params, ctx)
    headers = _headers(label, shape, ctx, env_values)
    auth = _auth(join(label, "auth"), shape.auth, ctx, env_values)
    tls = _tls(join(label, "tls"), shape.tls, ctx)
    names = [*entity, *custom, *([body.param] if body and body.param else [])]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        add(label, f"parameter {dup!r} is defined more than once")
    if len(ctx.problems) > before or module is None or method not in ("POST", "GET"):
        return None
    return Webhook(
        name=shape.name,
        url=shape.url,
        module=module,
        method="GET" if method == "GET" else "POST",
        description=shape.description,
        org=org,
        secret=secret,
        body=body,
        entity_params=entity,
        custom_params=custom,
        secret_params=frozenset(secret_params),
        headers=headers,
        auth=auth,
        tls=tls,
        env_values=env_values,
    )


def check_module(path: str, name: str, ctx: Context) -> str | None:
    """The canonical name of the supported module ``name``; None (and an error) otherwise."""
    if name in UNSUPPORTED_MODULES or f"{name}s" in UNSUPPORTED_MODULES:
        ctx.problems.add(path, f"the CRM does not allow webhooks on {name} records")
        return None
    canonical = ctx.catalog.canonical(name)
    if canonical is None or not ctx.catalog.is_supported(canonical):
        ctx.problems.add(path, f"unknown module {name!r}")
        return None
    return canonical


def check_org(label: str, org: str | None, ctx: Context) -> str | None:
    """The item's organisation: a known one; in a document, the document's."""
    path = join(label, "org")
    if ctx.document_org is not None:
        if org is not None and org != ctx.document_org:
            ctx.problems.add(path, f"the document is organisation {ctx.document_org!r}")
        return ctx.document_org
    if org is not None and org not in ctx.org_ids:
        ctx.problems.add(path, f"unknown organisation {org!r} (not in [[orgs]])")
    return org


def _secret(path: str, raw: str | None, ctx: Context) -> str | None:
    if raw is None:
        return None
    before = len(ctx.problems)
    secret, _ = ctx.references.resolve(path, raw)
    if len(ctx.problems) > before:
        return None
    key = secret.removeprefix(_SECRET_PREFIX) if secret.startswith(_SECRET_PREFIX) else None
    try:
        # Standard Webhooks secrets are base64, often without padding.
        decoded = (
            None if key is None else base64.b64decode(key + "=" * (-len(key) % 4), validate=True)
        )
    except (binascii.Error, ValueError):
        decoded = None
    if not decoded:
        ctx.problems.add(path, "must be a Standard Webhooks secret: 'whsec_' + base64")
        return None
    return secret


def _body(
    path: str, shape: BodyShape | None, ctx: Context, env_values: dict[str, str]
) -> BodySpec | None:
    if shape is None:
        return None
    if shape.param is not None and not _PARAM_NAME_RE.fullmatch(shape.param):
        ctx.problems.add(join(path, "param"), "must be an identifier (letters, digits, _)")
    ctx.references.collect(join(path, "template"), shape.template, env_values)
    return BodySpec(format=shape.format, template=shape.template, param=shape.param)


def _param_names_ok(path: str, params: Mapping[str, str], ctx: Context) -> bool:
    ok = True
    for key in params:
        if not key.strip():
            ctx.problems.add(path, "parameter name must not be empty")
            ok = False
        elif CONTROL_RE.search(key):
            ctx.problems.add(join(path, key), "name contains control characters")
            ok = False
    return ok


def _entity_params(
    label: str, params: Mapping[str, str], ctx: Context, env_values: dict[str, str]
) -> dict[str, str]:
    path = join(label, "entity_params")
    _param_names_ok(path, params, ctx)
    for key, text in params.items():
        if len(text) > ctx.limits.entity_param_chars:
            ctx.problems.add(
                join(path, key), f"longer than {ctx.limits.entity_param_chars} characters"
            )
        ctx.references.collect(join(path, key), text, env_values)
    return dict(params)


def _custom_params(
    label: str, params: Mapping[str, str], ctx: Context
) -> tuple[dict[str, str], set[str]]:
    """Custom parameters are literals: references resolved, CRM placeholders refused."""
    path = join(label, "custom_params")
    _param_names_ok(path, params, ctx)
    custom: dict[str, str] = {}
    from_references: set[str] = set()
    for key, text in params.items():
        if _PLACEHOLDER_RE.search(text):
            ctx.problems.add(
                join(path, key),
                "custom parameters are literals (or ${env:NAME}, ${file:PATH}); "
                "put CRM fields in entity_params",
            )
        custom[key], found = ctx.references.resolve(join(path, key), text)
        if found:
            from_references.add(key)
    return custom, from_references


def _headers(
    label: str, shape: WebhookShape, ctx: Context, env_values: dict[str, str]
) -> dict[str, str]:
    """Header name → template. Names are tokens crmhooks does not own; values one line."""
    path = join(label, "headers")
    seen: set[str] = set()
    for name, value in shape.headers.items():
        p = join(path, name)
        lower = name.lower()
        if not _TOKEN_RE.fullmatch(name):
            ctx.problems.add(p, "not a valid header name (RFC 7230 token)")
        elif lower in _RESERVED_HEADERS:
            ctx.problems.add(p, f"may not be set: {_RESERVED_HEADERS[lower]}")
        elif lower.startswith("webhook-"):
            ctx.problems.add(p, "may not be set: crmhooks sends the webhook-* headers")
        elif lower == "authorization" and shape.auth is not None:
            ctx.problems.add(p, "may not be set together with [webhooks.auth]")
        elif lower == "content-type" and (shape.body is None or shape.body.param is not None):
            # A form body (or none) has its own type; only a raw document's may change.
            ctx.problems.add(p, "may be set only for a raw body (a body without param)")
        elif lower in seen:
            ctx.problems.add(p, "header set more than once (names ignore case)")
        seen.add(lower)
        if CONTROL_RE.search(value.replace("\t", " ")):
            ctx.problems.add(p, "contains control characters")
        ctx.references.collect(p, value, env_values)
    return dict(shape.headers)


def _auth(
    path: str, shape: AuthShape | None, ctx: Context, env_values: dict[str, str]
) -> AuthSpec | None:
    """Every auth field resolved in place; a value that came from a reference is a secret."""
    if shape is None:
        return None

    def field(key: str, text: str) -> str:
        # A value from a reference is a secret: it joins env_values (secret_values).
        resolved, _ = ctx.references.resolve(join(path, key), text, env_values)
        if CONTROL_RE.search(resolved):
            ctx.problems.add(join(path, key), "contains control characters")
        return resolved

    if isinstance(shape, BasicAuthShape):
        username = field("username", shape.username)
        if ":" in username:
            ctx.problems.add(join(path, "username"), "must not contain ':' (RFC 7617)")
        return BasicAuth(username=username, password=field("password", shape.password))
    if isinstance(shape, BearerAuthShape):
        return BearerAuth(token=field("token", shape.token))
    assert isinstance(shape, OAuth2AuthShape)
    token_url = field("token_url", shape.token_url)
    for message in url_problems(token_url, placeholders=False):
        ctx.problems.add(join(path, "token_url"), message)
    return OAuth2Auth(
        token_url=token_url,
        client_id=field("client_id", shape.client_id),
        client_secret=field("client_secret", shape.client_secret),
        scope=field("scope", shape.scope),
        audience=field("audience", shape.audience),
    )


def _tls(path: str, shape: TlsShape | None, ctx: Context) -> TlsSpec | None:
    if shape is None:
        return None
    for key in ("client_cert_file", "client_key_file", "ca_file"):
        if has_reference(getattr(shape, key)):
            ctx.problems.add(join(path, key), NOT_HERE)
            return None
    ctx.files.cert_and_key(
        path, "client_cert_file", shape.client_cert_file, "client_key_file", shape.client_key_file
    )
    if shape.ca_file:
        ctx.files.ca_file(join(path, "ca_file"), shape.ca_file)
    return TlsSpec(
        client_cert_file=shape.client_cert_file,
        client_key_file=shape.client_key_file,
        ca_file=shape.ca_file,
    )
