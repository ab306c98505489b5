"""The processor's worker against real Kafka, a real HTTP image host and local or Cloudinary storage."""

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import cast

import cloudinary.exceptions
import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
from PIL import Image

from services.processor.failures import ImageFailure, StorageUnavailable
from services.processor.storage import CloudinaryStorage, LocalStorage, make_storage
from services.processor.worker import run
from shared.events import ImageError, ImageProcessed, ImageRequested
from shared.kafka import make_producer, produce_and_wait
from shared.settings import REPO_ROOT, Settings
from testbed.http_servers import ImageHost
from testbed.images import jpeg_bytes, png_bytes
from tests.support.cloudinary_contract import CloudinaryContractServer
from tests.support.kafka import TopicReader, committed_offsets, end_offsets, wait_until_consumed
from tests.support.settings import make_test_settings
from tests.support.threads import ServiceThread

WAIT_SECONDS = 60


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings(fetch_attempts=2, fetch_read_timeout=2.0, public_base_url="http://files.test")


@pytest.fixture
def workers():
    """workers(settings, storage=None) runs the processor in a thread; all are stopped (and their
    crashes reported) after the test."""
    started: list[ServiceThread] = []

    def start(settings: Settings, **kwargs) -> ServiceThread:
        started.append(ServiceThread(run, settings, **kwargs))
        return started[-1]

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def read_topic():
    readers = []

    def make(settings: Settings, topic: str) -> TopicReader:
        readers.append(TopicReader(settings.kafka_bootstrap_servers, topic))
        return readers[-1]

    yield make
    for reader in readers:
        reader.close()


def requested(request_id: uuid.UUID, row: int, url: str) -> ImageRequested:
    return ImageRequested(request_id=request_id, image_id=uuid.uuid4(), row_number=row, position=1, input_url=url)


def send(settings: Settings, messages: list[tuple[str, bytes]]) -> None:
    producer = make_producer(settings)
    produce_and_wait(producer, settings.topic_requested, messages)


def send_events(settings: Settings, events: list[ImageRequested]) -> None:
    """Keyed by request id: one partition, in this order."""
    send(settings, [(str(e.request_id), e.model_dump_json().encode()) for e in events])


def results_for(messages, request_id: uuid.UUID) -> list[ImageProcessed]:
    results = [ImageProcessed.model_validate_json(m.value()) for m in messages]
    return [r for r in results if r.request_id == request_id]


