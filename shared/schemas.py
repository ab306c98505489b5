"""The published JSON Schemas: the Kafka events (schemas/events/) and the webhook's payload
(schemas/webhooks/), generated from their pydantic models by `make schemas`; a test fails while a
committed file differs from its model."""

import json
from pathlib import Path

from pydantic import BaseModel

from shared.events import ImageProcessed, ImageRequested, JobRequested
from shared.outcomes import JobCompleted

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"

# name -> (folder under schemas/, model)
CONTRACTS: dict[str, tuple[str, type[BaseModel]]] = {
    "image.requested": ("events", ImageRequested),
    "image.processed": ("events", ImageProcessed),
    "job.requested": ("events", JobRequested),
    "job.completed": ("webhooks", JobCompleted),
}


def json_schema(name: str) -> dict:
    folder, model = CONTRACTS[name]
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://imgpipe.local/schemas/{folder}/{name}.v1.json"
    return schema


def schema_path(name: str) -> Path:
    folder, _model = CONTRACTS[name]
    return SCHEMAS_DIR / folder / f"{name}.v1.json"


def write_schemas() -> None:
    for name in CONTRACTS:
        path = schema_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_schema(name), indent=2) + "\n")


if __name__ == "__main__":
    write_schemas()
