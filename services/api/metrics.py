"""The dispatcher's metrics (services/api/dispatcher.py), served at the API's /metrics. Only the API
process leading the release reports the gauges; the others report leading 0 and no waiting images."""

import threading
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import REGISTRY, GaugeMetricFamily

LEADING = Gauge("imgpipe_dispatch_leading", "1 while this API process leads the release of images, else 0")
RELEASED = Counter("imgpipe_dispatch_images_released_total", "Images released into Kafka by this process")
HELD = Gauge("imgpipe_dispatch_images_released_not_finished", "Images released into Kafka and not finished yet")
WINDOW = Gauge("imgpipe_dispatch_window_images", "How many images may be released and not finished")
PACE = Gauge(
    "imgpipe_dispatch_images_per_second", "What the processors finish per second, as the dispatcher measures it"
)
FIRST_RELEASE = Histogram(
    "imgpipe_dispatch_first_release_seconds",
    "From a job's upload (its commit) to the release of its first image",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
NO_KEY = "(no key)"


class WaitingPerClient:
    """Images not released yet per client (API key name; NO_KEY for jobs without a key), as of the
    leader's last round."""

    def __init__(self):
        self._latest: dict[str, int] = {}
        self._lock = threading.Lock()

    def set(self, waiting: dict[str, int]) -> None:
        with self._lock:
            self._latest = waiting

    def collect(self):
        gauge = GaugeMetricFamily(
            "imgpipe_dispatch_images_waiting", "Images not released yet, per client", labels=["client"]
        )
        with self._lock:
            for client, images in sorted(self._latest.items()):
                gauge.add_metric([client], images)
        yield gauge


WAITING = WaitingPerClient()
REGISTRY.register(WAITING)


def observe_round(jobs: Iterable, held: int, window: int, images_per_second: float) -> None:
    waiting: dict[str, int] = {}
    for job in jobs:
        name = job.client_name or NO_KEY
        waiting[name] = waiting.get(name, 0) + job.demand.waiting
    WAITING.set(waiting)
    HELD.set(held)
    WINDOW.set(window)
    PACE.set(images_per_second)
