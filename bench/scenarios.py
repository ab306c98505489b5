"""The scenarios. Each one runs its jobs through the services (Bench.stack) and returns its checks (measured
figure against target), the wall time and images/s of its jobs, and what else it measured.
Every figure is a ratio or a bound measured within the same run: the machine is shared and noisy."""

import itertools
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from bench import codec, intake, load, proc, sharing
from bench.baseline import pillow_throughput
from bench.checks import check, job_line, log, percentile
from bench.images import ImageFile, ImageSet
from bench.jobs import Job, Jobs
from bench.servers import ImageServer, WebhookReceiver
from bench.stack import Infrastructure, Services
from deploy.local.services import DEFAULT_PROCESSORS

IN_FLIGHT = "IMGPIPE_PROCESSOR_MAX_IN_FLIGHT"  # images in flight per processor process
COMPRESS_PROCESSES = "IMGPIPE_COMPRESS_PROCESSES"  # 0: compress in the processor's threads
WARM_UP_IMAGES = 2
LATENCY_JOB_WAIT = 10.0  # seconds one latency job may take before it counts as not finished
DEAD_HOST_TARGET = 60.0  # seconds for all of the dead host's URLs to fail
SCALING_POINT_WAIT = 30.0  # a slower setting is measured by the images it did in this time


@dataclass(frozen=True)
class Sizes:
    efficiency_images: int = 500
    isolation_images: int = 200
    black_hole_urls: int = 20
    dead_host_urls: int = 10_000
    fairness_bulk_images: int = 5_000
    fairness_small_jobs: int = 20
    latency_jobs: int = 200
    memory_images: int = 64
    scaling_images: int = 200
    intake_rows: int = 100_000
    intake_memory_rows: int = 1_000_000
    notifier_results: int = 200_000
    cliff_small_images: int = 150
    cliff_mid_images: int = 1000
    cliff_backlog_images: int = 20_000
    client_job_images: int = 2000
    client_b_delay_seconds: int = 5
    backlog_rows: int = 1_000_000
    backlog_watch_seconds: int = 30
    load_rows: int = 100_000
    load_uploads: int = 16
    load_flood_seconds: int = 20

    def scaled(self, scale: float) -> "Sizes":
        return replace(
            self, **{f.name: max(MINIMUM_SIZES[f.name], round(getattr(self, f.name) * scale)) for f in fields(self)}
        )


MINIMUM_SIZES = dict(
    efficiency_images=4,
    isolation_images=4,
    black_hole_urls=2,
    dead_host_urls=20,
    fairness_bulk_images=10,
    fairness_small_jobs=3,
    latency_jobs=3,
    memory_images=2,
    scaling_images=4,
    intake_rows=100,
    intake_memory_rows=100,
    notifier_results=100,
    cliff_small_images=3,
    cliff_mid_images=6,
    cliff_backlog_images=30,
    client_job_images=6,
    client_b_delay_seconds=1,
    backlog_rows=100,
    backlog_watch_seconds=2,
    load_rows=100,
    load_uploads=2,
    load_flood_seconds=2,
)


