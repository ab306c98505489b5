"""Health, readiness and Prometheus metrics of the three services, read over real HTTP from real
processes (and the consumer lag from a real consumer's librdkafka statistics)."""

import uuid
from urllib.parse import urlsplit, urlunsplit

import httpx
from confluent_kafka import TopicPartition
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from deploy.local.probe import free_port
from deploy.local.services import ServiceGroup
from deploy.local.stack import wait_for_api
from shared.health import NOT_STARTED
from shared.kafka import make_consumer, make_producer, produce_and_wait
from shared.metrics import CONSUMER_LAG
from shared.offsets import OffsetTracker
from testbed.images import jpeg_bytes
from tests.support.scrape import scrape, total, wait_for_answer, wait_until
from tests.support.settings import service_env
from tests.support.stack import JOB_TIMEOUT, all_images, assert_settled_with_one_webhook, upload, url_csv
from tests.support.tcp_proxy import TcpProxy


def health_url(services: ServiceGroup, name: str) -> str:
    return f"http://127.0.0.1:{services.health_ports[name]}"


def test_each_service_counts_what_a_job_did_and_is_ready(start_stack, image_host, receivers):
    stack, webhooks = start_stack(), receivers()
    jpegs = [jpeg_bytes(400, 300, seed) for seed in (1, 2)]
    urls = [image_host.add(f"/m{n}.jpg", body) for n, body in enumerate(jpegs)] + [image_host.base_url + "/gone.jpg"]
    refused = stack.api.post("/upload", files={"file": ("job.csv", "name\nno urls here\n", "text/csv")})
    assert refused.json()["error"]["code"] == "invalid_csv"

    request_id = upload(stack.api, url_csv(urls), webhooks.url)
    webhooks.wait_for(1, JOB_TIMEOUT)
    assert_settled_with_one_webhook(stack, request_id, webhooks)
    _, images = all_images(stack.api, request_id)

    api = scrape(stack.settings.public_base_url)
    assert api.value("imgpipe_uploads_total", outcome="accepted") == 1
    assert api.value("imgpipe_uploads_total", outcome="invalid_csv") == 1
    assert api.value("imgpipe_dispatch_leading") == 1
    assert api.value("imgpipe_dispatch_images_released_total") == 3
    assert api.value("imgpipe_dispatch_first_release_seconds_count") == 1
    assert api.value("imgpipe_dispatch_window_images") >= stack.settings.dispatch_window_min_images
    wait_until(
        lambda: scrape(stack.settings.public_base_url).value("imgpipe_dispatch_images_released_not_finished") == 0,
        what="the dispatcher seeing every released image finished",
    )
    assert scrape(stack.settings.public_base_url).matching("imgpipe_dispatch_images_waiting") == {}  # no job waits

    processors = [health_url(stack.services, name) for name in stack.services.names if name.startswith("processor")]
    assert total(processors, "imgpipe_images_processed_total") == 2
    assert total(processors, "imgpipe_images_encoded_total", codec="turbojpeg") == 2  # JPEGs: the fast path
    assert total(processors, "imgpipe_images_failed_total", reason="http_404") == 1
    assert sum(sum(scrape(url).matching("imgpipe_images_failed_total").values()) for url in processors) == 1
    assert total(processors, "imgpipe_downloaded_bytes_total") == sum(map(len, jpegs))
    assert total(processors, "imgpipe_stored_bytes_total") == sum(i["bytes_out"] for i in images if i["bytes_out"])
    assert total(processors, "imgpipe_stage_seconds_count", stage="download") == 3  # the 404 was one download
    assert total(processors, "imgpipe_stage_seconds_count", stage="compress") == 2
    assert total(processors, "imgpipe_stage_seconds_count", stage="store") == 2
    assert total(processors, "imgpipe_images_in_flight") == 0

    notifier = scrape(health_url(stack.services, "notifier"))
    assert notifier.value("imgpipe_results_applied_total") == 3
    assert notifier.value("imgpipe_jobs_completed_total") == 1
    assert notifier.value("imgpipe_webhook_attempts_total", outcome="delivered") == 1
    assert sum(notifier.matching("imgpipe_webhook_attempts_total").values()) == 1

    # Every partition is reported by the member holding it, and nothing is left to do.
    settings = stack.settings
    request_partitions = {
        (topic, str(p))
        for topic in (settings.topic_requested, settings.topic_requested_bulk)
        for p in range(settings.topic_partitions)
    }
    wait_until(
        lambda: lags(processors, settings.processor_group) == dict.fromkeys(request_partitions, 0),
        what="the processors' lag reported as 0 on every partition",
    )
    processed_partitions = {(settings.topic_processed, str(p)) for p in range(settings.topic_partitions)}
    wait_until(
        lambda: (
            lags([health_url(stack.services, "notifier")], settings.notifier_group)
            == dict.fromkeys(processed_partitions, 0)
        ),
        what="the notifier's lag reported as 0 on every partition",
    )

    for base_url in [settings.public_base_url, health_url(stack.services, "notifier"), *processors]:
        assert httpx.get(f"{base_url}/healthz").status_code == 200
        ready = httpx.get(f"{base_url}/readyz")
        assert ready.status_code == 200, (base_url, ready.text)
        assert ready.json()["status"] == "ready" and set(ready.json()["checks"].values()) == {"ok"}
    assert set(httpx.get(f"{settings.public_base_url}/readyz").json()["checks"]) == {"postgresql", "kafka"}
    assert set(httpx.get(f"{processors[0]}/readyz").json()["checks"]) == {"kafka", "consumer"}
    assert set(httpx.get(f"{health_url(stack.services, 'notifier')}/readyz").json()["checks"]) == {
        "kafka",
        "postgresql",
        "consumer",
    }


