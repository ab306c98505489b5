"""The notifier's main loop: consume image results, apply them, and keep the webhook sender running."""

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

from confluent_kafka import Consumer, KafkaException, Message
from pydantic import ValidationError
from standardwebhooks import Webhook

from services.notifier import metrics
from services.notifier.reconciler import Reconciler, reconcile_until
from services.notifier.results import ResultBatch, apply_results
from services.notifier.webhook import deliver_due, make_webhook_client
from shared.db import DictPool, make_pool, migrate
from shared.events import ImageProcessed, describe_invalid
from shared.faults import crash_point
from shared.health import consumer_check, readiness
from shared.kafka import (
    DeliveryError,
    commit_stored,
    dead_letter,
    ensure_topics,
    make_consumer,
    make_producer,
    produce_and_wait,
    store_offsets,
)
from shared.metrics import CONSUMER_LAG
from shared.offsets import OffsetTracker, position
from shared.retry import MESSAGE_MAX_ATTEMPTS, UNAVAILABLE, Backoff
from shared.settings import Settings

log = logging.getLogger(__name__)

BATCH_SIZE = 10_000
DELIVERY_INTERVAL_SECONDS = 1.0
POLL_SECONDS = 0.5
# After a batch's first result, what else comes within this is applied in the same transaction:
# one commit per 20 ms at most instead of one per result while images finish one by one.
BATCH_WINDOW_SECONDS = 0.02


def run(settings: Settings, stop: threading.Event) -> None:
    """Consume until `stop` is set. Offsets are stored only after a batch is committed to the database,
    so a crash at any point re-delivers results, which apply_results ignores the second time."""
    if settings.webhook_secret is not None:
        Webhook(settings.webhook_secret.get_secret_value())  # a malformed secret stops the start, not each send
    migrate(settings.database_url)
    if settings.create_topics:
        ensure_topics(settings)
    pool = make_pool(settings.database_url)
    tracker = OffsetTracker()
    assigned: set[tuple[str, int]] = set()
    consumer = make_consumer(
        settings,
        settings.notifier_group,
        [settings.topic_processed],
        tracker,
        assigned,
        **CONSUMER_LAG.consumer_config(settings.notifier_group),
    )
    readiness.add("consumer", consumer_check(assigned))
    deliveries_due = threading.Event()
    stop_helpers = threading.Event()
    sender = threading.Thread(
        target=_send_webhooks, args=(pool, settings, deliveries_due, stop_helpers), name="webhook-sender", daemon=True
    )
    sender.start()
    producer = make_producer(settings)
    reconciler = threading.Thread(
        target=reconcile_until,
        args=(stop_helpers, Reconciler(settings, pool, producer), settings.reconcile_interval_seconds),
        name="reconciler",
        daemon=True,
    )
    reconciler.start()
    applier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apply-results")
    applying: Applying | None = None  # the batch in the database while the next one is read
    try:
        while not stop.is_set():
            # While a batch is being applied, only what has already arrived is taken, so that the batch's
            # end (its webhooks, its offsets) never waits for the next message.
            messages = _take(consumer, POLL_SECONDS if applying is None else 0)
            following = None
            if messages:
                started = [(m, tracker.start(*position(m))) for m in messages if m.error() is None]
                readable, unreadable = _parse(messages)
                batch = ResultBatch([result for _, result in readable])
                following = Applying(
                    applier.submit(_apply_until_committed, pool, batch, readable, stop),
                    len(readable),
                    started,
                    unreadable,
                )
            if applying is not None and not _finish(
                applying, consumer, tracker, producer, settings, deliveries_due, stop
            ):
                break
            applying = following
        if applying is not None:
            _finish(applying, consumer, tracker, producer, settings, deliveries_due, stop)
    finally:
        applier.shutdown(wait=True)
        consumer.close()
        stop_helpers.set()
        deliveries_due.set()
        sender.join()
        reconciler.join()
        producer.flush(10)
        pool.close()


class Applied(NamedTuple):
    completed: list  # the jobs the batch completed
    refused: list[tuple[Message, str]]  # results the database refused, with why: to the dead-letter topic


class Applying(NamedTuple):
    """A batch handed to the applier thread, with what its end needs on the consuming thread."""

    committed: Future  # Applied, or None if stopped before the batch was committed
    results: int
    started: list[tuple[Message, int]]  # its messages, with the epoch of their partition at the start
    unreadable: list[tuple[Message, str]]  # to pass on to the dead-letter topic


