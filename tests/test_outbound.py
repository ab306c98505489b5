"""The address rule of outbound requests, applied where the connection is made (shared/outbound.py).

Only loopback is ever dialled here: the tests' backend refuses to dial anything else, and records
what it was asked to dial, so a wrong decision shows without traffic leaving the machine."""

import ipaddress
import socket

import httpcore
import pytest

from services.processor.failures import ImageFailure
from services.processor.fetch import fetch_image, make_http_client
from shared.addresses import AddressRule, ForbiddenAddress, is_public
from shared.outbound import CheckedBackend
from tests.support.settings import make_test_settings

PUBLIC = "93.184.215.14"


class LoopbackOnlyBackend(CheckedBackend):
    """The production backend with a resolver of the test's and a dialler that never leaves loopback."""

    def __init__(self, answers: list[list[str]]):
        super().__init__(AddressRule(), self.answer)
        self.answers = iter(answers)
        self.resolved: list[str] = []
        self.dialled: list[str] = []

    def answer(self, host: str, _port: int) -> list[str]:
        self.resolved.append(host)
        return next(self.answers)

    def dial(self, address, port, timeout, local_address, socket_options):
        self.dialled.append(address)
        if not ipaddress.ip_address(address).is_loopback:
            raise httpcore.ConnectError(f"test: {address} is not dialled from here")
        return super().dial(address, port, timeout, local_address, socket_options)


@pytest.fixture
def listener():
    """A loopback port that must never be connected to; yields a function counting connections made."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.setblocking(False)

        def connections() -> int:
            count = 0
            while True:
                try:
                    sock.accept()[0].close()
                    count += 1
                except BlockingIOError:
                    return count

        # the tests read the port off the yielded function
        connections.port = sock.getsockname()[1]  # type: ignore[attr-defined]
        yield connections


def fetch_through(backend: CheckedBackend, url: str) -> ImageFailure:
    settings = make_test_settings(allow_private_addresses=False, fetch_connect_timeout=1)
    with make_http_client(settings, backend) as client, pytest.raises(ImageFailure) as caught:
        fetch_image(client, url, settings.max_download_bytes)
    return caught.value


def test_a_name_rebinding_to_loopback_never_gets_a_connection(listener):
    """The name answers a public address first and 127.0.0.1 next. The address checked is the address
    dialled: resolved once, the second answer is never used."""
    backend = LoopbackOnlyBackend([[PUBLIC], ["127.0.0.1"], ["127.0.0.1"]])
    failure = fetch_through(backend, f"http://rebind.example:{listener.port}/a.jpg")
    assert failure.code == "connect_error"  # the public address, which the test does not dial
    assert backend.resolved == ["rebind.example"]
    assert backend.dialled == [PUBLIC]
    assert listener() == 0


@pytest.mark.parametrize(
    "answer",
    [
        ["127.0.0.1"],
        [PUBLIC, "127.0.0.1"],  # one private answer among public ones is enough to refuse
        ["64:ff9b::7f00:1"],  # NAT64 of 127.0.0.1
        ["::ffff:127.0.0.1"],
        ["2002:7f00:1::"],  # 6to4 of 127.0.0.1
        ["169.254.169.254"],
    ],
)
def test_private_answers_are_refused_before_dialling(listener, answer):
    backend = LoopbackOnlyBackend([answer])
    failure = fetch_through(backend, f"http://name.example:{listener.port}/a.jpg")
    assert failure.code == "forbidden_address"
    assert backend.dialled == []
    assert listener() == 0


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fd00::1",
        "fe80::1",
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::7f00:1",  # NAT64 (well-known and local-use)
        "::ffff:127.0.0.1",
        "::ffff:0:10.0.0.1",
        "::127.0.0.1",
        "2002:7f00:1::",
        "2002:a9fe:a9fe::",
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo
    ],
)
def test_addresses_that_are_not_public(address):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", PUBLIC, "2606:4700::1111", "64:ff9b::808:808", "2002:808:808::"])
def test_public_addresses(address):
    assert is_public(ipaddress.ip_address(address))


def test_allowed_hosts_and_allowing_private_addresses_skip_the_rule():
    AddressRule(allowed_private_hosts=["images.internal"]).refuse_private("Images.Internal", ["10.0.0.5"])
    AddressRule(allow_private_addresses=True).refuse_private("x.example", ["127.0.0.1"])
    with pytest.raises(ForbiddenAddress, match="x.example resolves to 10.0.0.5"):
        AddressRule(allowed_private_hosts=["images.internal"]).refuse_private("x.example", ["10.0.0.5"])
