"""Jobs through the real API: upload a one-column CSV with a webhook, then wait for that webhook."""

import json
import time
import uuid
from dataclasses import dataclass

import httpx

from bench.servers import WebhookReceiver


@dataclass
class Job:
    images: int
    hook_key: str
    uploaded_at: float  # time.monotonic() right before POST /upload
    request_id: str = ""
    finished_at: float | None = None  # when its webhook arrived
    webhook: dict | None = None
    api_key: str | None = None  # the key it was uploaded with, if not the Jobs' own

    @property
    def seconds(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.uploaded_at

    @property
    def images_per_second(self) -> float | None:
        seconds = self.seconds
        return None if seconds is None else self.images / seconds

    def summary(self, name: str) -> dict:
        return {
            "job": name,
            "images": self.images,
            "seconds": self.seconds,
            "images_per_second": self.images_per_second,
            "finished": self.finished_at is not None,
            "failed_images": self.webhook["failed_images"] if self.webhook else None,
        }


class Jobs:
    def __init__(self, api_url: str, webhooks: WebhookReceiver, api_key: str | None = None):
        """api_key: sent with every request unless an upload names another (an API that requires keys)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.api = httpx.Client(base_url=api_url, timeout=120, headers=headers)
        self.webhooks = webhooks
        self.uploaded: list[Job] = []

    def upload(self, urls: list[str], api_key: str | None = None) -> Job:
        job = Job(images=len(urls), hook_key=uuid.uuid4().hex, uploaded_at=time.monotonic(), api_key=api_key)
        csv_text = "url\n" + "\n".join(urls) + "\n"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        response = self.api.post(
            "/upload",
            files={"file": ("bench.csv", csv_text, "text/csv")},
            data={"webhook_url": self.webhooks.url(job.hook_key)},
            headers=headers,
        )
        if response.status_code != 202:
            raise RuntimeError(f"upload of {len(urls)} URLs answered {response.status_code}: {response.text[:500]}")
        job.request_id = response.json()["request_id"]
        self.uploaded.append(job)
        return job

    def wait(self, job: Job, within: float) -> bool:
        """Wait until the job's webhook, at most until `within` seconds after its upload."""
        arrival = self.webhooks.wait(job.hook_key, job.uploaded_at + within)
        if arrival is not None:
            job.finished_at, body = arrival
            job.webhook = json.loads(body)
        return arrival is not None

    def all_finished(self) -> bool:
        """True if every job uploaded here was waited for and is finished: nothing left in the services."""
        return all(job.finished_at is not None for job in self.uploaded)

    def counts(self, job: Job) -> dict:
        """The job's counts now (total, processed, failed, pending)."""
        headers = {"Authorization": f"Bearer {job.api_key}"} if job.api_key else {}
        return self.api.get(f"/status/{job.request_id}", params={"limit": 1}, headers=headers).json()["counts"]

    def close(self) -> None:
        self.api.close()
