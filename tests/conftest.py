"""Session fixtures: real Kafka and PostgreSQL on 127.0.0.1, started here unless
KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL name running ones; and the three services as processes."""

import gc
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx
import hypothesis
import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from deploy.local.kafka import KafkaBroker
from deploy.local.postgres import LocalPostgres, database_url, ensure_installed
from deploy.local.probe import free_port
from deploy.local.services import ServiceGroup
from deploy.local.stack import wait_for_api
from shared.db import make_pool, migrate
from shared.kafka import ensure_topics
from shared.settings import Settings
from testbed.http_servers import ImageHost, WebhookReceiver
from tests.support.jobs import Jobs
from tests.support.settings import make_test_settings, own_names, service_env
from tests.support.stack import Stack

# Property tests (hypothesis, schemathesis) draw the same examples on every run, so CI is deterministic and
# a failure is seen again by rerunning; HYPOTHESIS_PROFILE=explore searches afresh with more examples.
# No deadline: on a shared 2-core machine a slow example is not a failure.
hypothesis.settings.register_profile("deterministic", derandomize=True, database=None, deadline=None, print_blob=True)
hypothesis.settings.register_profile("explore", max_examples=1000, database=None, deadline=None, print_blob=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@dataclass
class Infrastructure:
    kafka_bootstrap_servers: str
    database_url: str  # the session's migrated database, shared by the tests that only read and write rows
    server_url: str  # the PostgreSQL server's maintenance database
    template: str  # a migrated database nobody connects to, copied by new_database()

    def new_database(self) -> str:
        """A migrated database of one's own (a copy of the template); drop it with drop_database()."""
        name = f"imgpipe_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(self.template))
            )
        return database_url(self.server_url, name)

    def drop_database(self, url: str) -> None:
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(urlparse(url).path.lstrip("/"))
                )
            )


@pytest.fixture(scope="session")
def infra(tmp_path_factory):
    kafka_servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    server_url = os.environ.get("DATABASE_URL")
    started: list[KafkaBroker | LocalPostgres] = []

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
        return postgres.url("postgres")

    try:
        with ThreadPoolExecutor(2) as pool:
            kafka_future = None if kafka_servers else pool.submit(start_kafka)
            database_future = None if server_url else pool.submit(start_postgres)
            kafka_servers = kafka_future.result() if kafka_future else kafka_servers
            server_url = database_future.result() if database_future else server_url
    except BaseException:  # one of them failed: do not leave the other running
        _shut_down(started)
        raise
    # each came from the environment or was just started
    assert kafka_servers is not None and server_url is not None

    # Databases of this session's own, also on a server named by DATABASE_URL, so that other
    # sessions' jobs and webhook deliveries on the same server never meet this one's.
    suffix = uuid.uuid4().hex[:12]
    template, shared_database = f"imgpipe_template_{suffix}", f"imgpipe_test_{suffix}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        for name in (template, shared_database):
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    for name in (template, shared_database):
        migrate(database_url(server_url, name))
    infrastructure = Infrastructure(kafka_servers, database_url(server_url, shared_database), server_url, template)
    yield infrastructure
    # Kafka clients the tests left to the garbage collector (in reference cycles, e.g. an app and its
    # dispatcher) go now, while their brokers still answer: later, they would print connection errors.
    gc.collect()
    for name in (template, shared_database):
        infrastructure.drop_database(database_url(server_url, name))
    _shut_down(started)


def _shut_down(components) -> None:
    """Stop what the session started; a PostgreSQL cluster is also deleted (as root it lives outside
    pytest's temporary folders, in /var/tmp/imgpipe-postgres, so nothing else would delete it)."""
    for component in reversed(components):
        if isinstance(component, LocalPostgres):
            component.remove()
        else:
            component.stop()


@pytest.fixture
def db(settings):
    """A connection to the database of the test module's own `settings` fixture (autocommit, dict rows)."""
    with psycopg.connect(settings.database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def make_settings(infra, tmp_path):
    """Settings on the test infrastructure with topics and consumer groups of their own,
    so that tests sharing the broker never consume each other's events. Every test server is on
    127.0.0.1, which the services refuse to reach by default: tests that check that refusal pass
    allow_private_addresses=False."""

    def make(**overrides) -> Settings:
        values = dict(
            kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
            database_url=infra.database_url,
            **own_names(),
            topic_partitions=4,
            health_port=0,  # off unless a test asks (start_stack gives each service a free port)
            storage_dir=tmp_path / "images",
            allow_private_addresses=True,
            kafka_auto_commit_interval_ms=200,  # the tests wait for committed offsets
        )
        values.update(overrides)
        settings = make_test_settings(**values)
        ensure_topics(settings)
        return settings

    return make


@pytest.fixture(scope="module")
def module_database(infra):
    """A migrated database for one test module alone (for modules sharing one API over their tests)."""
    url = infra.new_database()
    yield url
    infra.drop_database(url)


@pytest.fixture
def own_database(infra):
    """A migrated database for this test alone (for tests that run a notifier or the whole stack)."""
    url = infra.new_database()
    yield url
    infra.drop_database(url)


@pytest.fixture
def start_stack(make_settings, own_database, tmp_path):
    """start_stack(processors=2, env_overrides=None, **settings) runs the three services as real processes on the test
    infrastructure and a database of the test's own; they are stopped after the test."""
    with ExitStack() as cleanup:

        def start(processors: int = 2, env_overrides: dict[str, dict[str, str]] | None = None, **overrides) -> Stack:
            """env_overrides: service name -> extra variables for that service alone (e.g. IMGPIPE_CRASH_AT)."""
            port = free_port()
            settings = make_settings(
                **{
                    "api_port": port,
                    "public_base_url": f"http://127.0.0.1:{port}",
                    "topic_partitions": 12,
                    "fetch_attempts": 2,
                    "database_url": own_database,
                    **overrides,
                }
            )
            services = ServiceGroup(service_env(settings), tmp_path / "logs", processors=processors)
            services.env_overrides.update(env_overrides or {})
            services.health_ports = {name: free_port() for name in services.health_ports}  # never a busy 8081
            cleanup.enter_context(_running(services))
            wait_for_api(settings.public_base_url)
            api = cleanup.enter_context(httpx.Client(base_url=settings.public_base_url, timeout=30))
            return Stack(settings, services, api)

        yield start


@contextmanager
def _running(services: ServiceGroup):
    services.start()
    try:
        yield services
    finally:
        services.stop()
        for name in services.names:
            print(f"--- {name} log (tail) ---\n{services.log_tail(name)}")


@pytest.fixture
def running_stack(start_stack) -> Stack:
    return start_stack()


@pytest.fixture
def pool(own_database):
    """A connection pool on a database of this test's own: no other test's jobs or deliveries in it."""
    pool = make_pool(own_database)
    yield pool
    pool.close()


@pytest.fixture
def jobs(pool) -> Jobs:
    return Jobs(pool)


@pytest.fixture
def receivers():
    """receivers(**options) starts a WebhookReceiver on 127.0.0.1; all are stopped after the test."""
    with ExitStack() as running:
        yield lambda **options: running.enter_context(WebhookReceiver(**options))


@pytest.fixture
def image_host():
    """An HTTP server on 127.0.0.1 serving the images a test adds to it."""
    with ImageHost() as host:
        yield host
