"""Jobs created over Kafka: the API consumes job.requested (shared/events.py JobRequested), stores each
job as an upload would be stored, and the dispatcher releases its images like any other. An event it cannot take
(not a JobRequested, a bad URL, too many images, a refused webhook URL, an api_key_id that names no
active key) goes unchanged to
job.requested.dlq with a header saying why. An event is committed only once its job is stored, so a
crash takes it again; the producer's request_id makes that repeat create nothing."""
import logging
import threading
import uuid

from confluent_kafka import Consumer, Message, Producer
from psycopg_pool import ConnectionPool
from pydantic import ValidationError

from services.api import jobs, keys
from services.api.csv_input import CsvRow, ParsedCsv
from services.api.errors import ApiError
from services.api.urls import check_webhook_url, is_http_url
from shared import kafka
from shared.events import JobOptions, JobRequested
from shared.settings import Settings

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
MAX_RETRY_DELAY_SECONDS = 30.0
URL_COLUMN = "url"  # the one column of the output CSV of a job created over Kafka, beside Output Image Urls


class InvalidJob(Exception):
    """The event cannot become a job; the message says why."""


def read_job(value: bytes | None, settings: Settings) -> tuple[JobRequested, ParsedCsv]:
    try:
        job = JobRequested.model_validate_json(value or b"")
    except ValidationError as exc:
        raise InvalidJob("not a job.requested event: " + "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'event'}: {error['msg']}" for error in exc.errors())) from None
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
    def __init__(self, settings: Settings, pool: ConnectionPool, producer: Producer):
        self.settings = settings
        self.pool = pool
        self.producer = producer

    def run(self, stop: threading.Event) -> None:
        consumer = Consumer({
            **kafka.client_config(self.settings),
            "group.id": self.settings.intake_group,
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,
            "auto.commit.interval.ms": self.settings.kafka_auto_commit_interval_ms,
            "auto.offset.reset": "earliest",
        })
        consumer.subscribe([self.settings.topic_job_requested])
        try:
            while not stop.is_set():
                message = consumer.poll(POLL_SECONDS)
                if message is None:
                    continue
                if message.error() is not None:
                    log.warning("job intake consumer error: %s", message.error())
                    continue
                if self._take_until_done(message, stop):
                    consumer.store_offsets(message)
        finally:
            consumer.close()

    def _take_until_done(self, message: Message, stop: threading.Event) -> bool:
        """Take the message, retrying while the database or Kafka fails; False if stopped first."""
        delay = 0.5
        while True:
            try:
                self.take(message)
                return True
            except Exception:
                log.exception("taking the job at %s[%d]@%d failed; retrying in %gs",
                              message.topic(), message.partition(), message.offset(), delay)
                if stop.wait(delay):
                    return False
                delay = min(delay * 2, MAX_RETRY_DELAY_SECONDS)

    def take(self, message: Message) -> None:
        try:
            job, parsed = read_job(message.value(), self.settings)
        except InvalidJob as exc:
            self._dead_letter(message, exc)
            return
        try:
            owner = self._owner(job)
        except InvalidJob as exc:
            self._dead_letter(message, exc)
            return
        stored = jobs.insert_job(self.pool, parsed, job.webhook_url, owner, job_id=job.request_id,
                                 options=job.options or JobOptions(quality=self.settings.jpeg_quality))
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

    def _dead_letter(self, message: Message, reason: InvalidJob) -> None:
        log.warning("job event %s[%d]@%d sent to %s: %s", message.topic(), message.partition(), message.offset(),
                    self.settings.topic_job_dead_letter, reason)
        kafka.produce_and_wait(self.producer, self.settings.topic_job_dead_letter,
                               [(message.key(), message.value(), kafka.dead_letter_headers(message, str(reason)))])
