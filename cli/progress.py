"""A job's progress as the CLI shows it, summed over every page of its status answer."""

from dataclasses import dataclass, field
from datetime import datetime

from cli.client import ApiClient


@dataclass
class FailureReason:
    count: int
    example_message: str
    example_url: str


@dataclass
class JobProgress:
    request_id: str
    status: str  # pending | processing | completed
    total: int
    processed: int
    failed: int
    bytes_in: int  # of the processed images: before compression
    bytes_out: int  # and after
    failures: dict[str, FailureReason] = field(default_factory=dict)  # by error code, in the order first seen
    first_page: dict = field(default_factory=dict)  # the status answer's job fields (webhook, times, events)

    @property
    def done(self) -> int:
        return self.processed + self.failed

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def bytes_saved(self) -> int:
        return self.bytes_in - self.bytes_out

    @property
    def seconds_taken(self) -> float | None:
        """From upload to completion, by the API's clock."""
        return self._seconds_since_upload("completed_at")

    @property
    def images_per_second(self) -> float | None:
        """Images finished per second from upload to the job's last change, by the API's clock."""
        seconds = self._seconds_since_upload("updated_at")
        return self.done / seconds if seconds and self.done else None

    @property
    def seconds_left(self) -> float | None:
        if self.completed:
            return 0.0
        rate = self.images_per_second
        return (self.total - self.done) / rate if rate else None

    def _seconds_since_upload(self, field_name: str) -> float | None:
        created, then = self.first_page.get("created_at"), self.first_page.get(field_name)
        if not (created and then):
            return None
        return (datetime.fromisoformat(then) - datetime.fromisoformat(created)).total_seconds()


def fetch_progress(client: ApiClient, request_id: str) -> JobProgress:
    """Reads every page; the counts are the first page's, the bytes and failures the images' (pages read
    a moment apart may differ by a few images while the job runs; once it is completed nothing changes)."""
    progress = None
    for page in client.status_pages(request_id):
        if progress is None:
            counts = page["counts"]
            progress = JobProgress(
                request_id=page["request_id"],
                status=page["status"],
                total=counts["total"],
                processed=counts["processed"],
                failed=counts["failed"],
                bytes_in=0,
                bytes_out=0,
                first_page={key: value for key, value in page.items() if key not in ("images", "page")},
            )
        for image in page["images"]:
            _add_image(progress, image)
    assert progress is not None  # status_pages yields the first page at least
    return progress


def _add_image(progress: JobProgress, image: dict) -> None:
    if image["status"] == "processed" and image["bytes_in"] is not None and image["bytes_out"] is not None:
        progress.bytes_in += image["bytes_in"]
        progress.bytes_out += image["bytes_out"]
    elif image["status"] == "failed" and image["error"]:
        code = image["error"]["code"]
        if code in progress.failures:
            progress.failures[code].count += 1
        else:
            progress.failures[code] = FailureReason(1, image["error"]["message"] or "", image["input_url"])
