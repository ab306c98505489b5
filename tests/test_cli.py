"""The installed `imgpipe` command, run as a user runs it (a subprocess, its output captured: not a
terminal), against the real stack, a loopback server that records what it is sent, or nothing at all."""

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from deploy.local.probe import free_port
from testbed.http_servers import LoopbackHTTPServer, LoopbackServer
from testbed.images import jpeg_bytes
from tests.support.stack import JOB_TIMEOUT, url_csv, wait_for_status

IMGPIPE = Path(sys.executable).parent / "imgpipe"  # the console script `make install` puts beside the venv's python
# Variables that would change what the command does or how rich draws; the tests set what they need.
_CLEARED = (
    "IMGPIPE_API_URL",
    "IMGPIPE_API_KEY",
    "COLUMNS",
    "LINES",
    "FORCE_COLOR",
    "TTY_COMPATIBLE",
    "TTY_INTERACTIVE",
    "NO_COLOR",
    "TERM",
)
WIDTH = 80  # rich's width when the output is not a terminal


def imgpipe(*args: str, text: bool = True, **env: str) -> subprocess.CompletedProcess:
    assert IMGPIPE.exists(), f"{IMGPIPE} is missing: run `make install`"
    environment = {key: value for key, value in os.environ.items() if key not in _CLEARED}
    result = subprocess.run(
        [str(IMGPIPE), *args], env={**environment, **env}, capture_output=True, text=text, timeout=JOB_TIMEOUT
    )
    print(f"$ imgpipe {' '.join(args)} -> {result.returncode}\n{result.stdout}{result.stderr}")
    return result


def assert_plain_text(output: str) -> None:
    """Readable where it is not a terminal: no colour or cursor escapes, nothing wider than rich's 80 columns."""
    assert "\x1b" not in output and "\r" not in output
    assert all(len(line) <= WIDTH for line in output.splitlines()), output


def assert_one_error_line(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgpipe: "), result.stderr
    for text in expected:
        assert text in lines[0]


def table_row(output: str, *cells: str) -> bool:
    """Whether a rich table row holds these cells, in order."""
    return re.search(r"\s*│\s*".join(re.escape(cell) for cell in cells), output) is not None


def test_submit_wait_follows_a_job_to_its_failures_then_status_and_output_read_it(
    start_stack, image_host, receivers, tmp_path
):
    stack, webhooks = start_stack(processors=1), receivers()
    api_url = stack.settings.public_base_url
    urls = [image_host.add(f"/ok{seed}.jpg", jpeg_bytes(400, 300, seed)) for seed in range(3)]
    urls += [image_host.base_url + "/missing.jpg", image_host.add("/notes.jpg", b"these are not image bytes")]
    csv_file = tmp_path / "products.csv"
    csv_file.write_text(url_csv(urls))

    submitted = imgpipe("submit", str(csv_file), "--webhook", webhooks.url, "--wait", IMGPIPE_API_URL=api_url)

    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stderr == ""
    assert_plain_text(submitted.stdout)
    request_id = submitted.stdout.splitlines()[0]
    assert str(uuid.UUID(request_id)) == request_id  # the id alone on the first line
    job = stack.api.get(f"/status/{request_id}").json()
    assert job["status"] == "completed" and job["counts"]["failed"] == 2
    assert webhooks.wait_for(1, JOB_TIMEOUT)[0].json()["request_id"] == request_id
    assert re.search(
        rf"^job {request_id[:8]}: 5/5 done, 2 failed, [\d.]+ img/s, saved [\d.]+ [kM]?B \(\d+ %\), 0s left$",
        submitted.stdout,
        re.MULTILINE,
    )
    assert f"Job {request_id} completed: 3 processed, 2 failed of 5\n" in submitted.stdout
    assert re.search(r"^[\d.]+ kB → [\d.]+ kB, saved .*; took [\d.]+ s, [\d.]+ img/s$", submitted.stdout, re.MULTILINE)
    assert "Failures by reason" in submitted.stdout
    assert table_row(submitted.stdout, "http_404", "1", "the server answered 404")
    assert table_row(submitted.stdout, "not_an_image", "1", "the content is not an image")

    status = imgpipe("status", request_id, "--api", api_url)
    assert status.returncode == 0, status.stderr
    assert_plain_text(status.stdout)
    assert re.search(r"status\s+completed \(events published\)", status.stdout)
    assert "5 total: 3 processed, 2 failed, 0 pending" in status.stdout
    assert re.search(r"release\s+5 released, 0 waiting *\n", status.stdout)  # no share: it has nothing left to do
    saved = sum(i["bytes_in"] - i["bytes_out"] for i in job["images"] if i["status"] == "processed")
    assert re.search(r"bytes\s+.* in, .* out, saved", status.stdout) and saved > 0
    assert f"to {webhooks.url}" in status.stdout
    assert table_row(status.stdout, "http_404", "1") and table_row(status.stdout, "not_an_image", "1")

    raw = imgpipe("status", request_id, "--json", "--api", api_url)
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout) == stack.api.get(f"/status/{request_id}").json()

    expected_csv = stack.api.get(f"/output_csv/{request_id}").content
    written = imgpipe("output", request_id, "-o", str(tmp_path / "out.csv"), "--api", api_url)
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "out.csv").read_bytes() == expected_csv
    output_rows = list(csv.reader(io.StringIO(expected_csv.decode())))
    assert [row[-1] for row in output_rows[-2:]] == ["failed:http_404", "failed:not_an_image"]
    to_stdout = imgpipe("output", request_id, "--api", api_url, text=False)
    assert to_stdout.returncode == 0 and to_stdout.stdout == expected_csv