def lags(base_urls: list[str], group: str) -> dict[tuple[str, str], float]:
    found = {}
    for url in base_urls:
        for pairs, value in scrape(url).matching("imgpipe_consumer_lag", group=group).items():
            labels = dict(pairs)
            found[(labels["topic"], labels["partition"])] = value
    return found


def test_consumer_lag_is_the_end_of_a_partition_minus_the_committed_offset(make_settings):
    settings = make_settings(topic_partitions=1)
    topic, group = settings.topic_processed, f"lag-{uuid.uuid4().hex[:8]}"
    produce_and_wait(make_producer(settings), topic, [(b"key", b"value")] * 10)
    consumer = make_consumer(
        settings,
        group,
        [topic],
        OffsetTracker(),
        **{**CONSUMER_LAG.consumer_config(group), "statistics.interval.ms": 500},
    )
    try:

        def lag_seen() -> float | None:
            consumer.poll(0.2)  # serves the statistics callback
            families = text_string_to_metric_families(generate_latest().decode())
            for sample in (s for family in families for s in family.samples if s.name == "imgpipe_consumer_lag"):
                if sample.labels == {"group": group, "topic": topic, "partition": "0"}:
                    return sample.value
            return None

        wait_until(lambda: lag_seen() == 10, what="a lag of 10 before anything is committed")
        consumer.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
        wait_until(lambda: lag_seen() == 7, what="a lag of 7 once offset 3 is committed")
    finally:
        consumer.close()


def test_readyz_names_what_a_starting_service_still_waits_for(make_settings, tmp_path):
    """A processor whose Kafka does not answer, and a notifier whose PostgreSQL does not, answer
    /healthz (alive) and /readyz 503 with the reason while their start checks wait (30 s, then exit)."""
    dead_port = free_port()
    no_kafka = make_settings().model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{dead_port}"})
    no_database = make_settings().model_copy(
        update={"database_url": f"postgresql://postgres@127.0.0.1:{dead_port}/imgpipe"}
    )
    processor = ServiceGroup(service_env(no_kafka), tmp_path / "no-kafka", processors=1)
    notifier = ServiceGroup(service_env(no_database), tmp_path / "no-database")
    for group in (processor, notifier):
        group.health_ports = {name: free_port() for name in group.health_ports}
    try:
        processor.start("processor-1")
        notifier.start("notifier")

        ready = wait_for_answer(f"{health_url(processor, 'processor-1')}/readyz")
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert checks["kafka"].startswith("KafkaException") and checks["consumer"] == NOT_STARTED, checks
        assert httpx.get(f"{health_url(processor, 'processor-1')}/healthz").status_code == 200

        checks = wait_until(
            lambda: _checks_once_kafka_answers(health_url(notifier, "notifier")),
            what="the notifier's Kafka check passing",
        )
        assert checks["postgresql"].startswith("OperationalError") and checks["consumer"] == NOT_STARTED, checks
        assert httpx.get(f"{health_url(notifier, 'notifier')}/healthz").status_code == 200
    finally:
        processor.stop()
        notifier.stop()


def _checks_once_kafka_answers(base_url: str) -> dict | None:
    ready = wait_for_answer(f"{base_url}/readyz")
    assert ready.status_code == 503, ready.text
    checks = ready.json()["checks"]
    return checks if checks["kafka"] == "ok" else None


def test_the_api_is_not_ready_while_postgresql_is_unreachable(make_settings, own_database, tmp_path):
    database = urlsplit(own_database)
    with TcpProxy(database.port) as proxy:
        port = free_port()
        through_proxy = urlunsplit(
            database._replace(netloc=database.netloc.replace(f":{database.port}", f":{proxy.port}"))
        )
        settings = make_settings(database_url=through_proxy, api_port=port, public_base_url=f"http://127.0.0.1:{port}")
        services = ServiceGroup(service_env(settings), tmp_path / "logs")
        try:
            services.start("api")
            wait_for_api(settings.public_base_url)
            assert httpx.get(f"{settings.public_base_url}/readyz").status_code == 200

            proxy.cut()
            ready = httpx.get(f"{settings.public_base_url}/readyz", timeout=30)
            assert ready.status_code == 503
            assert ready.json()["status"] == "not_ready" and ready.json()["checks"]["kafka"] == "ok"
            assert ready.json()["checks"]["postgresql"] != "ok"

            proxy.restore()
            wait_until(
                lambda: httpx.get(f"{settings.public_base_url}/readyz", timeout=30).status_code == 200,
                what="the API ready again once PostgreSQL is back",
            )
        finally:
            services.stop()
