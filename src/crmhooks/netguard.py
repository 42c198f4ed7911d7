"""SSRF guard: which addresses a webhook may reach.

The guard resolves a URL's host itself, refuses the request if ANY address is
blocked, and hands the vetted addresses to the transport, which connects to
exactly those (``http1.Http1Pool.request(addresses=...)``): there is no second
DNS lookup in which a rebinding name could answer with 127.0.0.1. TLS SNI and
the Host header still use the host name.

The tables below are written out on purpose instead of trusting
``ipaddress.is_private``/``is_global``, whose answers changed between Python
versions and which do not look inside IPv4-mapped, NAT64, 6to4 or Teredo
addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Sequence
from typing import Protocol

from yarl import URL

from crmhooks.errors import DeliveryRefused

IPv4Net = ipaddress.IPv4Network
IPv6Net = ipaddress.IPv6Network
# ``[delivery] allowed_networks``: ranges an operator lets through the guard.
AllowedNetworks = Sequence[IPv4Net | IPv6Net]

# IPv4 ranges a webhook must never reach (IANA special-purpose registry, RFC 6890
# and successors). First match wins, so the more specific entries come first.
BLOCKED_V4: tuple[tuple[IPv4Net, str], ...] = (
    (IPv4Net("255.255.255.255/32"), "limited broadcast"),
    (IPv4Net("0.0.0.0/8"), "unspecified ('this network')"),
    (IPv4Net("10.0.0.0/8"), "private (RFC 1918)"),
    (IPv4Net("100.64.0.0/10"), "carrier-grade NAT shared space (RFC 6598)"),
    (IPv4Net("127.0.0.0/8"), "loopback"),
    (IPv4Net("169.254.0.0/16"), "link-local (cloud metadata lives here)"),
    (IPv4Net("172.16.0.0/12"), "private (RFC 1918)"),
    (IPv4Net("192.0.0.0/24"), "IETF protocol assignments (RFC 6890)"),
    (IPv4Net("192.0.2.0/24"), "documentation (TEST-NET-1)"),
    (IPv4Net("192.88.99.0/24"), "deprecated 6to4 relay anycast (RFC 7526)"),
    (IPv4Net("192.168.0.0/16"), "private (RFC 1918)"),
    (IPv4Net("198.18.0.0/15"), "benchmarking (RFC 2544)"),
    (IPv4Net("198.51.100.0/24"), "documentation (TEST-NET-2)"),
    (IPv4Net("203.0.113.0/24"), "documentation (TEST-NET-3)"),
    (IPv4Net("224.0.0.0/4"), "multicast"),
    (IPv4Net("240.0.0.0/4"), "reserved (class E)"),
)

# IPv6 forms that carry an IPv4 address: the verdict is the embedded address's.
MAPPED_V6 = IPv6Net("::ffff:0:0/96")  # IPv4-mapped (RFC 4291)
TRANSLATED_V6 = IPv6Net("::ffff:0:0:0/96")  # IPv4-translated (RFC 2765), deprecated
COMPATIBLE_V6 = IPv6Net("::/96")  # IPv4-compatible (RFC 4291), deprecated
NAT64_V6 = IPv6Net("64:ff9b::/96")  # well-known NAT64 prefix (RFC 6052)
SIXTOFOUR_V6 = IPv6Net("2002::/16")  # 6to4 (RFC 3056): v4 in bits 16..47
TEREDO_V6 = IPv6Net("2001::/32")  # Teredo (RFC 4380): server v4, obfuscated client v4

# Everything that can be routed on the IPv6 internet lies in 2000::/3; the few
# ranges inside it that are not receivers are listed in BLOCKED_V6.
GLOBAL_UNICAST_V6 = IPv6Net("2000::/3")

BLOCKED_V6: tuple[tuple[IPv6Net, str], ...] = (
    (IPv6Net("::/128"), "unspecified"),
    (IPv6Net("::1/128"), "loopback"),
    # Local-use NAT64 (RFC 8215): the operator picks where the v4 sits, and the
    # prefix is never global, so the whole range is refused.
    (IPv6Net("64:ff9b:1::/48"), "local-use NAT64 prefix (RFC 8215)"),
    (IPv6Net("100::/64"), "discard-only (RFC 6666)"),
    # 2001::/23 holds protocol assignments (benchmarking, ORCHID, AS112, AMT ...):
    # none of them is a webhook receiver. Teredo (2001::/32) is handled above by
    # its embedded addresses before this entry is reached.
    (IPv6Net("2001::/23"), "IETF protocol assignments (RFC 2928)"),
    (IPv6Net("2001:db8::/32"), "documentation"),
    (IPv6Net("3fff::/20"), "documentation (RFC 9637)"),
    (IPv6Net("5f00::/16"), "SRv6 segment identifiers (RFC 9602)"),
    (IPv6Net("fc00::/7"), "unique-local (RFC 4193)"),
    (IPv6Net("fe80::/10"), "link-local"),
    (IPv6Net("fec0::/10"), "site-local (deprecated)"),
    (IPv6Net("ff00::/8"), "multicast"),
)

# RFC 6761: these names are loopback by definition; refused without a lookup.
LOCALHOST_NAMES = re.compile(r"^(?:.+\.)?localhost\.?$")
# LDH labels (plus '_', which some internal DNS uses); IDNs arrive punycoded from yarl.
HOSTNAME = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]*)(?:\.[a-z0-9_-]+)*\.?$")
# A last label that looks like a number: no real TLD is numeric, so such a host is
# an address in some notation (or a typo) and must not reach DNS.
NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")


class Resolver(Protocol):
    """Turns a host name into the IP addresses it resolves to (strings)."""

    async def resolve(self, host: str) -> list[str]:
        """The addresses of ``host``; OSError (socket.gaierror) if it does not resolve."""
        ...


class SystemResolver:
    """The operating system's resolver (getaddrinfo in the loop's executor)."""

    async def resolve(self, host: str) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, None, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM
        )
        return [str(info[4][0]) for info in infos]

    def __repr__(self) -> str:
        return "SystemResolver()"


def parse_legacy_ipv4(host: str) -> str | None:
    """``host`` as a dotted quad if inet_aton would read it as an IPv4 address, else None.

    inet_aton (and so getaddrinfo) accepts 1 to 4 parts, each decimal, octal
    (leading 0) or hex (0x); the last part fills the remaining bytes:
    ``2130706433``, ``0177.0.0.1``, ``0x7f.1`` and ``127.1`` are all 127.0.0.1.
    """
    text = host[:-1] if host.endswith(".") else host
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        lowered = part.lower()
        if lowered.startswith("0x"):
            digits, base = lowered[2:], 16
            if not digits or any(c not in "0123456789abcdef" for c in digits):
                return None
        elif len(lowered) > 1 and lowered.startswith("0"):
            digits, base = lowered[1:], 8
            if any(c not in "01234567" for c in digits):
                return None
        else:
            digits, base = lowered, 10
            if not digits or not digits.isascii() or not digits.isdigit():
                return None
        values.append(int(digits, base))
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for index, value in enumerate(head):
        number |= value << (8 * (3 - index))
    return str(ipaddress.IPv4Address(number))


def _v4_verdict(addr: ipaddress.IPv4Address) -> str | None:
    for net, reason in BLOCKED_V4:
        if addr in net:
            return f"{addr} is {reason} ({net})"
    return None


def _embedded(addr: ipaddress.IPv6Address, what: str, v4: ipaddress.IPv4Address) -> str | None:
    inner = _v4_verdict(v4)
    return None if inner is None else f"{addr} is the {what} form of {inner}"


def _v6_verdict(addr: ipaddress.IPv6Address) -> str | None:
    low32 = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in MAPPED_V6:
        return _embedded(addr, "IPv4-mapped", low32)
    if addr in NAT64_V6:
        return _embedded(addr, "NAT64", low32)
    if addr in SIXTOFOUR_V6:
        return _embedded(addr, "6to4", ipaddress.IPv4Address((int(addr) >> 80) & 0xFFFFFFFF))
    if addr in TEREDO_V6:
        server = ipaddress.IPv4Address((int(addr) >> 64) & 0xFFFFFFFF)
        client = ipaddress.IPv4Address(~int(addr) & 0xFFFFFFFF)
        return _embedded(addr, "Teredo (client)", client) or _embedded(
            addr, "Teredo (server)", server
        )
    for net, reason in BLOCKED_V6:
        if addr in net:
            return f"{addr} is {reason} ({net})"
    # ::/96 and ::ffff:0:0:0/96 are deprecated ways to write an IPv4 address; no
    # receiver uses them, so they are refused even when the IPv4 part is public.
    if addr in COMPATIBLE_V6:
        return _embedded(addr, "IPv4-compatible", low32) or (
            f"{addr} is a deprecated IPv4-compatible address"
        )
    if addr in TRANSLATED_V6:
        return _embedded(addr, "IPv4-translated", low32) or (
            f"{addr} is a deprecated IPv4-translated address"
        )
    if addr not in GLOBAL_UNICAST_V6:
        return f"{addr} is reserved (outside global unicast 2000::/3)"
    return None


def is_blocked_ip(ip: str, allowed: AllowedNetworks = ()) -> str | None:
    """Why a webhook may not connect to address ``ip``, or None if it may.

    Accepts IPv4 and IPv6 text, with brackets and a zone id (``[fe80::1%eth0]``).
    An address inside one of ``allowed`` (``[delivery] allowed_networks``) may be
    reached, and so may the IPv4-mapped form of an allowed IPv4 address (a
    dual-stack resolver may answer with it); a zone id is refused all the same.
    ValueError if ``ip`` is not an address.
    """
    text = ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        bare, _, zone = text.partition("%")
        addr6 = ipaddress.IPv6Address(bare)
        if zone:
            verdict = _v6_verdict(addr6)
            # A zone id only makes sense for link-scoped addresses, which are blocked.
            return verdict or f"{ip} carries a zone id (scoped address)"
        if allowed and _is_allowed(addr6, allowed):
            return None
        return _v6_verdict(addr6)
    addr4 = ipaddress.IPv4Address(text)
    if allowed and _is_allowed(addr4, allowed):
        return None
    return _v4_verdict(addr4)


def _is_allowed(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address, allowed: AllowedNetworks
) -> bool:
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    if mapped is not None and any(mapped in net for net in allowed if net.version == 4):
        return True
    return any(addr in net for net in allowed if net.version == addr.version)


def _literal(host: str) -> str | None:
    """The address ``host`` denotes without DNS (IPv6 or any inet_aton IPv4 form)."""
    if ":" in host:
        bare = host.partition("%")[0]
        try:
            ipaddress.IPv6Address(bare)
        except ValueError:
            raise DeliveryRefused(f"host {host!r} is not a valid IPv6 address") from None
        return host
    return parse_legacy_ipv4(host)


async def check_url(url: str | URL, resolver: Resolver, allowed: AllowedNetworks = ()) -> list[str]:
    """The vetted addresses to connect to for ``url``.

    DeliveryRefused (with the reason) if the URL is not http(s), has no valid
    host, or if ANY address of its host is blocked (``allowed`` networks are
    not); OSError if the name does not resolve (a DNS failure is a connection
    error, which a retry may cure). ``localhost`` names are refused whatever
    ``allowed`` says: write the address.
    """
    parsed = url if isinstance(url, URL) else URL(url)
    if parsed.scheme not in ("http", "https"):
        raise DeliveryRefused(f"scheme {parsed.scheme!r} is not http or https")
    host = (parsed.host or "").lower()
    if not host:
        raise DeliveryRefused("the URL has no host")
    literal = _literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        if not HOSTNAME.match(host):
            raise DeliveryRefused(f"host {host!r} is not a valid host name")
        if NUMERIC_LABEL.match(host.rstrip(".").rsplit(".", 1)[-1]):
            raise DeliveryRefused(f"host {host!r} is neither an IPv4 address nor a host name")
        if LOCALHOST_NAMES.match(host):
            raise DeliveryRefused(f"host {host!r} is a localhost name (loopback)")
        addresses = await resolver.resolve(host)
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} has no addresses")
    vetted: list[str] = []
    for address in addresses:
        reason = is_blocked_ip(address, allowed)
        if reason is not None:
            via = "" if literal is not None else f"{host} resolves to {address}: "
            raise DeliveryRefused(f"{via}{reason}")
        if address not in vetted:
            vetted.append(address)
    return vetted