def test_images_get_results_and_garbage_goes_to_the_dead_letter_topic(settings, image_host, read_topic, workers):
    request_id = uuid.uuid4()
    jpeg = jpeg_bytes(640, 480, seed=1)
    png = png_bytes(320, 240, seed=2, mode="RGBA")
    events = [
        requested(request_id, 1, image_host.add("/photo.jpg", jpeg)),
        requested(request_id, 2, image_host.add("/logo.png", png)),
        requested(request_id, 3, image_host.base_url + "/missing.jpg"),
    ]
    garbage = [
        (f"garbage-{request_id}", b"{this is not json"),
        (f"incomplete-{request_id}", b'{"request_id": "%s", "row_number": 1}' % str(request_id).encode()),
    ]
    send_events(settings, events)
    send(settings, garbage)
    processed = read_topic(settings, settings.topic_processed)
    dead_letters = read_topic(settings, settings.topic_dead_letter)

    workers(settings)
    messages = processed.wait_for(lambda got: len(results_for(got, request_id)) >= 3)
    dead = dead_letters.wait_for(lambda got: len(got) >= 2)

    assert {m.key() for m in messages} == {str(request_id).encode()}
    results = {r.image_id: r for r in results_for(messages, request_id)}
    assert len(results) == 3
    for event in events:
        result = results[event.image_id]
        assert (result.row_number, result.position, result.input_url) == (event.row_number, 1, event.input_url)
        assert result.event_id != event.event_id

    photo = results[events[0].image_id]
    assert photo.status == "processed" and photo.error is None
    assert photo.bytes_out is not None and photo.bytes_in is not None  # set on every processed result
    assert photo.format == "JPEG" and photo.bytes_in == len(jpeg) and photo.bytes_out < 0.7 * len(jpeg)
    key = f"{request_id}/{events[0].image_id}.jpg"
    assert photo.output_url == f"http://files.test/files/{key}"
    with Image.open(settings.storage_dir / key) as stored:
        assert (stored.format, stored.size) == ("JPEG", (640, 480))
    assert (settings.storage_dir / key).stat().st_size == photo.bytes_out

    logo = results[events[1].image_id]
    assert logo.bytes_out is not None and logo.bytes_in is not None  # set on every processed result
    assert logo.status == "processed" and logo.format == "PNG" and logo.bytes_out <= logo.bytes_in
    with Image.open(settings.storage_dir / f"{request_id}/{events[1].image_id}.png") as stored:
        assert (stored.format, stored.mode, stored.size) == ("PNG", "RGBA", (320, 240))

    missing = results[events[2].image_id]
    assert missing.error is not None  # set on every failed result
    assert missing.status == "failed" and missing.error.code == "http_404" and missing.output_url is None

    assert sorted((m.key(), m.value()) for m in dead) == sorted((k.encode(), v) for k, v in garbage)
    for message in dead:
        headers = dict(message.headers())
        assert headers["error"].startswith(b"not a valid image.requested event")
        assert headers["source_topic"] == settings.topic_requested.encode()


def test_the_format_comes_from_the_bytes_not_the_url(settings, image_host, read_topic, workers):
    request_id = uuid.uuid4()
    jpeg = jpeg_bytes(400, 300, seed=11)
    event = requested(request_id, 1, image_host.add("/really-a-jpeg.png", jpeg))
    send_events(settings, [event])
    processed = read_topic(settings, settings.topic_processed)

    workers(settings)
    [result] = results_for(processed.wait_for(lambda got: len(results_for(got, request_id)) == 1), request_id)

    assert result.status == "processed" and result.format == "JPEG"
    assert result.output_url is not None  # set on every processed result
    assert result.output_url.endswith(f"/{event.image_id}.jpg")
    with Image.open(settings.storage_dir / f"{request_id}/{event.image_id}.jpg") as stored:
        assert stored.format == "JPEG"
    assert not (settings.storage_dir / f"{request_id}/{event.image_id}.png").exists()


def test_a_restarted_worker_continues_after_what_it_acknowledged(settings, image_host, read_topic):
    request_id = uuid.uuid4()
    url = image_host.add("/a.jpg", jpeg_bytes(320, 240, seed=3))
    first, second = requested(request_id, 1, url), requested(request_id, 2, url)  # same key: same partition, in order
    processed = read_topic(settings, settings.topic_processed)

    send_events(settings, [first])
    worker = ServiceThread(run, settings)
    processed.wait_for(lambda got: len(results_for(got, request_id)) == 1)
    worker.stop()
    send_events(settings, [second])
    worker = ServiceThread(run, settings)
    messages = processed.wait_for(lambda got: any(r.image_id == second.image_id for r in results_for(got, request_id)))
    worker.stop()

    # Had the first worker not committed, the second would have processed `first` again before `second`.
    assert [r.image_id for r in results_for(messages, request_id)] == [first.image_id, second.image_id]


