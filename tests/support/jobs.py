"""Jobs in PostgreSQL made through the API's own functions, and result events about their images."""

import csv
import io
import uuid

from services.api.csv_input import parse_csv
from services.api.jobs import insert_job
from shared.db import DictPool
from shared.events import ImageError, ImageProcessed, ImageStatus

HEADER = ["S. No.", "Product Name", "Input Image Urls"]


class Jobs:
    """Creates jobs with pending images as an upload does (their events are the dispatcher's to release,
    where one runs: a test that produces them itself runs none)."""

    def __init__(self, pool: DictPool):
        self.pool = pool
        self.created: list[uuid.UUID] = []

    def create(
        self, image_count: int, webhook_url: str | None = None, owner_key_id: uuid.UUID | None = None
    ) -> tuple[uuid.UUID, list[dict]]:
        """Two URLs per CSV row: image i is at row i // 2 + 1, position i % 2 + 1.
        Returns the job id and its images ({"id", "row_number", "position", "input_url"}) in that order."""
        token = uuid.uuid4().hex
        urls = [f"http://images.test/{token}/{i}.jpg" for i in range(image_count)]
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(HEADER)
        for row, start in enumerate(range(0, image_count, 2), start=1):
            writer.writerow([row, f"Product {row}", ",".join(urls[start : start + 2])])
        job_id, _ = insert_job(self.pool, parse_csv(out.getvalue().encode(), image_count), webhook_url, owner_key_id)
        self.created.append(job_id)
        return job_id, [
            {key: image[key] for key in ("id", "row_number", "position", "input_url")} for image in self.images(job_id)
        ]

    def release_without_events(self, job_id: uuid.UUID) -> None:
        """As if the dispatcher had released every image of the job and Kafka had then lost the events.
        Done before a dispatcher runs on the database, or it would release them itself."""
        with self.pool.connection() as conn:
            conn.execute(
                "UPDATE processing_jobs SET released_images = total_images, release_row = 2147483647,"
                " release_position = 2147483647, first_released_at = now(), last_released_at = now(),"
                " published_at = now() WHERE job_id = %s",
                [job_id],
            )

    def job(self, job_id: uuid.UUID) -> dict | None:
        with self.pool.connection() as conn:
            return conn.execute("SELECT * FROM processing_jobs WHERE job_id = %s", [job_id]).fetchone()

    def images(self, job_id: uuid.UUID) -> list[dict]:
        with self.pool.connection() as conn:
            return conn.execute(
                "SELECT * FROM images WHERE job_id = %s ORDER BY row_number, position", [job_id]
            ).fetchall()

    def deliveries(self, job_id: uuid.UUID) -> list[dict]:
        with self.pool.connection() as conn:
            return conn.execute("SELECT * FROM webhook_deliveries WHERE job_id = %s", [job_id]).fetchall()

    def delete_created(self) -> None:
        with self.pool.connection() as conn:
            conn.execute("DELETE FROM processing_jobs WHERE job_id = ANY(%s)", [self.created])


def result(job_id: uuid.UUID, image: dict, failed: bool = False) -> ImageProcessed:
    """A fresh result event (new event_id each call) for one image."""
    common = dict(
        request_id=job_id,
        image_id=image["id"],
        row_number=image["row_number"],
        position=image["position"],
        input_url=image["input_url"],
    )
    if failed:
        return ImageProcessed(
            **common, status=ImageStatus.failed, error=ImageError(code="http_404", message="the image URL answered 404")
        )
    return ImageProcessed(
        **common,
        status=ImageStatus.processed,
        output_url=f"http://files.test/{image['id']}.jpg",
        format="JPEG",
        bytes_in=1000,
        bytes_out=200,
    )


def expected_payload(job_id: uuid.UUID, images: list[dict], failed_ids=(), base_url="http://imgpipe.test") -> dict:
    """The webhook payload of a job whose results were made by result(): written out, not built by the code under test."""
    in_order = sorted(images, key=lambda i: (i["row_number"], i["position"]))
    return {
        "request_id": str(job_id),
        "status": "completed",
        "total_images": len(images),
        "processed_images": len(images) - len(failed_ids),
        "failed_images": len(failed_ids),
        "output_csv_url": f"{base_url}/output_csv/{job_id}",
        "output_images": [
            f"http://files.test/{image['id']}.jpg" for image in in_order if image["id"] not in failed_ids
        ],
        "images": [
            {
                "row_number": image["row_number"],
                "position": image["position"],
                "input_url": image["input_url"],
                "output_url": None if image["id"] in failed_ids else f"http://files.test/{image['id']}.jpg",
                "status": "failed" if image["id"] in failed_ids else "processed",
                "format": None if image["id"] in failed_ids else "JPEG",
                "bytes_in": None if image["id"] in failed_ids else 1000,
                "bytes_out": None if image["id"] in failed_ids else 200,
                "error": {"code": "http_404", "message": "the image URL answered 404"}
                if image["id"] in failed_ids
                else None,
            }
            for image in in_order
        ],
    }
