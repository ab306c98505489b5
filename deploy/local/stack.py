"""`make run`: PostgreSQL, Kafka and the three services on 127.0.0.1, in the foreground until Ctrl-C.

Everything it keeps lives under .local/ (data, logs, stored images); a second run reuses it.
Settings come from the environment like the services' own (see the README)."""
import logging
import os
import time
from urllib.parse import urlparse

import httpx

from deploy.local.kafka import KafkaBroker
from deploy.local.postgres import LocalPostgres, ensure_installed
from deploy.local.services import REPO_ROOT, ServiceGroup
from shared.db import migrate
from shared.kafka import ensure_topics
from shared.runtime import setup_logging, stop_on_signals
from shared.settings import get_settings

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


def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level)
    stop = stop_on_signals()

    database = urlparse(settings.database_url)
    kafka_port = int(settings.kafka_bootstrap_servers.rsplit(":", 1)[1])
    ensure_installed()
    postgres = LocalPostgres(LOCAL_DIR / "postgres", port=database.port)
    kafka = KafkaBroker(LOCAL_DIR / "kafka", port=kafka_port, controller_port=kafka_port + 1,
                        partitions=settings.topic_partitions)
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
        print(f"\nimgpipe is up: API at http://{settings.api_host}:{settings.api_port} "
              f"(docs at /docs), logs in {LOCAL_DIR / 'logs'}. Ctrl-C stops everything.\n", flush=True)
        while not stop.wait(1):
            for name in services.restart_exited():
                log.warning("%s exited; restarted it (see %s)", name, LOCAL_DIR / "logs" / f"{name}.log")
    finally:
        services.stop()
        kafka.stop()
        postgres.stop()


if __name__ == "__main__":
    main()