def wait_for_log(caplog, text: str, count: int, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while sum(text in record.getMessage() for record in caplog.records) < count:
        assert time.monotonic() < deadline, f"fewer than {count} log records with {text!r} within {timeout}s"
        time.sleep(0.05)


def test_a_storage_outage_delays_images_without_losing_them(make_settings, image_host, read_topic, workers, caplog):
    settings = make_settings(image_max_attempts=1)
    settings.storage_dir.parent.mkdir(parents=True, exist_ok=True)
    settings.storage_dir.write_text("a file where the storage directory should be")  # every save fails
    request_id = uuid.uuid4()
    url = image_host.add("/b.jpg", jpeg_bytes(320, 240, seed=4))
    events = [requested(request_id, 1, url), requested(request_id, 2, url)]
    processed = read_topic(settings, settings.topic_processed)
    send_events(settings, events)

    with caplog.at_level(logging.WARNING, logger="services.processor"):
        workers(settings)
        # More tries than image_max_attempts: an outage is not the image's fault, so there is no limit.
        wait_for_log(caplog, "waits for the storage", count=settings.image_max_attempts + 1)
        assert sum(end_offsets(admin(settings), settings.topic_processed).values()) == 0  # no result yet
        settings.storage_dir.unlink()  # storage is back
        messages = processed.wait_for(lambda got: len(results_for(got, request_id)) >= 2)

    results = results_for(messages, request_id)
    assert sorted(r.image_id for r in results) == sorted(e.image_id for e in events)
    assert all(r.status == "processed" for r in results)
    assert all((settings.storage_dir / f"{request_id}/{e.image_id}.jpg").is_file() for e in events)


class BuggyStorage(LocalStorage):
    """Local storage with a bug that shows for one image only: its save raises KeyError."""

    def __init__(self, settings: Settings, broken_image_id: uuid.UUID):
        super().__init__(settings.storage_dir, settings.public_base_url)
        self.broken_image_id = str(broken_image_id)
        self.broken_saves = 0

    def save(self, key: str, data: bytes, content_type: str) -> str:
        if self.broken_image_id in key:
            self.broken_saves += 1
            raise KeyError("a bug that only this image triggers")
        return super().save(key, data, content_type)


def test_an_unexpected_error_fails_its_image_after_bounded_tries_and_the_partition_moves_on(
    settings, image_host, read_topic, workers
):
    request_id = uuid.uuid4()
    url = image_host.add("/c.jpg", jpeg_bytes(320, 240, seed=5))
    bad, *good = [requested(request_id, row, url) for row in range(1, 5)]  # one partition: the bad one first
    storage = BuggyStorage(settings, bad.image_id)
    processed = read_topic(settings, settings.topic_processed)
    send_events(settings, [bad, *good])

    workers(settings, storage=storage)
    results = {
        r.image_id: r
        for r in results_for(
            processed.wait_for(lambda got: len({r.image_id for r in results_for(got, request_id)}) == 4), request_id
        )
    }

    assert results[bad.image_id].status == "failed"
    error = results[bad.image_id].error
    assert error is not None  # set on every failed result
    assert error.code == "internal_error"
    assert "KeyError" in error.message
    assert storage.broken_saves == settings.image_max_attempts == 3
    assert [results[e.image_id].status for e in good] == ["processed"] * 3


def admin(settings: Settings) -> AdminClient:
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})


def set_topic_config(settings: Settings, topic: str, name: str, value: str) -> None:
    resource = ConfigResource(
        ResourceType.TOPIC,
        topic,
        incremental_configs=[ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)],
    )
    client = admin(settings)  # kept referenced until the futures resolve
    for future in client.incremental_alter_configs([resource]).values():
        future.result(10)


