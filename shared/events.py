"""The events on the Kafka topics. schemas/events/*.json are generated from these models."""
import json
import uuid
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas" / "events"


def _now() -> datetime:
    return datetime.now(timezone.utc)


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


class ImageRequested(ImageRef):
    event_type: Literal["image.requested"] = "image.requested"


def image_requested(request_id: uuid.UUID, image) -> ImageRequested:
    """The request event of one image row (a mapping with id, row_number, position, input_url)."""
    return ImageRequested(request_id=request_id, image_id=image["id"], row_number=image["row_number"],
                          position=image["position"], input_url=image["input_url"])


class ImageStatus(str, Enum):
    processed = "processed"
    failed = "failed"


class ImageError(BaseModel):
    code: str = Field(description="Stable machine-readable reason, e.g. http_404, timeout, not_an_image, internal_error")
    message: str = Field(description="Human-readable detail")


class ImageProcessed(ImageRef):
    """The outcome of one image: status processed (with output_url) or failed (with error)."""

    event_type: Literal["image.processed"] = "image.processed"
    status: ImageStatus
    output_url: str | None = None
    format: str | None = Field(None, description="Pillow format name, e.g. JPEG, PNG")
    bytes_in: int | None = Field(None, ge=0)
    bytes_out: int | None = Field(None, ge=0)
    error: ImageError | None = None


EVENT_MODELS: dict[str, type[BaseModel]] = {
    "image.requested": ImageRequested,
    "image.processed": ImageProcessed,
}


def json_schema(event_type: str) -> dict:
    schema = EVENT_MODELS[event_type].model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://imgpipe.local/schemas/events/{event_type}.v1.json"
    return schema


def schema_path(event_type: str) -> Path:
    return SCHEMA_DIR / f"{event_type}.v1.json"


def write_schemas() -> None:
    SCHEMA_DIR.mkdir(parents=True, exist_ok=True)
    for event_type in EVENT_MODELS:
        schema_path(event_type).write_text(json.dumps(json_schema(event_type), indent=2) + "\n")


if __name__ == "__main__":
    write_schemas()
