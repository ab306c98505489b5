"""S3 storage against moto's S3 server: a real HTTP S3 endpoint on 127.0.0.1, in a process of its own
(`python -m moto.server`), reached by boto3 over the network like any S3. Credentials are dummy values."""

import io
import json
import logging
import re
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import botocore.exceptions
import httpx
import pytest
from PIL import Image

from deploy.local.probe import free_port, port_open
from services.processor.failures import ImageFailure, StorageUnavailable
from services.processor.storage import S3Storage, make_storage
from testbed.http_servers import LoopbackHTTPServer, LoopbackServer
from testbed.images import encode, jpeg_bytes, photo_like, png_bytes
from tests.support.settings import make_test_settings
from tests.support.stack import upload, url_csv, wait_for_status

REGION = "us-east-1"
DUMMY_CREDENTIALS = dict(s3_access_key_id="test-access-key-id", s3_secret_access_key="test-secret-access-key")
PREFIX = "imgpipe-test/"
START_TIMEOUT = 30


class MotoServer:
    """`python -m moto.server` on a loopback port; stop() ends the process, so its port refuses connections."""

    def __init__(self, log_path: Path, port: int | None = None):
        self.log_path, self.port = log_path, port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while not port_open(self.port):
                assert self.process.poll() is None, f"moto server exited:\n{self.log_path.read_text()}"
                assert time.monotonic() < deadline, f"moto server not listening within {START_TIMEOUT}s"
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        assert self.process is not None  # started
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def client(self):
        """An S3 client of the test's own, to create buckets and look at what the storage wrote."""
        return boto3.session.Session(
            aws_access_key_id="test-admin", aws_secret_access_key="test-admin", region_name=REGION
        ).client("s3", endpoint_url=self.endpoint_url)

    def create_bucket(self, public: bool = False) -> str:
        name = f"imgpipe-{uuid.uuid4().hex[:12]}"
        client = self.client()
        client.create_bucket(Bucket=name)
        if public:  # as on AWS: anonymous reads allowed by a bucket policy, not by object ACLs
            client.put_bucket_policy(
                Bucket=name,
                Policy=json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Principal": "*",
                                "Action": "s3:GetObject",
                                "Resource": f"arn:aws:s3:::{name}/*",
                            }
                        ],
                    }
                ),
            )
        return name

    def keys(self, bucket: str) -> list[str]:
        return [item["Key"] for item in self.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


def s3_fields(moto: MotoServer, bucket: str, **overrides) -> dict:
    return (
        dict(
            storage="s3",
            s3_bucket=bucket,
            s3_prefix=PREFIX,
            s3_region=REGION,
            s3_endpoint_url=moto.endpoint_url,
            **DUMMY_CREDENTIALS,
        )
        | overrides
    )


def s3_storage(moto: MotoServer, bucket: str, **overrides) -> S3Storage:
    storage = make_storage(make_test_settings(**s3_fields(moto, bucket, **overrides)))
    assert isinstance(storage, S3Storage)
    return storage


def test_a_public_base_url_serves_the_stored_bytes_with_their_content_type(moto):
    bucket = moto.create_bucket(public=True)
    storage = s3_storage(moto, bucket, s3_public_base_url=f"{moto.endpoint_url}/{bucket}/")
    jpeg, png = jpeg_bytes(64, 48, seed=1), png_bytes(64, 48, seed=2)

    jpeg_url = storage.save("job-1/image-1.jpg", jpeg, "image/jpeg")
    png_url = storage.save("job-1/image-2.png", png, "image/png")

    assert jpeg_url == f"{moto.endpoint_url}/{bucket}/{PREFIX}job-1/image-1.jpg"
    for url, body, content_type in ((jpeg_url, jpeg, "image/jpeg"), (png_url, png, "image/png")):
        answer = httpx.get(url)  # anonymous: the bucket policy lets anyone read
        assert (answer.status_code, answer.content, answer.headers["content-type"]) == (200, body, content_type)


def test_without_a_public_base_url_a_presigned_url_serves_the_object(moto):
    bucket = moto.create_bucket()
    storage = s3_storage(moto, bucket, s3_presigned_url_expiry_seconds=900)
    jpeg = jpeg_bytes(64, 48, seed=3)

    url = storage.save("job-2/image-1.jpg", jpeg, "image/jpeg")

    assert url.startswith(f"{moto.endpoint_url}/{bucket}/{PREFIX}job-2/image-1.jpg?")
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["900"] and query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert httpx.get(url.split("?")[0]).status_code == 403  # the bucket is private: the signature is what lets it in
    answer = httpx.get(url)
    assert (answer.status_code, answer.content, answer.headers["content-type"]) == (200, jpeg, "image/jpeg")


def test_the_same_image_twice_is_one_object_under_the_same_key(moto):
    bucket = moto.create_bucket(public=True)
    storage = s3_storage(moto, bucket, s3_public_base_url=f"{moto.endpoint_url}/{bucket}")
    jpeg = jpeg_bytes(64, 48, seed=4)

    first = storage.save("job-3/image-1.jpg", jpeg, "image/jpeg")
    second = storage.save("job-3/image-1.jpg", jpeg, "image/jpeg")  # a duplicate event

    assert first == second
    assert moto.keys(bucket) == [f"{PREFIX}job-3/image-1.jpg"]
    assert httpx.get(first).content == jpeg


def test_one_client_serves_as_many_threads_as_images_in_flight(moto, caplog):
    bucket = moto.create_bucket()
    in_flight = 16
    storage = s3_storage(moto, bucket, processor_max_in_flight=in_flight)
    all_started = threading.Barrier(in_flight)

    def save(number: int) -> str:
        all_started.wait()
        return storage.save(f"job-9/image-{number}.jpg", b"jpeg", "image/jpeg")

    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        with ThreadPoolExecutor(in_flight) as pool:
            urls = list(pool.map(save, range(in_flight)))

    assert len(set(urls)) == len(moto.keys(bucket)) == in_flight
    assert not [r.message for r in caplog.records if "pool is full" in r.message]  # a connection for each thread


def test_a_missing_bucket_fails_the_image_as_storage_error(moto):
    storage = s3_storage(moto, f"imgpipe-missing-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ImageFailure) as caught:
        storage.save("job-4/image-1.jpg", jpeg_bytes(64, 48, seed=5), "image/jpeg")
    assert caught.value.code == "storage_error"
    assert "NoSuchBucket" in caught.value.message


def test_a_stopped_s3_makes_the_storage_unavailable_until_it_is_back(tmp_path):
    server = MotoServer(tmp_path / "moto.log")
    server.start()
    try:
        bucket = server.create_bucket()
        storage = s3_storage(server, bucket)
        jpeg = jpeg_bytes(64, 48, seed=6)
        storage.save("job-5/image-1.jpg", jpeg, "image/jpeg")  # a pooled connection to the server now
        server.stop()

        with pytest.raises(StorageUnavailable) as caught:
            storage.save("job-5/image-2.jpg", jpeg, "image/jpeg")
        assert isinstance(caught.value.__cause__, botocore.exceptions.EndpointConnectionError)

        server.start()  # on the same port; moto keeps its buckets in memory, so the bucket is made again
        server.client().create_bucket(Bucket=bucket)
        storage.save("job-5/image-2.jpg", jpeg, "image/jpeg")  # the same storage, and its one client, again
        assert server.keys(bucket) == [f"{PREFIX}job-5/image-2.jpg"]
    finally:
        assert server.process is not None  # started before the try
        if server.process.poll() is None:
            server.stop()


class _S3ErrorHandler(BaseHTTPRequestHandler):
    server: LoopbackHTTPServer

    protocol_version = "HTTP/1.1"  # answers botocore's "Expect: 100-continue" at once instead of letting it wait 1 s

    def log_message(self, *args):
        pass

    def do_PUT(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, code = self.server.owner.answer
        body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>as told</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class S3ErrorServer(LoopbackServer):
    """Answers every PUT with `answer`, an S3 error (status, code): answers of S3 that moto does not give."""

    def __init__(self, status: int, code: str):
        super().__init__(_S3ErrorHandler)
        self.answer = (status, code)


def storage_at(server: S3ErrorServer) -> S3Storage:
    return S3Storage(
        make_test_settings(
            storage="s3",
            s3_bucket="imgpipe-test",
            s3_region=REGION,
            s3_endpoint_url=server.base_url,
            **DUMMY_CREDENTIALS,
        )
    )


@pytest.mark.parametrize(
    "status, code", [(503, "SlowDown"), (500, "InternalError"), (429, "TooManyRequests"), (400, "RequestTimeout")]
)
def test_throttling_and_server_errors_make_the_storage_unavailable(status, code):
    with S3ErrorServer(status, code) as server:
        storage = storage_at(server)
        with pytest.raises(StorageUnavailable, match=code):
            storage.save("job-6/image-1.jpg", b"jpeg", "image/jpeg")


@pytest.mark.parametrize(
    "status, code", [(403, "AccessDenied"), (403, "InvalidAccessKeyId"), (301, "PermanentRedirect")]
)
def test_refusals_fail_the_image_as_storage_error(status, code):
    with S3ErrorServer(status, code) as server:
        storage = storage_at(server)
        with pytest.raises(ImageFailure) as caught:
            storage.save("job-6/image-1.jpg", b"jpeg", "image/jpeg")
    assert caught.value.code == "storage_error" and code in caught.value.message


@pytest.fixture
def no_default_credentials(monkeypatch, tmp_path):
    """boto3's default chain with nothing in it: no AWS_* variables, no ~/.aws files, no instance metadata."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "BOTO_CONFIG"):
        monkeypatch.setenv(name, str(tmp_path / "absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # only loopback traffic, and no wait for a timeout


def test_without_keys_the_default_credential_chain_is_used(moto, no_default_credentials, monkeypatch):
    bucket = moto.create_bucket()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-chain-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-chain-secret")
    storage = s3_storage(moto, bucket, s3_access_key_id=None, s3_secret_access_key=None)
    url = storage.save("job-7/image-1.jpg", b"jpeg", "image/jpeg")
    assert "Credential=test-chain-key-id%2F" in url  # signed with the chain's key
    assert httpx.get(url).content == b"jpeg"


def test_s3_settings_are_checked_at_start(no_default_credentials):
    with pytest.raises(ValueError, match="S3_BUCKET"):
        S3Storage(make_test_settings(storage="s3", **DUMMY_CREDENTIALS))
    with pytest.raises(ValueError, match="go together"):
        S3Storage(make_test_settings(storage="s3", s3_bucket="imgpipe-test", s3_access_key_id="test-only-the-id"))
    with pytest.raises(ValueError, match="found no credentials"):
        S3Storage(make_test_settings(storage="s3", s3_bucket="imgpipe-test"))


def test_a_job_through_the_running_stack_is_stored_on_s3(moto, start_stack, image_host):
    bucket = moto.create_bucket()
    stack = start_stack(processors=1, **s3_fields(moto, bucket))
    sources = {
        image_host.add("/a.jpg", jpeg_bytes(640, 480, seed=8)): "JPEG",
        image_host.add("/b.png", encode(photo_like(320, 200, seed=9), "PNG", compress_level=0)): "PNG",
    }

    request_id = upload(stack.api, url_csv(list(sources)), webhook_url=None)
    status = wait_for_status(stack.api, request_id, lambda s: s["status"] == "completed")

    assert status["counts"]["processed"] == len(sources)
    stored = moto.keys(bucket)
    assert len(stored) == len(sources)
    assert all(re.fullmatch(rf"{PREFIX}{request_id}/[0-9a-f-]{{36}}\.(jpg|png)", key) for key in stored), stored
    for image in status["images"]:
        answer = httpx.get(image["output_url"])  # presigned: the bucket is private
        assert answer.status_code == 200
        assert len(answer.content) == image["bytes_out"] < image["bytes_in"]
        fmt = sources[image["input_url"]]
        assert answer.headers["content-type"] == f"image/{fmt.lower()}"
        assert Image.open(io.BytesIO(answer.content)).format == fmt
