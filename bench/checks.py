"""What every scenario reports with: a check's row, a percentile, a line of progress."""

import math

from bench.jobs import Job


def check(name: str, measured: str, target: str, met: bool | None, value: float | None = None) -> dict:
    return {"check": name, "measured": measured, "target": target, "met": met, "value": value}


def percentile(values: list[float], percent: float) -> float:
    """Nearest rank: the smallest value with at least `percent` % of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


def log(message: str) -> None:
    print(f"  {message}", flush=True)


def job_line(name: str, job: Job) -> str:
    if job.seconds is None:
        return f"{name}: {job.images} images, not finished"
    return f"{name}: {job.images} images in {job.seconds:.2f} s ({job.images_per_second:.1f} img/s)"
