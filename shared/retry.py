"""Trying again: one backoff (0.5 s, doubling, at most 30 s) and one bound for what a message's own
content makes fail, so that one poison message never stalls a service."""

import threading

import psycopg

from shared.kafka import DeliveryError

FIRST_DELAY_SECONDS = 0.5
MAX_DELAY_SECONDS = 30.0
MESSAGE_MAX_ATTEMPTS = 3  # a message that fails this often for a reason of its own goes to the dead-letter topic

# Failures of what a service depends on, not of the message: tried again without limit.
UNAVAILABLE = (psycopg.OperationalError, DeliveryError)  # includes psycopg_pool's PoolTimeout, deadlocks, serialization


class Backoff:
    def __init__(self, first: float = FIRST_DELAY_SECONDS, most: float = MAX_DELAY_SECONDS):
        self.delay, self.most = first, most

    def wait(self, stop: threading.Event) -> bool:
        """Sleep the current delay, then double it; False if `stop` was set meanwhile."""
        stopped = stop.wait(self.delay)
        self.delay = min(self.delay * 2, self.most)
        return not stopped
