"""Which addresses outbound requests (image downloads, webhooks) may reach: public ones only, so a URL
in a CSV cannot reach the service's own network or a cloud metadata endpoint.

The check is made on the address about to be connected to (shared/outbound.py), not on a name
resolved earlier, so a name that answers differently the second time (DNS rebinding) cannot pass.
"""

import ipaddress
import socket
from collections.abc import Callable, Iterable

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 ranges that carry an IPv4 address in their last 32 bits: a translator or tunnel on the path
# delivers to that IPv4 address, so it is the one that must be public.
_LAST_32_BITS_IS_IPV4 = [
    ipaddress.ip_network("64:ff9b::/96"),  # NAT64 well-known prefix (RFC 6052)
    ipaddress.ip_network("::ffff:0:0:0/96"),  # IPv4-translated (RFC 2765)
    ipaddress.ip_network("::/96"),  # IPv4-compatible (deprecated, RFC 4291)
]
# NAT64 local-use prefixes (RFC 8215) embed the IPv4 address at a position only the operator knows.
_NOT_PUBLIC_EXTRA = [ipaddress.ip_network("64:ff9b:1::/48")]

Resolver = Callable[[str, int], list[str]]


class ForbiddenAddress(httpx.ConnectError):
    """The host resolves to an address that is not public; nothing was sent to it."""


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's address; Teredo is not global anyway
    if any(address in network for network in _LAST_32_BITS_IS_IPV4) and int(address) & 0xFFFFFFFF > 1:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in network for network in _NOT_PUBLIC_EXTRA):
            return False
        inner = embedded_ipv4(address)
        return inner is None or is_public(inner)
    return True


def resolve(host: str, port: int) -> list[str]:
    """Every address the host name resolves to, in the resolver's order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # str(): the hints allow an int there, which an IPv4 or IPv6 address never is
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class AddressRule:
    """Public addresses only, unless private addresses are allowed altogether or for named hosts."""

    def __init__(self, allow_private_addresses: bool = False, allowed_private_hosts: Iterable[str] = ()):
        self.allow_private_addresses = allow_private_addresses
        self.allowed_private_hosts = {host.lower() for host in allowed_private_hosts}

    def applies_to(self, host: str) -> bool:
        return not self.allow_private_addresses and host.lower().strip("[]") not in self.allowed_private_hosts

    def refuse_private_host(self, host: str, port: int, resolver: Resolver = resolve) -> None:
        """Resolve the host and refuse it as refuse_private does (OSError when it does not resolve)."""
        if self.applies_to(host):
            self.refuse_private(host, resolver(host, port))

    def refuse_private(self, host: str, addresses: Iterable[str]) -> None:
        """Raise ForbiddenAddress if any of the host's addresses is not public (a host answering both
        kinds would reach the private one on some attempts)."""
        if not self.applies_to(host):
            return
        for address in addresses:
            if not is_public(ipaddress.ip_address(address.split("%", 1)[0])):
                raise ForbiddenAddress(f"{host} resolves to {address}, which is not a public address")