def test_error_answers_and_a_job_not_found_give_one_line_and_a_non_zero_exit(start_stack, tmp_path):
    stack = start_stack(processors=0)  # no processor: an uploaded job stays in progress
    api_url = stack.settings.public_base_url
    in_progress = stack.api.post(
        "/upload", files={"file": ("job.csv", url_csv(["https://example.com/a.jpg"]), "text/csv")}
    ).json()["request_id"]
    other = stack.api.post(
        "/upload", files={"file": ("job.csv", url_csv(["https://example.com/b.jpg"] * 2), "text/csv")}
    ).json()["request_id"]
    wait_for_status(stack.api, other, lambda status: status["events"] == "published")
    wait_for_status(stack.api, in_progress, lambda status: status["events"] == "published")
    status = imgpipe("status", in_progress, "--api", api_url)
    assert re.search(r"release\s+1 released, 0 waiting; share of the processors 50%", status.stdout), status.stdout
    unknown = str(uuid.uuid4())

    assert_one_error_line(imgpipe("status", unknown, "--api", api_url), "job_not_found (404)", unknown)
    assert_one_error_line(imgpipe("output", unknown, "--api", api_url), "job_not_found (404)")
    assert_one_error_line(imgpipe("watch", unknown, "--api", api_url), "job_not_found (404)")
    # An id is one path segment: this one reaches no other endpoint (/healthz would answer 200)
    assert_one_error_line(imgpipe("status", "../healthz", "--api", api_url), "(404)")
    not_completed = imgpipe("output", in_progress, "-o", str(tmp_path / "out.csv"), "--api", api_url)
    assert_one_error_line(not_completed, "job_not_completed (409)", "0 processed, 0 failed, 1 pending, 1 total")
    assert not (tmp_path / "out.csv").exists()

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("name,price\nshoe,12\n")
    assert_one_error_line(imgpipe("submit", str(bad_csv), "--api", api_url), "invalid_csv (422)")


@pytest.mark.parametrize("command", [["status", "6f1c0000-0000-4000-8000-000000000000"], ["watch", "6f1c"], ["submit"]])
def test_an_unreachable_api_gives_one_line_and_a_non_zero_exit(command, tmp_path):
    if command == ["submit"]:
        (tmp_path / "job.csv").write_text(url_csv(["https://example.com/a.jpg"]))
        command = ["submit", str(tmp_path / "job.csv"), "--wait"]
    nobody = f"http://127.0.0.1:{free_port()}"  # a free port: nothing listens there

    assert_one_error_line(imgpipe(*command, IMGPIPE_API_URL=nobody), f"cannot reach the API at {nobody}")
    assert_one_error_line(imgpipe(*command, "--api", nobody), f"cannot reach the API at {nobody}")


