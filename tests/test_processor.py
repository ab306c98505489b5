"""The processor's worker against real Kafka, a real HTTP image host and local or Cloudinary storage."""
import logging
import os
import subprocess
import sys
import time
import uuid

import cloudinary.exceptions
import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
from PIL import Image

from services.processor.failures import ImageFailure, StorageUnavailable
from services.processor.storage import CloudinaryStorage, LocalStorage, make_storage
from services.processor.worker import run
from shared.events import ImageProcessed, ImageRequested
from shared.kafka import make_producer, produce_and_wait
from shared.settings import REPO_ROOT, Settings
from tests.cloudinary_contract import CloudinaryContractServer
from tests.support.images import jpeg_bytes, png_bytes
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
    assert photo.format == "JPEG" and photo.bytes_in == len(jpeg) and photo.bytes_out < 0.7 * len(jpeg)
    key = f"{request_id}/{events[0].image_id}.jpg"
    assert photo.output_url == f"http://files.test/files/{key}"
    with Image.open(settings.storage_dir / key) as stored:
        assert (stored.format, stored.size) == ("JPEG", (640, 480))
    assert (settings.storage_dir / key).stat().st_size == photo.bytes_out

    logo = results[events[1].image_id]
    assert logo.status == "processed" and logo.format == "PNG" and logo.bytes_out <= logo.bytes_in
    with Image.open(settings.storage_dir / f"{request_id}/{events[1].image_id}.png") as stored:
        assert (stored.format, stored.mode, stored.size) == ("PNG", "RGBA", (320, 240))

    missing = results[events[2].image_id]
    assert missing.status == "failed" and missing.error.code == "http_404" and missing.output_url is None

    assert sorted((m.key(), m.value()) for m in dead) == sorted((k.encode(), v) for k, v in garbage)
    for message in dead:
        headers = dict(message.headers())
        assert headers["error"].startswith(b"not an ImageRequested event")
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
    results = {r.image_id: r for r in results_for(processed.wait_for(
        lambda got: len({r.image_id for r in results_for(got, request_id)}) == 4), request_id)}

    assert results[bad.image_id].status == "failed"
    assert results[bad.image_id].error.code == "internal_error"
    assert "KeyError" in results[bad.image_id].error.message
    assert storage.broken_saves == settings.image_max_attempts == 3
    assert [results[e.image_id].status for e in good] == ["processed"] * 3


def admin(settings: Settings) -> AdminClient:
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})


def set_topic_config(settings: Settings, topic: str, name: str, value: str) -> None:
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)])
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
        committed = committed_offsets(admin(settings), settings.processor_group, settings.topic_requested)
        assert all(offset < 0 for offset in committed.values()), committed
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
        assert result.output_url.startswith(f"{server.base_url}/demo-cloud/image/upload/v")
        assert result.output_url.endswith(f"/imgpipe-test/{request_id}/{result.image_id}.jpg")


def test_the_service_entry_point_tunes_pillow_before_importing_it():
    env = {k: v for k, v in os.environ.items() if k != "PILLOW_BLOCKS_MAX"}
    code = "import services.processor.__main__; from PIL import Image; print(Image.core.get_blocks_max())"
    output = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
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
        storage="cloudinary", cloudinary_url=server.cloudinary_url(), cloudinary_upload_prefix=server.base_url,
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
    settings = make_test_settings(**cloudinary_fields(cloudinary_server, cloudinary_url=cloudinary_server.cloudinary_url("wrong")))
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
