"""Images whose events were lost (e.g. Kafka's log deleted, a topic recreated) are requested again,
and after reconcile_max_requests such requests they fail as `lost`, so that every job ends.

An image is taken for lost only when it cannot still be on its way. Each pass notes the database's
clock and then, in this order: where the request topics end, where the processors have committed,
where the results topic ends. The processors commit an event only once its result is acknowledged,
so if at pass m they had committed past the request topics' ends of an earlier pass j, every image
requested before pass j has its result in the results topic below pass m's ends. Once the notifier
has committed past those, each such image is recorded, unless its events never reached a processor.
An image queued behind a backlog, or waiting for a retry, holds its partition's committed offset
back, so it is never taken for lost. Under a load that never lets the processors catch up with an
earlier pass, lost images wait until it does.
"""

import logging
import threading
from collections import deque
from dataclasses import dataclass
from datetime import datetime

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from shared import kafka
from shared.db import DictPool
from shared.events import ImageError, ImageProcessed, ImageStatus, JobOptions, RequestedEvents
from shared.failures import FailureCode
from shared.positions import Positions, committed_offsets, end_offsets, offset_reader, reached
from shared.settings import Settings

log = logging.getLogger(__name__)

PASSES_KEPT = 20
BATCH = 5_000

# Images released (up to their job's release cursor) and still pending. An image was last requested by
# the later of its job's last release (the dispatcher releases a job's images in order, so the image's own
# release was no later) and its last request by the reconciler.
PENDING_REQUESTED_BEFORE = """
SELECT i.id, i.job_id, i.row_number, i.position, i.input_url, i.requested_again, j.options
FROM processing_jobs j JOIN images i ON i.job_id = j.job_id
WHERE j.status <> 'completed' AND j.last_released_at < %(cutoff)s
  AND i.status = 'pending' AND (i.row_number, i.position) <= (j.release_row, j.release_position)
  AND greatest(i.requested_again_at, j.last_released_at) < %(cutoff)s
ORDER BY i.job_id, i.row_number, i.position
LIMIT %(limit)s
FOR UPDATE OF i SKIP LOCKED
"""

# clock_timestamp(): after the events were acknowledged, so a later pass's cutoff covers them.
MARK_REQUESTED_AGAIN = """
UPDATE images SET requested_again = requested_again + 1, requested_again_at = clock_timestamp()
WHERE id = ANY(%s)
"""


@dataclass(frozen=True)
class Pass:
    database_time: datetime
    requests_end: Positions
    processors_committed: Positions
    results_end: Positions


class Reconciler:
    def __init__(self, settings: Settings, pool: DictPool, producer: Producer):
        self.settings = settings
        self.pool = pool
        self.producer = producer
        self.admin = AdminClient(kafka.client_config(settings))
        self.processors = offset_reader(settings, settings.processor_group)
        self.notifiers = offset_reader(settings, settings.notifier_group)
        self.request_topics = [settings.topic_requested, settings.topic_requested_bulk]
        self.passes: deque[Pass] = deque(maxlen=PASSES_KEPT)

    def close(self) -> None:
        self.processors.close()
        self.notifiers.close()

    def run_once(self) -> int:
        """One pass: return how many lost images were requested again or failed."""
        notifiers_committed = committed_offsets(self.notifiers, [self.settings.topic_processed])
        cutoff = self._cutoff(notifiers_committed)
        self.passes.append(self._take_pass())
        return 0 if cutoff is None else self._handle_lost_before(cutoff)

    def _take_pass(self) -> Pass:
        with self.pool.connection() as conn:
            row = conn.execute("SELECT clock_timestamp() AS now").fetchone()
        assert row is not None  # a SELECT without FROM gives one row
        return Pass(
            row["now"],
            end_offsets(self.admin, self.request_topics),
            committed_offsets(self.processors, self.request_topics),
            end_offsets(self.admin, [self.settings.topic_processed]),
        )

    def _cutoff(self, notifiers_committed: Positions) -> datetime | None:
        """The latest time before which every requested image had its result recorded, or None."""
        passes = list(self.passes)
        for m in range(len(passes) - 1, -1, -1):
            if reached(notifiers_committed, passes[m].results_end):
                for j in range(m - 1, -1, -1):
                    if reached(passes[m].processors_committed, passes[j].requests_end):
                        return passes[j].database_time
                return None
        return None

    def _handle_lost_before(self, cutoff: datetime) -> int:
        handled = 0
        while True:
            with self.pool.connection() as conn, conn.transaction():
                lost = conn.execute(PENDING_REQUESTED_BEFORE, {"cutoff": cutoff, "limit": BATCH}).fetchall()
                if not lost:
                    return handled
                again = [image for image in lost if image["requested_again"] < self.settings.reconcile_max_requests]
                given_up = [image for image in lost if image["requested_again"] >= self.settings.reconcile_max_requests]
                self._request_again(again)
                self._fail(given_up)
                conn.execute(MARK_REQUESTED_AGAIN, [[image["id"] for image in lost]])
            log.warning(
                "%d image(s) whose events were lost: %d requested again, %d failed as %s",
                len(lost),
                len(again),
                len(given_up),
                FailureCode.LOST,
            )
            handled += len(lost)

    def _request_again(self, images: list[dict]) -> None:
        for job_id in {image["job_id"] for image in images}:
            of_job = [image for image in images if image["job_id"] == job_id]
            stored = of_job[0]["options"]
            options = None if stored is None else JobOptions.model_validate(stored)
            events = RequestedEvents(job_id, options).encode(
                (image["id"], image["row_number"], image["position"], image["input_url"]) for image in of_job
            )
            messages = [(str(image["id"]), event) for image, event in zip(of_job, events, strict=True)]
            kafka.produce_and_wait(self.producer, self.settings.topic_requested_bulk, messages)

    def _fail(self, images: list[dict]) -> None:
        error = ImageError(
            code=FailureCode.LOST, message=f"its events were lost {self.settings.reconcile_max_requests + 1} time(s)"
        )
        messages = [
            (
                str(image["id"]),
                ImageProcessed(
                    request_id=image["job_id"],
                    image_id=image["id"],
                    status=ImageStatus.failed,
                    error=error,
                    **_place(image),
                )
                .model_dump_json()
                .encode(),
            )
            for image in images
        ]
        kafka.produce_and_wait(self.producer, self.settings.topic_processed, messages)


def _place(image: dict) -> dict:
    return {key: image[key] for key in ("row_number", "position", "input_url")}


def reconcile_until(stop: threading.Event, reconciler: Reconciler, interval: float) -> None:
    try:
        while not stop.wait(interval):
            try:
                reconciler.run_once()
            except Exception:
                log.exception("reconciling lost images failed; trying again in %gs", interval)
    finally:
        reconciler.close()
