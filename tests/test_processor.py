"""The processor's worker against real Kafka, a real HTTP image host and local storage."""
import io
import os
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager

import cloudinary.exceptions
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from PIL import Image

from services.processor.failures import ImageFailure
from services.processor.storage import CloudinaryStorage, LocalStorage, make_storage
from services.processor.worker import run
from shared.events import ImageProcessed, ImageRequested
from shared.kafka import make_producer, produce_and_wait
from shared.settings import REPO_ROOT, Settings
from tests.cloudinary_contract import CloudinaryContractServer
from tests.support.images import jpeg_bytes, png_bytes

WAIT_SECONDS = 60


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings(fetch_attempts=2, fetch_read_timeout=2.0, public_base_url="http://files.test")


@contextmanager
def running_worker(settings: Settings):
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(settings, stop), name="processor", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive(), "the worker did not stop within 30 s of the stop event"


class TopicReader:
    """Reads a whole topic from the beginning, without a consumer group."""

    def __init__(self, settings: Settings, topic: str):
        self.messages = []
        self.consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "unused"})
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(settings.topic_partitions)])

    def wait_for(self, done, timeout: float = WAIT_SECONDS) -> list:
        deadline = time.monotonic() + timeout
        while not done(self.messages):
            assert time.monotonic() < deadline, f"timed out; read so far: {[m.value() for m in self.messages]}"
            message = self.consumer.poll(0.2)
            if message is not None and not message.error():
                self.messages.append(message)
        return self.messages

    def close(self):
        self.consumer.close()


@pytest.fixture
def read_topic():
    readers = []

    def make(settings: Settings, topic: str) -> TopicReader:
        readers.append(TopicReader(settings, topic))
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
    send(settings, [(str(e.request_id), e.model_dump_json().encode()) for e in events])


def results_for(messages, request_id: uuid.UUID) -> list[ImageProcessed]:
    results = [ImageProcessed.model_validate_json(m.value()) for m in messages]
    return [r for r in results if r.request_id == request_id]


def test_images_get_results_and_garbage_goes_to_the_dead_letter_topic(settings, image_host, read_topic):
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

    with running_worker(settings):
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


def test_a_restarted_worker_continues_after_what_it_acknowledged(settings, image_host, read_topic):
    request_id = uuid.uuid4()
    url = image_host.add("/a.jpg", jpeg_bytes(320, 240, seed=3))
    first, second = requested(request_id, 1, url), requested(request_id, 2, url)  # same key: same partition, in order
    processed = read_topic(settings, settings.topic_processed)

    send_events(settings, [first])
    with running_worker(settings):
        processed.wait_for(lambda got: len(results_for(got, request_id)) == 1)
    send_events(settings, [second])
    with running_worker(settings):
        messages = processed.wait_for(lambda got: any(r.image_id == second.image_id for r in results_for(got, request_id)))

    # Had the first worker not committed, the second would have processed `first` again before `second`.
    assert [r.image_id for r in results_for(messages, request_id)] == [first.image_id, second.image_id]


def test_a_storage_outage_delays_images_without_losing_or_reordering_them(settings, image_host, read_topic):
    settings.storage_dir.parent.mkdir(parents=True, exist_ok=True)
    settings.storage_dir.write_text("a file where the storage directory should be")  # every save fails
    request_id = uuid.uuid4()
    url = image_host.add("/b.jpg", jpeg_bytes(320, 240, seed=4))
    events = [requested(request_id, 1, url), requested(request_id, 2, url)]
    processed = read_topic(settings, settings.topic_processed)
    send_events(settings, events)

    with running_worker(settings):
        with pytest.raises(AssertionError, match="timed out"):
            processed.wait_for(lambda got: len(results_for(got, request_id)) > 0, timeout=6)
        settings.storage_dir.unlink()  # storage is back
        messages = processed.wait_for(lambda got: len(results_for(got, request_id)) >= 2)

    results = results_for(messages, request_id)
    assert [r.image_id for r in results] == [e.image_id for e in events]
    assert all(r.status == "processed" for r in results)
    assert all((settings.storage_dir / f"{request_id}/{e.image_id}.jpg").is_file() for e in events)


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


@pytest.fixture
def cloudinary_server():
    with CloudinaryContractServer("demo-cloud", "123456789012345", "right-secret") as server:
        yield server


def cloudinary_settings(server: CloudinaryContractServer, **overrides) -> Settings:
    values = dict(
        storage="cloudinary", cloudinary_url=server.cloudinary_url(), cloudinary_upload_prefix=server.base_url,
        cloudinary_folder="imgpipe-test",
    )
    values.update(overrides)
    return Settings(**values)


def test_cloudinary_storage_uploads_with_a_valid_signature(cloudinary_server):
    storage = make_storage(cloudinary_settings(cloudinary_server))
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
    storage = CloudinaryStorage(cloudinary_settings(cloudinary_server, cloudinary_url=cloudinary_server.cloudinary_url("wrong")))
    with pytest.raises(ImageFailure) as caught:
        storage.save("job-1/image-1.jpg", jpeg_bytes(64, 48, seed=5), "image/jpeg")
    assert caught.value.code == "storage_error"
    assert "Invalid Signature" in caught.value.message
    assert cloudinary_server.uploads == {}


def test_cloudinary_outage_is_raised_for_a_retry_not_a_failed_image(cloudinary_server):
    storage = CloudinaryStorage(cloudinary_settings(cloudinary_server))
    cloudinary_server.fail_with_status = 500
    with pytest.raises(cloudinary.exceptions.Error) as caught:
        storage.save("job-1/image-1.jpg", jpeg_bytes(64, 48, seed=5), "image/jpeg")
    assert not isinstance(caught.value, ImageFailure)


def test_cloudinary_settings_are_checked_at_start():
    with pytest.raises(ValueError, match="CLOUDINARY_URL"):
        CloudinaryStorage(Settings(storage="cloudinary"))
    with pytest.raises(ValueError, match="CLOUDINARY_URL"):
        CloudinaryStorage(Settings(storage="cloudinary", cloudinary_url="https://key:secret@demo"))
