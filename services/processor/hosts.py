"""Per image host (an origin: scheme, name and port): a limit on concurrent downloads, and a circuit breaker.

After `failure_threshold` consecutive connection failures or timeouts on one host, its downloads
fail at once as host_unavailable for `cooldown_seconds` (a dead or black-holed host costs a few
timeouts, not one per image). Then the host is tried again: a success closes the breaker, one more
failure opens it for another cooldown."""

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from services.processor.failures import ImageFailure
from services.processor.priority import PriorityGate
from shared.failures import FailureCode

log = logging.getLogger(__name__)


class _Host:
    def __init__(self, limit: int):
        self.slots = PriorityGate(limit)
        self.consecutive_failures = 0
        self.open_until = 0.0  # monotonic time until which the breaker is open


class HostGuard:
    def __init__(
        self, limit: int, failure_threshold: int, cooldown_seconds: float, clock: Callable[[], float] = time.monotonic
    ):
        self.limit, self.failure_threshold, self.cooldown_seconds = limit, failure_threshold, cooldown_seconds
        self.clock = clock
        self._hosts: dict[str, _Host] = {}
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, host: str, priority: int) -> Iterator[None]:
        """Hold one of the host's download slots; raise ImageFailure(host_unavailable) while its breaker is open."""
        state = self._host(host)
        self._refuse_if_open(host, state)
        with state.slots.slot(priority):
            self._refuse_if_open(host, state)  # it may have opened while this download waited for a slot
            yield

    def succeeded(self, host: str) -> None:
        state = self._host(host)
        with self._lock:
            state.consecutive_failures = 0

    def failed(self, host: str) -> None:
        """A connection failure or timeout (not an HTTP error answer: the host is up)."""
        state = self._host(host)
        with self._lock:
            state.consecutive_failures += 1
            if state.consecutive_failures >= self.failure_threshold:
                if not self._is_open(state):
                    log.warning(
                        "%s failed %d times in a row: its images fail as host_unavailable for %g s",
                        host,
                        self.failure_threshold,
                        self.cooldown_seconds,
                    )
                state.open_until = self.clock() + self.cooldown_seconds
                state.consecutive_failures = self.failure_threshold - 1  # after the cooldown, one failure reopens it

    def is_open(self, host: str) -> bool:
        return self._is_open(self._host(host))

    def refuse_if_open(self, host: str) -> None:
        """Raise ImageFailure(host_unavailable) while the host's breaker is open."""
        self._refuse_if_open(host, self._host(host))

    def _is_open(self, state: _Host) -> bool:
        return self.clock() < state.open_until

    def _refuse_if_open(self, host: str, state: _Host) -> None:
        if self._is_open(state):
            raise ImageFailure(
                FailureCode.HOST_UNAVAILABLE,
                f"{host} failed {self.failure_threshold} times in a row; not tried again for {self.cooldown_seconds:g} s",
            )

    def _host(self, host: str) -> _Host:
        with self._lock:
            if host not in self._hosts:
                self._hosts[host] = _Host(self.limit)
            return self._hosts[host]
