"""Crash on purpose at a named point, so the crash tests can prove what survives a crash exactly there.

Off unless the crash_at setting (IMGPIPE_CRASH_AT) names a point: "<point>" crashes the first time the
point is reached, "<point>:<n>" the n-th time. Points: processor.after_process (an image is processed,
its result not yet acknowledged by Kafka), notifier.after_completing_commit (a batch that completed a
job is committed to PostgreSQL, its offsets not yet stored), dispatcher.after_produce (a round's events
are acknowledged by Kafka, the jobs' release cursors not yet moved)."""

import collections
import logging
import os
import signal
from collections.abc import Callable

from shared.settings import Settings

log = logging.getLogger(__name__)

_reached: collections.Counter = collections.Counter()


def crash_point(settings: Settings, point: str, commit_stored: Callable[[], None] | None = None) -> None:
    """commit_stored: commits the consumer's stored offsets first, so that anything stored too early
    reaches the broker and a test can tell that nothing was."""
    if settings.crash_at is None:
        return
    name, _, nth = settings.crash_at.partition(":")
    if name != point:
        return
    _reached[point] += 1
    if _reached[point] < int(nth or 1):
        return
    if commit_stored is not None:
        commit_stored()
    log.warning("crash_at=%s: killing this process (pid %d)", settings.crash_at, os.getpid())
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)
