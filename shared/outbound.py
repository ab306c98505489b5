"""The HTTP clients of outbound requests (image downloads, webhooks): the address rule is applied at
connect time, to the very address connected to, and a download can have a total deadline.

httpx resolves a host name when it connects; a check made earlier (a request hook) resolves it
separately, so a name that answers a public address first and a private one next got through. Here
the network backend resolves once, checks every address and connects only to a checked address, as
imgproxy does in its dialer. It is also applied to every redirect hop, since each hop connects anew.
"""

import contextlib
import contextvars
import time
from collections.abc import Iterator

import httpcore
import httpx

from shared.addresses import AddressRule, Resolver, resolve

# The monotonic time by which the current thread's download must be over (None: no total deadline).
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("imgpipe_deadline", default=None)


@contextlib.contextmanager
def total_deadline(seconds: float | None) -> Iterator[float | None]:
    """Within this block, every read, write and connect of this thread's requests times out when
    `seconds` have passed in total, however the server trickles its bytes. Yields the deadline
    (None, and no deadline, when seconds is None)."""
    deadline = None if seconds is None else time.monotonic() + seconds
    token = _deadline.set(deadline)
    try:
        yield deadline
    finally:
        _deadline.reset(token)


def _within_deadline(timeout: float | None, error: type[Exception]) -> float | None:
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise error("the total deadline passed")
    return remaining if timeout is None else min(timeout, remaining)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _within_deadline(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _within_deadline(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore.NetworkStream:
        timeout = _within_deadline(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class CheckedBackend(httpcore.SyncBackend):
    """Resolves each host once, refuses it unless every address passes the rule, then connects to
    one of exactly those addresses."""

    def __init__(self, rule: AddressRule, resolver: Resolver = resolve):
        self.rule = rule
        self.resolver = resolver

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        timeout = _within_deadline(timeout, httpcore.ConnectTimeout)
        if not self.rule.applies_to(host):
            return _DeadlineStream(self.dial(host, port, timeout, local_address, socket_options))
        try:
            addresses = self.resolver(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        self.rule.refuse_private(host, addresses)
        error: Exception = httpcore.ConnectError(f"{host} has no address")
        for address in addresses:
            try:
                return _DeadlineStream(self.dial(address, port, timeout, local_address, socket_options))
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error

    def dial(self, address, port, timeout, local_address, socket_options) -> httpcore.NetworkStream:
        return super().connect_tcp(address, port, timeout, local_address, socket_options)


def checked_transport(backend: CheckedBackend, **options) -> httpx.HTTPTransport:
    """An httpx transport (options as httpx.HTTPTransport takes them) whose connections all go through
    the backend. httpx does not take a network backend, its httpcore pool does: it is set there."""
    transport = httpx.HTTPTransport(**options)
    pool = transport._pool  # httpx 0.28 (pinned); tests/test_outbound.py fails if this stops working
    assert isinstance(pool, httpcore.ConnectionPool), "proxies are not supported for outbound requests"
    pool._network_backend = backend
    return transport


def address_checked_client(backend: CheckedBackend, limits: httpx.Limits | None = None, **options) -> httpx.Client:
    """An httpx.Client (other options as httpx.Client takes them) whose connections go through the backend."""
    return httpx.Client(transport=checked_transport(backend, limits=limits or httpx.Limits()), **options)
