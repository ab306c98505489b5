"""What the CLI prints: the live progress bars (on a terminal), plain progress lines (elsewhere), the
failure table and the status summary. In a non-terminal rich prints without colours or cursor moves."""

from rich.console import Group
from rich.filesize import decimal as size
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from cli.client import one_line
from cli.progress import JobProgress


def api_text(value, style: str = "") -> Text:
    """Text from the API (codes, messages, URLs): never read as rich markup, no control characters."""
    return Text(one_line(value), style=style)


def make_progress(console) -> Progress:
    """Live bars, one task per job; progress_fields() gives each task's values."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]} failed"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("saved {task.fields[saved]}"),
        TextColumn("{task.fields[left]} left"),
        console=console,
    )


def job_label(request_id: str) -> str:
    return f"job {request_id[:8]}"


def progress_fields(job: JobProgress) -> dict:
    return dict(
        total=job.total,
        completed=job.done,
        failed=job.failed,
        rate=rate_text(job),
        saved=saved_text(job),
        left=left_text(job),
    )


def progress_line(job: JobProgress) -> str:
    """The same as a bar, for output that is not a terminal (a log, a pipe)."""
    return (
        f"{job_label(job.request_id)}: {job.done}/{job.total} done, {job.failed} failed, {rate_text(job)}, "
        f"saved {saved_text(job)}, {left_text(job)} left"
    )


def rate_text(job: JobProgress) -> str:
    rate = job.images_per_second
    return f"{rate:.1f} img/s" if rate else "– img/s"


def saved_text(job: JobProgress) -> str:
    if not job.bytes_in:
        return "–"
    return f"{size(job.bytes_saved)} ({100 * job.bytes_saved / job.bytes_in:.0f} %)"


def left_text(job: JobProgress) -> str:
    seconds = job.seconds_left
    if seconds is None:
        return "–"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def summary(job: JobProgress) -> Text:
    text = Text.assemble(
        f"Job {job.request_id} {job.status}: ",
        (f"{job.processed} processed", "green"),
        ", ",
        (f"{job.failed} failed", "red" if job.failed else ""),
        f" of {job.total}",
    )
    details = []
    if job.bytes_in:
        details.append(f"{size(job.bytes_in)} → {size(job.bytes_out)}, saved {saved_text(job)}")
    if job.seconds_taken is not None:
        details.append(f"took {job.seconds_taken:.1f} s, {rate_text(job)}")
    if details:
        text.append("\n" + "; ".join(details))
    return text


def failure_table(job: JobProgress) -> Table:
    table = Table(title="Failures by reason", title_justify="left")
    table.add_column("reason", no_wrap=True)
    table.add_column("images", justify="right")
    table.add_column("example", overflow="fold")
    for code, reason in sorted(job.failures.items(), key=lambda item: -item[1].count):
        example = Text.assemble(api_text(reason.example_message), "\n", api_text(reason.example_url, "dim"))
        table.add_row(api_text(code), str(reason.count), example)
    return table


def job_report(job: JobProgress) -> Group:
    """What `submit --wait` and `watch` print when a job is completed."""
    return Group(summary(job), *([failure_table(job)] if job.failures else []))


def release_text(dispatch: dict) -> str:
    """The job's place in the release of images: what is out, what waits, its share and estimates."""
    text = f"{dispatch['released']} released, {dispatch['waiting']} waiting"
    if dispatch["share"] is not None:
        text += f"; share of the processors {dispatch['share']:.0%}"
    if dispatch["started_at"] is None and dispatch["starts_within_seconds"] is not None:
        text += f"; starts within {dispatch['starts_within_seconds']:.0f} s"
    if dispatch["expected_finish_seconds"] is not None:
        text += f"; about {dispatch['expected_finish_seconds']:.0f} s to go at that share"
    return text


def status_view(job: JobProgress) -> Group:
    """`imgpipe status`: the job's state, counts, bytes, times, webhook and failures."""
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column(overflow="fold")

    def add(name: str, value: str) -> None:
        fields.add_row(name, api_text(value))

    add("request id", job.request_id)
    add("status", f"{job.status} (events {job.first_page.get('events', '?')})")
    counts = job.first_page["counts"]
    add(
        "images",
        f"{counts['total']} total: {counts['processed']} processed, "
        f"{counts['failed']} failed, {counts['pending']} pending",
    )
    dispatch = job.first_page.get("dispatch")
    if dispatch:
        add("release", release_text(dispatch))
    if job.bytes_in:
        add("bytes", f"{size(job.bytes_in)} in, {size(job.bytes_out)} out, saved {saved_text(job)}")
    if not job.completed:
        add("progress", f"{rate_text(job)}, {left_text(job)} left")
    for name in ("created_at", "completed_at"):
        if job.first_page.get(name):
            add(name.removesuffix("_at"), job.first_page[name])
    webhook = job.first_page.get("webhook")
    if webhook:
        attempts = f"{webhook['attempts']} attempt{'s' if webhook['attempts'] != 1 else ''}"
        last_error = f"; last error: {webhook['last_error']}" if webhook.get("last_error") else ""
        add("webhook", f"{webhook['status']} ({attempts}) to {webhook['url']}{last_error}")
    return Group(fields, *([failure_table(job)] if job.failures else []))
