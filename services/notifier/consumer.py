"""The notifier's main loop: consume image results, apply them, and keep the webhook sender running."""
import logging
import threading

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition
from psycopg_pool import ConnectionPool
from standardwebhooks import Webhook

from services.notifier.results import apply_results
from services.notifier.webhook import deliver_due, make_webhook_client
from shared.db import make_pool, migrate
from shared.events import ImageProcessed
from shared.faults import crash_point
from shared.kafka import commit_stored, ensure_topics, make_consumer
from shared.settings import Settings

log = logging.getLogger(__name__)

BATCH_SIZE = 500
DELIVERY_INTERVAL_SECONDS = 1.0
MAX_RETRY_DELAY_SECONDS = 30.0


def run(settings: Settings, stop: threading.Event) -> None:
    """Consume until `stop` is set. Offsets are stored only after a batch is committed to the database,
    so a crash at any point re-delivers results, which apply_results ignores the second time."""
    if settings.webhook_secret is not None:
        Webhook(settings.webhook_secret.get_secret_value())  # a malformed secret stops the start, not each send
    migrate(settings.database_url)
    if settings.create_topics:
        ensure_topics(settings)
    pool = make_pool(settings.database_url)
    consumer = make_consumer(settings, settings.notifier_group, [settings.topic_processed])
    deliveries_due = threading.Event()
    stop_sender = threading.Event()
    sender = threading.Thread(
        target=_send_webhooks, args=(pool, settings, deliveries_due, stop_sender), name="webhook-sender", daemon=True
    )
    sender.start()
    try:
        while not stop.is_set():
            messages = consumer.consume(num_messages=BATCH_SIZE, timeout=0.5)
            if not messages:
                continue
            results = _parse(messages)
            completed = _apply_until_committed(pool, results, stop)
            if completed is None:
                break  # stopping before the batch was committed: its offsets stay unstored
            if completed:
                log.info("jobs completed: %s", ", ".join(map(str, completed)))
                crash_point(settings, "notifier.after_completing_commit", lambda: commit_stored(consumer))
                deliveries_due.set()
            _store_offsets(consumer, messages)
    finally:
        consumer.close()
        stop_sender.set()
        deliveries_due.set()
        sender.join()
        pool.close()


def _parse(messages: list[Message]) -> list[ImageProcessed]:
    results = []
    for message in messages:
        if message.error() is not None:
            if message.error().fatal():
                raise KafkaException(message.error())
            log.warning("consumer error: %s", message.error())
            continue
        try:
            results.append(ImageProcessed.model_validate_json(message.value()))
        except ValueError as exc:
            log.error("skipping unparseable result at %s[%d]@%d: %s",
                      message.topic(), message.partition(), message.offset(), exc)
    return results


def _apply_until_committed(pool: ConnectionPool, results: list[ImageProcessed], stop: threading.Event) -> list | None:
    """Apply the batch, retrying while the database fails; return the jobs it completed, or None if
    stopped before it was committed."""
    delay = 0.5
    while True:
        try:
            with pool.connection() as conn:
                return apply_results(conn, results)
        except Exception:
            log.exception("applying %d results failed; retrying in %gs", len(results), delay)
            if stop.wait(delay):
                return None
            delay = min(delay * 2, MAX_RETRY_DELAY_SECONDS)


def _store_offsets(consumer: Consumer, messages: list[Message]) -> None:
    next_offsets: dict[tuple[str, int], int] = {}
    for message in messages:
        if message.error() is None:
            next_offsets[(message.topic(), message.partition())] = message.offset() + 1
    if not next_offsets:
        return
    try:
        consumer.store_offsets(offsets=[TopicPartition(t, p, o) for (t, p), o in next_offsets.items()])
    except KafkaException as exc:
        # A partition revoked meanwhile: its new owner re-reads these results, which is harmless.
        log.warning("could not store offsets: %s", exc)


def _send_webhooks(
    pool: ConnectionPool, settings: Settings, deliveries_due: threading.Event, stop: threading.Event
) -> None:
    """Deliver due webhooks every second, or at once when a job completes."""
    with make_webhook_client(settings) as client:
        while not stop.is_set():
            deliveries_due.clear()
            try:
                deliver_due(pool, client, settings, stop)
            except Exception:
                log.exception("delivering webhooks failed")
            deliveries_due.wait(DELIVERY_INTERVAL_SECONDS)
