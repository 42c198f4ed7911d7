"""Network addresses in the config: webhook URLs, hosts, the proxy, the admin listener, CIDRs.

Each function returns the problems of one value as messages (no item path):
the callers name the item. A URL that passes can be sent: its host is a DNS
name or an IP literal that every client reads the same way (SPEC §3).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from urllib.parse import SplitResult, urlsplit

from crmhooks.settings import Network

# C0 and C1 controls and DEL: they would split a request line or a header (SPEC §6).
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# RFC 3986 userinfo: unreserved, sub-delims, ":" and percent-encoded octets.
_USERINFO_RE = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:]|%[0-9A-Fa-f]{2})*")
# Underscores are not LDH, but real internal hosts (container and service names)
# have them, and resolvers and HTTP clients accept them.
_ASCII_LABEL_RE = re.compile(r"[a-z0-9_-]{1,63}")
# WHATWG URL reads a host whose last label is a number (decimal, or 0x hex) as an
# IPv4 address (``0x7f.1`` is 127.0.0.1): allowed only as a plain dotted quad.
_NUMERIC_LABEL_RE = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")
_MAX_HOST_CHARS = 253  # RFC 1035, in its ASCII (IDNA) form
_IDNA_LETTERS = ("L", "M", "N")  # Unicode categories allowed in a label, besides "-"


def url_problems(url: str, *, placeholders: bool) -> list[str]:
    """Why ``url`` cannot be a webhook's (or a token endpoint's) URL; [] when it can.

    ``placeholders``: the URL is a template (placeholders and references are
    allowed in the path and query, never in the scheme, host or port).
    """
    if CONTROL_RE.search(url):
        return ["contains control characters"]
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:
        return [f"not a valid URL: {exc}"]
    if parts.scheme.lower() not in ("http", "https") or "${" in parts.scheme:
        return ["must be an absolute http:// or https:// URL"]
    if "${" in parts.netloc:
        if not placeholders:
            return ["must not hold ${...}"]
        return [
            "placeholders are not allowed in the scheme, host or port "
            "(credentials: use [webhooks.auth] type = basic)"
        ]
    return authority_problems(parts)


def authority_problems(parts: SplitResult) -> list[str]:
    """The userinfo, host and port of a split URL."""
    netloc = parts.netloc
    if "\\" in netloc:
        return ["a backslash in the host part (some clients read it as '/')"]
    userinfo, at, hostport = netloc.rpartition("@")
    if at and not _USERINFO_RE.fullmatch(userinfo):
        return ["the user name or password must be percent-encoded (RFC 3986)"]
    try:
        port = parts.port
    except ValueError as exc:
        return [f"not a valid URL: {str(exc).lower()}"]
    if port == 0:
        return ["not a valid URL: port 0"]
    if hostport.startswith("["):
        literal = hostport[1:].partition("]")[0]
        return [] if _is_ipv6(literal) else [f"host [{literal}] is not an IPv6 address"]
    host = parts.hostname
    if not host:
        return ["has no host"]
    problem = host_problem(host)
    return [] if problem is None else [problem]


def _is_ipv6(text: str) -> bool:
    if "%" in text:  # a zone id (fe80::1%eth0) names an interface of this machine
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def host_problem(host: str) -> str | None:
    """Why ``host`` (no brackets, any case) is not a DNS name or an IPv4 literal."""
    name = host.lower()
    labels = name.removesuffix(".").split(".")
    if _NUMERIC_LABEL_RE.fullmatch(labels[-1]):
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return f"host {host!r} is neither a dotted IPv4 address nor a DNS name"
        return None
    ascii_length = len(labels) - 1
    for label in labels:
        if label.isascii():
            if not _ASCII_LABEL_RE.fullmatch(label):
                return f"host {host!r} is not a valid DNS name (label {label!r})"
            ascii_length += len(label)
            continue
        if any(unicodedata.category(c)[0] not in _IDNA_LETTERS and c != "-" for c in label):
            return f"host {host!r} has a character that is not allowed in a DNS name"
        try:
            encoded = label.encode("idna")  # as crmhooks.delivery encodes it
        except UnicodeError:
            return f"host {host!r} is not a valid internationalised domain name"
        if not 0 < len(encoded) <= 63:
            return f"host {host!r} is not a valid DNS name (label {label!r})"
        ascii_length += len(encoded)
    if ascii_length > _MAX_HOST_CHARS:
        return f"host name longer than {_MAX_HOST_CHARS} characters"
    return None


def proxy_problems(proxy: str) -> list[str]:
    """``[delivery] proxy``: "" or ``http://host:port`` (no credentials, no path)."""
    if not proxy:
        return []
    if CONTROL_RE.search(proxy):
        return ["contains control characters"]
    try:
        parts = urlsplit(proxy)
        port = parts.port
    except ValueError as exc:
        return [f"not a valid URL: {str(exc).lower()}"]
    if parts.scheme.lower() != "http":
        return ['must be "" or an http:// URL such as "http://proxy.internal:3128"']
    if "@" in parts.netloc:
        return ["proxy credentials are not supported"]
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return ["must be http://host:port, with no path or query"]
    if port is None:
        return ["needs a port (http://host:port)"]
    return authority_problems(parts)


_LISTEN_RE = re.compile(r"(?P<host>\[[^\]]*\]|[^:\[\]]+):(?P<port>[0-9]{1,5})")


def listen_problem(listen: str) -> str | None:
    """``[admin] listen``: "" (off) or ``host:port`` (``[::1]:9464`` for IPv6; port 0: any free)."""
    if not listen:
        return None
    match = _LISTEN_RE.fullmatch(listen)
    if match is None:
        return 'must be "" or host:port, such as "127.0.0.1:9464"'
    if int(match["port"]) > 65535:
        return f"port {match['port']} is out of range (0 to 65535)"
    host = match["host"]
    if host.startswith("["):
        return None if _is_ipv6(host[1:-1]) else f"host {host} is not an IPv6 address"
    return host_problem(host)


def network(text: str) -> Network | str:
    """A CIDR network (``10.20.0.0/16``), or why ``text`` is not one."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        return f"not a CIDR network: {exc}"
