"""`make run`: PostgreSQL, Kafka and the three services on 127.0.0.1, in the foreground until Ctrl-C.

Everything it keeps lives under .local/ (data, logs, stored images); a second run reuses it.
Settings come from the environment like the services' own (see the README).

`--kafka-cluster` (`make run-cluster`) runs three Kafka nodes instead of one, on the port pairs from
KAFKA_BOOTSTRAP_SERVERS's port up (9092/9093, 9094/9095, 9096/9097 by default), data in
.local/kafka-cluster/; imgpipe's topics then get replication factor 3 and min.insync.replicas 2."""

import argparse
import logging
import os
import time
from urllib.parse import urlparse

import httpx

from deploy.local.kafka import KafkaBroker, KafkaCluster
from deploy.local.postgres import LocalPostgres, ensure_installed
from deploy.local.services import REPO_ROOT, ServiceGroup
from shared.db import migrate
from shared.kafka import ensure_topics
from shared.runtime import setup_logging, stop_on_signals
from shared.settings import Settings, get_settings

log = logging.getLogger("imgpipe.stack")
LOCAL_DIR = REPO_ROOT / ".local"


def wait_for_api(base_url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the API did not answer on {base_url} within {timeout}s (see .local/logs/api.log)")


def endpoints(settings: Settings, services: ServiceGroup) -> str:
    """Where each service answers: the API, and the health ports of the others (health_port 0: none)."""
    lines = [
        "imgpipe is up:",
        f"  {'api':<13} http://{settings.api_host}:{settings.api_port}  (docs at /docs; /healthz, /readyz, /metrics)",
    ]
    for name, port in services.health_ports.items():
        if port:
            lines.append(f"  {name:<13} http://{settings.health_host}:{port}  (/healthz, /readyz, /metrics)")
    return "\n".join(lines)


def use_kafka_cluster(nodes: int = 3) -> None:
    """Point this process's settings, and the services', at `nodes` Kafka nodes on consecutive port pairs."""
    first_port = int(Settings().kafka_bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
    os.environ["IMGPIPE_KAFKA_BOOTSTRAP_SERVERS"] = ",".join(f"127.0.0.1:{first_port + 2 * n}" for n in range(nodes))
    os.environ.setdefault("IMGPIPE_KAFKA_REPLICATION_FACTOR", str(min(3, nodes)))
    os.environ.setdefault("IMGPIPE_KAFKA_MIN_INSYNC_REPLICAS", str(min(2, nodes)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.stack", description=__doc__.splitlines()[0])
    parser.add_argument("--kafka-cluster", action="store_true", help="three Kafka nodes instead of one")
    if parser.parse_args(argv).kafka_cluster:
        use_kafka_cluster()
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)
    stop = stop_on_signals()

    database = urlparse(settings.database_url)
    kafka_ports = [int(address.rsplit(":", 1)[1]) for address in settings.kafka_bootstrap_servers.split(",")]
    ensure_installed()
    postgres = LocalPostgres(LOCAL_DIR / "postgres", port=database.port or 5432)  # no port in the URL: PostgreSQL's own
    if len(kafka_ports) == 1:
        kafka: KafkaBroker | KafkaCluster = KafkaBroker(
            LOCAL_DIR / "kafka",
            port=kafka_ports[0],
            controller_port=kafka_ports[0] + 1,
            partitions=settings.topic_partitions,
        )
    else:
        kafka = KafkaCluster(
            LOCAL_DIR / "kafka-cluster",
            kafka_ports,
            [port + 1 for port in kafka_ports],
            partitions=settings.topic_partitions,
        )
    services = ServiceGroup(dict(os.environ), LOCAL_DIR / "logs")
    try:
        postgres.start()
        postgres.create_database(database.path.lstrip("/"))
        migrate(settings.database_url)
        log.info("PostgreSQL ready at %s", settings.database_url)
        kafka.start()
        ensure_topics(settings)
        log.info("Kafka ready at %s", kafka.bootstrap_servers)
        services.start()
        wait_for_api(f"http://{settings.api_host}:{settings.api_port}")
        print(
            f"\n{endpoints(settings, services)}\nlogs in {LOCAL_DIR / 'logs'}. Ctrl-C stops everything.\n", flush=True
        )
        while not stop.wait(1):
            for name in services.restart_exited():
                log.warning("%s exited; restarted it (see %s)", name, LOCAL_DIR / "logs" / f"{name}.log")
    finally:
        services.stop()
        kafka.stop()
        postgres.stop()


if __name__ == "__main__":
    main()
