"""PostgreSQL is the outbox of the image.requested events: a job is committed first and its events are
produced after; a relay thread publishes again whatever Kafka has not acknowledged, until it has.

Each unpublished job says when its events are due to be (re)published (publish_due_at):
- an upload sets it republish_after_seconds ahead: a lease, so that if this API dies before Kafka
  acknowledges, another API (or this one, restarted) takes the job after that, and not before;
- an attempt that fails (Kafka refused, or did not acknowledge within publish_attempt_seconds) makes
  the job due at once: nobody waits for the lease of an attempt known to have failed;
- the relay takes due jobs (FOR UPDATE SKIP LOCKED, so two APIs never take the same one), renews the
  lease and produces the events again, as often as it takes.
Kafka's acknowledgement of every event of a job sets published_at.
A job's events are produced by a thread of their own, reading the job's images from PostgreSQL in
batches (PRODUCE_BATCH_IMAGES), so that neither the upload nor the relay waits for a large job to be
handed over, and memory stays bounded whatever its size; the upload waits only for the acknowledgement,
and no longer than upload_publish_wait_seconds. An event may reach Kafka twice (an
attempt that timed out after the broker wrote it, an API that died after producing): the processor
and the notifier key everything by image id, so a repeat changes nothing.
"""
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
from confluent_kafka import KafkaError, KafkaException, Producer
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool

from shared.events import JobOptions, RequestedEvents
from shared.settings import Settings

log = logging.getLogger(__name__)

RELAY_TICK_SECONDS = 0.1  # how often the relay serves delivery reports
RETRY_DELAY_SECONDS = 1.0  # after a failed attempt, before the next one (each attempt itself takes up to publish_attempt_seconds)
RELAY_MAX_JOBS_IN_FLIGHT = 20  # jobs the relay produces at once: during an outage, Kafka's local queue holds no more
PRODUCE_BATCH_IMAGES = 20_000  # images read from PostgreSQL, then handed to the producer, at a time (5000: 1.6x slower)


class Delivery:
    """The delivery reports of one job's events, counted as they arrive (on whichever thread polls)."""

    def __init__(self, events: int, upload_waiting: bool = False):
        self.events = events
        self.pending = events  # reports still to come
        self.first_error: str | None = None
        self.settled = threading.Event()  # every report is in: acknowledged, or failed if first_error is set
        self.upload_waiting = upload_waiting  # while an upload waits for it, the upload records the outcome
        self._lock = threading.Lock()

    def report(self, error: KafkaError | None, _message=None) -> None:
        self._count(1, error.str() if error is not None else None)

    def give_up(self, unsent: int, reason: str) -> None:
        """`unsent` events were never handed to the producer: the attempt has failed."""
        self._count(unsent, reason)

    def _count(self, reports: int, error: str | None) -> None:
        with self._lock:
            self.first_error = self.first_error or error
            self.pending -= reports
            if self.pending <= 0:
                self.settled.set()

    def cannot_settle_within(self, remaining: float, elapsed: float) -> bool:
        """Whether, at the rate reports have come so far, the rest would take longer than `remaining`
        (unknown, so False, before the first report)."""
        reported = self.events - self.pending
        return reported > 0 and self.pending * elapsed / reported > remaining

    @property
    def ok(self) -> bool:
        return self.settled.is_set() and self.first_error is None


