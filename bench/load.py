"""Load (issue 14): many large uploads at once while a client polls a job's status, and one API key over
its uploads-per-minute limit while another key works. Against the api and the notifier (no processors:
the uploads' rows are stored and nothing is fetched). The harness's own clients (httpx in threads), not
Locust: the scenario is a precise choreography (uploads released together, a poller at a fixed interval,
two keys with their own limits) measured in the same run as everything else, and it needs nothing more."""

import multiprocessing
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import httpx
import psycopg

from bench import proc
from bench.checks import check, log, percentile
from bench.intake import services_without_processors, write_url_csv
from services.api import keys

POLL_SECONDS = 0.05
IDLE_SECONDS = 5.0
STATUS_P99_TARGET = 0.100
MEMORY_TARGET_MIB = 300
UNAFFECTED_RATIO = 1.5
LIMITED_PER_MINUTE = 5
B_UPLOAD_SECONDS = 0.25
FLOOD_CLIENTS = 2
FLOOD_INTERVAL_SECONDS = 0.2  # per flooding client: two of them send up to 600 uploads a minute against a limit of 5


class Poller:
    """GET /status of one job every POLL_SECONDS, in a process of its own (the harness's other clients
    would otherwise delay it on the interpreter lock): each answer's time and status code."""

    def __init__(self, base_url: str, path: str, headers: dict | None = None):
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._answers = context.Queue()
        self._process = context.Process(
            target=_poll, args=(base_url, path, headers or {}, self._stop, self._answers), daemon=True
        )
        self._process.start()

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        answers = self._answers.get(timeout=60)
        self._process.join(10)
        return answers


def _poll(base_url: str, path: str, headers: dict, stop, answers) -> None:
    timed = []
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status = client.get(path).status_code
            except httpx.TransportError:
                status = 0
            timed.append((time.monotonic() - started, status))
            stop.wait(max(0.0, POLL_SECONDS - (time.monotonic() - started)))
    answers.put(timed)


