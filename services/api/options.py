"""A job's options from the form fields of POST /upload: each one optional, refused with a 422 naming it."""

from pydantic import ValidationError

from services.api.errors import ApiError
from shared.events import JobOptions

FIELD_DESCRIPTIONS = {name: field.description for name, field in JobOptions.model_fields.items()}


def read_options(default_quality: int, **fields: str | None) -> JobOptions:
    """JobOptions from form values; an empty or missing field takes its default (quality: the setting's)."""
    given = {name: value.strip() for name, value in fields.items() if value is not None and value.strip()}
    if "format" in given:
        given["format"] = given["format"].lower()
    try:
        return JobOptions(**given).with_default_quality(default_quality)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0])
        raise ApiError(
            422, "invalid_options", f"{field}: {first['msg']} (got {given.get(field, '')[:100]!r})", field=field
        ) from None
