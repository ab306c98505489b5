"""Kafka, PostgreSQL and the imgpipe services for the benchmark, started as `make run` starts them
(deploy/local) but in a work folder of the benchmark's own and on free ports.

Kafka and PostgreSQL: started here (Kafka's data wiped at each start, the PostgreSQL cluster reused), or
the running ones named by KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL. Either way the run gets a fresh
database of its own, dropped at the end. Services: an api and a notifier on topics and consumer groups
of their own, and processors that can be restarted with other settings while those two keep running."""

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import psycopg
from confluent_kafka import ConsumerGroupState, KafkaException
from confluent_kafka.admin import AdminClient
from psycopg import sql

from bench.proc import descendants, kill_descendants, listening_pid
from bench.servers import LOOPBACK
from deploy.local.kafka import KafkaBroker
from deploy.local.postgres import LocalPostgres, ensure_installed
from deploy.local.postgres import database_url as database_url_of
from deploy.local.probe import free_port
from deploy.local.services import ServiceGroup
from deploy.local.stack import wait_for_api
from services.api import keys
from shared.db import migrate
from shared.kafka import client_config
from shared.settings import Settings

# How to reach a secured Kafka named by KAFKA_BOOTSTRAP_SERVERS: passed on to the services as they are.
KAFKA_SECURITY_VARIABLES = (
    "IMGPIPE_KAFKA_SECURITY_PROTOCOL",
    "IMGPIPE_KAFKA_SASL_MECHANISM",
    "IMGPIPE_KAFKA_SASL_USERNAME",
    "IMGPIPE_KAFKA_SASL_PASSWORD",
    "IMGPIPE_KAFKA_SSL_CA_LOCATION",
)
SERVICE_STOP_SECONDS = 3  # a processor stuck on a host that never answers is killed after this; nothing is kept


