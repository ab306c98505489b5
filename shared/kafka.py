"""Kafka producers, consumers and topics, configured the same way by every service."""
import logging
import time
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from shared.settings import Settings

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    """At least one message was not acknowledged by the brokers."""


def producer_config(settings: Settings, **overrides) -> dict:
    """Every service's producer: acknowledged only once every in-sync replica has the message (acks=all),
    idempotent, so retries inside librdkafka never duplicate or reorder."""
    config = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "message.timeout.ms": 30_000,
        "compression.type": "zstd",
    }
    config.update(overrides)
    return config


def make_producer(settings: Settings, **overrides) -> Producer:
    return Producer(producer_config(settings, **overrides))


def produce_and_wait(producer: Producer, topic: str, messages: Iterable[tuple], timeout: float = 60) -> int:
    """Send (key, value) or (key, value, headers) tuples and return once every one is acknowledged;
    raise DeliveryError otherwise. Waits for these messages only, so threads sharing one producer
    do not wait for each other."""
    reports: list = []  # one entry per delivery report: None or the error (append is thread-safe)
    sent = 0
    for key, value, *headers in messages:
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=headers[0] if headers else None,
                                 on_delivery=lambda err, _msg: reports.append(err))
                break
            except BufferError:  # local queue full: let deliveries drain, then retry
                producer.poll(0.5)
        producer.poll(0)
        sent += 1
    deadline = time.monotonic() + timeout
    while len(reports) < sent and time.monotonic() < deadline:
        producer.poll(0.1)
    if len(reports) < sent:
        raise DeliveryError(f"{sent - len(reports)} of {sent} messages to {topic} not acknowledged within {timeout}s")
    failures = [str(err) for err in reports if err is not None]
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
        "auto.commit.interval.ms": settings.kafka_auto_commit_interval_ms,
        "partition.assignment.strategy": "cooperative-sticky",
        # A member that crashed holds its partitions until its session expires (45 s by default).
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": max(100, settings.kafka_session_timeout_ms // 5),
    }
    config.update(overrides)
    consumer = Consumer(config)

    consumer.subscribe(topics, on_revoke=lambda c, _partitions: commit_stored(c))
    return consumer


def commit_stored(consumer: Consumer) -> None:
    """Commit the offsets stored so far, now (as on revoke), rather than at the next auto-commit."""
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError._NO_OFFSET:
            log.warning("commit of stored offsets failed: %s", exc)


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