def _finish(
    applying: Applying,
    consumer: Consumer,
    tracker: OffsetTracker,
    producer,
    settings: Settings,
    deliveries_due: threading.Event,
    stop: threading.Event,
) -> bool:
    """Wait for the batch to be committed to the database, then announce the jobs it completed, pass
    its unreadable messages on and store its offsets. False if stopped first: its offsets stay unstored."""
    applied = applying.committed.result()
    if applied is None:
        return False
    completed, letters = applied.completed, applying.unreadable + applied.refused
    metrics.RESULTS_APPLIED.inc(applying.results)
    if completed:
        for job_id in completed:
            log.info("job %s completed", job_id, extra={"request_id": str(job_id)})
        metrics.JOBS_COMPLETED.inc(len(completed))
        crash_point(settings, "notifier.after_completing_commit", lambda: commit_stored(consumer))
        deliveries_due.set()
    if letters and not _dead_letter_until_sent(producer, settings, letters, stop):
        return False
    for message, epoch in applying.started:
        tracker.finish(*position(message), epoch)
    store_offsets(consumer, tracker)
    return True


def _take(consumer: Consumer, timeout: float) -> list[Message]:
    """A batch: the first message within `timeout`, then whatever else comes within the window."""
    first = consumer.poll(timeout)
    return [] if first is None else [first] + consumer.consume(BATCH_SIZE - 1, timeout=BATCH_WINDOW_SECONDS)


def _parse(messages: list[Message]) -> tuple[list[tuple[Message, ImageProcessed]], list[tuple[Message, str]]]:
    """The results with their messages, and the messages that are not results with why."""
    readable, unreadable = [], []
    for message in messages:
        error = message.error()
        if error is not None:
            if error.fatal():
                raise KafkaException(error)
            log.warning("consumer error: %s", error)
            continue
        try:
            readable.append((message, ImageProcessed.model_validate_json(message.value() or b"")))
        except ValidationError as exc:
            unreadable.append((message, describe_invalid(exc, "image.processed")))
    return readable, unreadable


def _dead_letter_until_sent(producer, settings: Settings, letters: list[tuple[Message, str]], stop) -> bool:
    """Pass messages on unchanged to the results' dead-letter topic, with why; retry while Kafka refuses.
    False if stopped first."""
    topic = settings.topic_processed_dead_letter
    messages = [dead_letter(message, topic, error) for message, error in letters]
    backoff = Backoff()
    while True:
        try:
            produce_and_wait(producer, topic, messages)
            return True
        except DeliveryError as exc:
            log.warning("dead letters not acknowledged (%s); retrying in %gs", exc, backoff.delay)
            if not backoff.wait(stop):
                return False


def _apply_until_committed(
    pool: DictPool, batch: ResultBatch, readable: list[tuple[Message, ImageProcessed]], stop: threading.Event
) -> Applied | None:
    """Apply the batch, retrying while the database is unavailable; None if stopped before it was committed.
    A batch that fails MESSAGE_MAX_ATTEMPTS times for another reason is applied one result at a time,
    and the results the database refuses are passed on to the dead-letter topic."""
    backoff, failures = Backoff(), 0
    while True:
        try:
            if failures < MESSAGE_MAX_ATTEMPTS:
                with pool.connection() as conn:
                    return Applied(apply_results(conn, batch), [])
            return _apply_one_by_one(pool, readable)
        except UNAVAILABLE as exc:
            log.warning(
                "the database is unavailable (%s); applying %d results again in %gs",
                exc,
                len(batch.results),
                backoff.delay,
            )
        except Exception:
            failures += 1
            log.exception(
                "applying %d results failed (try %d of %d); trying again in %gs",
                len(batch.results),
                failures,
                MESSAGE_MAX_ATTEMPTS,
                backoff.delay,
            )
        if not backoff.wait(stop):
            return None


def _apply_one_by_one(pool: DictPool, readable: list[tuple[Message, ImageProcessed]]) -> Applied:
    completed, refused = [], []
    with pool.connection() as conn:
        for message, result in readable:
            try:
                completed += apply_results(conn, ResultBatch([result]))
            except UNAVAILABLE:
                raise
            except Exception as exc:
                refused.append((message, f"the database refused image.processed {result.event_id}: {exc}"))
    return Applied(completed, refused)


def _send_webhooks(pool: DictPool, settings: Settings, deliveries_due: threading.Event, stop: threading.Event) -> None:
    """Deliver due webhooks every second, or at once when a job completes."""
    with make_webhook_client(settings) as client:
        while not stop.is_set():
            deliveries_due.clear()
            try:
                deliver_due(pool, client, settings, stop)
            except Exception:
                log.exception("delivering webhooks failed")
            deliveries_due.wait(DELIVERY_INTERVAL_SECONDS)