def test_results_kafka_refuses_keep_their_offsets_uncommitted_until_accepted(
    make_settings, image_host, read_topic, workers, caplog
):
    settings = make_settings(kafka_auto_commit_interval_ms=100, public_base_url="http://files.test")
    set_topic_config(settings, settings.topic_processed, "max.message.bytes", "64")  # smaller than any result
    request_id = uuid.uuid4()
    url = image_host.add("/d.jpg", jpeg_bytes(320, 240, seed=6))
    events = [requested(request_id, row, url) for row in range(1, 4)]
    send_events(settings, events)
    processed = read_topic(settings, settings.topic_processed)

    with caplog.at_level(logging.WARNING):
        workers(settings)
        # The broker refused the results twice; auto-commit ran every 100 ms meanwhile.
        wait_for_log(caplog, "too large", count=2)
        committed = committed_offsets(settings, settings.processor_group, settings.topic_requested)
        assert all(offset <= 0 for offset in committed.values()), committed  # none past the first image
        assert sum(end_offsets(admin(settings), settings.topic_processed).values()) == 0

        set_topic_config(settings, settings.topic_processed, "max.message.bytes", "1048588")  # Kafka accepts again
        messages = processed.wait_for(lambda got: len(results_for(got, request_id)) >= 3)
        wait_until_consumed(settings.kafka_bootstrap_servers, settings.processor_group, [settings.topic_requested])

    results = results_for(messages, request_id)
    assert sorted(r.image_id for r in results) == sorted(e.image_id for e in events)  # each once
    assert all(r.status == "processed" for r in results)


def test_images_stored_on_cloudinary_through_the_running_worker(make_settings, image_host, read_topic, workers):
    with CloudinaryContractServer("demo-cloud", "123456789012345", "right-secret") as server:
        settings = make_settings(**cloudinary_fields(server))
        request_id = uuid.uuid4()
        jpeg = jpeg_bytes(500, 400, seed=7)
        events = [requested(request_id, row, image_host.add(f"/cl{row}.jpg", jpeg)) for row in (1, 2)]
        send_events(settings, events)
        processed = read_topic(settings, settings.topic_processed)

        workers(settings)
        results = results_for(processed.wait_for(lambda got: len(results_for(got, request_id)) == 2), request_id)

    assert sorted(server.uploads) == sorted(f"imgpipe-test/{request_id}/{e.image_id}" for e in events)
    for result in results:
        stored = server.uploads[f"imgpipe-test/{request_id}/{result.image_id}"]
        assert result.status == "processed" and result.bytes_out == len(stored) < len(jpeg)
        assert result.output_url is not None  # set on every processed result
        assert result.output_url.startswith(f"{server.base_url}/demo-cloud/image/upload/v")
        assert result.output_url.endswith(f"/imgpipe-test/{request_id}/{result.image_id}.jpg")


def test_the_service_entry_point_tunes_pillow_before_importing_it():
    env = {k: v for k, v in os.environ.items() if k != "PILLOW_BLOCKS_MAX"}
    code = "import services.processor.__main__; from PIL import Image; print(Image.core.get_blocks_max())"
    output = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert output.stdout.strip() == "16"


# Storage


def test_local_storage_writes_the_file_and_returns_its_url(tmp_path):
    storage = LocalStorage(tmp_path / "images", "http://127.0.0.1:8000/")
    url = storage.save("job/image.jpg", b"first", "image/jpeg")
    assert url == "http://127.0.0.1:8000/files/job/image.jpg"
    assert storage.save("job/image.jpg", b"second", "image/jpeg") == url  # a duplicate event overwrites
    assert (tmp_path / "images/job/image.jpg").read_bytes() == b"second"
    assert [p.name for p in (tmp_path / "images/job").iterdir()] == ["image.jpg"]  # no temporary files left


def test_local_storage_refuses_keys_outside_its_directory(tmp_path):
    storage = LocalStorage(tmp_path / "images", "http://127.0.0.1:8000")
    with pytest.raises(ValueError):
        storage.save("../escaped.jpg", b"x", "image/jpeg")
    assert not (tmp_path / "escaped.jpg").exists()


def test_local_storage_that_cannot_write_is_unavailable(tmp_path):
    (tmp_path / "images").write_text("a file where the directory should be")
    with pytest.raises(StorageUnavailable):
        LocalStorage(tmp_path / "images", "http://127.0.0.1:8000").save("job/image.jpg", b"x", "image/jpeg")


@pytest.fixture
def cloudinary_server():
    with CloudinaryContractServer("demo-cloud", "123456789012345", "right-secret") as server:
        yield server


