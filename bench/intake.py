"""Large jobs: the API's intake of a large CSV (time to 202, time until its first images are released into
Kafka, peak memory) and the notifier's rate on many prepared results against a bare COPY in the same run.
These scenarios start services of their own without processors (nothing fetches the URLs), so the
dispatcher releases one window of images and the rest waits in PostgreSQL; they stop them at the end."""

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
from confluent_kafka import Consumer, TopicPartition

from bench import proc
from bench.checks import check, log
from bench.stack import Services
from deploy.local.stack import wait_for_api
from services.api.csv_input import CsvRow, ParsedCsv, read_csv
from services.api.jobs import insert_job
from shared import db, kafka
from shared.events import ImageProcessed, ImageStatus
from shared.settings import Settings

URL_LENGTH = 100  # characters: a typical catalogue image URL
POLL_SECONDS = 0.02
COMMIT_POLL_SECONDS = 0.005
UPLOAD_TARGET_SECONDS = 2.0
AFTER_UPLOAD_SECONDS = 5  # the API's memory is watched this long after the 202 too
MEMORY_TARGET_MIB = 150
NOTIFIER_TARGET_PER_SECOND = 50_000


def _url(n: int) -> str:
    """A unique URL of URL_LENGTH characters (never fetched: these services have no processors)."""
    head = f"https://images.example.com/catalogue/{n:09d}/"
    return head + "x" * (URL_LENGTH - len(head) - 4) + ".jpg"


def write_url_csv(path: Path, rows: int) -> Path:
    with path.open("w") as out:
        out.write("url\n")
        for n in range(rows):
            out.write(_url(n) + "\n")
    return path


def settings_of(services: Services) -> Settings:
    """The services' settings, as they read them from their IMGPIPE_* environment."""
    return Settings(
        # mypy matches the **dict against BaseSettings' own _-prefixed options too; these are all fields
        **{  # type: ignore[arg-type]
            key.removeprefix("IMGPIPE_").lower(): value
            for key, value in services.env.items()
            if key.startswith("IMGPIPE_")
        }
    )


@contextmanager
def services_without_processors(
    bench, name: str, start: tuple[str, ...] = ("api", "notifier"), api_settings: dict[str, str] | None = None
) -> Iterator[tuple[Services, Settings]]:
    services = Services(bench.infra, f"{next(bench._tags)}-{name}", bench.work_dir, api_settings)
    settings = settings_of(services)
    kafka.ensure_topics(settings)
    try:
        for service in start:
            services.core.start(service)
        if "api" in start:
            wait_for_api(services.api_url)
        yield services, settings
    except Exception as exc:
        raise RuntimeError(f"{name}: {exc}\n{services.log_tails()}") from exc
    finally:
        services.stop()


class TopicCount:
    """The number of messages in some topics (the sum of their partitions' high watermarks)."""

    def __init__(self, settings: Settings, topics: list[str]):
        self.consumer = Consumer({**kafka.client_config(settings), "group.id": f"bench-count-{uuid.uuid4().hex}"})
        metadata = self.consumer.list_topics(timeout=10).topics
        self.partitions = [TopicPartition(topic, p) for topic in topics for p in metadata[topic].partitions]

    def __call__(self) -> int:
        return sum(self.consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1] for tp in self.partitions)

    def wait_for(self, count: int, until: float) -> float | None:
        """time.monotonic() once the topics hold `count` messages; None if not by `until`."""
        while time.monotonic() < until:
            if self() >= count:
                return time.monotonic()
            time.sleep(POLL_SECONDS)
        return None

    def close(self) -> None:
        self.consumer.close()


