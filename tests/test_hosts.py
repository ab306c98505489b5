"""HostGuard: concurrent downloads per host, and the circuit breaker opening and closing."""

import threading

import pytest

from services.processor.failures import ImageFailure
from services.processor.hosts import HostGuard
from services.processor.priority import BULK, NORMAL, PriorityGate


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_consecutive_failures_and_closes_after_the_cooldown():
    clock = Clock()
    guard = HostGuard(limit=4, failure_threshold=3, cooldown_seconds=30, clock=clock)
    for _ in range(2):
        guard.failed("dead.example")
    guard.succeeded("dead.example")  # a success in between starts the count again
    for _ in range(2):
        guard.failed("dead.example")
    assert not guard.is_open("dead.example")
    guard.failed("dead.example")
    assert guard.is_open("dead.example")

    with pytest.raises(ImageFailure) as caught, guard.slot("dead.example", NORMAL):
        pass
    assert caught.value.code == "host_unavailable"
    with guard.slot("alive.example", NORMAL):  # other hosts are not affected
        pass

    clock.now += 30  # cooldown over: tried again
    with guard.slot("dead.example", NORMAL):
        pass
    guard.failed("dead.example")  # one more failure opens it again at once
    assert guard.is_open("dead.example")
    clock.now += 30
    guard.succeeded("dead.example")
    guard.failed("dead.example")  # after a success it takes the whole threshold again
    assert not guard.is_open("dead.example")


def test_at_most_limit_downloads_per_host_at_once():
    guard = HostGuard(limit=2, failure_threshold=3, cooldown_seconds=30)
    entered, release = threading.Semaphore(0), threading.Event()
    active, most = [0], [0]
    lock = threading.Lock()

    def download():
        with guard.slot("busy.example", BULK):
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            entered.release()
            release.wait(5)
            with lock:
                active[0] -= 1

    threads = [threading.Thread(target=download) for _ in range(5)]
    for thread in threads:
        thread.start()
    for _ in range(2):
        assert entered.acquire(timeout=5)
    release.set()
    for thread in threads:
        thread.join(5)
    assert most[0] == 2


def test_a_priority_gate_lets_the_normal_lane_in_before_waiting_bulk_images():
    gate = PriorityGate(1)
    gate.acquire(BULK)  # the slot is taken
    order, started = [], []

    def wait_for_slot(name, priority):
        started.append(name)
        with gate.slot(priority):
            order.append(name)

    threads = []
    for name, priority in [("bulk-1", BULK), ("bulk-2", BULK), ("normal", NORMAL)]:
        threads.append(threading.Thread(target=wait_for_slot, args=(name, priority)))
        threads[-1].start()
        while len(gate._waiting) < len(threads):  # each is queued before the next comes
            threading.Event().wait(0.001)
    gate.release()
    for thread in threads:
        thread.join(5)
    assert order == ["normal", "bulk-1", "bulk-2"]