def test_job_options_and_the_api_key_are_sent_as_the_api_takes_them(receivers, tmp_path):
    """The per-job options travel as form fields beside the CSV (the API validates them) and the key as a
    bearer token: seen by a loopback server that records the request (it answers no JSON, which the
    command reports in one line)."""
    recorder = receivers()
    (tmp_path / "job.csv").write_text(url_csv(["https://example.com/a.jpg"]))

    result = imgpipe(
        "submit",
        str(tmp_path / "job.csv"),
        "--webhook",
        "https://hooks.example.com/x",
        "--quality",
        "70",
        "--max-width",
        "800",
        "--max-height",
        "600",
        "--format",
        "webp",
        "--api",
        recorder.base_url,
        IMGPIPE_API_KEY="imgpipe_secret_key",
    )

    assert_one_error_line(result, f"the server at {recorder.base_url} answered 200 without JSON")
    request = recorder.posts_to("/upload")[0]
    assert request.headers["Authorization"] == "Bearer imgpipe_secret_key"
    fields = dict(re.findall(rb'name="(\w+)"\r\n\r\n([^\r]*)\r\n', request.body))
    assert fields == {
        b"quality": b"70",
        b"max_width": b"800",
        b"max_height": b"600",
        b"format": b"webp",
        b"webhook_url": b"https://hooks.example.com/x",
    }
    assert b'name="file"; filename="job.csv"' in request.body and b"https://example.com/a.jpg" in request.body


def test_watch_without_ids_follows_every_job_in_progress_and_no_other(start_stack, image_host, tmp_path):
    stack = start_stack(processors=1, processor_max_in_flight=1)
    api_url = stack.settings.public_base_url
    done_file, slow_file = tmp_path / "done.csv", tmp_path / "slow.csv"
    done_file.write_text(url_csv([image_host.add("/done.jpg", jpeg_bytes(100, 80, 1))]))
    done = imgpipe("submit", str(done_file), "--wait", "--api", api_url).stdout.splitlines()[0]
    image_host.delay = 1.0  # six images, one at a time: the jobs below are in progress when watch starts
    slow_file.write_text(url_csv([image_host.add(f"/slow{n}.jpg", jpeg_bytes(100, 80, n)) for n in range(3)]))
    in_progress = [imgpipe("submit", str(slow_file), "--api", api_url).stdout.strip() for _ in range(2)]

    watched = imgpipe("watch", "--api", api_url)

    assert watched.returncode == 0, watched.stderr
    for request_id in in_progress:
        assert f"Job {request_id} completed: 3 processed, 0 failed of 3" in watched.stdout
    assert done not in watched.stdout
    assert imgpipe("watch", "--api", api_url).stdout.strip() == "no jobs in progress"


class _BusyThenAccepting(BaseHTTPRequestHandler):
    """Answers the first `busy` uploads 429 too_many_uploads with Retry-After: 1, then 202."""

    server: LoopbackHTTPServer

    def log_message(self, *args):
        pass

    def do_POST(self):
        owner = self.server.owner
        body = self.rfile.read(int(self.headers["Content-Length"]))
        owner.uploads.append((time.monotonic(), body))
        if len(owner.uploads) <= owner.busy:
            status, headers = 429, {"Retry-After": "1"}
            answer: dict[str, object] = {
                "error": {"code": "too_many_uploads", "message": "2 uploads are being accepted", "limit": 2}
            }
        else:
            status, headers = 202, {}
            answer = {
                "request_id": str(uuid.uuid4()),
                "total_images": 1,
                "events": "queued",
                "status_url": "/status/x",
                "output_csv_url": "/output_csv/x",
            }
        payload = json.dumps(answer).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/json", "Content-Length": str(len(payload))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)


class BusyApi(LoopbackServer):
    def __init__(self, busy: int):
        super().__init__(_BusyThenAccepting)
        self.busy = busy
        self.uploads: list[tuple[float, bytes]] = []


def test_submit_waits_as_retry_after_says_and_sends_the_whole_csv_again(tmp_path):
    csv_file = tmp_path / "job.csv"
    csv_file.write_text(url_csv([f"https://example.com/{n}.jpg" for n in range(50)]))
    with BusyApi(busy=2) as api:
        result = imgpipe("submit", str(csv_file), "--api", api.base_url)

    assert result.returncode == 0, result.stderr
    assert uuid.UUID(result.stdout.splitlines()[0])
    waits = result.stderr.splitlines()
    assert len(waits) == 2 and all("too_many_uploads (429)" in line and "retrying in 1 s" in line for line in waits)
    times = [arrived for arrived, _ in api.uploads]
    assert len(times) == 3 and all(later - earlier >= 1 for earlier, later in zip(times, times[1:], strict=False))
    assert all(csv_file.read_bytes() in body for _, body in api.uploads)  # rewound: the whole file every time


def test_an_answer_without_retry_after_is_not_retried(receivers, tmp_path):
    (tmp_path / "job.csv").write_text(url_csv(["https://example.com/a.jpg"]))
    server = receivers(statuses=[503], default_status=503)
    result = imgpipe("submit", str(tmp_path / "job.csv"), "--api", server.base_url)
    assert_one_error_line(result, "answered 503")
    assert len(server.posts_to("/upload")) == 1