@dataclass
class Infrastructure:
    kafka_bootstrap_servers: str
    server_url: str  # the PostgreSQL server's maintenance database
    started_here: bool
    databases: list[str] = field(default_factory=list)  # made here, dropped at the end

    def new_database(self) -> str:
        """A migrated database of its own: each Services gets one, so that jobs one scenario leaves
        unfinished are never released by the next one's dispatcher."""
        name = f"imgpipe_bench_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.databases.append(name)
        url = database_url_of(self.server_url, name)
        migrate(url)
        return url

    def drop_databases(self) -> None:
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            for name in self.databases:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        self.databases.clear()

    def _port_owner(self, address: str) -> int | None:
        host, _, port = address.rpartition(":")
        return listening_pid(int(port)) if host in (LOOPBACK, "localhost") else None

    def kafka_pid(self) -> int | None:
        return self._port_owner(self.kafka_bootstrap_servers.split(",")[0])

    def postgres_pid(self) -> int | None:
        url = urlparse(self.server_url)
        return self._port_owner(f"{url.hostname}:{url.port or 5432}")

    def postgres_version(self) -> str:
        with psycopg.connect(self.server_url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            assert row is not None  # SHOW gives one row
            return row[0]


@contextmanager
def infrastructure(
    work_dir: Path, kafka_bootstrap_servers: str | None, database_url: str | None
) -> Iterator[Infrastructure]:
    """database_url: a running server to use (a database of its own is made there for each Services)."""
    kafka = postgres = None
    try:
        if not kafka_bootstrap_servers:
            kafka = KafkaBroker(work_dir / "kafka", port=free_port(), controller_port=free_port())
            kafka.stop()  # one left running by an interrupted run
            shutil.rmtree(kafka.data_dir, ignore_errors=True)  # no topics of earlier runs piling up
            print("starting Kafka", flush=True)
            kafka.start()
            kafka_bootstrap_servers = kafka.bootstrap_servers
        if not database_url:
            ensure_installed()
            postgres = LocalPostgres(work_dir / "postgres", port=free_port())
            postgres.stop()
            print("starting PostgreSQL", flush=True)
            postgres.start()
            database_url = postgres.url("postgres")
        infra = Infrastructure(kafka_bootstrap_servers, database_url, started_here=kafka is not None)
        try:
            yield infra
        finally:
            infra.drop_databases()
    finally:
        if kafka:
            kafka.stop()
        if postgres:
            postgres.stop()


class Processors(ServiceGroup):
    """Only the processor processes of a ServiceGroup, so that they can be restarted with other settings."""

    def __init__(self, env: dict[str, str], log_dir: Path, count: int):
        super().__init__(env, log_dir, processors=count)
        self.names = [name for name in self.names if name.startswith("processor-")]


class Services:
    """An api and a notifier (a ServiceGroup without processors) and the processors (a Processors)."""

    def __init__(self, infra: Infrastructure, name: str, work_dir: Path, api_settings: dict[str, str] | None = None):
        """api_settings: IMGPIPE_ variables for the api (and the notifier) alone."""
        suffix = f"{name}.{uuid.uuid4().hex[:6]}"
        port = free_port()
        self.infra = infra
        self.database_url = infra.new_database()
        self.api_settings = api_settings or {}
        self.api_url = f"http://{LOOPBACK}:{port}"
        self.log_dir = work_dir / "logs" / name
        self.storage_dir = work_dir / "images" / name
        self.processor_group = f"bench-processor-{suffix}"
        inherited = {
            k: v
            for k, v in os.environ.items()
            if (not k.startswith("IMGPIPE_") or k in KAFKA_SECURITY_VARIABLES)
            and k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")
        }
        self.env = {
            **inherited,
            # both spellings: whichever one a version of shared/settings.py prefers, it is this value
            "KAFKA_BOOTSTRAP_SERVERS": infra.kafka_bootstrap_servers,
            "IMGPIPE_KAFKA_BOOTSTRAP_SERVERS": infra.kafka_bootstrap_servers,
            "DATABASE_URL": self.database_url,
            "IMGPIPE_DATABASE_URL": self.database_url,
            "IMGPIPE_TOPIC_REQUESTED": f"bench.{suffix}.requested",
            "IMGPIPE_TOPIC_REQUESTED_BULK": f"bench.{suffix}.requested-bulk",
            "IMGPIPE_TOPIC_PROCESSED": f"bench.{suffix}.processed",
            "IMGPIPE_TOPIC_DEAD_LETTER": f"bench.{suffix}.requested-dlq",
            "IMGPIPE_PROCESSOR_GROUP": self.processor_group,
            "IMGPIPE_NOTIFIER_GROUP": f"bench-notifier-{suffix}",
            "IMGPIPE_API_PORT": str(port),
            "IMGPIPE_PUBLIC_BASE_URL": self.api_url,
            "IMGPIPE_STORAGE_DIR": str(self.storage_dir),
            "IMGPIPE_ALLOW_PRIVATE_ADDRESSES": "true",  # every image host and the webhook are on 127.0.0.1
            "IMGPIPE_HEALTH_PORT": "0",  # not measured; a fixed port may be taken (a `make run` beside it)
            "IMGPIPE_TOPIC_PROCESSED_DEAD_LETTER": f"bench.{suffix}.processed-dlq",
            "IMGPIPE_TOPIC_JOB_REQUESTED": f"bench.{suffix}.job-requested",
            "IMGPIPE_TOPIC_JOB_DEAD_LETTER": f"bench.{suffix}.job-requested-dlq",
            "IMGPIPE_INTAKE_GROUP": f"bench-intake-{suffix}",
        }
        self.core = ServiceGroup({**self.env, **self.api_settings}, self.log_dir, processors=0)
        self.processors: Processors | None = None
        kafka = client_config(
            Settings(kafka_bootstrap_servers=infra.kafka_bootstrap_servers)
        )  # security from the environment
        self.kafka_admin = AdminClient({**kafka, "log_level": 3})
        self.processor_settings: dict[str, str] = {}

    def start(self, processors: int, processor_settings: dict[str, str]) -> None:
        self.core.start()
        self.restart_processors(processors, processor_settings)
        wait_for_api(self.api_url)

    def restart_processors(self, count: int, processor_settings: dict[str, str]) -> None:
        self._stop_processors()
        self.processor_settings = processor_settings
        self.processors = Processors({**self.env, **processor_settings}, self.log_dir, count)
        self.processors.start()

    def api_key(self, name: str, weight: float = 1) -> str | None:
        """A new API key of these services' database, if their api requires keys; else None."""
        if self.api_settings.get("IMGPIPE_API_KEYS_REQUIRED", "").lower() not in ("1", "true", "yes"):
            return None
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            return keys.create_key(conn, f"{name}-{uuid.uuid4().hex[:6]}", weight)[1]

    def wait_for_processors(self, timeout: float = 30) -> bool:
        """True once the processor group is stable with every processor holding partitions."""
        assert self.processors is not None  # start() made them
        wanted = len(self.processors.names)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                group = self.kafka_admin.describe_consumer_groups([self.processor_group])[self.processor_group].result(
                    5
                )
                if (
                    group.state == ConsumerGroupState.STABLE
                    and len(group.members) >= wanted
                    and all(member.assignment.topic_partitions for member in group.members)
                ):
                    return True
            except (KafkaException, TimeoutError):  # e.g. the group coordinator still loading after a start
                pass
            time.sleep(0.2)
        return False

    def pids(self) -> dict[str, int]:
        groups = [self.core] + ([self.processors] if self.processors else [])
        return {name: proc.pid for group in groups for name, proc in group.processes.items()}

    def processor_pids(self) -> list[int]:
        assert self.processors is not None  # start() made them
        return [proc.pid for proc in self.processors.processes.values()]

    def _stop_processors(self) -> None:
        if self.processors:
            # a processor killed after the timeout would leave its compression worker processes behind
            workers = [child for pid in self.processor_pids() for child in descendants(pid)]
            self.processors.stop(SERVICE_STOP_SECONDS)
            kill_descendants(workers)

    def stop(self) -> None:
        self._stop_processors()
        self.core.stop(SERVICE_STOP_SECONDS)
        shutil.rmtree(self.storage_dir, ignore_errors=True)

    def log_tails(self) -> str:
        names = self.core.names + (self.processors.names if self.processors else [])
        return "\n".join(f"--- {name} ---\n{self.core.log_tail(name, 15)}" for name in names)
