"""The running stack as a test sees it (start_stack in conftest.py), and what tests do through its API."""

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from deploy.local.services import ServiceGroup
from shared.settings import Settings
from testbed.http_servers import WebhookReceiver
from tests.support.kafka import wait_until_consumed
from tests.support.settings import service_env


@dataclass
class Stack:
    settings: Settings
    services: ServiceGroup
    api: httpx.Client


JOB_TIMEOUT = 120
START_EXIT_TIMEOUT = 60  # a service that cannot start says so and exits within this
KILLED = -signal.SIGKILL
CRASH_TEST_SETTINGS = dict(kafka_auto_commit_interval_ms=100, kafka_session_timeout_ms=2000)


def upload(api: httpx.Client, csv_text: str, webhook_url: str | None) -> str:
    data = {"webhook_url": webhook_url} if webhook_url else {}
    response = api.post("/upload", files={"file": ("job.csv", csv_text, "text/csv")}, data=data)
    assert response.status_code == 202, response.text
    return response.json()["request_id"]


def all_images(api: httpx.Client, request_id: str) -> tuple[dict, list[dict]]:
    images, offset = [], 0
    while offset is not None:
        page = api.get(f"/status/{request_id}", params={"offset": offset}).json()
        images += page["images"]
        offset = page["page"]["next_offset"]
    return page, images


def url_csv(urls: list[str]) -> str:
    return "url\n" + "\n".join(urls) + "\n"


def wait_for_status(api: httpx.Client, request_id: str, done, timeout: float = JOB_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while not done(status := api.get(f"/status/{request_id}").json()):
        assert time.monotonic() < deadline, f"job {request_id} never reached the expected state: {status}"
        time.sleep(0.1)
    return status


def assert_settled_with_one_webhook(stack: Stack, request_id: str, receiver: WebhookReceiver) -> None:
    """Wait until every request is processed and every result applied (committed offsets at the ends of
    the topics: the services commit only finished work), then check the webhook was sent exactly once."""
    settings = stack.settings
    wait_until_consumed(
        settings.kafka_bootstrap_servers,
        settings.processor_group,
        [settings.topic_requested, settings.topic_requested_bulk],
    )
    wait_until_consumed(settings.kafka_bootstrap_servers, settings.notifier_group, [settings.topic_processed])
    webhook = wait_for_status(stack.api, request_id, lambda s: s["webhook"]["status"] != "pending")["webhook"]
    assert (webhook["status"], webhook["attempts"]) == ("delivered", 1)
    assert len(receiver.posts_to()) == 1


def service_logs(log_dir: Path) -> dict[str, str]:
    return {path.stem: path.read_text(errors="replace") for path in log_dir.glob("*.log")}


def exits_at_start(settings: Settings, log_dir: Path, processors: int = 1) -> dict[str, int]:
    """Start the services with these settings; each one's exit status (one still running after
    START_EXIT_TIMEOUT raises subprocess.TimeoutExpired)."""
    services = ServiceGroup(service_env(settings), log_dir, processors=processors)
    services.start()
    try:
        return {name: services.wait_exit(name, START_EXIT_TIMEOUT) for name in services.names}
    finally:
        services.stop()
