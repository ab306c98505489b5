"""Faults of the infrastructure on real processes, in the middle of a job: one broker of a three-node
Kafka cluster SIGKILLed, PostgreSQL stopped and started, the single broker stopped and started. Each
time the job completes, every image is recorded once (database rows and counts, output CSV, webhook
payload; the results topic may hold repeats, which change nothing) and exactly one webhook arrives.

"The middle" is real: the image host answers each download after IMAGE_DELAY and the processor
downloads at most DOWNLOADS_AT_ONCE from it, so a job of IMAGES images lasts about
IMAGES / DOWNLOADS_AT_ONCE * IMAGE_DELAY seconds. The fault comes once a third of them are done, and
each test checks that the job was not done when it came."""

import csv
import io
import os
import signal

import psycopg
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from deploy.local.kafka import KafkaBroker, KafkaCluster
from deploy.local.postgres import LocalPostgres
from deploy.local.probe import free_port
from shared.db import migrate
from testbed.http_servers import ImageHost, WebhookReceiver
from testbed.images import jpeg_bytes
from tests.support.kafka import committed_offsets, end_offsets, wait_until_consumed
from tests.support.stack import (
    CRASH_TEST_SETTINGS,
    JOB_TIMEOUT,
    Stack,
    assert_settled_with_one_webhook,
    upload,
    url_csv,
    wait_for_status,
)

IMAGES = 24
IMAGE_DELAY = 0.5
DOWNLOADS_AT_ONCE = 2
FAULT_SETTINGS = dict(CRASH_TEST_SETTINGS, fetch_per_host_limit=DOWNLOADS_AT_ONCE, compress_processes=0)


@pytest.fixture(scope="module")
def kafka_cluster(tmp_path_factory):
    ports = [free_port() for _ in range(6)]
    cluster = KafkaCluster(tmp_path_factory.mktemp("kafka-cluster"), ports[:3], ports[3:], partitions=12)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(kafka_cluster) -> KafkaCluster:
    """The module's three-node cluster, every node running (a test before may have killed one)."""
    return kafka_cluster.start()


@pytest.fixture
def own_kafka(tmp_path_factory):
    """A single broker for one test to stop and start (the session's broker is everyone's)."""
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"), port=free_port(), controller_port=free_port())
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def own_postgres(tmp_path_factory):
    """A PostgreSQL server for one test to stop and start, with a migrated database `imgpipe`."""
    postgres = LocalPostgres(tmp_path_factory.mktemp("postgres"), port=free_port(), fast_unsafe=True)
    postgres.start()
    postgres.create_database("imgpipe")
    migrate(postgres.url("imgpipe"))
    yield postgres
    postgres.remove()


def slow_images(image_host: ImageHost) -> list[str]:
    image_host.delay = IMAGE_DELAY
    return [image_host.add(f"/fault{n}.jpg", jpeg_bytes(200, 150, n)) for n in range(IMAGES)]


def done(status: dict) -> int:
    return status["counts"]["processed"] + status["counts"]["failed"]


