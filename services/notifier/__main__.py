"""python -m services.notifier: run the notifier until SIGTERM or SIGINT."""
from services.notifier.consumer import run
from shared.kafka import check_kafka
from shared.runtime import exit_on_startup_error, setup_logging, stop_on_signals
from shared.settings import get_settings


def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level)
    with exit_on_startup_error():
        check_kafka(settings)
    run(settings, stop_on_signals())


if __name__ == "__main__":
    main()
