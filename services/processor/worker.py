"""The processor: image.requested in (both lanes), one image.processed out per image, at least once,
many images at a time.

This thread owns the Kafka consumer. It keeps a queue of taken messages per lane, pausing a lane's
partitions while its queue is full, and starts images from the normal lane's queue first (a
small job never waits behind a large one's backlog), at most processor_max_in_flight at once. Each
image goes to a download thread, which runs the pipeline and produces its result; the result's
delivery report, served here, marks the message finished, and offsets are stored as far as the
OffsetTracker allows, although images finish out of order. Retries wait in a schedule here,
holding no thread."""

import functools
import heapq
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sized
from concurrent.futures import ThreadPoolExecutor

from confluent_kafka import KafkaException, Message, TopicPartition
from pydantic import ValidationError

from services.processor import metrics
from services.processor.compressor import Compressor
from services.processor.fetch import make_http_client
from services.processor.hosts import HostGuard
from services.processor.memory import return_free_memory
from services.processor.pipeline import ByteBudget, ImagePipeline, ImageTask, RetryLater
from services.processor.priority import BULK, NORMAL
from services.processor.storage import Storage, make_storage
from shared.events import ImageProcessed, ImageRequested, describe_invalid
from shared.faults import crash_point
from shared.health import consumer_check, readiness
from shared.kafka import commit_stored, dead_letter, ensure_topics, make_consumer, make_producer, store_offsets
from shared.metrics import CONSUMER_LAG
from shared.offsets import OffsetTracker, position
from shared.settings import Settings

log = logging.getLogger(__name__)

IDLE_WAIT_SECONDS = 0.2
BUSY_WAIT_SECONDS = 0.02  # while images are open: delivery reports are served this soon
RESULTS_LINGER_MS = 20
FETCH_WAIT_MAX_MS = 100
PRODUCE_RETRY_SECONDS = 1.0
MAX_PRODUCE_RETRY_SECONDS = 30.0


def run(settings: Settings, stop: threading.Event, storage: Storage | None = None) -> None:
    """Consume until `stop` is set; then finish the images in hand (for processor_drain_seconds at
    most), commit what is finished and return."""
    if settings.create_topics:
        ensure_topics(settings)
    Processor(settings, storage or make_storage(settings)).run(stop)


