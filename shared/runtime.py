"""What every long-running service needs: logging, a flag that SIGTERM/SIGINT set, and a clean exit when
it cannot start."""

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType

PARENT_CHECK_SECONDS = 1.0
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("request_id", "image_id")  # put on every line logged inside log_context()

# Per thread: each of the processor's download threads works on one image at a time.
_context: ContextVar[Mapping[str, str]] = ContextVar("imgpipe_log_context", default=MappingProxyType({}))


def setup_logging(level: str, log_format: str = "text") -> None:
    handler = log_handler(log_format)
    if log_format == "json":
        # What would otherwise reach stderr as a bare traceback becomes one JSON line too.
        sys.excepthook = lambda *exc_info: logging.getLogger("imgpipe").critical(
            "uncaught exception", exc_info=exc_info
        )
        threading.excepthook = lambda args: logging.getLogger("imgpipe").critical(
            "uncaught exception in thread %s",
            args.thread.name if args.thread else "?",
            # the hints want an exc_value that is not None; logging formats a None one too
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def log_handler(log_format: str, stream=None) -> logging.Handler:
    """A handler writing to `stream` (stderr by default) in that format, with the log_context() ids."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(_add_context)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


@contextmanager
def log_context(**ids) -> Iterator[None]:
    """Every line logged by this thread meanwhile carries these ids (request_id=..., image_id=...)."""
    token = _context.set({**_context.get(), **{name: str(value) for name, value in ids.items()}})
    try:
        yield
    finally:
        _context.reset(token)


def _add_context(record: logging.LogRecord) -> bool:
    for name, value in _context.get().items():
        if not hasattr(record, name):  # an id passed with extra= wins
            setattr(record, name, value)
    return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the context ids, and
    the traceback as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            if getattr(record, name, None) is not None:
                line[name] = str(getattr(record, name))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


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


def exit_with_parent(parent_pid: int) -> None:
    """In a worker process (a ProcessPoolExecutor's initializer): end when its parent does. A worker holds
    both ends of the pool's pipes, so a parent killed outright (SIGKILL, OOM) would otherwise leave it
    waiting forever."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
