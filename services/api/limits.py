"""What an upload may take, decided before its body is read (plain ASGI middleware, run after the API
key is known), so that a refused upload costs nothing and stores nothing:
- a slot: at most max_concurrent_uploads uploads, declaring at most max_uploading_bytes together (a body
  without Content-Length counts as the largest one allowed), are accepted at once; beyond, 429
  too_many_uploads. This is the intake's bulkhead: each upload parses on a core and holds a connection
  of the intake pool, which reads never use;
- its key's jobs created in the last minute below uploads_per_minute: else 429 uploads_per_minute;
- its key's images not finished below max_waiting_images: else 429 too_many_images_waiting; what is
  left of that limit bounds the upload's own images (the endpoint refuses it the same way if it has more).
With API keys off, every caller is one bucket. Each refusal names its limit and says when to retry
(Retry-After). A key's own limits (api_keys) override the settings'."""

import math
import time
from collections import Counter as Tally
from dataclasses import dataclass

import psycopg
from prometheus_client import Counter
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from services.api.errors import ApiError, database_error, error_response
from services.api.keys import ApiKey
from shared.db import DictPool
from shared.settings import Settings

NO_KEY = "(no key)"
UPLOAD_SECONDS_GUESS = 2.0  # an upload's time before any was measured: a 100,000-row CSV on 2 cores
PACE_UNKNOWN_RETRY_SECONDS = 60
# A key refused for its per-minute limit is refused again from memory this long, without asking the
# database: a client ignoring Retry-After costs a query a second, not one per request.
REFUSAL_KEPT_SECONDS = 1.0
MAX_RETRY_SECONDS = 3600

REFUSALS = Counter(
    "imgpipe_upload_refusals_total",
    "Uploads refused by a limit or a busy pool, per API key (name, or (no key)) and limit (the error code)",
    ["key", "limit"],
)

# One round trip: the key's jobs of the last minute (and the age of the oldest), its images not finished,
# and the processors' pace as the dispatcher measured it. {owner} is "= %(key)s" or "IS NULL".
USAGE = """
SELECT (SELECT count(*) FROM processing_jobs WHERE owner_key_id {owner} AND created_at > now() - interval '1 minute') AS recent,
       (SELECT extract(epoch FROM now() - min(created_at)) FROM processing_jobs
        WHERE owner_key_id {owner} AND created_at > now() - interval '1 minute') AS oldest_recent_age,
       (SELECT coalesce(sum(total_images - processed_images - failed_images), 0) FROM processing_jobs
        WHERE owner_key_id {owner} AND status <> 'completed') AS waiting,
       (SELECT images_per_second FROM dispatcher_state) AS pace
"""


@dataclass
class Usage:
    recent: int  # jobs created in the last minute
    oldest_recent_age: float | None  # seconds since the oldest of them
    waiting: int  # images not finished
    pace: float | None  # images/s the processors finish


def key_usage(pool: DictPool, key: ApiKey | None) -> Usage:
    with pool.connection() as conn:
        row = conn.execute(
            USAGE.format(owner="IS NULL" if key is None else "= %(key)s"), {"key": None if key is None else key.id}
        ).fetchone()
    assert row is not None  # a SELECT without FROM gives one row
    return Usage(
        row["recent"],
        None if row["oldest_recent_age"] is None else float(row["oldest_recent_age"]),
        int(row["waiting"]),
        row["pace"],
    )


