"""API keys, through real HTTP against the API in a uvicorn server on 127.0.0.1, with keys made by the
command an operator runs (python -m services.api.keys)."""

import hashlib
import logging
import socket
import subprocess
import sys
import time
import uuid

import httpx
import psycopg
import pytest

from deploy.local.services import REPO_ROOT
from services.api.app import create_app
from services.api.keys import ActiveKeys
from shared.events import JobRequested
from tests.support.api_server import ApiServer
from tests.support.kafka import produce_as_another_service, read_to_end, wait_until_consumed
from tests.support.settings import make_test_settings, own_names, service_env

CSV = ("job.csv", "url\nhttps://127.0.0.1:9/a.jpg\n", "text/csv")


@pytest.fixture(scope="module")
def settings(infra, tmp_path_factory):
    database = infra.new_database()
    yield make_test_settings(
        kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
        database_url=database,
        **own_names("keys"),
        topic_partitions=1,
        storage_dir=tmp_path_factory.mktemp("images"),
        api_keys_required=True,
    )
    infra.drop_database(database)


@pytest.fixture(scope="module")
def server(settings):
    with ApiServer(create_app(settings)) as api:
        yield api


@pytest.fixture
def api(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield client


def keys_command(settings, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "services.api.keys", *args],
        env=service_env(settings),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result


def new_key(settings, name: str | None = None) -> str:
    """A key as the command prints it: alone on standard output."""
    return keys_command(settings, "create", name or f"client-{uuid.uuid4().hex[:8]}").stdout.strip()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "unauthorized"


def test_without_a_valid_key_every_endpoint_but_health_answers_401(api, settings):
    key = new_key(settings)
    key_id, secret = key.removeprefix("imgpipe_").split("_", 1)
    wrong_keys = [
        None,
        "not-a-key",
        key[:-1] + ("A" if key[-1] != "A" else "B"),  # the right id, a wrong secret
        f"imgpipe_{uuid.uuid4().hex}_{secret}",  # a wrong id, the right secret
    ]
    job = str(uuid.uuid4())
    for wrong in wrong_keys:
        headers = {} if wrong is None else bearer(wrong)
        assert_unauthorized(api.post("/upload", files={"file": CSV}, headers=headers))
        assert_unauthorized(api.get(f"/status/{job}", headers=headers))
        assert_unauthorized(api.get(f"/output_csv/{job}", headers=headers))
        assert_unauthorized(api.get("/metrics", headers=headers))
    assert_unauthorized(api.get(f"/status/{job}", headers={"Authorization": key}))  # no scheme
    assert_unauthorized(api.get(f"/status/{job}", headers={"Authorization": f"Basic {key}"}))
    assert api.get("/healthz").status_code == 200
    assert api.get("/readyz").status_code == 200  # probes carry no key
    assert api.get("/metrics", headers=bearer(key)).status_code == 200
    assert api.get(f"/status/{job}", headers=bearer(key)).json()["error"]["code"] == "job_not_found"


def test_an_upload_without_a_key_is_refused_before_its_body_is_read(server, settings):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {settings.max_csv_bytes}\r\n\r\n".encode()
        )  # and no body at all
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 ")


def test_a_job_is_visible_only_to_the_key_that_created_it(api, settings):
    owner, other = new_key(settings), new_key(settings)
    upload = api.post("/upload", files={"file": CSV}, headers=bearer(owner))
    assert upload.status_code == 202, upload.text
    request_id = upload.json()["request_id"]

    assert api.get(f"/status/{request_id}", headers=bearer(owner)).json()["request_id"] == request_id
    listed = {
        key: [job["request_id"] for job in api.get("/jobs", headers=bearer(key)).json()["jobs"]]
        for key in (owner, other)
    }
    assert request_id in listed[owner] and request_id not in listed[other]
    assert api.get(f"/output_csv/{request_id}", headers=bearer(owner)).json()["error"]["code"] == "job_not_completed"
    unknown = str(uuid.uuid4())
    for path in ("status", "output_csv"):
        seen_by_other = api.get(f"/{path}/{request_id}", headers=bearer(other))
        never_existed = api.get(f"/{path}/{unknown}", headers=bearer(other))
        assert seen_by_other.status_code == never_existed.status_code == 404
        assert seen_by_other.text == never_existed.text.replace(unknown, request_id)
    with psycopg.connect(settings.database_url) as conn:
        assert (
            conn.execute(
                "SELECT name FROM processing_jobs JOIN api_keys ON api_keys.id = owner_key_id WHERE job_id = %s",
                (request_id,),
            ).fetchone()
            is not None
        )