@dataclass
class Bench:
    """What every scenario shares: the infrastructure, the images and their server, the webhook receiver."""

    infra: Infrastructure
    images: ImageSet
    image_server: ImageServer
    webhooks: WebhookReceiver
    sizes: Sizes
    work_dir: Path
    max_wait: float  # the longest any job is waited for
    in_flight: list[int]
    processor_counts: list[int]
    scale: float
    baseline: dict = field(default_factory=dict)  # bare Pillow's figures, per image set
    _tags: Iterator[int] = field(default_factory=itertools.count)
    _services: Services | None = None
    _jobs: Jobs | None = None

    def mixed_urls(self, count: int) -> list[str]:
        return self.urls_of(self.images.mixed, count)

    def urls_of(self, images: list[ImageFile], count: int) -> list[str]:
        """`count` URLs cycling through `images`, each unique (a query string): no two images of any
        job share a URL."""
        tag = next(self._tags)
        cycle = itertools.islice(itertools.cycle(images), count)
        return [self.image_server.url(image.name, f"job={tag}&n={n}") for n, image in enumerate(cycle)]

    def jpegs(self) -> list[ImageFile]:
        return [image for image in self.images.mixed if image.format == "JPEG"]

    def pillow_baseline(self, image_set: str = "mixed") -> dict:
        """Bare Pillow with 1 and 2 processes over the images of an efficiency job ("mixed" or "jpegs"),
        as many as it has, in its order; measured once per run and set."""
        if image_set not in self.baseline:
            images = self.images.mixed if image_set == "mixed" else self.jpegs()
            order = list(itertools.islice(itertools.cycle(range(len(images))), self.sizes.efficiency_images))
            data = [self.images.read(image) for image in images]
            megapixels = sum(images[i].megapixels for i in order)
            self.baseline[image_set] = {}
            for processes in (1, 2):
                result = pillow_throughput(data, order, processes)
                result["megapixels_per_second"] = megapixels / result["seconds"]
                self.baseline[image_set][f"{processes}_process{'es' if processes > 1 else ''}"] = result
                print(
                    f"  bare Pillow, {image_set}, {processes} process(es): {result['images_per_second']:.1f} img/s",
                    flush=True,
                )
        return self.baseline[image_set]

    @contextmanager
    def stack(
        self,
        scenario: str,
        processors: int = DEFAULT_PROCESSORS,
        processor_settings: dict[str, str] | None = None,
        api_settings: dict[str, str] | None = None,
    ) -> Iterator[tuple[Services, Jobs]]:
        """The services with these settings, warmed up. A scenario gets the services of the one before if
        that one finished every job it uploaded and ran its api with the same settings (only the
        processors are restarted if their settings differ), else new services on topics and a database
        of their own, so that work a scenario leaves behind (a black-hole URL, say) never reaches the next one."""
        settings, api_settings = processor_settings or {}, api_settings or {}
        if self._services is not None and self._services.api_settings != api_settings:
            self.stop_services()
        try:
            if self._services is None:
                self._services = Services(self.infra, f"{next(self._tags)}-{scenario}", self.work_dir, api_settings)
                self._services.start(processors, settings)
                self._jobs = Jobs(self._services.api_url, self.webhooks, self._services.api_key("bench"))
                self.warm_up(self._services, self._jobs)
            # started services have their processors, and their Jobs beside them
            elif (processors, settings) != (len(self._services.processors.names), self._services.processor_settings):  # type: ignore[union-attr]
                assert self._jobs is not None
                self._services.restart_processors(processors, settings)
                self.warm_up(self._services, self._jobs)
            assert self._jobs is not None
            yield self._services, self._jobs
        except Exception as exc:
            tails = self._services.log_tails() if self._services else ""
            self.stop_services()
            raise RuntimeError(f"{scenario}: {exc}\n{tails}") from exc
        if not self._jobs.all_finished():
            self.stop_services()

    def stop_services(self) -> None:
        if self._jobs:
            self._jobs.close()
        if self._services:
            self._services.stop()
        self._services = self._jobs = None

    def warm_up(self, services: Services, jobs: Jobs) -> None:
        """Every processor in the group with partitions, and one small job through, before measuring."""
        if not services.wait_for_processors():
            print("  warning: the processor group was not stable with every processor after 30 s", flush=True)
        job = jobs.upload(self.urls_of([self.images.typical()], WARM_UP_IMAGES))
        if not jobs.wait(job, 60):
            raise RuntimeError("a warm-up job of 2 images did not finish within 60 s")


def _seconds(job: Job) -> float:
    return job.seconds if job.seconds is not None else math.inf


def _finite(seconds: float) -> float | None:
    return None if seconds == math.inf else seconds


def _in_seconds(seconds: float) -> str:
    return "not finished" if seconds == math.inf else f"{seconds:.2f} s"


def _in_ms(seconds: float) -> str:
    return "not finished" if seconds == math.inf else f"{seconds * 1000:.0f} ms"


