"""Jobs created over Kafka: the API consumes job.requested (shared/events.py JobRequested), stores each
job as an upload would be stored, and the dispatcher releases its images like any other. An event it cannot take
(not a JobRequested, a bad URL, too many images, a refused webhook URL, an api_key_id that names no
active key) goes unchanged to
job.requested.dlq with a header saying why. An event is committed only once its job is stored, so a
crash takes it again; the producer's request_id makes that repeat create nothing."""

import logging
import threading
import uuid

from confluent_kafka import KafkaException, Message, Producer
from pydantic import ValidationError

from services.api import jobs, keys
from services.api.csv_input import CsvRow, ParsedCsv
from services.api.errors import ApiError
from services.api.urls import check_webhook_url, is_http_url
from shared import kafka
from shared.db import DictPool
from shared.events import JobOptions, JobRequested, describe_invalid
from shared.metrics import CONSUMER_LAG
from shared.offsets import OffsetTracker, position
from shared.retry import MESSAGE_MAX_ATTEMPTS, UNAVAILABLE, Backoff
from shared.settings import Settings

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
URL_COLUMN = "url"  # the one column of the output CSV of a job created over Kafka, beside Output Image Urls


class InvalidJob(Exception):
    """The event cannot become a job; the message says why."""


def read_job(value: bytes | None, settings: Settings) -> tuple[JobRequested, ParsedCsv]:
    try:
        job = JobRequested.model_validate_json(value or b"")
    except ValidationError as exc:
        raise InvalidJob(describe_invalid(exc, "job.requested")) from None
    if len(job.image_urls) > settings.max_images_per_job:
        raise InvalidJob(f"{len(job.image_urls)} images; a job may have at most {settings.max_images_per_job}")
    for number, url in enumerate(job.image_urls, start=1):
        if not is_http_url(url):
            raise InvalidJob(f"image_urls[{number - 1}] is not an absolute http(s) URL: {url[:200]!r}")
    if job.webhook_url is not None:
        try:
            check_webhook_url(job.webhook_url, settings)
        except ApiError as exc:
            raise InvalidJob(exc.message) from None
    rows = [CsvRow(row_number=number, cells=[url], urls=[url]) for number, url in enumerate(job.image_urls, start=1)]
    return job, ParsedCsv(header=[URL_COLUMN], url_column=0, rows=rows)


class JobIntake:
    def __init__(self, settings: Settings, pool: DictPool, producer: Producer):
        self.settings = settings
        self.pool = pool
        self.producer = producer

    def run(self, stop: threading.Event) -> None:
        tracker = OffsetTracker()
        consumer = kafka.make_consumer(
            self.settings,
            self.settings.intake_group,
            [self.settings.topic_job_requested],
            tracker,
            **CONSUMER_LAG.consumer_config(self.settings.intake_group),
        )
        try:
            while not stop.is_set():
                message = consumer.poll(POLL_SECONDS)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.fatal():
                        raise KafkaException(error)
                    log.warning("job intake consumer error: %s", error)
                    continue
                partition, offset = position(message)
                epoch = tracker.start(partition, offset)
                if not self._take_until_done(message, stop):
                    break
                tracker.finish(partition, offset, epoch)
                kafka.store_offsets(consumer, tracker)
        finally:
            consumer.close()

    def _take_until_done(self, message: Message, stop: threading.Event) -> bool:
        """Take the message, retrying while the database or Kafka is unavailable; after MESSAGE_MAX_ATTEMPTS
        failures for another reason, pass it on to the dead-letter topic. False if stopped first."""
        backoff = Backoff()
        failures: list[Exception] = []
        while True:
            try:
                if len(failures) < MESSAGE_MAX_ATTEMPTS:
                    self.take(message)
                else:
                    self._dead_letter(message, f"could not be stored in {len(failures)} tries: {failures[-1]!r}")
                return True
            except UNAVAILABLE as exc:
                log.warning(
                    "taking the job at %s[%d]@%d waits for the database or Kafka (%s); next try in %gs",
                    message.topic(),
                    message.partition(),
                    message.offset(),
                    exc,
                    backoff.delay,
                )
            except Exception as exc:
                failures.append(exc)
                log.exception(
                    "taking the job at %s[%d]@%d failed (try %d of %d); next try in %gs",
                    message.topic(),
                    message.partition(),
                    message.offset(),
                    len(failures),
                    MESSAGE_MAX_ATTEMPTS,
                    backoff.delay,
                )
            if not backoff.wait(stop):
                return False

    def take(self, message: Message) -> None:
        try:
            job, parsed = read_job(message.value(), self.settings)
            owner = self._owner(job)
        except InvalidJob as exc:
            self._dead_letter(message, str(exc))
            return
        stored = jobs.insert_job(
            self.pool,
            parsed,
            job.webhook_url,
            owner,
            job_id=job.request_id,
            options=(job.options or JobOptions()).with_default_quality(self.settings.default_quality),
        )
        if stored is None:
            log.info("job %s exists already; event %s changes nothing", job.request_id, job.event_id)
            return
        log.info("job %s created over Kafka with %d images", *stored)

    def _owner(self, job: JobRequested) -> uuid.UUID | None:
        """The API key the job belongs to: the event's api_key_id, which must name an active key."""
        if job.api_key_id is None:
            return None
        if not keys.is_active_key(self.pool, job.api_key_id):
            raise InvalidJob(f"api_key_id {job.api_key_id}: no such API key, or it is revoked")
        return job.api_key_id

    def _dead_letter(self, message: Message, error: str) -> None:
        topic = self.settings.topic_job_dead_letter
        kafka.produce_and_wait(self.producer, topic, [kafka.dead_letter(message, topic, error)])