def test_a_revoked_key_is_refused(api, settings):
    name = f"leaving-{uuid.uuid4().hex[:8]}"
    key = new_key(settings, name)
    assert api.get(f"/status/{uuid.uuid4()}", headers=bearer(key)).status_code == 404
    keys_command(settings, "revoke", name)
    # The API keeps a key it found for ActiveKeys.CACHE_SECONDS: refused once that has passed.
    deadline = time.monotonic() + ActiveKeys.CACHE_SECONDS + 5
    while (answer := api.get(f"/status/{uuid.uuid4()}", headers=bearer(key))).status_code == 404:
        assert time.monotonic() < deadline, "the revoked key is still accepted"
        time.sleep(0.2)
    assert_unauthorized(answer)
    assert_unauthorized(api.post("/upload", files={"file": CSV}, headers=bearer(key)))
    listed = keys_command(settings, "list").stdout
    assert name in listed and "revoked" in listed


def test_keys_are_stored_hashed_and_never_shown_or_logged_again(api, settings, caplog):
    caplog.set_level(logging.DEBUG)
    name = f"hashed-{uuid.uuid4().hex[:8]}"
    key = new_key(settings, name)
    assert api.post("/upload", files={"file": CSV}, headers=bearer(key)).status_code == 202
    assert_unauthorized(api.get(f"/status/{uuid.uuid4()}", headers=bearer(key + "x")))

    _, key_id, secret = key.split("_", 2)
    with psycopg.connect(settings.database_url) as conn:
        [(stored_hash,)] = conn.execute("SELECT key_sha256 FROM api_keys WHERE id = %s", (key_id,)).fetchall()
        every_row = conn.execute(
            "SELECT string_agg(t::text, ' ') FROM (SELECT * FROM api_keys) t"
            " UNION ALL SELECT string_agg(t::text, ' ') FROM (SELECT * FROM processing_jobs) t"
        ).fetchall()
    assert bytes(stored_hash) == hashlib.sha256(key.encode()).digest()
    assert all(secret not in (text or "") for (text,) in every_row)
    listed = keys_command(settings, "list").stdout
    assert name in listed and secret not in listed
    assert caplog.records and secret not in caplog.text


def test_a_job_over_kafka_belongs_to_the_api_key_it_names(api, settings):
    """A job.requested event with api_key_id is read through the API with that key only; an event naming
    a key that does not exist or is revoked goes to the dead-letter topic and stores nothing."""
    owner, other = new_key(settings), new_key(settings)
    revoked = new_key(settings, name := f"revoked-{uuid.uuid4().hex[:8]}")
    keys_command(settings, "revoke", name)
    owned, unknown, of_revoked = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    events = {owned: _id_of(owner), unknown: uuid.uuid4(), of_revoked: _id_of(revoked)}
    for request_id, api_key_id in events.items():
        event = JobRequested(request_id=request_id, image_urls=["https://127.0.0.1:9/a.jpg"], api_key_id=api_key_id)
        produce_as_another_service(
            settings, settings.topic_job_requested, str(request_id).encode(), event.model_dump_json().encode()
        )

    wait_until_consumed(settings, settings.intake_group, [settings.topic_job_requested])
    assert api.get(f"/status/{owned}", headers=bearer(owner)).status_code == 200
    assert api.get(f"/status/{owned}", headers=bearer(other)).status_code == 404
    letters = {
        m.key().decode(): dict(m.headers())["error"].decode()
        for m in read_to_end(settings, settings.topic_job_dead_letter)
    }
    assert set(letters) == {str(unknown), str(of_revoked)}
    assert all("no such API key, or it is revoked" in error for error in letters.values())
    with psycopg.connect(settings.database_url) as conn:
        stored = conn.execute(
            "SELECT count(*) FROM processing_jobs WHERE job_id = ANY(%s)", ([unknown, of_revoked],)
        ).fetchone()
    assert stored is not None  # count(*) always answers one row
    assert stored[0] == 0


def _id_of(key: str) -> uuid.UUID:
    return uuid.UUID(key.removeprefix("imgpipe_").split("_", 1)[0])
