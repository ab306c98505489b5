"""Where the topics end and where a consumer group has got to, per partition, read from the brokers.

A group's committed offsets are read through a consumer of that group that never subscribes (so it
never joins the group): AdminClient.list_consumer_group_offsets crashes the process (SIGSEGV in
librdkafka) when the group's coordinator is not ready (confluentinc/librdkafka#5040,
confluent-kafka-python#1982), which happens at start and after a broker restart."""

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from shared.kafka import client_config
from shared.settings import Settings

Positions = dict[tuple[str, int], int]  # (topic, partition) -> offset


def _partitions(client: AdminClient | Consumer, topics: list[str], timeout: float) -> list[TopicPartition]:
    metadata = client.list_topics(timeout=timeout).topics
    return [TopicPartition(topic, p) for topic in topics for p in metadata[topic].partitions]


def end_offsets(admin: AdminClient, topics: list[str], timeout: float = 10) -> Positions:
    latest = admin.list_offsets({tp: OffsetSpec.latest() for tp in _partitions(admin, topics, timeout)})
    return {(tp.topic, tp.partition): future.result(timeout).offset for tp, future in latest.items()}


def offset_reader(settings: Settings, group: str) -> Consumer:
    """A consumer that reads `group`'s committed offsets and does nothing else (close it after use)."""
    return Consumer({**client_config(settings), "group.id": group, "enable.auto.commit": False})


def committed_offsets(reader: Consumer, topics: list[str], timeout: float = 10) -> Positions:
    """The reader's group's committed offset per partition (negative where it has committed none)."""
    committed = reader.committed(_partitions(reader, topics, timeout), timeout=timeout)
    return {(tp.topic, tp.partition): tp.offset for tp in committed}


def reached(committed: Positions, ends: Positions) -> bool:
    """Whether the group has consumed every message below those end offsets."""
    return all(end == 0 or committed.get(key, -1) >= end for key, end in ends.items())