class Processor:
    def __init__(self, settings: Settings, storage: Storage):
        self.settings = settings
        self.tracker = OffsetTracker()
        self.assigned: set[tuple[str, int]] = set()  # kept by the consumer's rebalance callbacks
        # Results are sent in batches of up to 20 ms: a handful of requests a second instead of one
        # per image, which the broker pays for on the same cores as the compression.
        self.producer = make_producer(settings, **{"linger.ms": RESULTS_LINGER_MS})
        self.consumer = make_consumer(
            settings,
            settings.processor_group,
            [settings.topic_requested, settings.topic_requested_bulk],
            self.tracker,
            self.assigned,
            **{
                "partition.assignment.strategy": "roundrobin",  # every processor gets partitions of both lanes
                # A resumed partition is fetched again only once the fetch already waiting at the broker
                # returns: at most this long (500 ms by default), so a backlog is not read in stutters.
                "fetch.wait.max.ms": FETCH_WAIT_MAX_MS,
                **CONSUMER_LAG.consumer_config(settings.processor_group),
            },
        )
        readiness.add("consumer", consumer_check(self.assigned))
        self.compressor = Compressor(settings.compress_processes, settings.turbojpeg_library)
        self.client = make_http_client(settings)
        hosts = HostGuard(
            settings.fetch_per_host_limit, settings.host_failure_threshold, settings.host_cooldown_seconds
        )
        memory = ByteBudget(settings.processor_max_in_flight_bytes)
        self.pipeline = ImagePipeline(settings, storage, self.client, hosts, self.compressor, memory)
        self.threads = ThreadPoolExecutor(settings.processor_max_in_flight, thread_name_prefix="image")
        # From download threads: (task, RetryLater) for an image to try again, (task, None) once its result
        # (or dead letter) is handed to the producer.
        self.from_threads: queue.SimpleQueue = queue.SimpleQueue()
        self.thread_errors: queue.SimpleQueue = queue.SimpleQueue()  # what must stop the processor
        self.scheduled: list = []  # heap of (due, sequence, action) run by this thread
        self.sequence = itertools.count()
        self.lanes: dict[str, deque[ImageTask]] = {  # normal lane first
            settings.topic_requested: deque(),
            settings.topic_requested_bulk: deque(),
        }
        # Also the most results awaiting Kafka's acknowledgement.
        self.queue_limit = settings.processor_queued_per_lane
        self.working = 0  # images in a download thread or waiting for a retry
        self.waiting = 0  # of which are waiting for a retry
        self.unacked = 0  # results handed to the producer and not yet acknowledged
        self.paused: set[tuple[str, int]] = set()
        self.trimmed = True  # free memory handed back since the last image finished
        self._set_gauges(running=True)

    def run(self, stop: threading.Event) -> None:
        self.consumer_thread = threading.current_thread()
        log.info(
            "processor consuming %s and %s as group %s, up to %d images at a time",
            self.settings.topic_requested,
            self.settings.topic_requested_bulk,
            self.settings.processor_group,
            self.settings.processor_max_in_flight,
        )
        try:
            while not stop.is_set():
                self._raise_thread_errors()
                self._hear_from_threads()
                self._run_due()
                self.producer.poll(0)  # delivery reports: finished messages
                self._apply_lane_limits()
                for message in self._take():
                    self._queue(message)
                self._start_queued()
                store_offsets(self.consumer, self.tracker)
                if self.working:
                    self.trimmed = False
                elif not self.trimmed:
                    return_free_memory()
                    self.trimmed = True
        finally:
            self._drain()
            self.consumer.close()  # commits the stored offsets of finished work
            self.producer.flush(10)
            self.threads.shutdown(wait=False, cancel_futures=True)
            self.compressor.close()
            self.client.close()
            self._set_gauges(running=False)
            log.info("processor stopped")

    def _set_gauges(self, running: bool) -> None:
        """The gauges are global: once stopped they read 0 and hold no reference to this processor (whose
        producer would otherwise live on, trying to reach its brokers)."""
        metrics.IMAGES_IN_FLIGHT.set_function((lambda: self.working) if running else (lambda: 0))
        for lane, name in ((self.settings.topic_requested, "normal"), (self.settings.topic_requested_bulk, "bulk")):
            waiting: Sized = self.lanes[lane] if running else ()
            metrics.IMAGES_QUEUED.labels(lane=name).set_function(functools.partial(len, waiting))

    # --- taking messages ------------------------------------------------------------------------

    def _apply_lane_limits(self) -> None:
        """Pause a lane's partitions while its queue is full; resume them once it is half empty."""
        self.paused &= self.assigned
        wanted = set()
        for topic, partition in self.assigned:
            queued = len(self.lanes.get(topic, ()))
            if queued >= self.queue_limit or ((topic, partition) in self.paused and queued > self.queue_limit // 2):
                wanted.add((topic, partition))
        if wanted - self.paused:
            log.debug("queues full: pausing %s", sorted(wanted - self.paused))
            self.consumer.pause([TopicPartition(*p) for p in wanted - self.paused])
        if self.paused - wanted:
            log.debug("queues have room: resuming %s", sorted(self.paused - wanted))
            self.consumer.resume([TopicPartition(*p) for p in self.paused - wanted])
        self.paused = wanted

    def _take(self) -> list[Message]:
        """The first message as soon as it arrives, then what is already fetched, up to the queues' room.
        (A message of a partition assigned since the last pause is taken even without room.)"""
        wait = BUSY_WAIT_SECONDS if self.working or self.unacked else IDLE_WAIT_SECONDS
        if self.scheduled:
            wait = min(wait, max(0.0, self.scheduled[0][0] - time.monotonic()))
        if self._can_start():
            wait = 0.0
        first = self.consumer.poll(wait)
        if first is None:
            return []
        # Full lanes are paused, so what comes is for the others: take what the fullest of them can hold.
        rooms = [self.queue_limit - len(lane) for lane in self.lanes.values() if len(lane) < self.queue_limit]
        room = min(rooms, default=0) - 1
        return [first] + (self.consumer.consume(num_messages=room, timeout=0) if room > 0 else [])

    def _queue(self, message: Message) -> None:
        kafka_error = message.error()
        if kafka_error is not None:
            if kafka_error.fatal():
                raise KafkaException(kafka_error)
            log.warning("consumer error: %s", kafka_error)
            return
        partition, offset = position(message)
        epoch = self.tracker.start(partition, offset)
        try:
            event = ImageRequested.model_validate_json(message.value() or b"")
        except ValidationError as exc:
            self.working += 1
            error = describe_invalid(exc, "image.requested")
            self.threads.submit(self._in_thread, self._send_dead_letter, message, epoch, error, True)
            return
        priority = NORMAL if message.topic() == self.settings.topic_requested else BULK
        self.lanes[partition[0]].append(ImageTask(partition, offset, event, priority, epoch=epoch))

    def _can_start(self) -> bool:
        return (
            self.working < self.settings.processor_max_in_flight
            and self.unacked < self.queue_limit
            and any(self.lanes.values())
        )

    def _start_queued(self) -> None:
        """Start queued images while there is room, the normal lane's first."""
        while self._can_start():
            lane = next(lane for lane in self.lanes.values() if lane)
            task = lane.popleft()
            if not self.tracker.is_open(task.partition, task.offset, task.epoch):
                continue  # its partition was revoked meanwhile: the new owner does it
            failed = self.pipeline.fail_fast(task)
            if failed is not None:  # a host cut off by its breaker: thousands of images fail in a moment
                self.unacked += 1
                self._produce_result(task, failed.result, attempt=1)
            else:
                self.working += 1
                self.threads.submit(self._in_thread, self._work, task)

    # --- in download threads --------------------------------------------------------------------

    def _in_thread(self, function: Callable, *args) -> None:
        try:
            function(*args)
        except BaseException as exc:  # a bug or a fatal Kafka error: stop the processor, loudly
            self.thread_errors.put(exc)

    def _work(self, task: ImageTask) -> None:
        outcome = self.pipeline.run(task)
        if isinstance(outcome, RetryLater):
            self.from_threads.put((task, outcome))
            return
        crash_point(self.settings, "processor.after_process", lambda: commit_stored(self.consumer))
        self._produce_result(task, outcome.result, attempt=1)
        self.from_threads.put((task, None))

    def _produce_result(self, task: ImageTask, result: ImageProcessed, attempt: int) -> None:
        def delivered(error, _message) -> None:  # served by the consumer thread's producer.poll()
            if error is None:
                self._finish(task.partition, task.offset, task.epoch)
                return
            delay = min(MAX_PRODUCE_RETRY_SECONDS, PRODUCE_RETRY_SECONDS * 2 ** (attempt - 1))
            log.warning(
                "result of image %s not acknowledged by Kafka (%s); producing it again in %gs",
                task.event.image_id,
                error,
                delay,
                extra={"request_id": str(task.event.request_id), "image_id": str(task.event.image_id)},
            )
            self._schedule(delay, lambda: self._produce_result(task, result, attempt + 1))

        self._produce(
            self.settings.topic_processed,
            str(result.request_id).encode(),
            result.model_dump_json().encode(),
            None,
            delivered,
        )

    def _send_dead_letter(self, message: Message, epoch: int, error: str, in_thread: bool) -> None:
        """Pass an unreadable message on unchanged, with headers saying why and where from."""
        key, value, headers = dead_letter(message, self.settings.topic_dead_letter, error)

        def delivered(kafka_error, _message) -> None:
            if kafka_error is None:
                self._finish(*position(message), epoch)
            else:
                log.warning("dead letter not acknowledged (%s); sending it again", kafka_error)
                self._schedule(PRODUCE_RETRY_SECONDS, lambda: self._send_dead_letter(message, epoch, error, False))

        self._produce(self.settings.topic_dead_letter, key, value, headers, delivered)
        if in_thread:  # the first time, not a retry
            metrics.DEAD_LETTERS.inc()
            self.from_threads.put((None, None))

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, headers, on_delivery) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
                return
            except BufferError:  # the local queue is full: poll() serves delivery reports, which frees it
                if threading.current_thread() is self.consumer_thread:
                    self.producer.poll(0.1)
                else:
                    time.sleep(0.1)

    # --- back in the consumer thread ------------------------------------------------------------

    def _finish(self, partition: tuple[str, int], offset: int, epoch: int) -> None:
        self.tracker.finish(partition, offset, epoch)
        self.unacked -= 1

    def _schedule(self, delay: float, action: Callable[[], object]) -> None:
        heapq.heappush(self.scheduled, (time.monotonic() + delay, next(self.sequence), action))

    def _hear_from_threads(self) -> None:
        while not self.from_threads.empty():
            task, retry = self.from_threads.get()
            if retry is None:  # handed to the producer
                self.working -= 1
                self.unacked += 1
            else:
                self.waiting += 1
                # as for IMAGES_QUEUED above: mypy cannot infer a lambda whose default binds a value
                self._schedule(retry.delay, lambda task=task: self._resubmit(task))  # type: ignore[misc]

    def _resubmit(self, task: ImageTask) -> None:
        self.waiting -= 1
        if not self.tracker.is_open(task.partition, task.offset, task.epoch):
            self.working -= 1  # revoked while it waited: its new owner does it
            return
        self.threads.submit(self._in_thread, self._work, task)

    def _run_due(self) -> None:
        now = time.monotonic()
        while self.scheduled and self.scheduled[0][0] <= now:
            heapq.heappop(self.scheduled)[2]()

    def _raise_thread_errors(self) -> None:
        if not self.thread_errors.empty():
            raise self.thread_errors.get()

    def _drain(self) -> None:
        """Let running images finish and their results be acknowledged; what is queued or waits for a
        retry is left to the partition's next owner (its offset stays uncommitted)."""
        deadline = time.monotonic() + self.settings.processor_drain_seconds
        while (
            (self.working - self.waiting or self.unacked) and time.monotonic() < deadline and self.thread_errors.empty()
        ):
            self.producer.poll(0.05)
            self._hear_from_threads()
        store_offsets(self.consumer, self.tracker)
