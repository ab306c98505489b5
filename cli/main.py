"""The `imgpipe` command: submit, status, output, watch."""

import json
import os
import sys
import time
from contextlib import nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cli.client import DEFAULT_API_URL, ApiClient, CliError
from cli.progress import JobProgress, fetch_progress
from cli.views import job_label, job_report, make_progress, progress_fields, progress_line, status_view

POLL_SECONDS = 0.5
POLL_LOAD_FACTOR = 2  # wait at least twice as long as a poll took: a big job's pages never keep the API busy
PLAIN_PRINT_SECONDS = 5  # not on a terminal: a progress line at most this often (and the last one)

app = typer.Typer(
    name="imgpipe",
    help="Submit CSVs of image URLs to imgpipe and follow their jobs.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()

ApiUrl = Annotated[
    str,
    typer.Option(
        "--api",
        envvar="IMGPIPE_API_URL",
        show_envvar=True,
        help="The API's address. An API key, if the API needs one, is read from IMGPIPE_API_KEY.",
    ),
]
RequestId = Annotated[str, typer.Argument(help="The job's request id, as submit prints it.")]


class ImageFormat(str, Enum):
    keep = "keep"
    webp = "webp"
    jpeg = "jpeg"


def connect(api_url: str) -> ApiClient:
    return ApiClient(api_url, os.environ.get("IMGPIPE_API_KEY") or None)


@app.command()
def submit(
    csv_file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="The CSV of image URLs.")
    ],
    webhook: Annotated[str | None, typer.Option(help="URL the API POSTs to once the job is completed.")] = None,
    quality: Annotated[int | None, typer.Option(help="JPEG/WEBP quality for this job.")] = None,
    max_width: Annotated[int | None, typer.Option(help="Shrink wider images to this width.")] = None,
    max_height: Annotated[int | None, typer.Option(help="Shrink taller images to this height.")] = None,
    image_format: Annotated[ImageFormat | None, typer.Option("--format", help="Output format.")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Show live progress until the job is completed, then its failures.")
    ] = False,
    api: ApiUrl = DEFAULT_API_URL,
) -> None:
    """Upload a CSV; print the job's request id (and with --wait, follow it to the end)."""
    given = {
        "quality": quality,
        "max_width": max_width,
        "max_height": max_height,
        "format": image_format.value if image_format else None,
    }
    options = {name: str(value) for name, value in given.items() if value is not None}
    with connect(api) as client:
        request_id = client.upload(csv_file, webhook, options)["request_id"]
        print(request_id, flush=True)
        if wait:
            follow(client, [request_id])


@app.command()
def status(
    request_id: RequestId,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the API's answer (first page of images) as JSON.")
    ] = False,
    api: ApiUrl = DEFAULT_API_URL,
) -> None:
    """A job's state, counts, bytes saved, webhook and failures by reason."""
    with connect(api) as client:
        if as_json:
            print(json.dumps(client.status_page(request_id), indent=2))
        else:
            console.print(status_view(fetch_progress(client, request_id)))


@app.command()
def output(
    request_id: RequestId,
    out: Annotated[
        Path | None, typer.Option("-o", "--output", help="File to write (default: standard output).")
    ] = None,
    api: ApiUrl = DEFAULT_API_URL,
) -> None:
    """Download a completed job's output CSV."""
    with connect(api) as client:
        body = client.output_csv(request_id)
    if out is None:
        sys.stdout.buffer.write(body)
        return
    try:
        out.write_bytes(body)
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"wrote {len(body)} bytes to {out}")


@app.command()
def watch(
    request_ids: Annotated[list[str] | None, typer.Argument(help="Request ids of the jobs to follow.")] = None,
    api: ApiUrl = DEFAULT_API_URL,
) -> None:
    """Follow the named jobs, or every job in progress, with live progress until all are completed."""
    with connect(api) as client:
        request_ids = list(dict.fromkeys(request_ids or client.jobs_in_progress()))
        if not request_ids:
            console.print("no jobs in progress")
            return
        follow(client, request_ids)


def follow(client: ApiClient, request_ids: list[str]) -> None:
    """Poll the jobs until every one is completed, with a live bar each on a terminal (elsewhere a plain
    progress line now and then), then print each job's summary and failures."""
    live = console.is_terminal
    bars = make_progress(console)
    tasks = {
        request_id: bars.add_task(job_label(request_id), total=None, failed=0, rate="– img/s", saved="–", left="–")
        for request_id in request_ids
    }
    jobs: dict[str, JobProgress] = {}
    last_printed = None
    try:
        with bars if live else nullcontext():
            while True:
                started = time.monotonic()
                for request_id in request_ids:
                    if request_id not in jobs or not jobs[request_id].completed:
                        jobs[request_id] = fetch_progress(client, request_id)
                        bars.update(tasks[request_id], **progress_fields(jobs[request_id]))
                finished = all(job.completed for job in jobs.values())
                if not live and (finished or last_printed is None or started - last_printed >= PLAIN_PRINT_SECONDS):
                    for job in jobs.values():
                        print(progress_line(job), flush=True)
                    last_printed = started
                if finished:
                    break
                time.sleep(max(POLL_SECONDS, POLL_LOAD_FACTOR * (time.monotonic() - started)))
    except CliError as error:
        if len(jobs) < len(request_ids):  # a job not found, say: no hint that it goes on
            raise
        raise CliError(f"{error} (the jobs go on; follow them with: imgpipe watch {' '.join(request_ids)})") from None
    except KeyboardInterrupt:
        raise CliError(
            f"stopped following; the jobs go on: imgpipe watch {' '.join(request_ids)}", exit_code=130
        ) from None
    for request_id in request_ids:
        console.print(job_report(jobs[request_id]))


def main() -> None:
    """The console script: a CliError ends the command with one line on stderr and its exit code."""
    try:
        app(prog_name="imgpipe")
    except CliError as error:
        print(f"imgpipe: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
