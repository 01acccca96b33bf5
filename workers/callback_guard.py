"""Where webhooks may go: the callback-URL check against server-side request forgery (SSRF).

Whoever submits a job chooses its ``callback_url``, and a worker POSTs to it from inside the
operator's network; unchecked, it would reach loopback services, the private network or the
cloud's metadata endpoint. :class:`CallbackGuard` allows public addresses only: it refuses
loopback, private (RFC 1918, fc00::/7), link-local, multicast, unspecified, reserved and
broadcast addresses, the shared address space 100.64.0.0/10 and anything else that is not
globally reachable, in every spelling (decimal ``2130706433``, hex ``0x7f000001``, octal or short
``0177.0.0.1`` / ``127.1``, IPv6 literals, IPv4-mapped, NAT64 and 6to4 IPv6), and names that
resolve to such addresses (every address a name resolves to must be allowed). Cloud metadata
addresses and names are refused even inside an allow-listed network. Also refused: user info
(``user:pass@``), ports outside 1..65535, schemes other than http(s), URLs over 2048
characters, and hosts that do not resolve.

It runs twice: when the API accepts the job (a clear 422) and at every delivery, because DNS
may answer differently by then ("DNS rebinding"); the sender then connects to the very
addresses checked (:attr:`Destination.addresses`), never resolving the name again.
``UNBOX_WEBHOOK_ALLOW_NETWORKS`` allow-lists networks for on-premise receivers.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from urllib.parse import quote, urlsplit

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
Resolver = Callable[[str, int], list[str]]

MAX_URL_LENGTH = 2048
ALLOW_HINT = "; an operator can allow a network with UNBOX_WEBHOOK_ALLOW_NETWORKS"
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
    "169.254.170.2",  # AWS ECS task metadata
    "fd00:ec2::254",  # AWS IMDS over IPv6
    "100.100.100.200",  # Alibaba Cloud
))
METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal", "metadata.azure.internal"})
SHARED_ADDRESS_SPACE = IPv4Network("100.64.0.0/10")
BROADCAST = IPv4Address("255.255.255.255")
NAT64 = IPv6Network("64:ff9b::/96")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")  # a last label like this makes the host an IPv4 number
_UNSAFE_CHARACTER = re.compile(r"[\x00-\x20\x7f\\]")
_PRINTABLE_ASCII = "".join(chr(code) for code in range(0x21, 0x7f))


class CallbackRefused(ValueError):
    """A callback URL that webhooks may not use; the message says why, for whoever submitted it."""


@dataclass(frozen=True)
class Destination:
    """A vetted callback: where to connect (``addresses``) and what to ask for there."""

    scheme: str  # http | https
    host: str  # ASCII host name or address, for the Host header, TLS SNI and the certificate check
    port: int
    target: str  # path and query of the request line
    addresses: tuple[IPAddress, ...]  # every address the host resolved to, all allowed; connect to these


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (``socket.getaddrinfo``, TCP)."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def parse_networks(text: str) -> list[IPNetwork]:
    """Comma-separated CIDR networks (``127.0.0.1/32,10.20.0.0/16``); ``ValueError`` with a readable message."""
    networks: list[IPNetwork] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise ValueError(f"{item!r} is not a network in CIDR form such as 10.20.0.0/16 ({exc})") from None
    return networks


def _unwrapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) is that IPv4 address: the same destination."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _embedded_ipv4(address: IPAddress) -> IPv4Address | None:
    """The IPv4 address a NAT64 (64:ff9b::/96) or 6to4 (2002::/16) address leads to."""
    if not isinstance(address, IPv6Address):
        return None
    if address in NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def _kind(address: IPAddress) -> str | None:
    """Which non-public kind of address this is, or ``None`` for a public one."""
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address in SHARED_ADDRESS_SPACE:
        return "a shared (carrier-grade NAT) address"
    if address == BROADCAST:
        return "the broadcast address"
    if address.is_private:
        return "a private or special-purpose address"
    if address.is_reserved:
        return "a reserved address"
    if isinstance(address, IPv6Address) and address.is_site_local:
        return "a site-local address"
    if not address.is_global:
        return "not a public address"
    return None


def _ascii_host(host: str) -> str:
    """The host in ASCII (IDNA for international names, which also folds full-width digits and dots)."""
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise CallbackRefused(f"callback_url host {host!r} is not a valid domain name") from None


def _legacy_ipv4(name: str) -> IPv4Address | None:
    """The address of a host written as an IPv4 number in any legacy spelling, ``None`` for a name."""
    if not _NUMERIC_LABEL.match(name.rsplit(".", 1)[-1]):
        return None
    try:
        return IPv4Address(socket.inet_aton(name))
    except OSError:
        raise CallbackRefused(f"callback_url host {name!r} looks like an IPv4 address but is not one") from None


@dataclass(frozen=True)
class _Parsed:
    scheme: str
    host: str
    port: int
    target: str
    literal: IPAddress | None


def _parse(url: str) -> _Parsed:
    if not isinstance(url, str) or not url:
        raise CallbackRefused("callback_url must be an absolute http:// or https:// URL")
    if len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(f"callback_url is longer than {MAX_URL_LENGTH} characters")
    if _UNSAFE_CHARACTER.search(url):
        raise CallbackRefused("callback_url must not contain spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise CallbackRefused(f"callback_url is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CallbackRefused("callback_url must be an absolute http:// or https:// URL")
    if "@" in parts.netloc:
        raise CallbackRefused("callback_url must not contain a user name or password (user:pass@)")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if not 1 <= port <= 65535:
        raise CallbackRefused("callback_url's port must be a number from 1 to 65535")
    host = parts.hostname or ""
    if not host:
        raise CallbackRefused("callback_url has no host")
    literal: IPAddress | None
    if parts.netloc.startswith("["):
        try:
            literal = IPv6Address(host)
        except ValueError:
            raise CallbackRefused(f"callback_url host [{host}] is not a valid IPv6 address") from None
    else:
        host = _ascii_host(host)
        host = host[:-1] if host.endswith(".") else host  # the root label: same name
        if not host:
            raise CallbackRefused("callback_url has no host")
        try:
            literal = IPv4Address(host)
        except ValueError:
            literal = _legacy_ipv4(host)
        if literal is not None:
            host = str(literal)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Parsed(parts.scheme, host, port, quote(target, safe=_PRINTABLE_ASCII), literal)


class CallbackGuard:
    """Decides whether a callback URL may be used, and to which addresses a delivery connects."""

    def __init__(self, allow_networks: Iterable[IPNetwork] = (), resolver: Resolver = system_resolver) -> None:
        self.allow_networks = tuple(allow_networks)
        self.resolver = resolver

    def refusal(self, address: IPAddress) -> str | None:
        """Why webhooks may not go to ``address`` (as "a loopback address" etc.), ``None`` when they may."""
        address = _unwrapped(address)
        if isinstance(address, IPv6Address) and address.scope_id:
            address = IPv6Address(address.packed)  # fe80::1%eth0 is judged as fe80::1
        embedded = _embedded_ipv4(address)
        if address in METADATA_ADDRESSES or embedded in METADATA_ADDRESSES:
            return "a cloud metadata address"
        if any(address.version == net.version and address in net for net in self.allow_networks):
            return None
        if embedded is not None:  # NAT64 / 6to4: judged by the IPv4 address it reaches
            kind = _kind(embedded)
            kind = None if kind is None else f"an IPv6 address leading to {embedded}, {kind}"
        else:
            kind = _kind(address)
        return None if kind is None else kind + ALLOW_HINT

    def check(self, url: str) -> Destination:
        """The vetted destination of ``url``; raises :class:`CallbackRefused` saying why it may not be used."""
        parsed = _parse(url)
        host = parsed.host
        if parsed.literal is not None:
            addresses = [_unwrapped(parsed.literal)]
        else:
            if host == "localhost" or host.endswith(".localhost"):
                raise CallbackRefused(f"callback_url host {host!r} is a loopback name; an allow-listed receiver "
                                      "is named by its address (e.g. http://127.0.0.1:8080/hook)")
            if host in METADATA_NAMES:
                raise CallbackRefused(f"callback_url host {host!r} is a cloud metadata name")
            addresses = self._resolve(host, parsed.port)
        for address in addresses:
            why = self.refusal(address)
            if why is not None:
                where = f"points to {address}" if parsed.literal is not None else f"host {host!r} resolves to {address}"
                raise CallbackRefused(f"callback_url {where}, {why}")
        return Destination(parsed.scheme, host, parsed.port, parsed.target, tuple(addresses))

    def problem(self, url: str) -> str | None:
        """Why ``url`` cannot take webhooks, or ``None`` when it can."""
        try:
            self.check(url)
        except CallbackRefused as exc:
            return str(exc)
        return None

    def _resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            found = self.resolver(host, port)
        except (OSError, UnicodeError, ValueError) as exc:
            raise CallbackRefused(f"callback_url host {host!r} does not resolve ({exc})") from None
        addresses: list[IPAddress] = []
        for text in found:
            try:
                address = _unwrapped(ipaddress.ip_address(text))
            except ValueError:
                raise CallbackRefused(f"callback_url host {host!r} resolves to {text!r}, not an address") from None
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise CallbackRefused(f"callback_url host {host!r} does not resolve")
        return addresses
