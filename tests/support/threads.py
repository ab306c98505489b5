"""A service's run(settings, stop) in a thread of the test, whose crash fails the test."""

import threading


class ServiceThread:
    def __init__(self, run, *args, **kwargs):
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(run, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, run, args, kwargs):
        try:
            run(*args, self.stop_event, **kwargs)
        except BaseException as exc:
            self.error = exc

    def stop(self, timeout: float = 30) -> None:
        """Set the stop event, wait for run() to return, and raise what it raised."""
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the service did not stop within {timeout}s of the stop event"
        if self.error is not None:
            raise AssertionError(f"the service crashed: {self.error!r}") from self.error