def _upload(base_url: str, csv_path, key: str | None = None) -> tuple[float, int, dict, dict]:
    """(seconds, status, error body or {}, headers) of one upload."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with csv_path.open("rb") as csv_file, httpx.Client(base_url=base_url, timeout=300, headers=headers) as client:
        started = time.monotonic()
        response = client.post("/upload", files={"file": (csv_path.name, csv_file, "text/csv")})
        seconds = time.monotonic() - started
    error = response.json().get("error", {}) if response.status_code >= 400 else {}
    return seconds, response.status_code, error, dict(response.headers)


def _p99(seconds: list[float]) -> float:

    return percentile(seconds, 99) if seconds else float("inf")


def uploads(bench) -> dict:
    """Many 100,000-row uploads at once, a status poller beside them, the API's peak memory."""

    rows, count = bench.sizes.load_rows, bench.sizes.load_uploads
    big = write_url_csv(bench.work_dir / "load.csv", rows)
    small = write_url_csv(bench.work_dir / "load-small.csv", 2)
    with services_without_processors(bench, "load") as (services, _settings):
        _upload(services.api_url, small)
        request_id = httpx.get(f"{services.api_url}/jobs").json()["jobs"][0]["request_id"]
        idle = Poller(services.api_url, f"/status/{request_id}")
        time.sleep(IDLE_SECONDS)
        idle_answers = idle.stop()
        poller = Poller(services.api_url, f"/status/{request_id}")
        with proc.PeakRssSampler(services.pids()["api"]) as memory, ThreadPoolExecutor(count) as pool:
            answers = list(pool.map(lambda _: _upload(services.api_url, big), range(count)))
        busy_answers = poller.stop()
        with psycopg.connect(services.database_url) as conn:
            row = conn.execute("SELECT count(*) FROM processing_jobs WHERE total_images = %s", [rows]).fetchone()
            assert row is not None  # count(*) gives one row
            stored = row[0]
    accepted = [a for a in answers if a[1] == 202]
    refused = [a for a in answers if a[1] != 202]
    honest = all(
        a[1] in (429, 503) and "retry-after" in a[3] and a[2].get("code") != "database_unavailable" for a in refused
    )
    codes = sorted({a[2].get("code", str(a[1])) for a in refused})
    read_errors = [status for _, status in busy_answers if status != 200]
    p99, idle_p99 = _p99([s for s, _ in busy_answers]), _p99([s for s, _ in idle_answers])
    log(
        f"{count} uploads of {rows} rows: {len(accepted)} accepted (in {min(a[0] for a in accepted):.1f}-"
        f"{max(a[0] for a in accepted):.1f} s), {len(refused)} refused ({', '.join(codes) or '-'}); {stored} stored"
    )
    log(
        f"status every {POLL_SECONDS * 1000:.0f} ms: {len(busy_answers)} answers, {len(read_errors)} errors, "
        f"p99 {p99 * 1000:.0f} ms (idle {idle_p99 * 1000:.0f} ms); API peak memory {memory.peak_mib:.0f} MB"
    )
    return {
        "checks": [
            check(
                "load: uploads",
                f"{len(accepted)} of {count} accepted; refused: {', '.join(codes) or 'none'}, "
                f"{'each' if honest else 'NOT each'} with Retry-After; {stored} stored",
                "202, or 429/503 with Retry-After and not database_unavailable; nothing stored when refused",
                honest and stored == len(accepted) and bool(accepted),
            ),
            check(
                "load: status reads",
                f"p99 {p99 * 1000:.0f} ms, {len(read_errors)} errors of {len(busy_answers)} "
                f"(idle p99 {idle_p99 * 1000:.0f} ms)",
                f"no error; p99 <= {STATUS_P99_TARGET * 1000:.0f} ms",
                not read_errors and p99 <= STATUS_P99_TARGET,
                p99,
            ),
            check(
                "load: API memory",
                f"{memory.peak_mib:.0f} MB peak",
                f"<= {MEMORY_TARGET_MIB} MB",
                memory.peak_mib <= MEMORY_TARGET_MIB,
                memory.peak_mib,
            ),
        ],
        "jobs": [
            {
                "job": f"{count} concurrent {rows}-row uploads",
                "images": rows * len(accepted),
                "seconds": max(a[0] for a in answers),
                "images_per_second": None,
                "finished": True,
                "failed_images": None,
            }
        ],
        "uploads": [{"seconds": a[0], "status": a[1], "code": a[2].get("code")} for a in answers],
        "status_p99_seconds": p99,
        "status_idle_p99_seconds": idle_p99,
        "peak_rss_mib": memory.peak_mib,
    }