class CommitWatch:
    """Notes when a job of `total_images` images becomes visible in the database: its commit, after
    which the dispatcher may release its images. A thread polls while the upload is under way, and once
    more after it (a small upload may commit and answer between two polls)."""

    def __init__(self, database_url: str, total_images: int):
        self.committed_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(database_url, total_images), daemon=True)
        self._thread.start()

    def _watch(self, database_url: str, total_images: int) -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            while True:
                stopping = self._stop.is_set()
                if conn.execute("SELECT 1 FROM processing_jobs WHERE total_images = %s", (total_images,)).fetchone():
                    self.committed_at = time.monotonic()
                    return
                if stopping:
                    return
                time.sleep(COMMIT_POLL_SECONDS)

    def close(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.committed_at


def upload(services: Services, path: Path) -> tuple[float, float, int]:
    """(time.monotonic() before, time.monotonic() at the 202, total_images)."""
    with path.open("rb") as file, httpx.Client(base_url=services.api_url, timeout=300) as client:
        before = time.monotonic()
        response = client.post("/upload", files={"file": (path.name, file, "text/csv")})
        answered = time.monotonic()
    if response.status_code != 202:
        raise RuntimeError(f"upload of {path.name} answered {response.status_code}: {response.text[:500]}")
    return before, answered, response.json()["total_images"]


def intake(bench) -> dict:

    rows = bench.sizes.intake_rows
    path = write_url_csv(bench.work_dir / "intake.csv", rows)
    with services_without_processors(bench, "intake") as (services, settings):
        count = TopicCount(settings, [settings.topic_requested, settings.topic_requested_bulk])
        try:
            upload(services, write_url_csv(bench.work_dir / "warm-up.csv", 2))
            already = _after_warm_up(count)
            watch = CommitWatch(services.database_url, rows)
            try:
                before, answered, _total = upload(services, path)
            finally:
                committed = watch.close()
            if committed is None:
                raise RuntimeError("the job's commit was not seen while the upload was under way")
            first_released = count.wait_for(already + 1, answered + 30)
        finally:
            count.close()
        bare = _bare_store_seconds(services.database_url, path)
    to_202 = answered - before
    log(
        f"{rows} rows: committed after {committed - before:.2f} s, 202 after {to_202:.2f} s; first images in Kafka "
        + (f"{(first_released - committed) * 1000:.0f} ms after the commit" if first_released else "not within 30 s")
        + f"; the same CSV stored bare (insert_job in the harness): {bare:.2f} s"
    )
    checks = [
        check(
            "intake: 202",
            f"{to_202:.2f} s for {rows} rows ({to_202 / bare:.2f}x storing it bare, {bare:.2f} s)",
            f"<= {UPLOAD_TARGET_SECONDS:g} s",
            to_202 <= UPLOAD_TARGET_SECONDS,
            to_202,
        )
    ]
    return {
        "checks": checks,
        "jobs": [
            {
                "job": f"{rows}-row CSV, upload -> 202",
                "images": rows,
                "seconds": to_202,
                "images_per_second": rows / to_202,
                "finished": True,
                "failed_images": None,
            }
        ],
        "seconds_to_202": to_202,
        "seconds_to_commit": committed - before,
        "bare_store_seconds": bare,
        "first_release_after_commit_seconds": None if first_released is None else first_released - committed,
    }


def _bare_store_seconds(database_url: str, path: Path) -> float:
    """The API's own store of the CSV (read_csv, then insert_job: COPY in one transaction), called in the
    harness: no HTTP, no worker process, no limits."""
    pool = db.make_pool(database_url, max_size=1)
    try:
        with path.open("rb") as csv_file:
            started = time.monotonic()
            insert_job(pool, read_csv(csv_file, 10**9), None)
            return time.monotonic() - started
    finally:
        pool.close()


def _after_warm_up(count: TopicCount) -> int:
    if count.wait_for(2, time.monotonic() + 30) is None:
        raise RuntimeError("the warm-up upload's 2 events did not reach Kafka within 30 s")
    return count()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def intake_memory(bench) -> dict:

    rows = bench.sizes.intake_memory_rows
    path = write_url_csv(bench.work_dir / "intake-memory.csv", rows)
    with services_without_processors(bench, "intake_memory") as (services, settings):
        api = services.pids()["api"]
        count = TopicCount(settings, [settings.topic_requested, settings.topic_requested_bulk])
        try:
            upload(services, write_url_csv(bench.work_dir / "warm-up.csv", 2))  # idle, with the upload path warm
            already = _after_warm_up(count)
            idle_kib = sum(_rss_kib(pid) for pid in proc.tree(api))
            with proc.PeakRssSampler(api) as sampler:  # resets the peaks first
                before, answered, total = upload(services, path)
                released = count.wait_for(already + 1, answered + 30)
                time.sleep(AFTER_UPLOAD_SECONDS)  # the dispatcher's rounds on the job
        finally:
            count.close()
    above_idle = sampler.peak_mib - idle_kib / 1024
    log(
        f"{rows} rows ({path.stat().st_size / 1e6:.0f} MB): 202 after {answered - before:.1f} s; "
        f"API peak RSS {sampler.peak_mib:.0f} MB, idle {idle_kib / 1024:.0f} MB"
    )
    measured = f"{above_idle:.0f} MB above idle ({idle_kib / 1024:.0f} MB) for {rows} rows" + (
        "" if released else " (no image released within 30 s)"
    )
    return {
        "checks": [
            check(
                "intake memory",
                measured,
                f"<= {MEMORY_TARGET_MIB} MB above idle",
                above_idle <= MEMORY_TARGET_MIB and released is not None,
                above_idle,
            )
        ],
        "jobs": [
            {
                "job": f"{rows}-row CSV, upload -> 202",
                "images": rows,
                "seconds": answered - before,
                "images_per_second": rows / (answered - before),
                "finished": True,
                "failed_images": None,
            }
        ],
        "seconds_to_202": answered - before,
        "csv_bytes": path.stat().st_size,
        "idle_rss_mib": idle_kib / 1024,
        "peak_rss_mib": sampler.peak_mib,
    }


def _store_job(pool, rows: int) -> tuple[uuid.UUID, list[dict]]:
    parsed = ParsedCsv(
        header=["url"],
        url_column=0,
        rows=[CsvRow(row_number=n + 1, cells=[_url(n)], urls=[_url(n)]) for n in range(rows)],
    )
    job_id, _ = insert_job(pool, parsed, None)
    with pool.connection() as conn:
        images = conn.execute(
            "SELECT id, row_number, position, input_url FROM images WHERE job_id = %s", (job_id,)
        ).fetchall()
    return job_id, images


def _result(job_id: uuid.UUID, image: dict) -> bytes:
    return (
        ImageProcessed(
            request_id=job_id,
            image_id=image["id"],
            row_number=image["row_number"],
            position=image["position"],
            input_url=image["input_url"],
            status=ImageStatus.processed,
            output_url=f"http://127.0.0.1:9/files/{image['id']}.jpg",
            format="JPEG",
            bytes_in=250_000,
            bytes_out=120_000,
        )
        .model_dump_json()
        .encode()
    )


def notifier(bench) -> dict:

    results = bench.sizes.notifier_results
    pool = None
    try:
        with services_without_processors(bench, "notifier", start=()) as (services, settings):
            pool = db.make_pool(services.database_url, max_size=1)
            job_id, images = _store_job(pool, results)
            kafka.produce_and_wait(
                kafka.make_producer(settings),
                settings.topic_processed,
                [(str(job_id).encode(), _result(job_id, image)) for image in images],
                timeout=300,
            )
            services.core.start("notifier")
            first = last = None
            seen = 0
            deadline = time.monotonic() + bench.max_wait + 30  # the notifier's start is not measured
            with psycopg.connect(services.database_url, autocommit=True) as conn:
                while time.monotonic() < deadline:
                    if services.core.processes["notifier"].poll() is not None:
                        raise RuntimeError("the notifier exited")
                    row = conn.execute(
                        "SELECT processed_images + failed_images FROM processing_jobs WHERE job_id = %s", (job_id,)
                    ).fetchone()
                    assert row is not None  # the job stored above
                    seen = row[0]
                    now = time.monotonic()
                    if seen and first is None:
                        first = (now, seen)
                    if seen >= results:
                        last = now
                        break
                    time.sleep(POLL_SECONDS)
        bare = _bare_copy_seconds(pool, results)
    finally:
        if pool is not None:
            pool.close()
    bare_rate = results / bare
    target = f">= {NOTIFIER_TARGET_PER_SECOND} results/s"
    # first[...] below: first is set whenever last is (by the first result seen, results > 0)
    if last is None or last == first[0]:  # type: ignore[index]
        result = check("notifier", f"{seen} of {results} results committed within the wait", target, False)
        rate = None
    else:
        rate = (results - first[1]) / (last - first[0])  # type: ignore[index]  # from the first committed batch: startup excluded
        result = check(
            "notifier",
            f"{rate:.0f} results/s (bare COPY {bare_rate:.0f} rows/s)",
            target,
            rate >= NOTIFIER_TARGET_PER_SECOND,
            rate,
        )
    log(f"notifier: {result['measured']}")
    return {
        "checks": [result],
        "jobs": [
            {
                "job": f"{results} prepared results, Kafka -> committed rows",
                "images": results,
                "seconds": None if last is None else last - first[0],  # type: ignore[index]
                "images_per_second": rate,
                "finished": last is not None,
                "failed_images": None,
            }
        ],
        "bare_copy_seconds": bare,
        "bare_copy_rows_per_second": bare_rate,
    }


def _bare_copy_seconds(pool, rows: int) -> float:
    """COPY `rows` finished images (the columns a result sets) into the images table, committed."""
    job_id, _ = insert_job(
        pool,
        ParsedCsv(header=["url"], url_column=0, rows=[CsvRow(row_number=1, cells=[_url(0)], urls=[_url(0)])]),
        None,
    )
    with pool.connection() as conn:
        started = time.monotonic()
        with (
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy(
                "COPY images (id, job_id, row_number, position, input_url, output_url, status, format, bytes_in,"
                " bytes_out) FROM STDIN"
            ) as copy,
        ):
            for n in range(rows):
                image_id = uuid.uuid4()
                copy.write_row(
                    (
                        image_id,
                        job_id,
                        n + 2,
                        1,
                        _url(n),
                        f"http://127.0.0.1:9/files/{image_id}.jpg",
                        "processed",
                        "JPEG",
                        250_000,
                        120_000,
                    )
                )
        return time.monotonic() - started