def cloudinary_fields(server: CloudinaryContractServer, **overrides) -> dict:
    fields = dict(
        storage="cloudinary",
        cloudinary_url=server.cloudinary_url(),
        cloudinary_upload_prefix=server.base_url,
        cloudinary_folder="imgpipe-test",
    )
    return {**fields, **overrides}


def test_cloudinary_storage_uploads_with_a_valid_signature(cloudinary_server):
    storage = make_storage(make_test_settings(**cloudinary_fields(cloudinary_server)))
    assert isinstance(storage, CloudinaryStorage)
    jpeg = jpeg_bytes(64, 48, seed=5)
    url = storage.save("job-1/image-1.jpg", jpeg, "image/jpeg")
    assert url.startswith(f"{cloudinary_server.base_url}/demo-cloud/image/upload/v")
    assert url.endswith("/imgpipe-test/job-1/image-1.jpg")
    assert cloudinary_server.uploads == {"imgpipe-test/job-1/image-1": jpeg}
    storage.save("job-1/image-1.jpg", jpeg, "image/jpeg")  # a duplicate event replaces the same asset
    assert list(cloudinary_server.uploads) == ["imgpipe-test/job-1/image-1"]
    assert cloudinary_server.received[-1]["overwrite"] in ("1", "true")


def test_cloudinary_wrong_secret_is_a_storage_failure(cloudinary_server):
    settings = make_test_settings(
        **cloudinary_fields(cloudinary_server, cloudinary_url=cloudinary_server.cloudinary_url("wrong"))
    )
    with pytest.raises(ImageFailure) as caught:
        CloudinaryStorage(settings).save("job-1/image-1.jpg", jpeg_bytes(64, 48, seed=5), "image/jpeg")
    assert caught.value.code == "storage_error"
    assert "Invalid Signature" in caught.value.message
    assert cloudinary_server.uploads == {}


def test_cloudinary_outage_makes_the_storage_unavailable_not_the_image_failed(cloudinary_server):
    storage = CloudinaryStorage(make_test_settings(**cloudinary_fields(cloudinary_server)))
    cloudinary_server.fail_with_status = 500
    with pytest.raises(StorageUnavailable) as caught:
        storage.save("job-1/image-1.jpg", jpeg_bytes(64, 48, seed=5), "image/jpeg")
    assert isinstance(caught.value.__cause__, cloudinary.exceptions.Error)


def test_cloudinary_settings_are_checked_at_start():
    with pytest.raises(ValueError, match="CLOUDINARY_URL"):
        CloudinaryStorage(make_test_settings(storage="cloudinary"))
    with pytest.raises(ValueError, match="CLOUDINARY_URL"):
        CloudinaryStorage(make_test_settings(storage="cloudinary", cloudinary_url="https://key:secret@demo"))


# Many images at a time


def send_to(settings: Settings, topic: str, partition: int, events: list[ImageRequested]) -> None:
    producer = make_producer(settings)
    for event in events:
        producer.produce(topic, key=str(event.image_id), value=event.model_dump_json().encode(), partition=partition)
    assert producer.flush(30) == 0


