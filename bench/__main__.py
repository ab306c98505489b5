"""Run imgpipe's benchmark scenarios, print their table, write latest.json, latest.md and scaling.png.

`make bench` runs `python -m bench`; docs/performance.md says what each scenario does and measures."""

import argparse
import os
import shutil
import sys
import time
import traceback
from contextlib import ExitStack
from pathlib import Path

# The codec scenario runs Pillow in this process: tuned as the processor runs it (read when Pillow is imported).
os.environ.setdefault("PILLOW_BLOCKS_MAX", "16")

from bench.images import ImageSpec, ensure_images  # noqa: E402
from bench.report import describe_machine, table_rows, text_table, write  # noqa: E402
from bench.scenarios import SCENARIOS, Bench, Sizes  # noqa: E402
from bench.servers import ImageServer, WebhookReceiver  # noqa: E402
from bench.stack import infrastructure  # noqa: E402
from deploy.local.services import REPO_ROOT  # noqa: E402


def _list(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios",
        type=_list(str),
        default=list(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every job's size and the number of distinct images (e.g. 0.01 for a smoke run)",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results", help="where the results go")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=REPO_ROOT / ".local" / "bench",
        help="Kafka and PostgreSQL data (when started here), service logs, stored images",
    )
    parser.add_argument("--max-wait", type=float, default=300.0, help="the longest any one job is waited for (s)")
    parser.add_argument(
        "--in-flight",
        type=_list(int),
        default=[1, 2, 4, 8, 16, 32],
        help="scaling: IMGPIPE_PROCESSOR_MAX_IN_FLIGHT settings",
    )
    parser.add_argument("--processors", type=_list(int), default=[1, 2], help="scaling: numbers of processor processes")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {','.join(sorted(unknown))}; known: {','.join(SCENARIOS)}")
    return args


def image_spec(scale: float) -> ImageSpec:
    return ImageSpec(jpegs=max(4, round(100 * scale)), pngs=max(2, round(10 * scale)), large=max(1, round(4 * scale)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    sizes = Sizes().scaled(args.scale)
    outcomes: dict[str, dict] = {}
    with ExitStack() as resources:
        shutil.rmtree(args.work_dir / "logs", ignore_errors=True)  # the services append: keep this run's only
        (args.work_dir / "logs").mkdir(parents=True)
        infra = resources.enter_context(
            infrastructure(args.work_dir, os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("DATABASE_URL"))
        )
        images = ensure_images(image_spec(args.scale))
        bench = Bench(
            infra=infra,
            images=images,
            image_server=resources.enter_context(ImageServer(images.directory)),
            webhooks=resources.enter_context(WebhookReceiver()),
            sizes=sizes,
            work_dir=args.work_dir,
            max_wait=args.max_wait,
            in_flight=args.in_flight,
            processor_counts=args.processors,
            scale=args.scale,
        )
        resources.callback(bench.stop_services)
        for name in [name for name in SCENARIOS if name in args.scenarios]:
            print(f"== {name} (t={time.monotonic() - started:.0f} s)", flush=True)
            try:
                outcomes[name] = SCENARIOS[name](bench)
            except Exception as exc:
                traceback.print_exc()
                outcomes[name] = {"error": f"{type(exc).__name__}: {exc}"}
        machine = describe_machine(infra.postgres_version(), infra.started_here)
    report = {
        "machine": machine,
        "run": {
            "argv": sys.argv[1:] if argv is None else argv,
            "scale": args.scale,
            "sizes": vars(sizes),
            "images": {"mixed": len(images.mixed), "large": len(images.large), "cache": str(images.directory)},
            "seconds": time.monotonic() - started,
        },
        "baseline": bench.baseline,
        "scenarios": outcomes,
    }
    write(report, args.out)
    print("\n" + text_table(table_rows(outcomes)))
    print(f"\n{time.monotonic() - started:.0f} s; results in {args.out}", flush=True)
    return 1 if any("error" in outcome for outcome in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
