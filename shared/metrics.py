"""Consumer lag per partition, from librdkafka's statistics (STATISTICS.md): each consumer reports,
for the partitions it holds, the end of the partition minus its group's committed offset
(`consumer_lag`). The services' own counters live next to their code (services/*/metrics.py)."""

import json
import logging
import threading

from prometheus_client.core import REGISTRY, GaugeMetricFamily

log = logging.getLogger(__name__)

STATISTICS_INTERVAL_MS = 5000
# librdkafka's fetch states of a partition this consumer does not hold (or no longer fetches).
NOT_HELD = {"none", "stopping", "stopped"}


class ConsumerLag:
    """The latest lag per (group, topic, partition) of each consumer of this process, served at scrape
    time. The statistics callback runs in the consumer's poll(), every STATISTICS_INTERVAL_MS."""

    def __init__(self):
        self._latest: dict[str, tuple[str, dict[tuple[str, int], int]]] = {}  # client name -> (group, lags)
        self._lock = threading.Lock()

    def consumer_config(self, group: str) -> dict:
        """What to add to a consumer's configuration for its lag to be reported."""
        return {"statistics.interval.ms": STATISTICS_INTERVAL_MS, "stats_cb": lambda stats: self._update(group, stats)}

    def _update(self, group: str, stats_json: str) -> None:
        try:
            stats = json.loads(stats_json)
            lags = {}
            for topic, topic_stats in stats.get("topics", {}).items():
                for partition in topic_stats.get("partitions", {}).values():
                    # Partition -1 holds messages of partitions not known yet.
                    if partition["partition"] >= 0 and partition.get("fetch_state") not in NOT_HELD:
                        lag = _lag(partition)
                        if lag is not None:
                            lags[(topic, partition["partition"])] = lag
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a format change must not stop the consumer
            log.warning("could not read librdkafka's statistics: %r", exc)
            return
        with self._lock:
            self._latest[stats.get("name", "?")] = (group, lags)

    def collect(self):
        gauge = GaugeMetricFamily(
            "imgpipe_consumer_lag",
            "Messages of a partition after its consumer group's committed offset, "
            "as last seen by the consumer holding it",
            labels=["group", "topic", "partition"],
        )
        with self._lock:
            latest = list(self._latest.values())
        for group, lags in latest:
            for (topic, partition), lag in sorted(lags.items()):
                gauge.add_metric([group, topic, str(partition)], lag)
        yield gauge


def _lag(partition: dict) -> int | None:
    """librdkafka's consumer_lag (end minus committed offset); when the group has committed nothing for
    the partition yet, which librdkafka reports as -1, everything from its start is still to do (the
    consumers start at the earliest offset). None while the ends are not known yet."""
    if partition.get("consumer_lag", -1) >= 0:
        return partition["consumer_lag"]
    if (
        partition.get("committed_offset", -1) < 0
        and partition.get("lo_offset", -1) >= 0
        and partition.get("hi_offset", -1) >= 0
    ):
        return partition["hi_offset"] - partition["lo_offset"]
    return None


CONSUMER_LAG = ConsumerLag()
REGISTRY.register(CONSUMER_LAG)