class Outbox:
    def __init__(self, pool: ConnectionPool, producer: Producer, settings: Settings):
        self.pool = pool
        self.producer = producer
        self.settings = settings
        self._in_flight: dict[uuid.UUID, Delivery] = {}
        self._lock = threading.Lock()
        self._next_scan = 0.0  # time.monotonic() of the relay's next look for due jobs
        self._closing = threading.Event()

    def publish_upload(self, job_id: uuid.UUID, total_images: int) -> bool:
        """Start producing a freshly committed job's events and wait up to upload_publish_wait_seconds for
        Kafka's acknowledgement; True if every event is acknowledged (published_at is set). Otherwise
        the production goes on and the relay sees the attempt through. A large job's answer is not held
        once the acknowledgements so far show that the rest cannot come within the wait."""
        started = time.monotonic()
        deadline = started + self.settings.upload_publish_wait_seconds
        delivery = self._start(job_id, total_images, upload_waiting=True)
        while not delivery.settled.is_set() and (remaining := deadline - time.monotonic()) > 0:
            self.producer.poll(min(0.05, remaining))
            if delivery.cannot_settle_within(deadline - time.monotonic(), time.monotonic() - started):
                break
        delivery.upload_waiting = False
        return self._settle(job_id) is True

    def run_relay(self, stop: threading.Event) -> None:
        """The relay thread: serve delivery reports, settle finished attempts, and publish due jobs
        (at once after a failed attempt, otherwise every republish_interval_seconds)."""
        while not stop.is_set():
            self.producer.poll(RELAY_TICK_SECONDS)
            try:
                self.settle_finished()
                if time.monotonic() >= self._next_scan:
                    self._next_scan = time.monotonic() + self.settings.republish_interval_seconds
                    count = self.publish_due()
                    if count:
                        log.warning("publishing again the events of %d job(s) Kafka has not acknowledged", count)
            except Exception:
                log.exception("the outbox relay failed; retrying in %gs", RETRY_DELAY_SECONDS)
                self._retry_soon()

    def settle_finished(self) -> None:
        with self._lock:
            finished = [job_id for job_id, delivery in self._in_flight.items()
                        if delivery.settled.is_set() and not delivery.upload_waiting]
        for job_id in finished:
            self._settle(job_id)

    def publish_due(self) -> int:
        """Take the jobs whose events are due (not being produced here), renew their lease and produce
        their events again; return how many jobs."""
        with self._lock:
            in_flight = list(self._in_flight)
        room = RELAY_MAX_JOBS_IN_FLIGHT - len(in_flight)
        if room <= 0:
            return 0
        with self.pool.connection() as conn, conn.transaction():
            due = conn.execute(
                "UPDATE processing_jobs SET publish_due_at = now() + make_interval(secs => %(lease)s),"
                " publish_attempts = publish_attempts + 1"
                " WHERE job_id IN (SELECT job_id FROM processing_jobs"
                "   WHERE published_at IS NULL AND publish_due_at <= now() AND NOT job_id = ANY(%(in_flight)s::uuid[])"
                "   ORDER BY publish_due_at LIMIT %(room)s FOR UPDATE SKIP LOCKED)"
                " RETURNING job_id, total_images",
                {"lease": self.settings.republish_after_seconds, "in_flight": in_flight, "room": room},
            ).fetchall()
        for job in due:
            self._start(job["job_id"], job["total_images"])
        return len(due)

    def close(self, timeout: float) -> None:
        """Stop producing, wait up to `timeout` for the events still queued, and record the jobs they complete."""
        self._closing.set()
        self.producer.flush(timeout)
        self.settle_finished()

    def _start(self, job_id: uuid.UUID, total_images: int, upload_waiting: bool = False) -> Delivery:
        """Produce the job's events on a thread of their own; reports arrive later, on poll()."""
        delivery = Delivery(total_images, upload_waiting)
        with self._lock:
            self._in_flight[job_id] = delivery
        threading.Thread(target=self._produce, args=(job_id, total_images, delivery), name=f"produce-{job_id}",
                         daemon=True).start()
        return delivery

    def _produce(self, job_id: uuid.UUID, total_images: int, delivery: Delivery) -> None:
        """Hand every event of the job to the producer, keyed by image id so that a job spreads over all
        partitions, on the bulk lane when the job is large. Whatever is not handed over counts as failed."""
        topic = self.settings.request_topic(total_images)
        sent = 0
        try:
            events = RequestedEvents(job_id, job_options(self.pool, job_id))
            for batch in self._image_batches(job_id):
                for image, event in zip(batch, events.encode(batch)):
                    failure = self._produce_one(topic, event, image[0], delivery)
                    if failure is not None:
                        delivery.give_up(total_images - sent, failure)
                        return
                    sent += 1
                self.producer.poll(0)
        except (KafkaException, psycopg.Error) as exc:  # e.g. a fatal producer error, the database gone
            delivery.give_up(total_images - sent, str(exc))
            return
        if sent != total_images:  # cannot happen while jobs' images are never deleted before their job
            delivery.give_up(total_images - sent, f"{sent} images found of {total_images}")

    def _produce_one(self, topic: str, value: bytes, key: str, delivery: Delivery) -> str | None:
        """None once the event is in the producer's local queue; why not if it cannot be."""
        stalled_since = None
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=delivery.report)
                return None
            except BufferError:  # Kafka's local queue is full (Kafka slow or away): wait a little
                now = time.monotonic()
                stalled_since = stalled_since or now
                if self._closing.is_set() or now - stalled_since >= self.settings.publish_attempt_seconds:
                    return "the producer's local queue stayed full"
                self.producer.poll(0.05)

    def _image_batches(self, job_id: uuid.UUID) -> Iterator[list[tuple]]:
        """The job's images in CSV order as (id, row_number, position, input_url), PRODUCE_BATCH_IMAGES at
        a time (keyset pages: no long transaction); the next page is read while this one is produced."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"read-{job_id}") as reader:
            next_page = reader.submit(self._image_page, job_id, (0, 0))
            while batch := next_page.result():
                next_page = reader.submit(self._image_page, job_id, batch[-1][1:3])
                yield batch

    def _image_page(self, job_id: uuid.UUID, after: tuple[int, int]) -> list[tuple]:
        with self.pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
            return cur.execute(
                "SELECT id::text, row_number, position, input_url FROM images"
                " WHERE job_id = %s AND (job_id, row_number, position) > (%s, %s, %s)"
                " ORDER BY job_id, row_number, position LIMIT %s",
                (job_id, job_id, *after, PRODUCE_BATCH_IMAGES),
            ).fetchall()

    def _settle(self, job_id: uuid.UUID) -> bool | None:
        """Record a finished attempt once: published_at if every event was acknowledged, due at once
        otherwise. None if the attempt has not finished (or another thread recorded it)."""
        with self._lock:
            delivery = self._in_flight.get(job_id)
            if delivery is None or not delivery.settled.is_set():
                return None
            del self._in_flight[job_id]
        if not delivery.ok:
            log.warning("events of job %s not acknowledged by Kafka (%s); publishing them again", job_id,
                        delivery.first_error)
            self._retry_soon()
        try:
            with self.pool.connection() as conn:
                if delivery.ok:
                    conn.execute("UPDATE processing_jobs SET published_at = now() WHERE job_id = %s", (job_id,))
                else:
                    conn.execute("UPDATE processing_jobs SET publish_due_at = now()"
                                 " WHERE job_id = %s AND published_at IS NULL", (job_id,))
        except psycopg.Error as exc:  # the job keeps its lease: published again when the lease ends
            log.warning("could not record the publication attempt of job %s: %s", job_id, exc)
        return delivery.ok

    def _retry_soon(self) -> None:
        self._next_scan = min(self._next_scan, time.monotonic() + RETRY_DELAY_SECONDS)


def job_options(pool: ConnectionPool, job_id: uuid.UUID) -> JobOptions | None:
    """The options stored with the job; None for a job stored before options existed."""
    with pool.connection() as conn:
        row = conn.execute("SELECT options FROM processing_jobs WHERE job_id = %s", (job_id,)).fetchone()
    return JobOptions.model_validate(row["options"]) if row and row["options"] is not None else None
