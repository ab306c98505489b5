"""A counting semaphore whose waiters go in by priority (lower first), then in the order they came.
Images of the normal lane pass bulk images wherever they queue for a host, for memory or for a
compression worker, so a small job is not stuck behind a large one inside the processor either."""

import heapq
import itertools
import threading
from contextlib import contextmanager

NORMAL, BULK = 0, 1


class PriorityGate:
    def __init__(self, slots: int):
        self._free = slots
        self._waiting: list = []  # heap of (priority, arrival, event)
        self._arrivals = itertools.count()
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, priority: int):
        self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    def acquire(self, priority: int) -> None:
        with self._lock:
            if self._free > 0 and not self._waiting:
                self._free -= 1
                return
            handed_over = threading.Event()
            heapq.heappush(self._waiting, (priority, next(self._arrivals), handed_over))
        handed_over.wait()

    def release(self) -> None:
        with self._lock:
            if self._waiting:
                heapq.heappop(self._waiting)[2].set()  # the slot passes straight to the first waiter
            else:
                self._free += 1