def _ratio_check(name: str, alone: Job, behind: Job, waited: float) -> dict:
    target = "<= 1.3x alone"
    if alone.seconds is None:
        return check(name, "the job alone did not finish", target, False)
    if behind.seconds is None:
        bound = waited / alone.seconds
        return check(
            name, f"> {bound:.1f}x (not done after {waited:.0f} s; alone {alone.seconds:.1f} s)", target, False, bound
        )
    ratio = behind.seconds / alone.seconds
    return check(
        name, f"{ratio:.2f}x ({behind.seconds:.1f} s vs {alone.seconds:.1f} s alone)", target, ratio <= 1.3, ratio
    )


def _cpu_seconds(roots: dict[str, Sequence[int | None]]) -> dict[str, float | None]:
    """CPU seconds so far of each group of process trees (None where a process is unknown or gone), and
    of the harness itself (without its children: the services are its children)."""
    totals: dict[str, float | None] = {}
    for name, pids in roots.items():
        readings = [proc.cpu_seconds(pid) if pid else None for pid in pids]
        totals[name] = None if None in readings else sum(readings)  # type: ignore[arg-type]  # no None in them here
    totals["harness"] = proc.cpu_seconds(os.getpid(), children=False)
    return totals


# The API releasing every image at once, as the outbox did before the dispatcher's window.
WITHOUT_WINDOW = {"IMGPIPE_DISPATCH_WINDOW_MIN_IMAGES": "10000000", "IMGPIPE_DISPATCH_WINDOW_MAX_IMAGES": "10000000"}
EFFICIENCY_PASSES = 2  # each way, alternating: the machine's noise is of the order of the difference sought


def efficiency(bench: Bench) -> dict:
    baseline = bench.pillow_baseline()["2_processes"]
    runs: dict[str, list[tuple[Job, dict]]] = {"without the window": [], "with the window": []}
    for _ in range(EFFICIENCY_PASSES):
        for way, api_settings in (("without the window", WITHOUT_WINDOW), ("with the window", {})):
            runs[way].append(_efficiency_job(bench, api_settings))
    job = runs["with the window"][-1][0]
    cpu_seconds = {way: done[-1][1] for way, done in runs.items()}  # of each way's last pass
    ratios = {
        way: [j.images_per_second / baseline["images_per_second"] if j.seconds else 0.0 for j, _ in done]
        for way, done in runs.items()
    }
    means = {way: sum(values) / len(values) for way, values in ratios.items()}
    for way, values in ratios.items():
        log(f"{way}: " + ", ".join(f"{v:.2f}" for v in values))
    target = ">= 0.90 of bare Pillow, 2 processes"
    if job.seconds is None:
        result = check("efficiency", f"not done after {bench.max_wait:.0f} s", target, False)
    else:
        ratio = means["with the window"]
        result = check(
            "efficiency",
            f"{ratio:.2f} ({job.images_per_second:.1f} vs {baseline['images_per_second']:.1f} img/s)",
            target,
            ratio >= 0.90,
            ratio,
        )
    without = means["without the window"]
    window = check(
        "efficiency: the window's cost",
        f"{means['with the window']:.2f} with, {without:.2f} without (means of {EFFICIENCY_PASSES} alternating passes)",
        ">= without - 0.03",
        means["with the window"] >= without - 0.03,
        means["with the window"] - without,
    )
    return {
        "checks": [result, window],
        "jobs": [j.summary(f"mixed images, upload -> webhook, {way}") for way, done in runs.items() for j, _ in done],
        "ratios": ratios,
        "baseline": bench.baseline["mixed"],
        "cpu_seconds": cpu_seconds,
    }


