"""What every long-running service needs: logging, and a flag that SIGTERM/SIGINT set."""
import logging
import signal
import threading


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def stop_on_signals() -> threading.Event:
    """Return an event that is set on SIGTERM or SIGINT, so a loop can finish its current work and stop."""
    stop = threading.Event()

    def handle(_signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop
