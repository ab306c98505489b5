"""Keep outbound requests (image downloads, webhooks) away from private, loopback and link-local
addresses, so a URL in a CSV cannot reach the service's own network or a cloud metadata endpoint."""
import ipaddress
import socket

import httpx


class ForbiddenAddress(httpx.RequestError):
    """The request's host resolves to an address that is not public."""


def refuse_private_hosts(request: httpx.Request) -> None:
    """An httpx request hook: it runs for every request, each redirect hop included."""
    host = request.url.host
    port = request.url.port or (443 if request.url.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return  # unresolvable: the connection attempt fails with its own error
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise ForbiddenAddress(f"{host} resolves to {address}, which is not a public address", request=request)


def outbound_hooks(allow_private_addresses: bool) -> dict:
    return {} if allow_private_addresses else {"request": [refuse_private_hosts]}
