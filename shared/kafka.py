"""Kafka producers, consumers and topics, configured the same way by every service."""

import logging
import time
from collections.abc import Iterable
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from shared.offsets import OffsetTracker, position
from shared.runtime import StartupError
from shared.settings import Settings

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    """At least one message was not acknowledged by the brokers."""


class KafkaUnavailable(StartupError):
    """The brokers cannot be used with these settings; the message says why."""


def client_config(settings: Settings) -> dict:
    """What every Kafka client (producer, consumer, admin) starts from: the brokers and how to reach them."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "security.protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.startswith("SASL_"):
        assert settings.kafka_sasl_password is not None  # Settings refuses SASL without credentials
        config.update(
            {
                "sasl.mechanism": settings.kafka_sasl_mechanism,
                "sasl.username": settings.kafka_sasl_username,
                "sasl.password": settings.kafka_sasl_password.get_secret_value(),
            }
        )
    if settings.kafka_ssl_ca_location is not None:
        config["ssl.ca.location"] = str(settings.kafka_ssl_ca_location)
    if settings.log_format == "json":
        # librdkafka writes its own lines to stderr; with a logger they become JSON lines like every
        # other (handed over when the client is polled, which every long-lived client here is).
        config["logger"] = logging.getLogger("librdkafka")
    return config


class _ConnectionProblems:
    """librdkafka's error callback and log lines, kept instead of printed (both are served by poll())."""

    def __init__(self):
        self.errors: list[KafkaError] = []
        self.last_failure: str | None = None  # a failed connection is logged, not always reported as an error

    def log(self, _level: int, _format: str, facility: str, _client: str, message: str) -> None:
        if facility == "FAIL":
            self.last_failure = message.split("]: ", 1)[-1] if message.startswith("[thrd:") else message


def check_kafka(settings: Settings, timeout: float = 30) -> None:
    """Raise KafkaUnavailable, with one line saying why, unless the brokers answer these settings within
    `timeout`. Refused SASL credentials and failed TLS fail at once: librdkafka would retry them forever."""
    where = f"Kafka at {settings.kafka_bootstrap_servers}"
    problems = _ConnectionProblems()
    try:
        # AdminClient's hints allow only str and number values, not the callbacks librdkafka takes.
        admin = AdminClient({**client_config(settings), "error_cb": problems.errors.append, "logger": problems})  # type: ignore[dict-item]
    except KafkaException as exc:
        raise KafkaUnavailable(f"{where}: the client configuration is invalid: {exc.args[0].str()}") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin.list_topics(timeout=min(1.0, timeout))
            return
        except KafkaException as exc:
            last = exc.args[0]
        admin.poll(0)
        for error in problems.errors:
            if error.code() == KafkaError._AUTHENTICATION:
                raise KafkaUnavailable(
                    f"{where} refused the SASL authentication of user '{settings.kafka_sasl_username}' "
                    f"({settings.kafka_sasl_mechanism}): {error.str()}"
                )
            if error.code() == KafkaError._SSL:
                raise KafkaUnavailable(f"{where}: TLS failed (check kafka_ssl_ca_location): {error.str()}")
        if time.monotonic() >= deadline:
            reason = problems.last_failure or last.str()
            if settings.kafka_security_protocol == "PLAINTEXT" and "in state UP" in reason:
                reason += (
                    "; a listener that wants TLS or SASL closes PLAINTEXT connections so: see kafka_security_protocol"
                )
            raise KafkaUnavailable(f"{where} did not answer within {timeout:g}s: {reason}")


