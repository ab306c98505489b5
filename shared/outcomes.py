"""What a client is told about a job: one image's outcome (the status answer and the webhook share it)
and the webhook's payload. schemas/webhooks/job.completed.v1.json is generated from JobCompleted."""

from typing import Literal

from pydantic import BaseModel, Field

from shared.events import ImageError


class ImageOutcome(BaseModel):
    row_number: int = Field(description="1-based data row of the input CSV (the header is not counted)")
    position: int = Field(description="1-based place of the URL within its row's URL cell")
    input_url: str
    output_url: str | None = Field(description="Where the compressed image is; null unless processed")
    status: Literal["pending", "processed", "failed"]
    format: str | None = Field(None, description="Pillow format name of the output, e.g. JPEG, PNG")
    bytes_in: int | None = Field(None, description="Size of the downloaded image")
    bytes_out: int | None = Field(None, description="Size of the stored image")
    error: ImageError | None = Field(None, description="Why the image failed; null unless failed")

    @classmethod
    def from_row(cls, image) -> "ImageOutcome":
        """From an images row (with error_code and error_message columns)."""
        error = None
        if image["error_code"] is not None:
            error = ImageError(code=image["error_code"], message=image["error_message"])
        return cls(**{key: image[key] for key in OUTCOME_COLUMNS if key in image}, error=error)


OUTCOME_COLUMNS = ("row_number", "position", "input_url", "output_url", "status", "format", "bytes_in", "bytes_out")


class JobCompleted(BaseModel):
    """The webhook's JSON body, POSTed once every image of the job is processed or failed."""

    request_id: str
    status: Literal["completed"] = "completed"
    total_images: int
    processed_images: int
    failed_images: int
    output_csv_url: str
    output_images: list[str] = Field(
        description="The output URLs of the processed images, in input order (CSV rows in order, the URLs of a "
        "row in order). A failed image has no output URL and is not in this list: see `images`."
    )
    images: list[ImageOutcome] = Field(description="Every image, in input order, with its outcome")
