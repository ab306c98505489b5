"""The dispatcher: a job's images wait in PostgreSQL and are released into Kafka a few at a time, so that
Kafka holds only a short window of work and what enters it is decided at release time, by fair share
(services/api/fair_share.py) within a window sized from the processors' measured pace
(services/api/window.py).

Every API process runs one; the one holding a PostgreSQL advisory lock leads and the others stand by,
taking over within STANDBY_SECONDS when the leader's session ends (a crash closes it). A round reads
the jobs not completed, works out what each holds (released and not finished: released_images minus
its results) and what waits, gives the window's free places out fairly, reads those images (each job's
next ones after its release cursor, in CSV order), produces their image.requested events, waits for
Kafka's acknowledgement, and only then moves the jobs' cursors, on the same session as the lock. A
leader that dies between the two has its images released again by the next one: a duplicate, which
the processors and the notifier absorb (everything is keyed by image id); nothing is lost, and with
one leader nothing is released twice in normal operation. Kafka down: the events are not acknowledged,
the cursors stay, the round is tried again.

A new job's first image may go beyond the window by up to an eighth of it, so that it starts at the
next round even while the window is full. Rounds run when an upload or the notifier signals (NOTIFY on
shared.db.RELEASE_CHANNEL: a new job, or results that free places), and every POLL_SECONDS otherwise."""

import logging
import threading
import time
import uuid
from dataclasses import dataclass

import psycopg
from confluent_kafka import Producer
from psycopg.rows import DictRow, dict_row, tuple_row

from services.api import metrics
from services.api.fair_share import JobDemand, Release, allocate
from services.api.window import Window
from shared.db import RELEASE_CHANNEL
from shared.events import JobOptions, RequestedEvents
from shared.faults import crash_point
from shared.kafka import make_producer
from shared.settings import Settings

log = logging.getLogger(__name__)

LOCK_KEY = 0x696D67706970  # "imgpip": the advisory lock whose holder leads
STANDBY_SECONDS = 1.0  # how often a standing-by dispatcher tries to take the lead
POLL_SECONDS = 0.25  # a round at least this often while images wait (NOTIFY usually comes first)
IDLE_POLL_SECONDS = 1.0  # ... and while none wait
ROUND_MIN_SECONDS = 0.005  # signals closer together than this share one round
ROUND_MAX_IMAGES = 20_000  # released in one round at most (a round's events are read and held in memory)
# Beyond the window, an eighth of it more is kept for the first image of jobs with none released yet, so
# that a new job starts at the next round even while the window is full.
STARTING_PART = 8
# The window is refilled once an eighth of it is free (or all that waits fits): a round per finished image
# made the broker, the processors' fetches and PostgreSQL work for every single image.
REFILL_PART = 8
RETRY_SECONDS = 1.0  # after a round that failed (Kafka or PostgreSQL), before the next
STATE_EVERY_SECONDS = 1.0  # how often the leader writes what it measured to dispatcher_state

ACTIVE_JOBS = """
SELECT j.job_id, j.owner_key_id, coalesce(k.weight, 1) AS weight, coalesce(k.name, '') AS client_name,
       j.total_images, j.released_images, j.processed_images + j.failed_images AS finished,
       j.release_row, j.release_position, j.options
FROM processing_jobs j LEFT JOIN api_keys k ON k.id = j.owner_key_id
WHERE j.status <> 'completed'
ORDER BY j.created_at, j.job_id
"""

# Each job's next images after its cursor, in CSV order (the unique index of images serves it).
NEXT_IMAGES = """
SELECT r.job_id, i.id::text, i.row_number, i.position, i.input_url
FROM unnest(%s::uuid[], %s::int[], %s::int[], %s::int[]) AS r(job_id, after_row, after_position, images)
CROSS JOIN LATERAL (
    SELECT id, row_number, position, input_url FROM images
    WHERE images.job_id = r.job_id
      AND (images.job_id, images.row_number, images.position) > (r.job_id, r.after_row, r.after_position)
    ORDER BY images.job_id, images.row_number, images.position
    LIMIT r.images
) i
ORDER BY r.job_id, i.row_number, i.position
"""

# Only from the count the round started from: a cursor someone else moved meanwhile stays theirs.
ADVANCE = """
UPDATE processing_jobs AS j
SET released_images = j.released_images + r.images, release_row = r.last_row, release_position = r.last_position,
    first_released_at = coalesce(j.first_released_at, now()), last_released_at = now(),
    published_at = CASE WHEN j.released_images + r.images >= j.total_images THEN now() ELSE j.published_at END
FROM unnest(%s::uuid[], %s::int[], %s::int[], %s::int[], %s::int[])
     AS r(job_id, released_before, images, last_row, last_position)
WHERE j.job_id = r.job_id AND j.released_images = r.released_before
RETURNING CASE WHEN r.released_before = 0 THEN extract(epoch FROM now() - j.created_at) END AS first_release_seconds
"""

SAVE_STATE = """
INSERT INTO dispatcher_state (window_images, images_per_second, released_not_finished) VALUES (%s, %s, %s)
ON CONFLICT (singleton) DO UPDATE SET window_images = excluded.window_images,
    images_per_second = excluded.images_per_second, released_not_finished = excluded.released_not_finished,
    updated_at = now()
"""


