"""Secured Kafka: the three services over SASL/SCRAM and over TLS on brokers of this module's own, a wrong
password or an untrusted broker certificate stopping each service at start with one clear line, and the
password in no log."""

import uuid

import pytest
from pydantic import SecretStr, ValidationError

from deploy.local.kafka import KafkaBroker, ScramListener, TlsListener
from deploy.local.probe import free_port
from shared.kafka import KafkaUnavailable, check_kafka
from testbed.images import jpeg_bytes
from tests.support.kafka import wait_until_consumed
from tests.support.settings import make_test_settings
from tests.support.stack import exits_at_start, service_logs, upload, url_csv, wait_for_status

USER = "imgpipe"
PASSWORD = f"scram-{uuid.uuid4().hex}"  # unique, so that finding it in a log can only mean a leak
MECHANISM = "SCRAM-SHA-256"


@pytest.fixture(scope="module")
def scram_broker(tmp_path_factory):
    """A broker with a SASL_PLAINTEXT listener that knows USER by PASSWORD (created at format time)."""
    broker = KafkaBroker(
        tmp_path_factory.mktemp("kafka-scram"),
        port=free_port(),
        controller_port=free_port(),
        scram=ScramListener(free_port(), {USER: PASSWORD}, MECHANISM),
    )
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    """A broker with an SSL listener whose certificate (self-signed, for 127.0.0.1) clients must trust."""
    directory = tmp_path_factory.mktemp("kafka-tls")
    broker = KafkaBroker(
        directory / "kafka",
        port=free_port(),
        controller_port=free_port(),
        tls=TlsListener(free_port(), directory / "tls"),
    )
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def tls(tls_broker):
    """Settings that reach tls_broker over TLS, checking its certificate."""
    return dict(
        kafka_bootstrap_servers=f"127.0.0.1:{tls_broker.tls.port}",
        kafka_security_protocol="SSL",
        kafka_ssl_ca_location=tls_broker.tls.ca_file,
    )


@pytest.fixture
def sasl(scram_broker):
    """Settings that reach scram_broker over SASL/SCRAM as USER."""
    return dict(
        kafka_bootstrap_servers=f"127.0.0.1:{scram_broker.scram.port}",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism=MECHANISM,
        kafka_sasl_username=USER,
        kafka_sasl_password=PASSWORD,
    )


def assert_a_job_completes(stack, image_host, receivers, name: str) -> None:
    """A three-image job through the stack's services, then the notifier's committed offsets read by a
    client of the tests' own with the same (secured) settings."""
    webhooks = receivers()
    urls = [image_host.add(f"/{name}{n}.jpg", jpeg_bytes(320, 240, n)) for n in range(3)]

    request_id = upload(stack.api, url_csv(urls), webhooks.url)

    [post] = webhooks.wait_for(1)
    assert post.json()["request_id"] == request_id and post.json()["processed_images"] == 3
    status = wait_for_status(stack.api, request_id, lambda s: s["status"] == "completed")
    assert status["counts"]["processed"] == 3
    settings = stack.settings
    wait_until_consumed(settings, settings.notifier_group, [settings.topic_processed])


def test_a_job_goes_through_the_three_services_over_sasl_scram(start_stack, sasl, image_host, receivers, tmp_path):
    stack = start_stack(processors=1, **sasl)
    assert_a_job_completes(stack, image_host, receivers, "s")
    stack.services.stop()
    logs = service_logs(tmp_path / "logs")
    assert set(logs) == {"api", "notifier", "processor-1"}
    assert not [name for name, text in logs.items() if PASSWORD in text]


def test_a_job_goes_through_the_three_services_over_tls(start_stack, tls, image_host, receivers):
    stack = start_stack(processors=1, **tls)
    assert_a_job_completes(stack, image_host, receivers, "t")


def test_a_broker_certificate_nobody_vouched_for_stops_every_service_at_start(
    make_settings, tls, own_database, tmp_path
):
    settings = make_settings(**tls, database_url=own_database, api_port=free_port())  # creates the topics
    stranger = TlsListener(0, tmp_path / "another-ca")  # a certificate that did not sign the broker's
    stranger.create()
    untrusting = settings.model_copy(update={"kafka_ssl_ca_location": stranger.ca_file})

    exits = exits_at_start(untrusting, tmp_path / "logs")

    assert exits == {"api": 1, "notifier": 1, "processor-1": 1}
    expected = f"cannot start: Kafka at {tls['kafka_bootstrap_servers']}: TLS failed (check kafka_ssl_ca_location)"
    for name, text in service_logs(tmp_path / "logs").items():
        assert expected in text, f"{name} log:\n{text}"
        assert "Traceback" not in text, f"{name} log:\n{text}"


def test_a_wrong_password_stops_every_service_at_start_with_one_clear_line(make_settings, sasl, own_database, tmp_path):
    settings = make_settings(**sasl, database_url=own_database, api_port=free_port())  # creates the topics
    wrong = settings.model_copy(update={"kafka_sasl_password": SecretStr(f"not-{PASSWORD}")})

    exits = exits_at_start(wrong, tmp_path / "logs")

    assert exits == {"api": 1, "notifier": 1, "processor-1": 1}
    expected = (
        f"cannot start: Kafka at {sasl['kafka_bootstrap_servers']} refused the SASL authentication "
        f"of user '{USER}' ({MECHANISM})"
    )
    for name, text in service_logs(tmp_path / "logs").items():
        assert expected in text, f"{name} log:\n{text}"
        assert "Traceback" not in text and "rdkafka" not in text, f"{name} log:\n{text}"
        assert PASSWORD not in text


def test_the_start_check_names_a_client_without_sasl_on_a_sasl_listener(make_settings, sasl):
    settings = make_settings(**sasl)
    plaintext = settings.model_copy(update={"kafka_security_protocol": "PLAINTEXT"})
    with pytest.raises(KafkaUnavailable, match="did not answer within 2s: .*see kafka_security_protocol"):
        check_kafka(plaintext, timeout=2)


def test_sasl_without_a_user_is_refused_without_echoing_the_settings():
    password = f"pw-{uuid.uuid4().hex[:6]}"  # short: pydantic would cut a long value's middle out of its message
    with pytest.raises(ValidationError, match="needs kafka_sasl_username and kafka_sasl_password") as refused:
        make_test_settings(kafka_security_protocol="SASL_SSL", kafka_sasl_password=password)
    assert password not in str(refused.value)
