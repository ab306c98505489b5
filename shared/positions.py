"""Where the topics end and where a consumer group has got to, per partition, read from the brokers."""
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

Positions = dict[tuple[str, int], int]  # (topic, partition) -> offset


def _partitions(admin: AdminClient, topics: list[str], timeout: float) -> list[TopicPartition]:
    metadata = admin.list_topics(timeout=timeout).topics
    return [TopicPartition(topic, p) for topic in topics for p in metadata[topic].partitions]


def end_offsets(admin: AdminClient, topics: list[str], timeout: float = 10) -> Positions:
    latest = admin.list_offsets({tp: OffsetSpec.latest() for tp in _partitions(admin, topics, timeout)})
    return {(tp.topic, tp.partition): future.result(timeout).offset for tp, future in latest.items()}


def committed_offsets(admin: AdminClient, group: str, topics: list[str], timeout: float = 10) -> Positions:
    """The group's committed offset per partition (negative where it has committed none)."""
    request = ConsumerGroupTopicPartitions(group, _partitions(admin, topics, timeout))
    committed = admin.list_consumer_group_offsets([request])[group].result(timeout)
    return {(tp.topic, tp.partition): tp.offset for tp in committed.topic_partitions}


def reached(committed: Positions, ends: Positions) -> bool:
    """Whether the group has consumed every message below those end offsets."""
    return all(end == 0 or committed.get(key, -1) >= end for key, end in ends.items())
