"""The API's answers, as documented on /docs (OpenAPI): one model per answer; an image's outcome is
shared with the webhook (shared/outcomes.py)."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.events import JobOptions
from shared.outcomes import ImageOutcome

Events = Literal["published", "queued"]
EVENTS_DESCRIPTION = (
    "queued: some of the job's images wait in PostgreSQL for the dispatcher to release them into Kafka, at the "
    "job's fair share of the processors (an upload always answers queued); published: every image's "
    "image.requested event is in Kafka (acknowledged)."
)


class UploadAccepted(BaseModel):
    request_id: str
    total_images: int
    events: Events = Field(description=EVENTS_DESCRIPTION)
    status_url: str
    output_csv_url: str


class Counts(BaseModel):
    total: int
    processed: int
    failed: int
    pending: int


class Dispatch(BaseModel):
    """The job's place in the release of images into Kafka, which gives every active job its fair share."""

    released: int = Field(description="Images released into Kafka (being processed, or finished)")
    waiting: int = Field(description="Images waiting in PostgreSQL for their turn")
    share: float | None = Field(
        description="The job's fair share of the processors now (0-1): its API key's weight over the weights of "
        "the keys with work (jobs without a key count as one key of weight 1), split among that key's active jobs; "
        "it grows as other jobs end. Null once every image of the job is finished"
    )
    started_at: datetime | None = Field(description="When its first image was released; null before")
    starts_within_seconds: float | None = Field(
        description="Before it starts: the time in which every place of the release window frees up at the "
        "processors' pace, by which its first images are released (at most that; usually at the next round)"
    )
    expected_finish_seconds: float | None = Field(
        description="Its unfinished images at its share of the processors' measured pace: an estimate, which "
        "shortens as other jobs end; null while the pace is not measured yet"
    )


class WebhookState(BaseModel):
    url: str
    status: Literal["waiting", "pending", "delivered", "failed"] = Field(
        description="waiting: the job is not completed yet; pending: being sent or retried; delivered; failed: gave up"
    )
    attempts: int
    last_error: str | None


class Page(BaseModel):
    offset: int
    limit: int
    next_offset: int | None = Field(description="The offset of the next page; null on the last page")


class JobStatus(BaseModel):
    request_id: str
    status: Literal["pending", "processing", "completed"]
    events: Events = Field(description=EVENTS_DESCRIPTION)
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    counts: Counts
    dispatch: Dispatch
    options: JobOptions | None = Field(
        description="How the job's images are compressed; null for a job stored before options existed (the defaults)"
    )
    webhook: WebhookState | None = Field(description="null when the job has no webhook_url")
    images: list[ImageOutcome] = Field(description="One page of the job's images, in input order")
    page: Page


JobState = Literal["pending", "processing", "completed"]


class JobSummary(BaseModel):
    request_id: str
    status: JobState
    events: Events = Field(description=EVENTS_DESCRIPTION)
    counts: Counts
    created_at: datetime


class JobList(BaseModel):
    jobs: list[JobSummary] = Field(description="Oldest first")


class Health(BaseModel):
    status: Literal["ok"]


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # details that depend on the error: row, limit, status, counts

    code: str = Field(description="Stable machine-readable reason, e.g. invalid_csv, job_not_found")
    message: str = Field(description="What went wrong, for people")


class ErrorBody(BaseModel):
    error: ErrorDetail


def errors(*status_codes: int) -> dict:
    """The `responses=` of a route: these status codes answer ErrorBody."""
    return {status: {"model": ErrorBody} for status in status_codes}