def keys_limit(bench) -> dict:
    """Key A over its uploads-per-minute limit (two clients ignoring its Retry-After, each uploading every
    FLOOD_INTERVAL_SECONDS) while key B uploads every B_UPLOAD_SECONDS and reads every POLL_SECONDS: B's
    answers against B alone, in the same run."""

    small = write_url_csv(bench.work_dir / "load-small.csv", 2)
    seconds = bench.sizes.load_flood_seconds
    with services_without_processors(bench, "load_keys", api_settings={"IMGPIPE_API_KEYS_REQUIRED": "true"}) as (
        services,
        _settings,
    ):
        with psycopg.connect(services.database_url, autocommit=True) as conn:
            name_a = f"a-{uuid.uuid4().hex[:6]}"
            _, key_a = keys.create_key(conn, name_a)
            _, key_b = keys.create_key(conn, f"b-{uuid.uuid4().hex[:6]}")
            keys.set_limits(conn, name_a, uploads_per_minute=LIMITED_PER_MINUTE, max_waiting_images=None)
        _upload(services.api_url, small, key_b)  # warm
        request_id = httpx.get(f"{services.api_url}/jobs", headers={"Authorization": f"Bearer {key_b}"}).json()["jobs"][
            0
        ]["request_id"]
        idle = _key_b_traffic(services.api_url, small, key_b, request_id, seconds)
        # Key A's clients in processes of their own: their CPU does not share the harness's interpreter lock
        # with key B's client, whose answers are timed.
        with ProcessPoolExecutor(FLOOD_CLIENTS, mp_context=multiprocessing.get_context("spawn")) as flood:
            floods = [flood.submit(_flood, services.api_url, small, key_a, seconds) for _ in range(FLOOD_CLIENTS)]
            busy = _key_b_traffic(services.api_url, small, key_b, request_id, seconds)
            a_answers = [answer for f in floods for answer in f.result()]
    a_accepted = sum(a[1] == 202 for a in a_answers)
    a_refused = [a for a in a_answers if a[1] == 429 and "retry-after" in a[3]]
    a_codes = sorted({a[2].get("code") for a in a_refused})
    b_ok = all(a[1] == 202 for a in busy["uploads"]) and all(status == 200 for _, status in busy["reads"])
    p99 = {
        name: {kind: _p99([a[0] for a in traffic[kind]]) for kind in ("uploads", "reads")}
        for name, traffic in (("idle", idle), ("busy", busy))
    }
    ratios = {kind: p99["busy"][kind] / p99["idle"][kind] for kind in ("uploads", "reads")}
    measured = (
        f"uploads p99 {p99['busy']['uploads'] * 1000:.0f} ms vs {p99['idle']['uploads'] * 1000:.0f} ms alone "
        f"({ratios['uploads']:.2f}x), reads p99 {p99['busy']['reads'] * 1000:.0f} ms vs "
        f"{p99['idle']['reads'] * 1000:.0f} ms ({ratios['reads']:.2f}x)"
    )
    log(
        f"key A: {a_accepted} accepted, {len(a_refused)} refused ({', '.join(a_codes)}) in {seconds} s; key B: {measured}"
    )
    return {
        "checks": [
            check(
                "load: key over its limit",
                f"{len(a_refused)} of key A's {len(a_answers)} uploads refused "
                f"({', '.join(a_codes)}; its uploads_per_minute is {LIMITED_PER_MINUTE}), {a_accepted} accepted",
                "429 with Retry-After",
                a_accepted == LIMITED_PER_MINUTE and len(a_refused) == len(a_answers) - a_accepted,
            ),
            check(
                "load: the other key",
                measured + ("" if b_ok else "; NOT every answer a success"),
                f"<= {UNAFFECTED_RATIO}x alone, no error",
                b_ok and max(ratios.values()) <= UNAFFECTED_RATIO,
                max(ratios.values()),
            ),
        ],
        "jobs": [
            {
                "job": "key B's uploads beside key A's flood",
                "images": 2 * len(busy["uploads"]),
                "seconds": seconds,
                "images_per_second": None,
                "finished": b_ok,
                "failed_images": None,
            }
        ],
        "key_a_uploads": len(a_answers),
        "p99_seconds": p99,
    }


def _flood(base_url: str, csv_path, key: str, seconds: float) -> list:
    """Uploads every FLOOD_INTERVAL_SECONDS for `seconds`, whatever the answers say."""
    answers = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answers.append(_upload(base_url, csv_path, key))
        time.sleep(FLOOD_INTERVAL_SECONDS)
    return answers


def _key_b_traffic(base_url: str, csv_path, key: str, request_id: str, seconds: float) -> dict:
    """Key B for `seconds`: an upload every B_UPLOAD_SECONDS and a status read every POLL_SECONDS."""
    poller = Poller(base_url, f"/status/{request_id}", {"Authorization": f"Bearer {key}"})
    uploads = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        uploads.append(_upload(base_url, csv_path, key))
        time.sleep(B_UPLOAD_SECONDS)
    return {"uploads": uploads, "reads": poller.stop()}
