"""The processor: image.requested in, one image.processed out per image, at least once."""
import logging
import threading

import httpx
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from pydantic import ValidationError

from services.processor import failures
from services.processor.compress import compress
from services.processor.failures import ImageFailure, StorageUnavailable
from services.processor.fetch import fetch_image, make_http_client
from services.processor.storage import Storage, make_storage
from shared.events import ImageError, ImageProcessed, ImageRequested, ImageStatus
from shared.faults import crash_point
from shared.kafka import DeliveryError, commit_stored, ensure_topics, make_consumer, make_producer, produce_and_wait
from shared.settings import Settings

log = logging.getLogger(__name__)

BATCH_SIZE = 8
MAX_RETRY_PAUSE_SECONDS = 30.0
DEAD_LETTER_ERROR_MAX_CHARS = 1000
Partition = tuple[str, int]  # (topic, partition)


def process(event: ImageRequested, client: httpx.Client, storage: Storage, settings: Settings) -> ImageProcessed:
    """Fetch, compress and store one image. Failures of the image itself become a failed result;
    anything else (storage unavailable, a bug) is raised so the event is processed again."""
    try:
        original = fetch_image(client, event.input_url, settings)
        compressed = compress(original, settings)
        # Deterministic: a duplicate event overwrites the same object instead of adding one.
        key = f"{event.request_id}/{event.image_id}{compressed.extension}"
        output_url = storage.save(key, compressed.data, compressed.content_type)
    except ImageFailure as failure:
        log.info("image %s of request %s failed: %s", event.image_id, event.request_id, failure)
        return failed_result(event, failure)
    log.info(
        "image %s of request %s: %s %d -> %d bytes",
        event.image_id, event.request_id, compressed.format, len(original), len(compressed.data),
    )
    return ImageProcessed(
        **_same_image(event),
        status=ImageStatus.processed,
        output_url=output_url,
        format=compressed.format,
        bytes_in=len(original),
        bytes_out=len(compressed.data),
    )


def failed_result(event: ImageRequested, failure: ImageFailure) -> ImageProcessed:
    return ImageProcessed(
        **_same_image(event), status=ImageStatus.failed, error=ImageError(code=failure.code, message=failure.message)
    )


def _same_image(event: ImageRequested) -> dict:
    return event.model_dump(include={"request_id", "image_id", "row_number", "position", "input_url"})


def run(settings: Settings, stop: threading.Event, storage: Storage | None = None) -> None:
    """Consume until `stop` is set; then finish the current batch, commit and return."""
    if settings.create_topics:
        ensure_topics(settings)
    storage = storage or make_storage(settings)
    client = make_http_client(settings)
    producer = make_producer(settings)
    consumer = make_consumer(
        settings, settings.processor_group, [settings.topic_requested],
        **{"max.poll.interval.ms": _max_batch_milliseconds(settings)},
    )
    log.info("processor consuming %s as group %s", settings.topic_requested, settings.processor_group)
    failed_batches = 0
    attempts: dict[tuple[str, int, int], int] = {}  # (topic, partition, offset) -> tries that raised unexpectedly
    try:
        while not stop.is_set():
            messages = consumer.consume(num_messages=BATCH_SIZE, timeout=1.0)
            if not messages:
                continue
            if _handle_batch(messages, consumer, producer, client, storage, settings, attempts):
                failed_batches = 0
            else:
                failed_batches += 1
                stop.wait(min(MAX_RETRY_PAUSE_SECONDS, 2.0 ** (failed_batches - 1)))
    finally:
        consumer.close()  # commits the stored offsets
        producer.flush(30)
        client.close()
        log.info("processor stopped")


def _max_batch_milliseconds(settings: Settings) -> int:
    """How long a batch may take before Kafka presumes this consumer dead and hands its partitions on:
    every image of a batch may exhaust its fetch attempts (the default 5 minutes is less than that)."""
    longest_fetch = settings.fetch_attempts * (settings.fetch_connect_timeout + settings.fetch_read_timeout + 1)
    return int(max(300, 2 * BATCH_SIZE * longest_fetch) * 1000)