def test_out_of_order_completion_commits_only_up_to_the_lowest_unfinished_image(
    settings, image_host, read_topic, workers
):
    request_id = uuid.uuid4()
    slow_url = image_host.add("/slow.jpg", jpeg_bytes(200, 150, seed=20))
    image_host.delays["/slow.jpg"] = 3.0
    fast_url = image_host.add("/fast.jpg", jpeg_bytes(200, 150, seed=21))
    slow, *fast = [requested(request_id, row, url) for row, url in enumerate([slow_url] + [fast_url] * 5, start=1)]
    send_to(settings, settings.topic_requested, 0, [slow, *fast])  # offsets 0 (slow) to 5
    processed = read_topic(settings, settings.topic_processed)

    workers(settings)
    processed.wait_for(lambda got: {r.image_id for r in results_for(got, request_id)} >= {e.image_id for e in fast})
    # Images on another partition, taken after those results: once they are committed, a commit
    # cycle has run since the fast images finished.
    later = [requested(request_id, 10 + n, fast_url) for n in range(2)]
    send_to(settings, settings.topic_requested, 1, later)
    wait_until_consumed(
        settings.kafka_bootstrap_servers, settings.processor_group, [settings.topic_requested], partitions=[1]
    )
    assert (
        committed_offsets(settings, settings.processor_group, settings.topic_requested)[0] <= 0
    )  # the slow one is open
    assert slow.image_id not in {r.image_id for r in results_for(processed.messages, request_id)}

    processed.wait_for(lambda got: slow.image_id in {r.image_id for r in results_for(got, request_id)})
    wait_until_consumed(settings.kafka_bootstrap_servers, settings.processor_group, [settings.topic_requested])
    assert committed_offsets(settings, settings.processor_group, settings.topic_requested)[0] == 6


def test_a_retry_waits_while_the_images_behind_it_proceed(make_settings, image_host, read_topic, workers):
    settings = make_settings(fetch_attempts=3)
    request_id = uuid.uuid4()
    flaky_url = image_host.add("/flaky.jpg", jpeg_bytes(200, 150, seed=22))
    image_host.first_statuses["/flaky.jpg"] = [503, 503]  # retried after 0.2 s, then 0.4 s
    flaky, *others = [
        requested(request_id, row, image_host.add(f"/o{row}.jpg", jpeg_bytes(200, 150, seed=row)))
        for row in range(1, 5)
    ]
    flaky.input_url = flaky_url
    send_events(settings, [flaky, *others])  # one partition, the flaky image first
    processed = read_topic(settings, settings.topic_processed)

    workers(settings)
    results = results_for(processed.wait_for(lambda got: len(results_for(got, request_id)) == 4), request_id)

    assert [r.image_id for r in results][-1] == flaky.image_id  # the others did not wait for its retries
    assert {r.status for r in results} == {"processed"}
    assert image_host.requests["/flaky.jpg"] == 3


def test_the_in_flight_bound_holds_and_paused_partitions_resume(make_settings, image_host, read_topic, workers, caplog):
    settings = make_settings(processor_max_in_flight=2, processor_queued_per_lane=16)
    request_id = uuid.uuid4()
    image_host.delay = 0.05
    image = jpeg_bytes(200, 150, seed=40)
    events = [requested(request_id, row, image_host.add(f"/b{row}.jpg", image)) for row in range(1, 49)]
    send(settings, [(str(e.image_id), e.model_dump_json().encode()) for e in events])  # spread over partitions
    processed = read_topic(settings, settings.topic_processed)

    with caplog.at_level(logging.DEBUG, logger="services.processor.worker"):
        workers(settings)
        results = results_for(processed.wait_for(lambda got: len(results_for(got, request_id)) == 48), request_id)

    assert {r.image_id for r in results} == {e.image_id for e in events}
    assert image_host.most_active <= 2
    assert any("pausing" in r.getMessage() for r in caplog.records)
    assert any("resuming" in r.getMessage() for r in caplog.records)


