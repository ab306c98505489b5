"""Kafka producers, consumers and topics, configured the same way by every service."""
import logging
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from shared.settings import Settings

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    """At least one message was not acknowledged by the brokers."""


def make_producer(settings: Settings, **overrides) -> Producer:
    config = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "message.timeout.ms": 30_000,
        "compression.type": "zstd",
    }
    config.update(overrides)
    return Producer(config)


def produce_and_wait(producer: Producer, topic: str, messages: Iterable[tuple[str, bytes]], timeout: float = 60) -> int:
    """Send (key, value) pairs and return once every one is acknowledged; raise DeliveryError otherwise."""
    failures: list[str] = []
    sent = 0

    def on_delivery(err, _msg):
        if err is not None:
            failures.append(str(err))

    for key, value in messages:
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain, then retry
                producer.poll(0.5)
        producer.poll(0)
        sent += 1
    remaining = producer.flush(timeout)
    if remaining:
        raise DeliveryError(f"{remaining} of {sent} messages to {topic} not acknowledged within {timeout}s")
    if failures:
        raise DeliveryError(f"{len(failures)} of {sent} messages to {topic} failed: {failures[0]}")
    return sent


def make_consumer(settings: Settings, group_id: str, topics: list[str], **overrides) -> Consumer:
    """An at-least-once consumer: offsets are stored by the caller after its work is done
    (store_offsets) and committed in the background; stored offsets are committed on revoke."""
    config = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": group_id,
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
    }
    config.update(overrides)
    consumer = Consumer(config)

    def on_revoke(c: Consumer, partitions):
        try:
            c.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("commit on revoke failed: %s", exc)

    consumer.subscribe(topics, on_revoke=on_revoke)
    return consumer


def ensure_topics(settings: Settings, timeout: float = 30) -> None:
    """Create the service's topics if they are missing (the brokers do not auto-create them)."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    wanted = [settings.topic_requested, settings.topic_processed, settings.topic_dead_letter]
    existing = admin.list_topics(timeout=timeout).topics
    missing = [NewTopic(t, num_partitions=settings.topic_partitions) for t in wanted if t not in existing]
    if not missing:
        return
    for topic, future in admin.create_topics(missing, operation_timeout=timeout).items():
        try:
            future.result(timeout)
            log.info("created topic %s", topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