def _handle_batch(
    messages: list[Message], consumer: Consumer, producer: Producer, client: httpx.Client, storage: Storage,
    settings: Settings, attempts: dict[tuple[str, int, int], int],
) -> bool:
    """Process a batch, send its results, then store its offsets. Return False if some of it must be
    processed again (the consumer is then rewound to it)."""
    results: list[tuple[str, bytes]] = []
    dead_letters: list[tuple[Message, str]] = []
    done: list[Message] = []
    retry_from: dict[Partition, int] = {}
    for message in messages:
        if message.error():
            if message.error().fatal():
                raise KafkaException(message.error())
            log.warning("consumer error: %s", message.error())
            continue
        partition = (message.topic(), message.partition())
        if partition in retry_from:
            continue  # an earlier message of this partition is retried first; offsets only move forward past done work
        try:
            event = ImageRequested.model_validate_json(message.value() or b"")
        except ValidationError as exc:
            dead_letters.append((message, _describe(exc)))
            done.append(message)
            continue
        try:
            result = process(event, client, storage, settings)
        except StorageUnavailable as exc:
            log.warning("image %s of request %s waits for the storage: %s", event.image_id, event.request_id, exc)
            retry_from[partition] = message.offset()
            continue
        except Exception as exc:
            tries = attempts[(*partition, message.offset())] = attempts.get((*partition, message.offset()), 0) + 1
            if tries < settings.image_max_attempts:
                log.exception("image %s of request %s raised (try %d); retrying", event.image_id, event.request_id, tries)
                retry_from[partition] = message.offset()
                continue
            log.exception("image %s of request %s failed after %d tries", event.image_id, event.request_id, tries)
            result = failed_result(event, ImageFailure(
                failures.INTERNAL_ERROR, f"unexpected {type(exc).__name__} in {tries} tries: {exc}"[:1000]))
            del attempts[(*partition, message.offset())]
        crash_point(settings, "processor.after_process", lambda: commit_stored(consumer))
        results.append((str(result.request_id), result.model_dump_json().encode()))
        done.append(message)

    try:
        _send_dead_letters(producer, settings.topic_dead_letter, dead_letters)
        produce_and_wait(producer, settings.topic_processed, results)
    except (DeliveryError, KafkaException, BufferError) as exc:
        log.error("results of a batch were not acknowledged; processing it again: %s", exc)
        _rewind(consumer, _first_offsets(messages))
        return False
    _store_offsets(consumer, done)
    _rewind(consumer, retry_from)
    return not retry_from


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "message"
    text = f"not an ImageRequested event ({exc.error_count()} errors); {where}: {first['msg']}"
    return text[:DEAD_LETTER_ERROR_MAX_CHARS]


def _send_dead_letters(producer: Producer, topic: str, dead_letters: list[tuple[Message, str]]) -> None:
    """Pass unreadable messages on unchanged, with headers saying why and where from; wait for the brokers."""
    for message, error in dead_letters:
        log.warning("message %s[%d]@%d sent to %s: %s", message.topic(), message.partition(), message.offset(), topic, error)
    produce_and_wait(producer, topic, [
        (message.key(), message.value(), list(message.headers() or []) + [
            ("error", error.encode()),
            ("source_topic", message.topic().encode()),
            ("source_partition", str(message.partition()).encode()),
            ("source_offset", str(message.offset()).encode()),
        ])
        for message, error in dead_letters
    ])


def _first_offsets(messages: list[Message]) -> dict[Partition, int]:
    first: dict[Partition, int] = {}
    for message in messages:
        if not message.error():
            partition = (message.topic(), message.partition())
            first[partition] = min(first.get(partition, message.offset()), message.offset())
    return first


def _store_offsets(consumer: Consumer, done: list[Message]) -> None:
    next_offsets: dict[Partition, int] = {}
    for message in done:
        partition = (message.topic(), message.partition())
        next_offsets[partition] = max(next_offsets.get(partition, 0), message.offset() + 1)
    if not next_offsets:
        return
    try:
        consumer.store_offsets(offsets=[TopicPartition(t, p, o) for (t, p), o in next_offsets.items()])
    except KafkaException as exc:  # a partition was revoked meanwhile: its new owner processes the messages again
        log.warning("could not store offsets: %s", exc)


def _rewind(consumer: Consumer, offsets: dict[Partition, int]) -> None:
    for (topic, partition), offset in offsets.items():
        try:
            consumer.seek(TopicPartition(topic, partition, offset))
        except KafkaException as exc:  # revoked meanwhile: the new owner starts from the committed offset
            log.warning("could not rewind %s[%d] to %d: %s", topic, partition, offset, exc)
