"""The JSON Schemas under schemas/events/ are the contract for other producers and consumers:
they must say exactly what the pydantic models in shared/events.py accept."""

import json
import uuid

import jsonschema
import pytest

from shared.events import ImageError, ImageProcessed, ImageRequested, ImageStatus, JobOptions, RequestedEvents
from shared.schemas import CONTRACTS, json_schema, schema_path


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_committed_schema_matches_the_model(name):
    committed = json.loads(schema_path(name).read_text())
    assert committed == json_schema(name), "run `make schemas` and commit schemas/"


def sample_events():
    ref = dict(request_id=uuid.uuid4(), image_id=uuid.uuid4(), row_number=3, position=2, input_url="http://h/x.jpg")
    yield ImageRequested(**ref)
    yield ImageProcessed(
        **ref, status=ImageStatus.processed, output_url="http://o/x.jpg", format="JPEG", bytes_in=1000, bytes_out=200
    )
    yield ImageProcessed(**ref, status=ImageStatus.failed, error=ImageError(code="http_404", message="not found"))


@pytest.mark.parametrize("event", list(sample_events()), ids=lambda e: f"{e.event_type}-{getattr(e, 'status', '')}")
def test_events_the_services_emit_validate_against_the_schema(event):
    document = json.loads(event.model_dump_json())
    jsonschema.validate(document, json.loads(schema_path(event.event_type).read_text()))
    assert type(event).model_validate(document) == event


AWKWARD_URLS = [
    "http://h/plain.jpg",
    'http://h/a"quote.jpg',
    "http://h/back\\slash.jpg",
    "http://h/é/ü.jpg",
    "http://h/line\u2028sep.jpg",
    "http://h/ctl\x01.jpg",
    "http://h/tab\t.jpg",
]


@pytest.mark.parametrize("options", [None, JobOptions(quality=80, max_width=100, format="webp")])
def test_requested_events_made_from_the_template_are_what_the_model_makes(options):
    """The outbox's events (RequestedEvents) validate against the schema and read back as the model's
    events of the same images, each with an event id of its own."""
    request_id = uuid.uuid4()
    images = [(uuid.uuid4(), n + 1, 1, url) for n, url in enumerate(AWKWARD_URLS)]
    encoder = RequestedEvents(request_id, options)
    events = encoder.encode(images) + encoder.encode(images[:2])
    schema = json.loads(schema_path("image.requested").read_text())
    parsed = []
    for event in events:
        jsonschema.validate(json.loads(event), schema)
        parsed.append(ImageRequested.model_validate_json(event))
    per_image = {"event_id", "occurred_at"}
    assert [p.model_dump(exclude=per_image) for p in parsed] == [
        ImageRequested(
            request_id=request_id,
            image_id=image_id,
            row_number=row_number,
            position=position,
            input_url=input_url,
            options=options,
        ).model_dump(exclude=per_image)
        for image_id, row_number, position, input_url in images + images[:2]
    ]
    assert len({p.event_id for p in parsed}) == len(events)
    assert {p.event_id.version for p in parsed} == {4}
    another_attempt = {
        ImageRequested.model_validate_json(event).event_id for event in RequestedEvents(request_id).encode(images)
    }
    assert another_attempt.isdisjoint(p.event_id for p in parsed)


def test_schema_and_model_reject_the_same_broken_event():
    schema = json.loads(schema_path("image.requested").read_text())
    broken = json.loads(next(sample_events()).model_dump_json())
    broken["row_number"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    with pytest.raises(ValueError):
        ImageRequested.model_validate(broken)


def with_unknown_fields(document):
    """The document with one more, unknown field in every JSON object, nested ones included."""
    if isinstance(document, dict):
        return {**{key: with_unknown_fields(value) for key, value in document.items()}, "added_by_a_newer_producer": 1}
    if isinstance(document, list):
        return [with_unknown_fields(item) for item in document]
    return document


@pytest.mark.parametrize("event", list(sample_events()), ids=lambda e: f"{e.event_type}-{getattr(e, 'status', '')}")
def test_consumers_ignore_unknown_fields_at_every_level(event):
    document = with_unknown_fields(json.loads(event.model_dump_json()))
    assert type(event).model_validate_json(json.dumps(document)) == event
    jsonschema.validate(document, json.loads(schema_path(event.event_type).read_text()))