def jpeg_efficiency(bench: Bench) -> dict:
    """The efficiency job with JPEGs only, against bare Pillow over the same JPEGs."""
    baseline = bench.pillow_baseline("jpegs")["2_processes"]
    job, cpu_seconds = _efficiency_job(bench, {}, bench.jpegs())
    target = ">= 1.0 of bare Pillow, 2 processes"
    if job.seconds is None:
        return {
            "checks": [check("efficiency on JPEGs", f"not done after {bench.max_wait:.0f} s", target, False)],
            "jobs": [job.summary("JPEGs, upload -> webhook")],
        }
    ratio = job.images_per_second / baseline["images_per_second"]
    result = check(
        "efficiency on JPEGs",
        f"{ratio:.2f} ({job.images_per_second:.1f} vs {baseline['images_per_second']:.1f} img/s)",
        target,
        ratio >= 1.0,
        ratio,
    )
    return {
        "checks": [result],
        "jobs": [job.summary("JPEGs, upload -> webhook")],
        "baseline": bench.baseline["jpegs"],
        "cpu_seconds": cpu_seconds,
    }


def _efficiency_job(
    bench: Bench, api_settings: dict[str, str], images: list[ImageFile] | None = None
) -> tuple[Job, dict]:
    with bench.stack("efficiency", api_settings=api_settings) as (services, jobs):
        roots: dict[str, Sequence[int | None]] = {
            name: [pid] for name, pid in services.pids().items() if not name.startswith("processor-")
        }
        roots |= {
            "processors": services.processor_pids(),
            "kafka": [bench.infra.kafka_pid()],
            "postgres": [bench.infra.postgres_pid()],
            "image server": [bench.image_server.process.pid],
        }
        before = _cpu_seconds(roots)
        job = jobs.upload(bench.urls_of(images or bench.images.mixed, bench.sizes.efficiency_images))
        jobs.wait(job, bench.max_wait)
        after = _cpu_seconds(roots)
    log(job_line(f"{'JPEG' if images else 'mixed'} job{' without the window' if api_settings else ''}", job))
    return job, {
        # mypy does not narrow after[name] and before[name] by the checks for None
        name: None if after[name] is None or before[name] is None else after[name] - before[name]  # type: ignore[operator]
        for name in after
    }


def isolation(bench: Bench) -> dict:
    count = bench.sizes.isolation_images
    with bench.stack("isolation") as (_services, jobs):
        alone = jobs.upload(bench.mixed_urls(count))
        jobs.wait(alone, bench.max_wait)
        jobs.upload([bench.image_server.black_hole_url(n) for n in range(bench.sizes.black_hole_urls)])
        behind = jobs.upload(bench.mixed_urls(count))
        waited = _patience(bench, alone)
        jobs.wait(behind, waited)
    log(job_line("alone", alone))
    log(job_line("after the black-hole URLs", behind))
    return {
        "checks": [_ratio_check("isolation", alone, behind, waited)],
        "jobs": [alone.summary("alone"), behind.summary(f"after {bench.sizes.black_hole_urls} black-hole URLs")],
    }


def _patience(bench: Bench, alone: Job) -> float:
    """How long to wait for a job that takes alone.seconds on its own: far past its target, no longer."""
    return min(bench.max_wait, 5 * _seconds(alone) + 10)


def dead_host(bench: Bench) -> dict:
    count = bench.sizes.isolation_images
    with bench.stack("dead_host") as (_services, jobs):
        alone = jobs.upload(bench.mixed_urls(count))
        jobs.wait(alone, bench.max_wait)
        dead = jobs.upload([bench.image_server.refused_url(n) for n in range(bench.sizes.dead_host_urls)])
        behind = jobs.upload(bench.mixed_urls(count))
        waited = _patience(bench, alone)
        jobs.wait(behind, waited)
        dead_wait = min(bench.max_wait, 2 * DEAD_HOST_TARGET)
        if not jobs.wait(dead, dead_wait):
            counts = jobs.counts(dead)
    log(job_line("refused URLs", dead))
    log(job_line("after them", behind))
    target = f"all failed within {DEAD_HOST_TARGET:.0f} s"
    if dead.seconds is None:
        all_failed = check(
            "dead host", f"{counts['failed']} of {dead.images} failed after {dead_wait:.0f} s", target, False
        )
    else:
        assert dead.webhook is not None  # it arrived with finished_at, which seconds is from
        failed = dead.webhook["failed_images"]
        all_failed = check(
            "dead host",
            f"{failed} of {dead.images} failed in {dead.seconds:.1f} s",
            target,
            failed == dead.images and dead.seconds <= DEAD_HOST_TARGET,
            dead.seconds,
        )
    return {
        "checks": [all_failed, _ratio_check("dead host: job after it", alone, behind, waited)],
        "jobs": [dead.summary("refused URLs"), alone.summary("alone"), behind.summary("after the refused URLs")],
    }


