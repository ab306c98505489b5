"""The work on one image, run by a download thread: fetch, compress, store, and the result event.

It never sleeps: an attempt worth repeating returns RetryLater, and the worker schedules it while
other images proceed. Failures of the image itself become a failed result; an unexpected error is
tried image_max_attempts times, then fails as internal_error; an unavailable storage is tried
again without limit (it is not the image's fault), keeping the compressed bytes meanwhile."""

import logging
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from services.processor import metrics
from services.processor.compress import Compressed, CompressOptions
from services.processor.compressor import Compressor
from services.processor.failures import ImageFailure, StorageUnavailable, TransientFailure
from services.processor.fetch import fetch_image
from services.processor.hosts import HostGuard
from services.processor.priority import NORMAL
from services.processor.storage import Storage
from shared.events import ImageError, ImageProcessed, ImageRequested, ImageStatus
from shared.failures import FailureCode
from shared.offsets import Partition
from shared.runtime import log_context
from shared.settings import Settings

log = logging.getLogger(__name__)

FETCH_RETRY_SECONDS = 0.2  # doubled after each failed attempt: 0.2 s, 0.4 s, ...
UNEXPECTED_RETRY_SECONDS = 0.5
STORAGE_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 30.0
MESSAGE_MAX_CHARS = 1000
UNKNOWN_SIZE_BYTES = 1_000_000  # reserved for a body sent without Content-Length, corrected once read


@dataclass
class ImageTask:
    """One image.requested message while it is worked on."""

    partition: Partition
    offset: int
    event: ImageRequested
    priority: int  # NORMAL or BULK (services/processor/priority.py)
    epoch: int = 0  # the OffsetTracker's epoch of the partition when the message was taken
    origin: str = field(init=False)  # what per-host limits and the circuit breaker count by
    fetch_attempts: int = 0
    unexpected_errors: int = 0
    storage_attempts: int = 0
    bytes_in: int = 0
    compressed: Compressed | None = None  # kept while the storage is unavailable, so it is not fetched again

    def __post_init__(self):
        self.origin = origin(self.event.input_url)


@dataclass
class Finished:
    result: ImageProcessed


@dataclass
class RetryLater:
    delay: float
    reason: str


class ByteBudget:
    """Bytes of images held in memory by this process. A download reads its body only once the
    body's size (Content-Length, or UNKNOWN_SIZE_BYTES without one) fits under `limit` beside what is
    held, or nothing is held (an image larger than the limit goes alone); so memory stays bounded
    however many downloads run at once. Waiting images of the normal lane go first."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._normal_waiting = 0
        self._changed = threading.Condition()

    def wait_below_limit(self, priority: int) -> None:
        with self._changed:
            self._wait(lambda: self.held < self.limit, priority)

    def reserve(self, count: int, priority: int) -> None:
        with self._changed:
            self._wait(lambda: self.held + count <= self.limit or self.held == 0, priority)
            self.held += count

    def _wait(self, room, priority: int) -> None:
        if priority == NORMAL:
            self._normal_waiting += 1
            self._changed.wait_for(room)
            self._normal_waiting -= 1
        else:
            self._changed.wait_for(lambda: room() and not self._normal_waiting)

    def add(self, count: int) -> None:
        with self._changed:
            self.held += count
            self._changed.notify_all()  # count may be negative (a body smaller than reserved)

    def release(self, count: int) -> None:
        self.add(-count)


class Reservation:
    """One download's share of a ByteBudget, given back when the `with` block ends."""

    def __init__(self, budget: ByteBudget, priority: int):
        self.budget, self.priority, self.held = budget, priority, 0

    def body_size(self, declared: int | None) -> None:
        """fetch_image's hook: called once the headers are in, before the body is read."""
        size = UNKNOWN_SIZE_BYTES if declared is None else declared
        self.budget.reserve(size, self.priority)
        self.held = size

    def resize(self, actual: int) -> None:
        self.budget.add(actual - self.held)
        self.held = actual

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.budget.release(self.held)
        self.held = 0


