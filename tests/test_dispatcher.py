"""The dispatcher on real PostgreSQL and Kafka: who gets the window's places, which lane their images
take, and that two dispatchers at once release every image once.

In the share tests the processors are stood in for by the test, so that shares are counted exactly,
round by round: it reads the released events back from the topics, takes the priority lane first as the
processors do, and finishes a few images at a time through the notifier's own apply_results, which
frees their places for the dispatcher's next round. The whole stack, processors included, is exercised
by test_end_to_end (a dispatcher killed mid-release) and by make bench's fairness scenarios."""

import json
import threading
import time
import uuid
from collections import Counter, deque
from typing import cast

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg.rows import dict_row

from services.api import keys
from services.api.dispatcher import Dispatcher
from services.notifier.results import ResultBatch, apply_results
from shared.events import ImageProcessed, ImageStatus
from tests.support.kafka import TopicReader, read_to_end

FINISHED_PER_STEP = 4


class StandInProcessors:
    """Runs the dispatcher's rounds by hand and finishes released images in the order processors would."""

    def __init__(self, settings):
        self.settings = settings
        self.dispatcher = Dispatcher(settings)
        self.conn = psycopg.connect(settings.database_url, autocommit=True, row_factory=dict_row)
        self.readers = {
            lane: TopicReader(settings, topic)
            for lane, topic in (("priority", settings.topic_requested), ("bulk", settings.topic_requested_bulk))
        }
        self.read = {lane: 0 for lane in self.readers}
        # events released and not finished, per lane
        self.queued: dict[str, deque[dict]] = {lane: deque() for lane in self.readers}
        self.lane_of_job: dict[str, Counter] = {}
        self.finished: list[str] = []  # job ids, one per finished image, in order

    def round(self) -> int:
        released = self.dispatcher.release_round(self.conn, threading.Event()).released
        total = sum(self.read.values()) + released
        deadline = time.monotonic() + 30
        while sum(len(reader.messages) for reader in self.readers.values()) < total:
            assert time.monotonic() < deadline, "released events did not arrive"
            for reader in self.readers.values():
                message = reader.consumer.poll(0.02)
                if message is not None and not message.error():
                    reader.messages.append(message)
        for lane, reader in self.readers.items():
            for message in reader.messages[self.read[lane] :]:
                event = json.loads(cast(bytes, message.value()))  # an event message, not an error: has a value
                self.queued[lane].append(event)
                self.lane_of_job.setdefault(event["request_id"], Counter())[lane] += 1
            self.read[lane] = len(reader.messages)
        return released

    def finish(self, count: int = FINISHED_PER_STEP) -> None:
        results = []
        for _ in range(count):
            lane = next((lane for lane in ("priority", "bulk") if self.queued[lane]), None)
            if lane is None:
                break
            event = self.queued[lane].popleft()
            results.append(
                ImageProcessed(
                    request_id=event["request_id"],
                    image_id=event["image_id"],
                    row_number=event["row_number"],
                    position=event["position"],
                    input_url=event["input_url"],
                    status=ImageStatus.processed,
                    output_url=f"http://files.test/{event['image_id']}.jpg",
                    format="JPEG",
                    bytes_in=10,
                    bytes_out=5,
                )
            )
            self.finished.append(event["request_id"])
        apply_results(self.conn, ResultBatch(results))

    def step(self) -> None:
        self.finish()
        self.round()

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.conn.close()
        self.dispatcher.close(5)


@pytest.fixture
def stand_in(make_settings, own_database):
    def make(window: int) -> StandInProcessors:
        settings = make_settings(
            database_url=own_database, dispatch_window_min_images=window, dispatch_window_max_images=window
        )
        processors = StandInProcessors(settings)
        made.append(processors)
        return processors

    made: list[StandInProcessors] = []
    yield make
    for processors in made:
        processors.close()


def finished_by(processors: StandInProcessors, job_ids, first: int) -> list[int]:
    """How many of the first `first` finished images each job has."""
    counts = Counter(processors.finished[:first])
    return [counts[str(job_id)] for job_id in job_ids]


def test_two_jobs_of_different_sizes_finish_in_proportion_to_their_fair_share(stand_in, jobs):
    processors = stand_in(window=8)
    small, _ = jobs.create(40)
    large, _ = jobs.create(200)
    processors.round()
    while jobs.job(small)["status"] != "completed":
        processors.step()
    done_small, done_large = finished_by(processors, [small, large], len(processors.finished))
    # Equal shares: while the small job ran, the large one finished as many (give or take one window).
    assert done_small == 40
    assert abs(done_large - 40) <= 8, (done_small, done_large)


def create_key(jobs, weight: float = 1) -> tuple[uuid.UUID, str]:
    name = f"client-{uuid.uuid4().hex[:8]}"
    with jobs.pool.connection() as conn:
        return keys.create_key(conn, name, weight)[0], name


