"""Positions on the real broker that tests wait for, instead of sleeping.

`kafka` is the bootstrap servers, or Settings: then the clients are configured as the services' are
(secured Kafka too)."""

import json
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from shared import positions
from shared.kafka import client_config
from shared.offsets import position
from shared.settings import Settings


def _config(kafka: str | Settings) -> dict:
    return client_config(kafka) if isinstance(kafka, Settings) else {"bootstrap.servers": kafka}


NOT_READY = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART}


def end_offsets(admin: AdminClient, topic: str, timeout: float = 10) -> dict[int, int]:
    """The end offset of each partition; retried while the broker says it is not ready (a topic just
    created has no leaders for a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
            latest = admin.list_offsets({TopicPartition(topic, p): OffsetSpec.latest() for p in partitions})
            return {tp.partition: future.result(10).offset for tp, future in latest.items()}
        except KafkaException as exc:
            if exc.args[0].code() not in NOT_READY or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def committed_offsets(kafka: str | Settings, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition of the topic (negative where none is committed), read
    as shared/positions.py reads them (the admin client's call can crash the process)."""
    reader = Consumer({**_config(kafka), "group.id": group, "enable.auto.commit": False})
    try:
        return {
            partition: offset for (_topic, partition), offset in positions.committed_offsets(reader, [topic]).items()
        }
    finally:
        reader.close()


def wait_until_consumed(
    kafka: str | Settings, group: str, topics: list[str], timeout: float = 60, partitions: list[int] | None = None
) -> None:
    """Wait until the group's committed offsets reach the end of every partition of the topics (or of
    the partitions given), as they are now. The services commit only what they finished, so then
    every message was handled."""
    admin = AdminClient(_config(kafka))
    ends = {
        topic: {
            p: end
            for p, end in end_offsets(admin, topic).items()
            if end > 0 and (partitions is None or p in partitions)
        }
        for topic in topics
    }
    deadline = time.monotonic() + timeout
    while True:
        behind = {
            topic: {p: end for p, end in topic_ends.items() if committed_offsets(kafka, group, topic)[p] < end}
            for topic, topic_ends in ends.items()
        }
        if not any(behind.values()):
            return
        assert time.monotonic() < deadline, f"group {group} did not consume {behind} within {timeout}s"
        time.sleep(0.1)


class TopicReader:
    """Reads a whole topic from the beginning, without a consumer group."""

    def __init__(self, kafka: str | Settings, topic: str):
        self.messages: list[Message] = []
        self.consumer = Consumer({**_config(kafka), "group.id": "unused"})
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])

    def wait_for(self, done, timeout: float = 60) -> list:
        deadline = time.monotonic() + timeout
        while not done(self.messages):
            assert time.monotonic() < deadline, f"timed out; read so far: {[m.value() for m in self.messages]}"
            message = self.consumer.poll(0.2)
            if message is not None and not message.error():
                self.messages.append(message)
        return self.messages

    def close(self):
        self.consumer.close()


def read_to_end(kafka: str | Settings, topic: str, timeout: float = 30) -> list:
    """Every message of the topic up to its end offsets as they are now (what was acknowledged before)."""
    admin = AdminClient(_config(kafka))
    ends = {p: end for p, end in end_offsets(admin, topic).items() if end > 0}
    consumer = Consumer({**_config(kafka), "group.id": "unused", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    messages, next_offsets = [], {p: 0 for p in ends}
    deadline = time.monotonic() + timeout
    try:
        while any(next_offsets[p] < end for p, end in ends.items()):
            assert time.monotonic() < deadline, f"could not read {topic} to its end within {timeout}s"
            message = consumer.poll(0.2)
            if message is not None and not message.error():
                (_, partition), offset = position(message)
                if offset < ends[partition]:
                    messages.append(message)
                    next_offsets[partition] = offset + 1
    finally:
        consumer.close()
    return messages


def produce_as_another_service(settings: Settings, topic: str, key: bytes | None, value: bytes) -> None:
    """What another service does: a plain confluent-kafka producer, nothing of imgpipe's."""
    producer = Producer({**client_config(settings), "acks": "all"})
    producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def requested_events(settings: Settings, request_id: str, expected: int, timeout: float = 30) -> list:
    """The image.requested messages of one job, on either lane, once there are `expected` of them (the
    dispatcher releases a job's images after its upload, not during it)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            message
            for topic in (settings.topic_requested, settings.topic_requested_bulk)
            for message in read_to_end(settings, topic)
            if json.loads(message.value())["request_id"] == request_id
        ]
        if len(found) >= expected:
            return found
        assert time.monotonic() < deadline, f"{len(found)} of {expected} events of job {request_id} released"
        time.sleep(0.05)