def producer_config(settings: Settings, **overrides) -> dict:
    """Every service's producer: acknowledged only once every in-sync replica has the message (acks=all),
    idempotent, so retries inside librdkafka never duplicate or reorder."""
    config = {
        **client_config(settings),
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
                producer.produce(
                    topic,
                    value=value,
                    key=key,
                    headers=headers[0] if headers else None,
                    on_delivery=lambda err, _msg: reports.append(err),
                )
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


DEAD_LETTER_ERROR_MAX_CHARS = 1000


def dead_letter(
    message: Message, topic: str, error: str
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]:
    """The message as it is passed on, unchanged, to the dead-letter `topic` (logged): its key, its
    value, and headers saying why and where from."""
    log.warning(
        "message %s[%d]@%d sent to %s: %s", message.topic(), message.partition(), message.offset(), topic, error
    )
    return message.key(), message.value(), dead_letter_headers(message, error)


def dead_letter_headers(message: Message, error: str) -> list[tuple[str, bytes | None]]:
    """The headers of a message passed on unchanged to a dead-letter topic: its own, why, and where from."""
    (topic, partition), offset = position(message)
    # A consumed message's headers are a list (the hints also allow the dict a producer may be given).
    return cast(list[tuple[str, bytes | None]], list(message.headers() or [])) + [
        ("error", error[:DEAD_LETTER_ERROR_MAX_CHARS].encode()),
        ("source_topic", topic.encode()),
        ("source_partition", str(partition).encode()),
        ("source_offset", str(offset).encode()),
    ]


def make_consumer(
    settings: Settings,
    group_id: str,
    topics: list[str],
    tracker: OffsetTracker,
    assigned: set[tuple[str, int]] | None = None,
    **overrides,
) -> Consumer:
    """An at-least-once consumer: the caller marks messages started and finished in `tracker`, and
    calls store_offsets(); stored offsets are committed in the background, on revoke and on close.
    `assigned`, if given, is kept equal to the consumer's assignment (asking the consumer for it
    waits on librdkafka's main thread, too slow for a loop)."""
    assigned = set() if assigned is None else assigned
    config = {
        **client_config(settings),
        "group.id": group_id,
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "auto.commit.interval.ms": settings.kafka_auto_commit_interval_ms,
        # Moves only the partitions that must move; a consumer of several topics passes "roundrobin",
        # which splits every topic's partitions evenly (sticky balances the total, so one member
        # could get all of one topic).
        "partition.assignment.strategy": "cooperative-sticky",
        # A member that crashed holds its partitions until its session expires (45 s by default).
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": max(100, settings.kafka_session_timeout_ms // 5),
    }
    config.update(overrides)
    consumer = Consumer(config)

    def on_assign(_c: Consumer, partitions: list[TopicPartition]) -> None:
        assigned.update((tp.topic, tp.partition) for tp in partitions)

    def on_revoke(c: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [(tp.topic, tp.partition) for tp in partitions]
        store_offsets(c, tracker, revoked)  # finished work is committed; the rest is the next owner's
        commit_stored(c)
        tracker.forget(revoked)
        assigned.difference_update(revoked)

    def on_lost(_c: Consumer, partitions: list[TopicPartition]) -> None:
        lost = [(tp.topic, tp.partition) for tp in partitions]
        tracker.forget(lost)  # already someone else's: commit nothing
        assigned.difference_update(lost)

    consumer.subscribe(topics, on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)
    return consumer


def store_offsets(consumer: Consumer, tracker: OffsetTracker, partitions: list | None = None) -> None:
    """Hand the offsets the tracker allows to the consumer, which commits them in the background."""
    offsets = tracker.committable(partitions)
    if not offsets:
        return
    try:
        consumer.store_offsets(offsets=offsets)
    except KafkaException as exc:  # a partition revoked meanwhile: its new owner processes its messages again
        log.warning("could not store offsets: %s", exc)


def commit_stored(consumer: Consumer) -> None:
    """Commit the offsets stored so far, now (as on revoke), rather than at the next auto-commit."""
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError._NO_OFFSET:
            log.warning("commit of stored offsets failed: %s", exc)


def ensure_topics(settings: Settings, timeout: float = 30) -> None:
    """Create the service's topics if they are missing (the brokers do not auto-create them)."""
    admin = AdminClient(client_config(settings))
    wanted = [
        settings.topic_requested,
        settings.topic_requested_bulk,
        settings.topic_processed,
        settings.topic_dead_letter,
        settings.topic_processed_dead_letter,
        settings.topic_job_requested,
        settings.topic_job_dead_letter,
    ]
    existing = admin.list_topics(timeout=timeout).topics
    missing = [
        NewTopic(
            t,
            num_partitions=settings.topic_partitions,
            replication_factor=settings.kafka_replication_factor,
            config={"min.insync.replicas": str(settings.kafka_min_insync_replicas)},
        )
        for t in wanted
        if t not in existing
    ]
    if not missing:
        return
    for topic, future in admin.create_topics(missing, operation_timeout=timeout).items():
        try:
            future.result(timeout)
            log.info("created topic %s", topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