def wait_for_the_middle(stack: Stack, request_id: str) -> None:
    wait_for_status(stack.api, request_id, lambda status: done(status) >= IMAGES // 3)


def assert_not_done(stack: Stack, request_id: str) -> None:
    """The job was still in progress: the fault came in its middle."""
    status = stack.api.get(f"/status/{request_id}").json()
    assert done(status) < IMAGES, f"the job was done before the fault: {status['counts']}"


def results_partition(admin: AdminClient, topic: str) -> int:
    """The one partition of the results topic that holds the job's results (they are keyed by request id)."""
    [partition] = [p for p, end in end_offsets(admin, topic).items() if end > 0]
    return partition


def assert_completed_once(stack: Stack, request_id: str, urls: list[str], receiver: WebhookReceiver) -> None:
    receiver.wait_for(1, JOB_TIMEOUT)
    assert_settled_with_one_webhook(stack, request_id, receiver)  # every message handled; one webhook, one attempt
    with psycopg.connect(stack.settings.database_url) as conn:
        job = conn.execute(
            "SELECT status, total_images, processed_images, failed_images FROM processing_jobs WHERE job_id = %s",
            [request_id],
        ).fetchone()
        images = conn.execute(
            "SELECT input_url, status, output_url FROM images WHERE job_id = %s ORDER BY row_number, position",
            [request_id],
        ).fetchall()
        deliveries = conn.execute("SELECT count(*) FROM webhook_deliveries WHERE job_id = %s", [request_id]).fetchone()
    assert job == ("completed", IMAGES, IMAGES, 0)
    assert [(url, "processed") for url in urls] == [(input_url, status) for input_url, status, _ in images]
    output_urls = [output_url for _, _, output_url in images]
    assert len(set(output_urls)) == IMAGES and None not in output_urls
    assert deliveries == (1,)

    lines = list(csv.reader(io.StringIO(stack.api.get(f"/output_csv/{request_id}").text)))
    assert lines == [["url", "Output Image Urls"]] + [list(pair) for pair in zip(urls, output_urls, strict=True)]
    [webhook] = receiver.posts_to()
    assert [(i["input_url"], i["output_url"]) for i in webhook.json()["images"]] == list(
        zip(urls, output_urls, strict=True)
    )


def test_one_of_three_brokers_killed_in_the_middle_of_a_job(cluster, start_stack, image_host, receivers):
    stack = start_stack(
        processors=1,
        kafka_bootstrap_servers=cluster.bootstrap_servers,
        kafka_replication_factor=3,
        kafka_min_insync_replicas=2,
        **FAULT_SETTINGS,
    )
    settings, receiver = stack.settings, receivers()
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap_servers})
    for topic in (settings.topic_requested, settings.topic_processed):
        assert {len(p.replicas) for p in admin.list_topics(topic, timeout=10).topics[topic].partitions.values()} == {3}
        config = ConfigResource(ConfigResource.Type.TOPIC, topic)
        assert admin.describe_configs([config])[config].result(10)["min.insync.replicas"].value == "2"
    urls = slow_images(image_host)

    request_id = upload(stack.api, url_csv(urls), receiver.url)
    wait_for_the_middle(stack, request_id)
    # The leader of the job's results partition: the processor's producer and the notifier's consumer
    # lose it and must find the new leader.
    partition = results_partition(admin, settings.topic_processed)
    topic = admin.list_topics(settings.topic_processed, timeout=10).topics[settings.topic_processed]
    victim = next(node for node in cluster.nodes if node.node_id == topic.partitions[partition].leader)
    os.killpg(victim.pid(), signal.SIGKILL)
    assert_not_done(stack, request_id)

    assert_completed_once(stack, request_id, urls, receiver)


def test_postgres_stopped_and_started_in_the_middle_of_a_job(own_postgres, start_stack, image_host, receivers):
    stack = start_stack(processors=1, database_url=own_postgres.url("imgpipe"), **FAULT_SETTINGS)
    settings, receiver = stack.settings, receivers()
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    urls = slow_images(image_host)

    request_id = upload(stack.api, url_csv(urls), receiver.url)
    wait_for_the_middle(stack, request_id)
    assert_not_done(stack, request_id)
    own_postgres.stop()
    # The processor needs no database: it finishes every image meanwhile, and the results wait in Kafka.
    wait_until_consumed(
        settings.kafka_bootstrap_servers,
        settings.processor_group,
        [settings.topic_requested, settings.topic_requested_bulk],
        timeout=JOB_TIMEOUT,
    )
    partition = results_partition(admin, settings.topic_processed)
    committed = committed_offsets(settings, settings.notifier_group, settings.topic_processed)[partition]
    # What the notifier could not record, it did not commit.
    assert committed < end_offsets(admin, settings.topic_processed)[partition]
    own_postgres.start()
    # The pool checks a connection before handing it out: the restart's broken ones are never used.
    assert stack.api.get(f"/status/{request_id}").status_code == 200

    assert_completed_once(stack, request_id, urls, receiver)


def test_the_single_broker_stopped_and_started_in_the_middle_of_a_job(own_kafka, start_stack, image_host, receivers):
    stack = start_stack(processors=1, kafka_bootstrap_servers=own_kafka.bootstrap_servers, **FAULT_SETTINGS)
    receiver = receivers()
    urls = slow_images(image_host)

    request_id = upload(stack.api, url_csv(urls), receiver.url)
    wait_for_the_middle(stack, request_id)
    own_kafka.stop()
    assert_not_done(stack, request_id)  # no result reaches the notifier while the broker is down
    own_kafka.start()

    assert_completed_once(stack, request_id, urls, receiver)