def test_clients_share_first_then_the_jobs_of_a_client(stand_in, jobs):
    processors = stand_in(window=12)
    key_a, name_a = create_key(jobs)
    key_b, name_b = create_key(jobs)
    a1, _ = jobs.create(200, owner_key_id=key_a)
    a2, _ = jobs.create(200, owner_key_id=key_a)
    b, _ = jobs.create(200, owner_key_id=key_b)
    processors.round()
    processors.round()  # the metrics of a round are what it found before releasing
    waiting = {
        name: REGISTRY.get_sample_value("imgpipe_dispatch_images_waiting", {"client": name})
        for name in (name_a, name_b)
    }
    # The first round: one image beyond the window for the first job not started (a1), then 12 places
    # shared between the keys: 6 to each.
    assert waiting == {name_a: 400 - 7, name_b: 200 - 6}
    while len(processors.finished) < 240:
        processors.step()
    # Of the first 240 images finished: half the key B's (one job), a quarter each of key A's two jobs.
    done_a1, done_a2, done_b = finished_by(processors, [a1, a2, b], 240)
    assert abs(done_b - 120) <= 12 and abs(done_a1 - 60) <= 12 and abs(done_a2 - 60) <= 12, (done_a1, done_a2, done_b)


def test_a_weight_changes_the_shares(stand_in, jobs):
    processors = stand_in(window=12)
    light, _ = create_key(jobs)
    heavy, heavy_name = create_key(jobs, weight=3)
    first, _ = jobs.create(300, owner_key_id=light)
    second, _ = jobs.create(300, owner_key_id=heavy)
    processors.round()
    while len(processors.finished) < 200:
        processors.step()
    done_light, done_heavy = finished_by(processors, [first, second], 200)
    assert abs(done_heavy - 150) <= 12, (done_light, done_heavy)  # three quarters
    with jobs.pool.connection() as conn:
        assert keys.set_weight(conn, heavy_name, 1)
    processors.finished.clear()
    while len(processors.finished) < 100:
        processors.step()
    done_light, done_heavy = finished_by(processors, [first, second], 100)
    assert abs(done_heavy - 50) <= 12, (done_light, done_heavy)  # a new weight counts from the next round


def test_a_new_job_behind_a_large_backlog_is_released_within_one_window(stand_in, jobs):
    processors = stand_in(window=8)
    backlog, _ = jobs.create(1000)
    processors.round()
    for _ in range(5):
        processors.step()
    assert processors.lane_of_job[str(backlog)] == Counter(bulk=processors.read["bulk"])  # alone: nobody to pass

    newcomer, _ = jobs.create(6)
    processors.step()  # the round after it was stored, with the places the step's finished images freed
    # Its first image at once, beyond the full window; then freed places while it held least, up to its
    # share of the window (half of 8), all through the priority lane.
    assert processors.lane_of_job[str(newcomer)] == Counter(priority=4)
    before = len(processors.finished)
    while jobs.job(newcomer)["status"] != "completed":
        processors.step()
    # Its images passed the backlog's queued ones: it completed within about a window of finished images.
    assert len(processors.finished) - before <= 8 + 6, processors.finished[before:]


def test_two_dispatchers_at_once_release_every_image_once(make_settings, own_database, jobs):
    settings = make_settings(
        database_url=own_database, dispatch_window_min_images=10_000, dispatch_window_max_images=10_000
    )
    dispatchers = [Dispatcher(settings), Dispatcher(settings)]
    stops = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=d.run, args=(s,), daemon=True) for d, s in zip(dispatchers, stops, strict=True)]
    for thread in threads:
        thread.start()
    try:
        created = []
        for _ in range(8):
            created.append(jobs.create(40)[0])
            time.sleep(0.05)
        wait_until_released(jobs, created)
        assert sum(d.leading.is_set() for d in dispatchers) == 1

        leader = next(n for n, d in enumerate(dispatchers) if d.leading.is_set())
        stops[leader].set()  # the other one takes over
        threads[leader].join(10)
        created += [jobs.create(40)[0] for _ in range(2)]
        wait_until_released(jobs, created)
        assert dispatchers[1 - leader].leading.is_set()

        events = read_to_end(settings, settings.topic_requested) + read_to_end(settings, settings.topic_requested_bulk)
        per_image = Counter(json.loads(message.value())["image_id"] for message in events)
        assert len(per_image) == 10 * 40
        assert set(per_image.values()) == {1}
    finally:
        for stop in stops:
            stop.set()
        for thread, dispatcher in zip(threads, dispatchers, strict=True):
            thread.join(10)
            dispatcher.close(5)


def wait_until_released(jobs, job_ids, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any(jobs.job(job_id)["published_at"] is None for job_id in job_ids):
        assert time.monotonic() < deadline, "the jobs were not released"
        time.sleep(0.05)
