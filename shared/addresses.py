"""Keep outbound requests (image downloads, webhooks) away from private, loopback and link-local
addresses, so a URL in a CSV cannot reach the service's own network or a cloud metadata endpoint."""
import ipaddress
import socket
from collections.abc import Callable, Iterable

import httpx


class ForbiddenAddress(httpx.RequestError):
    """The request's host resolves to an address that is not public."""


def private_host_guard(allowed_hosts: Iterable[str] = ()) -> Callable[[httpx.Request], None]:
    """An httpx request hook, run for every request, each redirect hop included: refuse hosts that
    resolve to an address that is not public, except the hosts named in allowed_hosts."""
    allowed = {host.lower() for host in allowed_hosts}

    def refuse_private_hosts(request: httpx.Request) -> None:
        host = request.url.host
        if host.lower() in allowed:
            return
        port = request.url.port or (443 if request.url.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return  # unresolvable: the connection attempt fails with its own error
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if not address.is_global:
                raise ForbiddenAddress(f"{host} resolves to {address}, which is not a public address", request=request)

    return refuse_private_hosts


def outbound_hooks(allow_private_addresses: bool, allowed_private_hosts: Iterable[str] = ()) -> dict:
    return {} if allow_private_addresses else {"request": [private_host_guard(allowed_private_hosts)]}
