"""Session fixtures: real Kafka and PostgreSQL on 127.0.0.1, started here unless
KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL name running ones; and the three services as processes."""
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse, urlunparse

import httpx
import psycopg
import pytest

from deploy.local.kafka import KafkaBroker
from deploy.local.postgres import LocalPostgres, ensure_installed
from deploy.local.services import ServiceGroup
from deploy.local.stack import wait_for_api
from shared.db import migrate
from shared.kafka import ensure_topics
from shared.settings import Settings
from tests.support.http_servers import ImageHost


# Every test server is on 127.0.0.1, which the services refuse to reach by default; the tests that
# check that refusal say allow_private_addresses=False themselves.
os.environ["IMGPIPE_ALLOW_PRIVATE_ADDRESSES"] = "true"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Infrastructure:
    kafka_bootstrap_servers: str
    database_url: str


@pytest.fixture(scope="session")
def infra(tmp_path_factory):
    kafka_servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    database_url = os.environ.get("DATABASE_URL")
    started = []

    def start_kafka():
        broker = KafkaBroker(tmp_path_factory.mktemp("kafka"), port=free_port(), controller_port=free_port())
        broker.start()
        started.append(broker)
        return broker.bootstrap_servers

    def start_postgres():
        ensure_installed()
        postgres = LocalPostgres(tmp_path_factory.mktemp("postgres"), port=free_port(), fast_unsafe=True)
        postgres.start()
        started.append(postgres)
        postgres.create_database("imgpipe_test")
        return postgres.url("imgpipe_test")

    def fresh_database(server_url: str) -> str:
        """A database of this session's own on a server named by DATABASE_URL, so that other
        sessions' jobs and webhook deliveries on the same server never meet this one's."""
        name = f"imgpipe_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return urlunparse(urlparse(server_url)._replace(path=f"/{name}"))

    with ThreadPoolExecutor(2) as pool:
        kafka_future = None if kafka_servers else pool.submit(start_kafka)
        database_future = None if database_url else pool.submit(start_postgres)
        kafka_servers = kafka_future.result() if kafka_future else kafka_servers
        database_url = database_future.result() if database_future else fresh_database(database_url)
    migrate(database_url)
    yield Infrastructure(kafka_servers, database_url)
    for component in reversed(started):
        component.stop()


@pytest.fixture
def make_settings(infra, tmp_path):
    """Settings on the test infrastructure with topics and consumer groups of their own,
    so that tests sharing the broker never consume each other's events."""

    def make(**overrides) -> Settings:
        suffix = uuid.uuid4().hex[:8]
        values = dict(
            kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
            database_url=infra.database_url,
            topic_requested=f"image.requested.{suffix}",
            topic_processed=f"image.processed.{suffix}",
            topic_dead_letter=f"image.requested.dlq.{suffix}",
            topic_partitions=4,
            processor_group=f"processor-{suffix}",
            notifier_group=f"notifier-{suffix}",
            storage_dir=tmp_path / "images",
        )
        values.update(overrides)
        settings = Settings(**values)
        ensure_topics(settings)
        return settings

    return make


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a service process these settings."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"IMGPIPE_{name.upper()}"] = str(value)
    return env


@pytest.fixture
def running_stack(make_settings, tmp_path):
    """The three services as real processes on the test infrastructure; yields (settings, services, api)."""
    port = free_port()
    settings = make_settings(
        api_port=port, public_base_url=f"http://127.0.0.1:{port}", topic_partitions=12, fetch_attempts=2
    )
    services = ServiceGroup(settings_env(settings), tmp_path / "logs", processors=2)
    services.start()
    try:
        wait_for_api(settings.public_base_url)
        with httpx.Client(base_url=settings.public_base_url, timeout=30) as api:
            yield settings, services, api
    finally:
        services.stop()
        for name in services.names:
            print(f"--- {name} log (tail) ---\n{services.log_tail(name)}")


@pytest.fixture
def image_host():
    """An HTTP server on 127.0.0.1 serving the images a test adds to it."""
    with ImageHost() as host:
        yield host
