"""Structured logs: with log_format=json every line a service writes is one JSON object, the lines
about a job or an image carry its request_id / image_id, and no secret of the settings ever appears."""

import base64
import io
import json
import logging
import threading
import uuid

from services.api.keys import create_key
from shared.runtime import log_context, log_handler
from testbed.images import jpeg_bytes
from tests.support.cloudinary_contract import CloudinaryContractServer
from tests.support.stack import JOB_TIMEOUT, assert_settled_with_one_webhook, upload, url_csv

WEBHOOK_KEY = b"webhook-signing-key-3f9a1c7e5d20"
SECRETS = {
    "webhook secret": "whsec_" + base64.b64encode(WEBHOOK_KEY).decode(),
    "Cloudinary API secret": "cloudinary-secret-4b8e2d6a91",
    "SASL password": "sasl-password-51c0e7b3d8",
    "S3 secret key": "s3-secret-key-a94d1f07c2",
}


def test_json_lines_name_the_job_and_image_and_never_a_secret(start_stack, pool, image_host, receivers):
    with pool.connection() as conn:
        _, api_key = create_key(conn, f"logs-{uuid.uuid4().hex[:8]}")
    webhooks = receivers()
    with CloudinaryContractServer("logs-cloud", "918273645546372", SECRETS["Cloudinary API secret"]) as cloudinary:
        stack = start_stack(
            log_format="json",
            log_level="DEBUG",
            api_keys_required=True,
            webhook_secret=SECRETS["webhook secret"],
            kafka_sasl_password=SECRETS["SASL password"],
            s3_secret_access_key=SECRETS["S3 secret key"],
            storage="cloudinary",
            cloudinary_url=cloudinary.cloudinary_url(),
            cloudinary_upload_prefix=cloudinary.base_url,
        )
        stack.api.headers["Authorization"] = f"Bearer {api_key}"
        urls = [image_host.add(f"/l{n}.jpg", jpeg_bytes(300, 200, n)) for n in range(2)] + [
            image_host.base_url + "/gone.jpg"
        ]
        request_id = upload(stack.api, url_csv(urls), webhooks.url)
        webhooks.wait_for(1, JOB_TIMEOUT)
        assert_settled_with_one_webhook(stack, request_id, webhooks)
        assert len(cloudinary.uploads) == 2
        answers = stack.api.get("/metrics").text + stack.api.get("/readyz").text
        stack.services.stop()  # every line written, none half-written

    with pool.connection() as conn:
        image_ids = {str(row["id"]) for row in conn.execute("SELECT id FROM images WHERE job_id = %s", [request_id])}
    lines = {name: read_json_lines(stack.services.log_dir / f"{name}.log") for name in stack.services.names}
    ids = {request_id} | image_ids
    for name, records in lines.items():
        for record in records:
            for id_ in ids:  # a line that names the job or one of its images says so in its fields
                if id_ in record["message"]:
                    assert request_id == record.get("request_id"), (name, record)
            if record.get("image_id") is not None:
                assert record["request_id"] == request_id, (name, record)
    processors = [record for name, records in lines.items() if name.startswith("processor") for record in records]
    about_job = [r for r in processors if r.get("request_id") == request_id]
    assert {r.get("image_id") for r in about_job} == image_ids, about_job  # each image, the failed one too
    assert any("http_404" in r["message"] for r in about_job)
    assert any(r.get("request_id") == request_id and "completed" in r["message"] for r in lines["notifier"])
    assert any(r.get("request_id") == request_id and "delivered" in r["message"] for r in lines["notifier"])
    assert any(r.get("request_id") == request_id and "accepted" in r["message"] for r in lines["api"])
    assert any(r.get("request_id") == request_id and "GET /status/" in r["message"] for r in lines["api"])

    everything = "".join((stack.services.log_dir / f"{name}.log").read_text() for name in stack.services.names)
    for what, secret in {**SECRETS, "webhook key": base64.b64encode(WEBHOOK_KEY).decode(), "API key": api_key}.items():
        assert secret not in everything, f"the {what} is in the logs"
        assert secret not in answers, f"the {what} is in /metrics or /readyz"


def read_json_lines(path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"{path.name}:{number} is not JSON: {line[:300]}") from None
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        records.append(record)
    assert records, f"{path.name} is empty"
    return records


def test_a_json_line_has_the_context_ids_of_its_thread_and_the_traceback():
    stream = io.StringIO()
    logger = logging.getLogger(f"imgpipe.test.{uuid.uuid4().hex}")
    logger.addHandler(log_handler("json", stream))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    request_id, image_id = uuid.uuid4(), uuid.uuid4()
    with log_context(request_id=request_id):
        with log_context(image_id=image_id):
            logger.info("inner %d", 1)
            other = threading.Thread(target=logger.info, args=("another thread",))
            other.start()
            other.join()
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
        logger.info("explicit", extra={"request_id": "given"})
    logger.info("outside")

    inner, in_thread, failed, explicit, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inner["message"] == "inner 1" and inner["level"] == "INFO" and inner["logger"] == logger.name
    assert (inner["request_id"], inner["image_id"]) == (str(request_id), str(image_id))
    assert inner["time"].endswith("+00:00")
    assert "request_id" not in in_thread  # another thread has its own context
    assert failed["request_id"] == str(request_id) and "image_id" not in failed
    assert failed["exception"].startswith("Traceback") and "ValueError: boom" in failed["exception"]
    assert explicit["request_id"] == "given"
    assert "request_id" not in outside


def test_text_lines_stay_readable():
    stream = io.StringIO()
    logger = logging.getLogger(f"imgpipe.test.{uuid.uuid4().hex}")
    logger.addHandler(log_handler("text", stream))
    logger.propagate = False
    logger.warning("image %s failed", "x")
    assert stream.getvalue().rstrip().endswith(f"WARNING {logger.name}: image x failed")
