"""What every long-running service needs: logging, a flag that SIGTERM/SIGINT set, and a clean exit when
it cannot start."""
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


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


class StartupError(Exception):
    """The service cannot start as configured; the message says why in one line."""


@contextmanager
def exit_on_startup_error() -> Iterator[None]:
    """Around a service's start-up checks: a StartupError is logged as one line and the process exits
    with status 1, without a traceback."""
    try:
        yield
    except StartupError as exc:
        logging.getLogger("imgpipe").error("cannot start: %s", exc)
        sys.exit(1)
