"""python -m services.notifier: run the notifier until SIGTERM or SIGINT."""

from services.notifier.consumer import run
from shared.db import check_database
from shared.health import serve_health
from shared.kafka import check_kafka
from shared.runtime import exit_on_startup_error, setup_logging, stop_on_signals
from shared.settings import get_settings


def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)
    with exit_on_startup_error():
        serve_health(settings, "kafka", "postgresql", "consumer")  # first: /readyz says what is missing meanwhile
        check_kafka(settings)
        check_database(settings.database_url)
    run(settings, stop_on_signals())


if __name__ == "__main__":
    main()