@dataclass
class ActiveJob:
    demand: JobDemand
    client_name: str
    released: int
    cursor: tuple[int, int]  # (row_number, position) of the last image released
    options: dict | None


@dataclass
class RoundResult:
    released: int
    waiting: int  # images still waiting after the round


class Dispatcher:
    def __init__(self, settings: Settings, producer: Producer | None = None):
        self.settings = settings
        self.producer = producer or make_producer(
            settings, **{"message.timeout.ms": int(settings.publish_attempt_seconds * 1000)}
        )
        self.window = Window(
            settings.dispatch_window_seconds, settings.dispatch_window_min_images, settings.dispatch_window_max_images
        )
        self.leading = threading.Event()
        self._released_since_round = 0
        self._events: dict[uuid.UUID, RequestedEvents] = {}  # per active job: its events' template
        self._state_saved_at = 0.0

    def run(self, stop: threading.Event) -> None:
        """Stand by until this process leads, then release until `stop` is set (or the lead is lost)."""
        while not stop.is_set():
            try:
                with psycopg.connect(self.settings.database_url, autocommit=True, row_factory=dict_row) as conn:
                    lock = conn.execute("SELECT pg_try_advisory_lock(%s) AS led", [LOCK_KEY]).fetchone()
                    assert lock is not None  # a SELECT without FROM gives one row
                    if lock["led"]:
                        self._lead(conn, stop)
                        continue
            except psycopg.Error as exc:
                log.warning("dispatcher: the database failed (%s); trying again in %gs", exc, RETRY_SECONDS)
            finally:
                self._step_down()
            stop.wait(STANDBY_SECONDS)

    def close(self, timeout: float) -> None:
        self.producer.flush(timeout)

    def _lead(self, conn: psycopg.Connection[DictRow], stop: threading.Event) -> None:
        log.info("dispatcher: leading the release of images")
        self.leading.set()
        metrics.LEADING.set(1)
        self.window = Window(
            self.settings.dispatch_window_seconds,
            self.settings.dispatch_window_min_images,
            self.settings.dispatch_window_max_images,
        )
        self._released_since_round = 0
        conn.execute(f"LISTEN {RELEASE_CHANNEL}")
        wait = 0.0
        while not stop.is_set():
            self._wait_for_signal(conn, wait)
            started = time.monotonic()
            try:
                result = self.release_round(conn, stop)
            except psycopg.OperationalError:
                raise  # the session (and the lead with it) is gone: stand by and try again
            except Exception:
                log.exception("dispatcher: a release round failed; trying again in %gs", RETRY_SECONDS)
                wait = RETRY_SECONDS
                continue
            if result.released >= ROUND_MAX_IMAGES:
                wait = 0.0  # more may fit at once
            else:  # signals coming closer together than ROUND_MIN_SECONDS share the next round
                stop.wait(max(0.0, ROUND_MIN_SECONDS - (time.monotonic() - started)))
                wait = POLL_SECONDS if result.waiting else IDLE_POLL_SECONDS

    def _step_down(self) -> None:
        if self.leading.is_set():
            log.info("dispatcher: no longer leading")
        self.leading.clear()
        metrics.LEADING.set(0)
        metrics.WAITING.set({})
        self._events.clear()

    @staticmethod
    def _wait_for_signal(conn: psycopg.Connection[DictRow], timeout: float) -> None:
        """Return at the first NOTIFY, or after `timeout`; signals already received are used up."""
        if timeout > 0:
            for _ in conn.notifies(timeout=timeout, stop_after=1):
                break
        for _ in conn.notifies(timeout=0):
            pass

    def release_round(self, conn: psycopg.Connection[DictRow], stop: threading.Event) -> RoundResult:
        """One round: fill the window's free places fairly; return what was released and what still waits."""
        jobs = [self._active_job(row) for row in conn.execute(ACTIVE_JOBS).fetchall()]
        held = sum(job.demand.held for job in jobs)
        waiting = sum(job.demand.waiting for job in jobs)
        self.window.observe(time.monotonic(), held, self._released_since_round)
        self._released_since_round = 0
        window = self.window.size
        metrics.observe_round(jobs, held, window, self.window.images_per_second)
        self._save_state(conn, window, held)
        self._events = {
            job.demand.job_id: self._events[job.demand.job_id] for job in jobs if job.demand.job_id in self._events
        }
        places = max(0, min(window - held, ROUND_MAX_IMAGES))
        if places < max(1, window // REFILL_PART) and waiting > places:
            places = 0  # too few to be worth a round's produce requests: wait until more are free
        new_jobs = any(job.released == 0 and job.demand.waiting for job in jobs)
        starting_places = max(0, window + max(1, window // STARTING_PART) - held) - places if new_jobs else 0
        if waiting == 0 or places + starting_places == 0:
            return RoundResult(0, waiting)
        plan = allocate([job.demand for job in jobs], window, places, starting_places)
        if not plan:
            return RoundResult(0, waiting)
        by_id = {job.demand.job_id: job for job in jobs}
        images = self._next_images(conn, [(by_id[job_id], release.total) for job_id, release in plan.items()])
        acknowledged = self._produce(by_id, plan, images, stop)
        crash_point(self.settings, "dispatcher.after_produce")
        released = self._advance(conn, by_id, images, acknowledged)
        self._released_since_round = released
        return RoundResult(released, waiting - released)

    def _active_job(self, row: dict) -> ActiveJob:
        return ActiveJob(
            demand=JobDemand(
                job_id=row["job_id"],
                client=row["owner_key_id"],
                weight=row["weight"],
                held=max(0, row["released_images"] - row["finished"]),
                waiting=row["total_images"] - row["released_images"],
                released=row["released_images"],
            ),
            client_name=row["client_name"],
            released=row["released_images"],
            cursor=(row["release_row"], row["release_position"]),
            options=row["options"],
        )

    def _next_images(
        self, conn: psycopg.Connection[DictRow], counts: list[tuple[ActiveJob, int]]
    ) -> dict[uuid.UUID, list[tuple]]:
        """Each job's next images after its cursor, as (id, row_number, position, input_url)."""
        rows = (
            conn.cursor(row_factory=tuple_row)
            .execute(
                NEXT_IMAGES,
                [
                    [job.demand.job_id for job, _ in counts],
                    [job.cursor[0] for job, _ in counts],
                    [job.cursor[1] for job, _ in counts],
                    [images for _, images in counts],
                ],
            )
            .fetchall()
        )
        images: dict[uuid.UUID, list[tuple]] = {}
        for job_id, *image in rows:
            images.setdefault(job_id, []).append(tuple(image))
        return images

    def _produce(
        self,
        jobs: dict[uuid.UUID, ActiveJob],
        plan: dict[uuid.UUID, Release],
        images: dict[uuid.UUID, list[tuple]],
        stop: threading.Event,
    ) -> set[uuid.UUID]:
        """Produce the round's events and wait for Kafka; return the jobs whose every event was acknowledged."""
        failed: dict[uuid.UUID, str] = {}
        pending = [0]

        def report(job_id: uuid.UUID):
            def delivered(error, _message) -> None:
                pending[0] -= 1
                if error is not None:
                    failed.setdefault(job_id, error.str())

            return delivered

        for job_id, of_job in images.items():
            events = self._events_of(jobs[job_id])
            priority = plan[job_id].priority
            on_delivery = report(job_id)
            for n, (image, event) in enumerate(zip(of_job, events.encode(of_job), strict=True)):
                topic = self.settings.topic_requested if n < priority else self.settings.topic_requested_bulk
                pending[0] += 1
                self._produce_one(topic, event, image[0], on_delivery)
            self.producer.poll(0)
        while pending[0] > 0 and not stop.is_set():
            self.producer.poll(0.05)  # every event gets its report within message.timeout.ms
        if pending[0] > 0:  # stopping: what is not acknowledged yet is released again by the next leader
            self.producer.flush(1)
        if failed:
            log.warning(
                "dispatcher: Kafka did not acknowledge the events of %d job(s) (%s); releasing them again",
                len(failed),
                next(iter(failed.values())),
            )
        unreported = set(images) if pending[0] > 0 else set()
        return set(images) - set(failed) - unreported

    def _produce_one(self, topic: str, value: bytes, key: str, on_delivery) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                return
            except BufferError:  # the local queue is full (Kafka slow or away): its reports free it
                self.producer.poll(0.05)

    def _events_of(self, job: ActiveJob) -> RequestedEvents:
        events = self._events.get(job.demand.job_id)
        if events is None:
            options = None if job.options is None else JobOptions.model_validate(job.options)
            events = self._events[job.demand.job_id] = RequestedEvents(job.demand.job_id, options)
        return events

    def _advance(
        self,
        conn: psycopg.Connection[DictRow],
        jobs: dict[uuid.UUID, ActiveJob],
        images: dict[uuid.UUID, list[tuple]],
        acknowledged: set[uuid.UUID],
    ) -> int:
        """Move the cursors of the jobs whose events Kafka acknowledged; return how many images that released."""
        done = [job_id for job_id in images if job_id in acknowledged]
        if not done:
            return 0
        rows = conn.execute(
            ADVANCE,
            [
                done,
                [jobs[job_id].released for job_id in done],
                [len(images[job_id]) for job_id in done],
                [images[job_id][-1][1] for job_id in done],
                [images[job_id][-1][2] for job_id in done],
            ],
        ).fetchall()
        for row in rows:
            if row["first_release_seconds"] is not None:
                metrics.FIRST_RELEASE.observe(float(row["first_release_seconds"]))
        released = sum(len(images[job_id]) for job_id in done)
        metrics.RELEASED.inc(released)
        return released

    def _save_state(self, conn: psycopg.Connection[DictRow], window: int, held: int) -> None:
        now = time.monotonic()
        if now - self._state_saved_at >= STATE_EVERY_SECONDS:
            conn.execute(SAVE_STATE, [window, self.window.images_per_second, held])
            self._state_saved_at = now