def fairness(bench: Bench) -> dict:
    small_jobs = bench.sizes.fairness_small_jobs
    interval = max(0.05, 1.0 * bench.scale)  # spreads the small jobs over the bulk job's first part
    with bench.stack("fairness") as (_services, jobs):
        bulk = jobs.upload(bench.mixed_urls(bench.sizes.fairness_bulk_images))
        deadline = time.monotonic() + 30
        while jobs.counts(bulk)["pending"] == bulk.images and time.monotonic() < deadline:
            time.sleep(0.1)  # the small jobs come once the bulk job is being processed
        small = []
        for _ in range(small_jobs):
            small.append(jobs.upload(bench.urls_of([bench.images.typical()], 1)))
            time.sleep(interval)
        last_upload = time.monotonic()
        for job in small:
            jobs.wait(job, bench.max_wait)
        jobs.wait(bulk, bench.max_wait)
    during = sum(1 for job in small if bulk.finished_at is None or job.uploaded_at < bulk.finished_at)
    latencies = [_seconds(job) for job in small]
    p95 = percentile(latencies, 95)
    log(job_line("bulk job", bulk))
    measured = f"p95 {_in_seconds(p95)} (max {_in_seconds(max(latencies))})"
    log(f"one-image jobs: {measured}, {during} of {small_jobs} uploaded while the bulk job ran")
    return {
        "checks": [check("fairness", measured, "p95 <= 1 s", p95 <= 1, _finite(p95))],
        "jobs": [bulk.summary("bulk job")] + [job.summary("one-image job") for job in small],
        "small_jobs_during_bulk": during,
        "bulk_still_running_after_uploads": bulk.finished_at is None or bulk.finished_at > last_upload,
    }


def latency(bench: Bench) -> dict:
    image = bench.images.typical()
    latencies = []
    with bench.stack("latency") as (_services, jobs):
        for _ in range(bench.sizes.latency_jobs):
            job = jobs.upload(bench.urls_of([image], 1))
            jobs.wait(job, min(LATENCY_JOB_WAIT, bench.max_wait))
            latencies.append(_seconds(job))
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    log(f"{len(latencies)} one-image jobs ({image.width}x{image.height} JPEG): p50 {_in_ms(p50)}, p99 {_in_ms(p99)}")
    finished = [s for s in latencies if s != math.inf]
    return {
        "checks": [
            check("latency p50", _in_ms(p50), "<= 100 ms", p50 <= 0.100, _finite(p50)),
            check("latency p99", _in_ms(p99), "<= 300 ms", p99 <= 0.300, _finite(p99)),
        ],
        "jobs": [
            {
                "job": "one-image jobs, one after another",
                "images": len(latencies),
                "seconds": sum(finished),
                "images_per_second": len(finished) / sum(finished) if finished else None,
                "finished": len(finished) == len(latencies),
                "failed_images": None,
            }
        ],
        "latencies_seconds": [_finite(s) for s in latencies],
    }


def memory(bench: Bench) -> dict:
    with bench.stack("memory", processors=1) as (services, jobs):
        with proc.PeakRssSampler(services.processor_pids()[0]) as sampler:
            job = jobs.upload(bench.urls_of(bench.images.large, bench.sizes.memory_images))
            jobs.wait(job, bench.max_wait)
    peak = sampler.peak_mib
    log(job_line("12-megapixel job", job))
    log(f"processor peak RSS {peak:.0f} MB over {len(sampler.peaks_kib)} process(es)")
    measured = f"{peak:.0f} MB ({len(sampler.peaks_kib)} process{'es' if len(sampler.peaks_kib) > 1 else ''})"
    return {
        "checks": [check("memory", measured, "<= 400 MB", peak <= 400, peak)],
        "jobs": [job.summary("12-megapixel images, one processor")],
        "peak_rss_mib_by_pid": {str(pid): kib / 1024 for pid, kib in sampler.peaks_kib.items()},
    }


