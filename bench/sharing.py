"""Fair share (issue 13): a job uploaded behind a large one, clients with API keys sharing (with and
without a weight), and the window of released images behind a 1,000,000-row upload. The jobs use the
small JPEGs of the image set, so that jobs of thousands of images take seconds, not minutes."""

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
from confluent_kafka import Consumer, TopicPartition

from bench.checks import check, job_line, log
from bench.jobs import Job
from services.api.dispatcher import ROUND_MAX_IMAGES
from shared import kafka, positions
from shared.settings import Settings

RATIO_TARGET = 2.5  # a job's time behind others against its time alone
SAMPLE_SECONDS = 0.2
API_KEYS = {"IMGPIPE_API_KEYS_REQUIRED": "true"}
START_WAIT = 30.0  # for a large job's processing to begin


class Progress:
    """Finished images per job, sampled from the services' database every SAMPLE_SECONDS in a thread."""

    def __init__(self, database_url: str):
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(database_url,), daemon=True)
        self._thread.start()

    def _sample(self, database_url: str) -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not self._stop.wait(SAMPLE_SECONDS):
                rows = conn.execute(
                    "SELECT job_id::text, processed_images + failed_images FROM processing_jobs"
                ).fetchall()
                self.samples.append((time.monotonic(), dict(rows)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def finished_between(self, start: float, end: float) -> dict[str, int]:
        """Images each job finished from the last sample at or before `start` to the last at or before `end`."""
        first = max((s for s in self.samples if s[0] <= start), default=self.samples[0], key=lambda s: s[0])[1]
        last = max((s for s in self.samples if s[0] <= end), key=lambda s: s[0])[1]
        return {job: count - first.get(job, 0) for job, count in last.items()}


def _wait_started(jobs, job: Job) -> None:
    deadline = time.monotonic() + START_WAIT
    while jobs.counts(job)["pending"] == job.images and time.monotonic() < deadline:
        time.sleep(0.1)


def _ratio(name: str, alone: Job, behind: Job) -> dict:

    target = f"<= {RATIO_TARGET}x alone"
    if alone.seconds is None or behind.seconds is None:
        return check(name, "not finished", target, False)
    ratio = behind.seconds / alone.seconds
    return check(
        name,
        f"{ratio:.2f}x ({behind.seconds:.1f} s vs {alone.seconds:.1f} s alone)",
        target,
        ratio <= RATIO_TARGET,
        ratio,
    )


def cliff(bench) -> dict:
    """A small and a mid-sized job, each uploaded while a large job is being processed, against their time alone."""

    sizes, small = bench.sizes, bench.images.small()
    with bench.stack("cliff") as (_services, jobs):
        alone = {}
        for images in (sizes.cliff_small_images, sizes.cliff_mid_images):
            alone[images] = jobs.upload(bench.urls_of(small, images))
            jobs.wait(alone[images], bench.max_wait)
        backlog = jobs.upload(bench.urls_of(small, sizes.cliff_backlog_images))
        _wait_started(jobs, backlog)
        behind = {}
        for images in (sizes.cliff_small_images, sizes.cliff_mid_images):
            behind[images] = jobs.upload(bench.urls_of(small, images))
            jobs.wait(behind[images], bench.max_wait)
        backlog_done = jobs.counts(backlog)
    for images in alone:
        log(job_line(f"{images} images alone", alone[images]))
        log(job_line(f"{images} images behind {backlog.images}", behind[images]))
    log(f"the {backlog.images}-image job had {backlog_done['pending']} images to go")
    return {
        "checks": [
            _ratio(f"cliff: {images} behind {backlog.images}", alone[images], behind[images]) for images in alone
        ],
        "jobs": [
            job.summary(f"{job.images} images {what}")
            for what, runs in (("alone", alone), ("behind", behind))
            for job in runs.values()
        ],
        "backlog_images_pending_at_end": backlog_done["pending"],
    }


def clients(bench, weight: float = 1.0) -> dict:
    """Key A uploads four jobs, key B (of this weight) one job 5 s later: B's share of the images finished
    while both are active, and (weight 1) B's time against its time alone."""

    sizes, small = bench.sizes, bench.images.small()
    name = "clients" if weight == 1 else "weights"
    with bench.stack(name, api_settings=API_KEYS) as (services, jobs):
        key_a, key_b = services.api_key("a"), services.api_key("b", weight)
        alone = None
        if weight == 1:
            alone = jobs.upload(bench.urls_of(small, sizes.client_job_images), key_b)
            jobs.wait(alone, bench.max_wait)
        progress = Progress(services.database_url)
        try:
            a_jobs = [jobs.upload(bench.urls_of(small, sizes.client_job_images), key_a) for _ in range(4)]
            _wait_started(jobs, a_jobs[0])
            time.sleep(bench.sizes.client_b_delay_seconds)
            b_job = jobs.upload(bench.urls_of(small, sizes.client_job_images), key_b)
            jobs.wait(b_job, bench.max_wait)
        finally:
            progress.stop()
        finished = progress.finished_between(b_job.uploaded_at, b_job.finished_at or time.monotonic())
    of_b = finished.get(b_job.request_id, 0)
    of_a = sum(finished.get(job.request_id, 0) for job in a_jobs)
    share = of_b / (of_a + of_b) if of_a + of_b else 0.0
    quarters = _shares_by_quarter(progress, b_job, a_jobs)
    low, high = (0.40, 0.60) if weight == 1 else (0.65, 0.85)
    log(
        job_line(f"key B (weight {weight:g})", b_job) + f"; B's share {share:.0%} ({of_b} of {of_a + of_b} images); "
        "by quarter of its time: " + ", ".join(f"{q:.0%}" for q in quarters)
    )
    checks = [
        check(
            f"{name}: B's share",
            f"{share:.0%} ({of_b} of {of_a + of_b} images finished while both were active)",
            f"{low:.0%}-{high:.0%}",
            low <= share <= high,
            share,
        )
    ]
    if alone is not None:
        log(job_line("key B alone", alone))
        checks.append(_ratio(f"{name}: B's job", alone, b_job))
    return {
        "checks": checks,
        "share_of_b": share,
        "share_of_b_by_quarter": quarters,
        "jobs": ([alone.summary("key B alone")] if alone else [])
        + [b_job.summary(f"key B (weight {weight:g})")]
        + [job.summary("key A") for job in a_jobs],
    }


def _shares_by_quarter(progress: Progress, b_job: Job, a_jobs: list[Job]) -> list[float]:
    """B's share of the images finished in each quarter of its time."""
    if b_job.finished_at is None:
        return []
    step = (b_job.finished_at - b_job.uploaded_at) / 4
    shares = []
    for quarter in range(4):
        start = b_job.uploaded_at + quarter * step
        finished = progress.finished_between(start, start + step)
        of_b = finished.get(b_job.request_id, 0)
        total = of_b + sum(finished.get(job.request_id, 0) for job in a_jobs)
        shares.append(of_b / total if total else 0.0)
    return shares


def weights(bench) -> dict:
    return clients(bench, weight=3.0)


@dataclass
class HeldSamples:
    """Peaks, sampled while a large backlog waits: images released and not finished (the database), the
    dispatcher's window, and the request topics' messages not yet committed by the processors."""

    held: list[int] = field(default_factory=list)
    window: list[int] = field(default_factory=list)
    unconsumed: list[int] = field(default_factory=list)


def _sample_held(database_url: str, settings: Settings, stop: threading.Event, samples: HeldSamples) -> None:
    topics = [settings.topic_requested, settings.topic_requested_bulk]
    reader = positions.offset_reader(settings, settings.processor_group)
    ends = Consumer({**kafka.client_config(settings), "group.id": "bench-ends"})
    partitions = [TopicPartition(t, p) for t in topics for p in range(settings.topic_partitions)]
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not stop.wait(SAMPLE_SECONDS):
                row = conn.execute(
                    "SELECT coalesce(sum(greatest(0, released_images - processed_images - failed_images)), 0)"
                    " FROM processing_jobs WHERE status <> 'completed'"
                ).fetchone()
                assert row is not None  # an aggregate without GROUP BY gives one row
                held = row[0]
                state = conn.execute("SELECT window_images FROM dispatcher_state").fetchone()
                end = sum(ends.get_watermark_offsets(tp, timeout=5, cached=False)[1] for tp in partitions)
                committed = sum(max(0, offset) for offset in positions.committed_offsets(reader, topics).values())
                samples.held.append(int(held))
                samples.window.append(state[0] if state else 0)
                samples.unconsumed.append(end - committed)
    finally:
        reader.close()
        ends.close()


def backlog(bench) -> dict:
    """A 1,000,000-row upload (URLs of a host that refuses connections: the processors fail them fast, at
    their highest pace) with the processors running: the window never lets more than itself plus one round
    into Kafka."""
    from bench.intake import settings_of, upload

    rows = bench.sizes.backlog_rows
    path = _refused_csv(bench.work_dir / "backlog.csv", rows, bench.image_server.refused_url)
    samples, stop = HeldSamples(), threading.Event()
    with bench.stack("backlog") as (services, _jobs):
        settings = settings_of(services)
        sampler = threading.Thread(
            target=_sample_held, args=(services.database_url, settings, stop, samples), daemon=True
        )
        sampler.start()
        try:
            before, answered, _total = upload(services, path)
            time.sleep(bench.sizes.backlog_watch_seconds)
        finally:
            stop.set()
            sampler.join()
        with httpx.Client(base_url=services.api_url, timeout=30) as api:
            jobs = api.get("/jobs").json()["jobs"]
    counts = jobs[0]["counts"] if jobs else {"processed": 0, "failed": 0}
    done = counts["processed"] + counts["failed"]
    peak_held, peak_window = max(samples.held, default=0), max(samples.window, default=0)
    peak_unconsumed = max(samples.unconsumed, default=0)
    bound = peak_window + ROUND_MAX_IMAGES
    log(
        f"{rows} rows: 202 after {answered - before:.1f} s; {done} images failed fast in {bench.sizes.backlog_watch_seconds:g} s; "
        f"peaks: released and not finished {peak_held}, window {peak_window}, not yet consumed {peak_unconsumed}"
    )
    return {
        "checks": [
            check("backlog: 202", f"{answered - before:.1f} s for {rows} rows", "as intake", None, answered - before),
            check(
                "backlog: released, not finished",
                f"peak {peak_held} (window peak {peak_window}; the topics' messages past the processors' "
                f"committed offsets, which trail by the auto-commit interval: peak {peak_unconsumed})",
                f"<= window + one round ({bound})",
                peak_held <= bound,
                peak_held,
            ),
        ],
        "jobs": [
            {
                "job": f"{rows}-row CSV of refused URLs, watched {bench.sizes.backlog_watch_seconds:g} s",
                "images": done,
                "seconds": bench.sizes.backlog_watch_seconds,
                "images_per_second": done / bench.sizes.backlog_watch_seconds,
                "finished": False,
                "failed_images": counts["failed"],
            }
        ],
        "samples": {"held": samples.held, "window": samples.window, "unconsumed": samples.unconsumed},
    }


def _refused_csv(path: Path, rows: int, refused_url) -> Path:
    with path.open("w") as out:
        out.write("url\n")
        for n in range(rows):
            out.write(refused_url(n) + "\n")
    return path