class ImagePipeline:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        client: httpx.Client,
        hosts: HostGuard,
        compressor: Compressor,
        memory: ByteBudget,
    ):
        self.settings, self.storage, self.client, self.hosts = settings, storage, client, hosts
        self.compressor, self.memory = compressor, memory
        self.options = CompressOptions.from_settings(settings)

    def run(self, task: ImageTask) -> Finished | RetryLater:
        with log_context(request_id=task.event.request_id, image_id=task.event.image_id):
            outcome = self._attempt(task)
        if isinstance(outcome, Finished) and task.compressed is not None:
            self.memory.release(len(task.compressed.data))
            task.compressed = None
        return outcome

    def _attempt(self, task: ImageTask) -> Finished | RetryLater:
        event = task.event
        try:
            if task.compressed is None:
                self._fetch_and_compress(task)
            assert task.compressed is not None  # set by _fetch_and_compress, which raises otherwise
            # Deterministic: a duplicate event overwrites the same object instead of adding one.
            key = f"{event.request_id}/{event.image_id}{task.compressed.extension}"
            with metrics.STORE_SECONDS.time():
                output_url = self.storage.save(key, task.compressed.data, task.compressed.content_type)
        except TransientFailure as failure:
            if task.fetch_attempts < self.settings.fetch_attempts:
                delay = FETCH_RETRY_SECONDS * 2 ** (task.fetch_attempts - 1)
                log.info(
                    "fetch attempt %d of image %s failed (%s); trying again in %gs",
                    task.fetch_attempts,
                    event.image_id,
                    failure,
                    delay,
                )
                return RetryLater(delay, str(failure))
            return self._failed(
                task, ImageFailure(failure.code, f"{failure.message} (after {task.fetch_attempts} attempts)")
            )
        except ImageFailure as failure:
            return self._failed(task, failure)
        except StorageUnavailable as exc:
            task.storage_attempts += 1
            delay = min(MAX_RETRY_SECONDS, STORAGE_RETRY_SECONDS * 2 ** (task.storage_attempts - 1))
            log.warning(
                "image %s of job %s waits for the storage (try %d, next in %gs): %s",
                event.image_id,
                event.request_id,
                task.storage_attempts,
                delay,
                exc,
            )
            return RetryLater(delay, f"the storage is unavailable: {exc}")
        except Exception as exc:
            task.unexpected_errors += 1
            if task.unexpected_errors < self.settings.image_max_attempts:
                log.exception(
                    "image %s of job %s raised (try %d); retrying",
                    event.image_id,
                    event.request_id,
                    task.unexpected_errors,
                )
                return RetryLater(UNEXPECTED_RETRY_SECONDS * 2 ** (task.unexpected_errors - 1), repr(exc))
            log.exception(
                "image %s of job %s failed after %d tries", event.image_id, event.request_id, task.unexpected_errors
            )
            message = f"unexpected {type(exc).__name__} in {task.unexpected_errors} tries: {exc}"
            return self._failed(task, ImageFailure(FailureCode.INTERNAL_ERROR, message[:MESSAGE_MAX_CHARS]))
        log.info(
            "image %s of job %s: %s %d -> %d bytes",
            event.image_id,
            event.request_id,
            task.compressed.format,
            task.bytes_in,
            len(task.compressed.data),
        )
        metrics.IMAGES_PROCESSED.inc()
        metrics.IMAGES_ENCODED.labels(codec=task.compressed.codec).inc()
        metrics.DOWNLOADED_BYTES.inc(task.bytes_in)
        metrics.STORED_BYTES.inc(len(task.compressed.data))
        return Finished(
            ImageProcessed(
                **_same_image(event),
                status=ImageStatus.processed,
                output_url=output_url,
                format=task.compressed.format,
                bytes_in=task.bytes_in,
                bytes_out=len(task.compressed.data),
            )
        )

    def _fetch_and_compress(self, task: ImageTask) -> None:
        host = task.origin
        self.memory.wait_below_limit(task.priority)  # opens no connection while the budget is spent
        with Reservation(self.memory, task.priority) as reservation:
            with self.hosts.slot(host, task.priority):
                task.fetch_attempts += 1
                try:
                    with metrics.DOWNLOAD_SECONDS.time():
                        data = fetch_image(
                            self.client,
                            task.event.input_url,
                            self.settings.max_download_bytes,
                            self.settings.fetch_total_timeout,
                            reservation.body_size,
                        )
                except TransientFailure as failure:
                    if failure.host_unreachable:
                        self.hosts.failed(host)
                    raise
                self.hosts.succeeded(host)
            reservation.resize(len(data))
            with metrics.COMPRESS_SECONDS.time():
                compressed = self.compressor.compress(data, self.options.for_job(task.event.options), task.priority)
            self.memory.add(len(compressed.data))
        task.bytes_in, task.compressed = len(data), compressed

    def fail_fast(self, task: ImageTask) -> Finished | None:
        """A failed result at once, without a thread, for a host whose breaker is open (its opening
        was logged; thousands of lines saying so again would cost more than the images)."""
        try:
            self.hosts.refuse_if_open(task.origin)
        except ImageFailure as failure:
            with log_context(request_id=task.event.request_id, image_id=task.event.image_id):
                return self._failed(task, failure, logging.DEBUG)
        return None

    def _failed(self, task: ImageTask, failure: ImageFailure, level: int = logging.INFO) -> Finished:
        event = task.event
        log.log(level, "image %s of job %s failed: %s", event.image_id, event.request_id, failure)
        metrics.IMAGES_FAILED.labels(reason=str(failure.code)).inc()
        return Finished(
            ImageProcessed(
                **_same_image(event),
                status=ImageStatus.failed,
                error=ImageError(code=failure.code, message=failure.message),
            )
        )


def origin(url: str) -> str:
    """scheme://host:port of an image URL: what per-host limits and the circuit breaker count by."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # e.g. an unclosed IPv6 bracket or a port that is not a number: fetching fails as invalid_url
        return url
    scheme = parts.scheme.lower()
    return f"{scheme}://{(parts.hostname or '')}:{port or (443 if scheme == 'https' else 80)}"


def _same_image(event: ImageRequested) -> dict:
    return event.model_dump(include={"request_id", "image_id", "row_number", "position", "input_url"})