class HangUpServer:
    """Accepts connections and closes them at once (a host that does not serve): counts the accepts."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _serve(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            connection.close()

    def close(self):
        self.listener.close()


def test_the_circuit_breaker_fails_a_dead_hosts_images_fast_and_tries_it_again_later(
    make_settings, read_topic, workers
):
    settings = make_settings(
        fetch_attempts=1, fetch_per_host_limit=1, host_failure_threshold=3, host_cooldown_seconds=1.0
    )
    dead = HangUpServer()
    request_id = uuid.uuid4()
    events = [requested(request_id, row, f"{dead.base_url}/{row}.jpg") for row in range(1, 9)]
    send_events(settings, events)
    processed = read_topic(settings, settings.topic_processed)
    try:
        workers(settings)
        results = results_for(processed.wait_for(lambda got: len(results_for(got, request_id)) == 8), request_id)
        codes = sorted(cast(ImageError, r.error).code for r in results)  # all failed: each has an error
        assert codes == ["connect_error"] * 3 + ["host_unavailable"] * 5
        assert dead.accepted == 3

        time.sleep(1.0)  # the cooldown: then the host is tried again
        again = requested(request_id, 9, f"{dead.base_url}/9.jpg")
        send_events(settings, [again])
        [result] = [
            r
            for r in results_for(processed.wait_for(lambda got: len(results_for(got, request_id)) == 9), request_id)
            if r.image_id == again.image_id
        ]
        assert result.error is not None  # a failed result
        assert result.error.code == "connect_error" and dead.accepted == 4
    finally:
        dead.close()


def test_two_processors_share_the_partitions_and_both_work(make_settings, image_host, read_topic, workers, tmp_path):
    settings = make_settings()
    first = workers(settings.model_copy(update={"storage_dir": tmp_path / "first"}))
    second = workers(settings.model_copy(update={"storage_dir": tmp_path / "second"}))
    wait_for_group_members(settings, 2)
    request_id = uuid.uuid4()
    events = [
        requested(request_id, row, image_host.add(f"/s{row}.jpg", jpeg_bytes(200, 150, seed=row)))
        for row in range(1, 25)
    ]
    send(settings, [(str(e.image_id), e.model_dump_json().encode()) for e in events])  # spread over partitions
    processed = read_topic(settings, settings.topic_processed)

    results = results_for(
        processed.wait_for(
            lambda got: {r.image_id for r in results_for(got, request_id)} == {e.image_id for e in events}
        ),
        request_id,
    )

    assert {r.status for r in results} == {"processed"}
    stored = {name: {p.stem for p in (tmp_path / name / str(request_id)).glob("*.jpg")} for name in ("first", "second")}
    assert stored["first"] and stored["second"]
    assert stored["first"] | stored["second"] == {str(e.image_id) for e in events}
    assert first and second


def wait_for_group_members(settings: Settings, count: int, timeout: float = WAIT_SECONDS) -> None:
    """Until the processor group has `count` members, each with partitions assigned."""
    kafka = admin(settings)
    deadline = time.monotonic() + timeout
    while True:
        try:
            group = kafka.describe_consumer_groups([settings.processor_group])[settings.processor_group].result(10)
            if len(group.members) == count and all(m.assignment.topic_partitions for m in group.members):
                return
        except KafkaException:  # the group's coordinator is still being found
            pass
        assert time.monotonic() < deadline, f"the group has {len(group.members)} members, not {count}"
        time.sleep(0.1)


def test_a_small_job_is_completed_ahead_of_a_large_backlog(make_settings, image_host, read_topic, workers):
    settings = make_settings(processor_max_in_flight=8)
    image_host.delay = 0.05
    backlog_id, small_id = uuid.uuid4(), uuid.uuid4()
    backlog_image = image_host.add("/backlog.jpg", jpeg_bytes(200, 150, seed=30))
    backlog = [requested(backlog_id, row, backlog_image) for row in range(1, 301)]
    send_to(settings, settings.topic_requested_bulk, 0, backlog[:150])
    send_to(settings, settings.topic_requested_bulk, 1, backlog[150:])
    with ImageHost() as other_host:  # another customer's images
        small = requested(small_id, 1, other_host.add("/small.jpg", jpeg_bytes(200, 150, seed=31)))
        processed = read_topic(settings, settings.topic_processed)
        workers(settings)
        processed.wait_for(lambda got: len(results_for(got, backlog_id)) >= 10)  # the backlog is being worked on
        send_events(settings, [small])  # the normal lane

        messages = processed.wait_for(lambda got: len(results_for(got, small_id)) == 1)
    assert results_for(messages, small_id)[0].status == "processed"
    assert len(results_for(messages, backlog_id)) < 150  # far from done when the small job was
