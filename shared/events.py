"""The events on the Kafka topics. schemas/events/*.json are generated from these models (shared/schemas.py)."""

import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from shared.failures import CODE_DESCRIPTION

MAX_DIMENSION = 65_535  # the largest width or height a JPEG can have
MAX_BYTES = 2**63 - 1  # PostgreSQL's bigint


def describe_invalid(exc: ValidationError, event_type: str) -> str:
    """One line for a message that is not a valid `event_type` event: each error, where and what."""
    return f"not a valid {event_type} event: " + "; ".join(
        f"{'.'.join(map(str, error['loc'])) or 'event'}: {error['msg']}" for error in exc.errors()
    )


def _now() -> datetime:
    return datetime.now(UTC)


class ImageRef(BaseModel):
    """Which image of which job an event is about. Unknown fields are ignored (tolerant reader),
    so producers may add fields without breaking older consumers."""

    schema_version: Literal[1] = 1
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4, description="Unique per event; duplicates share it")
    occurred_at: datetime = Field(default_factory=_now)
    request_id: uuid.UUID = Field(description="The job (the request_id returned by POST /upload)")
    image_id: uuid.UUID = Field(description="The image within the job")
    row_number: int = Field(ge=1, description="1-based data row of the input CSV (the header is not counted)")
    position: int = Field(ge=1, description="1-based place of the URL within its row's URL cell")
    input_url: str = Field(min_length=1, max_length=2048)


class JobOptions(BaseModel):
    """How a job's images are compressed; every field has a default, so {} is valid."""

    quality: int | None = Field(
        None,
        ge=1,
        le=95,
        description="JPEG and WebP quality (PNG and GIF are lossless here); "
        "absent: the service's default (IMGPIPE_DEFAULT_QUALITY, 50 unless set)",
    )
    max_width: int | None = Field(
        None,
        ge=1,
        le=MAX_DIMENSION,
        description="Scale down to at most this width, keeping the aspect ratio; never enlarge",
    )
    max_height: int | None = Field(
        None,
        ge=1,
        le=MAX_DIMENSION,
        description="Scale down to at most this height, keeping the aspect ratio; never enlarge",
    )
    format: Literal["keep", "webp", "jpeg"] = Field(
        "keep",
        description="keep: the input's format (the output never has more bytes than the input); "
        "webp or jpeg: converted (JPEG: transparency flattened on white)",
    )

    def with_default_quality(self, quality: int) -> "JobOptions":
        """These options, with `quality` if they name none: what a job is stored with."""
        return self if self.quality is not None else self.model_copy(update={"quality": quality})


class ImageRequested(ImageRef):
    event_type: Literal["image.requested"] = "image.requested"
    options: JobOptions | None = Field(None, description="The job's options; absent: the processor's defaults")


class RequestedEvents:
    """The image.requested events of one job, as JSON bytes, for images given as (id, row_number, position,
    input_url) (the columns of a database row, as the outbox reads them: tuples are the cheapest). The job's
    part is serialised once, by the model; each image adds only its own fields. A model per event costs several times as much, and the outbox produces 100,000 for a large job.
    event_id: a random 74-bit prefix per instance, then a counter (a UUID of version 4's layout), so
    every event of every attempt has an id of its own without an os.urandom call each."""

    _PER_IMAGE = {"event_id", "occurred_at", "image_id", "row_number", "position", "input_url"}

    def __init__(self, request_id: uuid.UUID, options: JobOptions | None = None):
        template = ImageRequested(
            request_id=request_id, image_id=uuid.UUID(int=0), row_number=1, position=1, input_url="-", options=options
        )
        self._job_part = template.model_dump_json(exclude=self._PER_IMAGE)[:-1]  # without its closing brace
        self._id_prefix = str(uuid.uuid4())[:24]  # the 8-4-4-4 groups and a dash
        self._count = 0

    def encode(self, images: Iterable[Sequence]) -> list[bytes]:
        """The events of these images, all with the same occurred_at (now)."""
        head = f'{self._job_part},"occurred_at":"{_now().isoformat()}","event_id":"{self._id_prefix}'
        events = []
        for image_id, row_number, position, input_url in images:
            self._count += 1
            events.append(
                f'{head}{self._count:012x}","image_id":"{image_id}","row_number":{int(row_number)},'
                f'"position":{int(position)},"input_url":{_json_string(input_url)}}}'.encode()
            )
        return events


def _json_string(text: str) -> str:
    """json.dumps(text, ensure_ascii=False), without its cost for the usual text that needs no escaping."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text, ensure_ascii=False)


class ImageStatus(str, Enum):
    processed = "processed"
    failed = "failed"


class ImageError(BaseModel):
    code: str = Field(description=CODE_DESCRIPTION)
    message: str = Field(description="Human-readable detail")


class ImageProcessed(ImageRef):
    """The outcome of one image: status processed (with output_url) or failed (with error)."""

    event_type: Literal["image.processed"] = "image.processed"
    status: ImageStatus
    output_url: str | None = None
    format: str | None = Field(None, description="Pillow format name, e.g. JPEG, PNG")
    bytes_in: int | None = Field(None, ge=0, le=MAX_BYTES)
    bytes_out: int | None = Field(None, ge=0, le=MAX_BYTES)
    error: ImageError | None = None


class JobRequested(BaseModel):
    """A job created over Kafka, by a service with no HTTP access to the API (topic job.requested, key: the
    request_id). It is stored, processed, tracked and reported exactly as an upload is."""

    schema_version: Literal[1] = 1
    event_type: Literal["job.requested"] = "job.requested"
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4, description="Unique per event; duplicates share it")
    occurred_at: datetime = Field(default_factory=_now)
    request_id: uuid.UUID = Field(
        description="Chosen by the producer: the job's id in GET /status/{request_id}, GET /output_csv/{request_id} "
        "and the webhook. The same request_id again creates nothing new."
    )
    image_urls: list[str] = Field(
        min_length=1, description="Absolute http(s) URLs, in order; the output CSV has one row per URL (column url)"
    )
    webhook_url: str | None = Field(None, description="Called once every image is processed or failed")
    options: JobOptions | None = Field(None, description="How the images are compressed; absent: every default")
    api_key_id: uuid.UUID | None = Field(
        None,
        description="The API key whose holder may read the job through the API (its id: the 32 hex digits "
        "after imgpipe_ in the key, as `python -m services.api.keys list` shows it); it must exist and not be "
        "revoked. Absent: the job belongs to no key, and is visible through the API only while keys are not required.",
    )