class UploadLimits:
    """The middleware. `pool`: returns the read pool (made in the app's lifespan, after this is built).
    Slots are taken before the key's limits are checked, so that a key's uploads arriving together see
    each other (one API process counts exactly; several may let a few more through)."""

    def __init__(self, app: ASGIApp, path: str, settings: Settings, pool):
        self.app = app
        self.path = path
        self.settings = settings
        self.pool = pool
        self.uploading: Tally = Tally()  # per key id (None: no key), uploads holding a slot
        self.uploading_bytes = 0
        self.upload_seconds = UPLOAD_SECONDS_GUESS  # a moving average of how long an upload holds its slot
        # With keys, one key may hold at most half the slots, so that another key always finds one.
        slots = settings.max_concurrent_uploads
        self.slots_per_key = max(1, slots // 2) if settings.api_keys_required else slots
        self.refused_until: dict = {}  # key id -> (until when, refusal): a per-minute refusal kept a moment

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        key: ApiKey | None = scope.get("state", {}).get("api_key")
        key_id = None if key is None else key.id
        declared = Headers(scope=scope).get("content-length")
        body_bytes = int(declared) if declared is not None and declared.isdigit() else self.settings.max_csv_bytes
        refusal = self._still_refused(key) or self._slot_refusal(body_bytes, key)
        allowed = None
        if refusal is None:
            self.uploading[key_id] += 1
            self.uploading_bytes += body_bytes
            try:
                refusal, allowed = await run_in_threadpool(self._key_check, key, self.uploading[key_id] - 1)
            except psycopg.OperationalError as exc:
                error = await run_in_threadpool(database_error, exc, self.settings.database_url)
                refusal = counted(error, key)
            if refusal is not None:
                self._give_back(key_id, body_bytes)
        if refusal is not None:
            # Connection: close, or uvicorn would read the refused body to discard it
            response = error_response(
                refusal.status_code,
                refusal.code,
                refusal.message,
                headers={**(refusal.headers or {}), "Connection": "close"},
                **refusal.details,
            )
            return await response(scope, receive, send)
        scope.setdefault("state", {})["image_allowance"] = allowed
        started = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            self._give_back(key_id, body_bytes)
            self.upload_seconds += 0.2 * (time.monotonic() - started - self.upload_seconds)

    def _give_back(self, key_id, body_bytes: int) -> None:
        self.uploading[key_id] -= 1
        if not self.uploading[key_id]:
            del self.uploading[key_id]
        self.uploading_bytes -= body_bytes

    def _still_refused(self, key: ApiKey | None) -> ApiError | None:
        """A key just refused for its per-minute limit is refused again without asking the database."""
        key_id = None if key is None else key.id
        until, refusal = self.refused_until.get(key_id, (0.0, None))
        if refusal is None or time.monotonic() >= until:
            self.refused_until.pop(key_id, None)
            return None
        return counted(refusal, key)

    def _slot_refusal(self, body_bytes: int, key: ApiKey | None) -> ApiError | None:
        in_flight = sum(self.uploading.values())
        mine = self.uploading[None if key is None else key.id]
        if (
            in_flight < self.settings.max_concurrent_uploads
            and mine < self.slots_per_key
            and (in_flight == 0 or self.uploading_bytes + body_bytes <= self.settings.max_uploading_bytes)
        ):
            return None
        return counted(
            ApiError(
                429,
                "too_many_uploads",
                f"{in_flight} uploads are being accepted ({self.uploading_bytes} bytes, {mine} of them this key's); the API "
                f"takes at most {self.settings.max_concurrent_uploads} at once ({self.settings.max_uploading_bytes} bytes), "
                f"{self.slots_per_key} per key: retry later",
                headers={"Retry-After": str(_seconds(self.upload_seconds))},
                limit=self.settings.max_concurrent_uploads,
            ),
            key,
        )

    def _key_check(self, key: ApiKey | None, others_in_flight: int) -> tuple[ApiError | None, "ImageAllowance | None"]:
        """A refusal by the key's limits, or None and how many images the upload may still bring.
        others_in_flight: the key's other uploads being accepted, not in the database yet."""
        per_minute = (key and key.uploads_per_minute) or self.settings.uploads_per_minute
        max_waiting = (key and key.max_waiting_images) or self.settings.max_waiting_images
        usage = key_usage(self.pool(), key)
        whose = f"API key {key.name!r}" if key else "all callers (API keys are off)"
        if usage.recent + others_in_flight >= per_minute:
            retry = 60 - (usage.oldest_recent_age or 0) if usage.recent >= per_minute else self.upload_seconds
            refusal = ApiError(
                429,
                "uploads_per_minute",
                f"{whose} created {usage.recent} jobs in the last minute "
                f"({others_in_flight} more being accepted); the limit is {per_minute}",
                headers={"Retry-After": str(_seconds(retry))},
                limit=per_minute,
            )
            if usage.recent >= per_minute:
                until = time.monotonic() + min(retry, REFUSAL_KEPT_SECONDS)
                self.refused_until[None if key is None else key.id] = (until, refusal)
            return counted(refusal, key), None
        allowance = ImageAllowance(key, whose, usage, max_waiting)
        if allowance.images <= 0:
            return allowance.refusal(), None
        return None, allowance


@dataclass
class ImageAllowance:
    """How many images an upload may still bring under its key's max_waiting_images."""

    key: ApiKey | None
    whose: str
    usage: Usage
    max_waiting: int

    @property
    def images(self) -> int:
        return self.max_waiting - self.usage.waiting

    def refusal(self) -> ApiError:
        """429 too_many_images_waiting, retrying once enough images are finished at the measured pace
        (counted: the endpoint raises it too, once the upload's rows show it brings too many)."""
        retry = (1 - self.images) / self.usage.pace if self.usage.pace else PACE_UNKNOWN_RETRY_SECONDS
        brings = f"; this upload brings more than the {self.images} it may" if self.images > 0 else ""
        return counted(
            ApiError(
                429,
                "too_many_images_waiting",
                f"{self.whose} has {self.usage.waiting} images not "
                f"finished yet{brings}; the limit is {self.max_waiting}",
                headers={"Retry-After": str(_seconds(retry))},
                limit=self.max_waiting,
            ),
            self.key,
        )


def counted(refusal: ApiError, key: ApiKey | None) -> ApiError:
    """The refusal, counted per key and limit (imgpipe_upload_refusals_total)."""
    REFUSALS.labels(key=key.name if key else NO_KEY, limit=refusal.code).inc()
    return refusal


def _seconds(value: float) -> int:
    return max(1, min(MAX_RETRY_SECONDS, math.ceil(value)))
