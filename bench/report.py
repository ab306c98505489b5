"""The results: a table on the terminal, latest.json and latest.md, and the scaling figure (scaling.png)."""

import datetime
import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

import PIL
from PIL import features

from deploy.local.kafka import KAFKA_VERSION
from deploy.local.services import REPO_ROOT


def _turbojpeg_versions() -> str:
    """PyTurboJPEG's version and the system libjpeg-turbo's (Debian's package) that it binds."""
    from importlib.metadata import version

    package = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libturbojpeg0"], capture_output=True, text=True)
    return f"PyTurboJPEG {version('PyTurboJPEG')} on libturbojpeg0 {package.stdout.strip() or '(not from dpkg)'}"


def describe_machine(postgres_version: str, kafka_started_here: bool) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    meminfo = Path("/proc/meminfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    mem_kib = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemTotal:")))
    git = lambda *args: subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 1024**2, 1),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "turbojpeg": _turbojpeg_versions(),
        "kafka": KAFKA_VERSION if kafka_started_here else f"external broker (deploy/local pins {KAFKA_VERSION})",
        "postgresql": postgres_version,
        "commit": git("rev-parse", "--short", "HEAD"),
        "work_tree_modified": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def table_rows(scenarios: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, outcome in scenarios.items():
        if "error" in outcome:
            rows.append((name, "error: " + outcome["error"].splitlines()[0][:80], "", "no"))
        for c in outcome.get("checks", []):
            rows.append((c["check"], c["measured"], c["target"], {True: "yes", False: "no", None: "-"}[c["met"]]))
    return rows


def text_table(rows: Sequence[tuple[str, ...]], header=("scenario", "measured", "target", "met?")) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    machine, run = report["machine"], report["run"]
    lines = [
        "# Benchmark results",
        "",
        f"`{' '.join(['python -m bench', *run['argv']])}`, {machine['date']}, {run['seconds']:.0f} s in all; "
        f"commit {machine['commit']}{' (work tree modified)' if machine['work_tree_modified'] else ''}.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM; Python {machine['python']}, "
        f"Pillow {machine['pillow']} (libjpeg-turbo {machine['libjpeg_turbo']}), {machine.get('turbojpeg')}, "
        f"Kafka {machine['kafka']}, "
        f"PostgreSQL {machine['postgresql']}.",
        "",
        *_markdown_table(
            ["scenario", "measured", "target", "met?"], [list(row) for row in table_rows(report["scenarios"])]
        ),
        "",
        "## Jobs",
        "",
        *_markdown_table(
            ["scenario", "job", "images", "wall time (s)", "images/s"],
            [
                [
                    name,
                    job["job"] + ("" if job["finished"] else _unfinished(job)),
                    job["images"],
                    _number(job["seconds"]),
                    _number(job["images_per_second"], 1),
                ]
                for name, outcome in report["scenarios"].items()
                for job in _summarised_jobs(outcome)
            ],
        ),
    ]
    baselines = report.get("baseline") or {}
    if baselines:
        lines += [
            "",
            "## Bare Pillow (same images, in memory, no Kafka, HTTP or database)",
            "",
            *_markdown_table(
                ["images", "processes", "images", "seconds", "images/s", "megapixels/s"],
                [
                    [
                        image_set,
                        b["processes"],
                        b["images"],
                        _number(b["seconds"]),
                        _number(b["images_per_second"], 1),
                        _number(b["megapixels_per_second"], 0),
                    ]
                    for image_set, baseline in baselines.items()
                    for b in baseline.values()
                ],
            ),
        ]
    efficiency = report["scenarios"].get("efficiency", {})
    if efficiency.get("cpu_seconds"):
        ways = efficiency["cpu_seconds"]  # the last pass of each way
        walls = {job["job"].rsplit(", ", 1)[-1]: job["seconds"] for job in efficiency["jobs"]}
        names = list(next(iter(ways.values())))
        lines += [
            "",
            "## CPU seconds during the efficiency job (the last pass each way)",
            "",
            *_markdown_table(
                ["process group", *ways], [[name, *(_number(cpu[name]) for cpu in ways.values())] for name in names]
            ),
            "",
            *(
                f"{way}: {_number(sum(s for s in cpu.values() if s))} CPU seconds in {_number(walls.get(way))} s "
                f"of wall time, which offers {_number(walls.get(way) and walls[way] * machine['cores'])} on "
                f"{machine['cores']} cores."
                for way, cpu in ways.items()
            ),
        ]
    if "scaling" in report["scenarios"] and "jobs" in report["scenarios"]["scaling"]:
        lines += [
            "",
            "## Scaling",
            "",
            "![scaling](scaling.png)",
            "",
            *_markdown_table(
                ["processors", "in flight", "compression", "images/s"],
                [
                    [p["processors"], p["in_flight"], _compression(p), _number(p["images_per_second"], 1)]
                    for p in report["scenarios"]["scaling"]["jobs"]
                ],
            ),
        ]
    return "\n".join(lines) + "\n"


def _compression(point: dict) -> str:
    return "threads" if point.get("IMGPIPE_COMPRESS_PROCESSES") == "0" else "worker processes"


def _unfinished(job: dict) -> str:
    if "images_done" in job:
        return f" (not finished: images/s of the {job['images_done']} done in the time waited)"
    return " (not finished)"


def _summarised_jobs(outcome: dict) -> list[dict]:
    """Jobs to list one by one; the many one-image jobs of fairness are left to the JSON."""
    return [job for job in outcome.get("jobs", []) if job["job"] != "one-image job"]


def scaling_figure(scaling: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5), dpi=120)
    in_processes = [p for p in scaling["jobs"] if _compression(p) == "worker processes"]
    for processors in sorted({p["processors"] for p in in_processes}):
        line = [p for p in in_processes if p["processors"] == processors]
        axes.plot(
            [p["in_flight"] for p in line],
            [p["images_per_second"] or 0 for p in line],
            marker="o",
            label=f"{processors} processor process{'es' if processors > 1 else ''}",
        )
    for point in (p for p in scaling["jobs"] if _compression(p) == "threads"):
        axes.plot(
            [point["in_flight"]],
            [point["images_per_second"] or 0],
            marker="x",
            markersize=9,
            linestyle="",
            label="1 processor, compressing in threads",
        )
    axes.axhline(
        scaling["baseline_2_processes_images_per_second"],
        color="grey",
        linestyle="--",
        label="bare Pillow, 2 processes",
    )
    settings = sorted({p["in_flight"] for p in scaling["jobs"]})
    axes.set_xscale("log", base=2)
    axes.set_xticks(settings, labels=[str(n) for n in settings])
    axes.minorticks_off()
    axes.set_xlabel("images in flight per processor (IMGPIPE_PROCESSOR_MAX_IN_FLIGHT)")
    axes.set_ylabel("images/s (upload -> webhook)")
    axes.set_ylim(bottom=0)
    axes.set_title("imgpipe: processor throughput by images in flight")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def _finite(value):
    """JSON has no Infinity or NaN: such figures (a job that never finished) are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(_finite(report), indent=2, default=str) + "\n")
    (out_dir / "latest.md").write_text(markdown(report))
    scaling = report["scenarios"].get("scaling", {})
    if scaling.get("jobs"):
        scaling_figure(scaling, out_dir / "scaling.png")