def scaling(bench: Bench) -> dict:
    baseline = bench.pillow_baseline()
    points = []
    for processors, in_flight in itertools.product(bench.processor_counts, bench.in_flight):
        points.append(
            _scaling_point(bench, processors, in_flight, {}, f"{processors} processor(s), in flight {in_flight}")
        )
    # The same work with compression in the processor's own threads instead of worker processes.
    in_flight = max(bench.in_flight)
    threads = _scaling_point(
        bench, 1, in_flight, {COMPRESS_PROCESSES: "0"}, f"1 processor, in flight {in_flight}, compressing in threads"
    )
    knees = {}
    for processors in bench.processor_counts:
        line = [p for p in points if p["processors"] == processors and p["images_per_second"]]
        if line:
            best = max(p["images_per_second"] for p in line)
            # the knee: the first setting that reaches 90 % of the line's best; more in flight adds little
            knee = next(p for p in line if p["images_per_second"] >= 0.9 * best)
            knees[processors] = {
                "in_flight": knee["in_flight"],
                "images_per_second": knee["images_per_second"],
                "best_images_per_second": best,
            }
    measured = (
        "; ".join(
            f"{n} processor{'s' if n > 1 else ''}: knee at {k['in_flight']} "
            f"({k['images_per_second']:.0f} img/s, best {k['best_images_per_second']:.0f})"
            for n, k in knees.items()
        )
        or "no job finished"
    )
    measured += f"; compressing in threads: {threads['images_per_second']:.0f} img/s"
    return {
        "checks": [check("scaling", measured, "plotted; knee reported", None)],
        "jobs": points + [threads],
        "knees": {str(n): k for n, k in knees.items()},
        "baseline_2_processes_images_per_second": baseline["2_processes"]["images_per_second"],
    }


def _scaling_point(bench: Bench, processors: int, in_flight: int, settings: dict[str, str], name: str) -> dict:
    waited = min(bench.max_wait, SCALING_POINT_WAIT)
    with bench.stack("scaling", processors, {IN_FLIGHT: str(in_flight), **settings}) as (_services, jobs):
        job = jobs.upload(bench.mixed_urls(bench.sizes.scaling_images))
        finished = jobs.wait(job, waited)
        point = {"processors": processors, "in_flight": in_flight, **settings, **job.summary(name)}
        if not finished:  # the rate of the images done so far; Bench.stack starts new services for the next point
            counts = jobs.counts(job)
            done = counts["processed"] + counts["failed"]
            point.update(images_done=done, images_per_second=done / (time.monotonic() - job.uploaded_at))
    log(
        f"{name}: {point['images_per_second']:.1f} img/s"
        + ("" if point["finished"] else f" ({point['images_done']} of {job.images} images done in {waited:.0f} s)")
    )
    return point


# In the order they run: those that leave work behind in the services (a black-hole URL, refused URLs, jobs
# larger than what they measure) come last, so that the others can share services (Bench.stack) instead
# of starting their own.
SCENARIOS = {
    "codec": codec.codec,
    "efficiency": efficiency,
    "jpeg_efficiency": jpeg_efficiency,
    "latency": latency,
    "fairness": fairness,
    "memory": memory,
    "scaling": scaling,
    "isolation": isolation,
    "dead_host": dead_host,
    "cliff": sharing.cliff,
    "clients": sharing.clients,
    "weights": sharing.weights,
    "backlog": sharing.backlog,
    # services of their own, without processors: they share nothing with the scenarios above
    "intake": intake.intake,
    "intake_memory": intake.intake_memory,
    "load": load.uploads,
    "load_keys": load.keys_limit,
    "notifier": intake.notifier,
}
