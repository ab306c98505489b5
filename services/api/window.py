"""How many images may be released into Kafka and not yet finished: what the processors finish in
`seconds`, measured from the results (never a fixed count), within [minimum, maximum].

Each round of the dispatcher reports what is held (released, not finished) and what it released since
the round before; what was finished meanwhile follows. The rate is an exponential moving average over
about `seconds`, updated only while the processors had work, so an idle spell does not shrink the window
the next burst starts with. If the window limits the processors (they finish everything faster than
`seconds`), the rate it measures grows with it, so it opens until the processors are the limit."""

import math


class Window:
    def __init__(self, seconds: float, minimum: int, maximum: int):
        self.seconds = seconds
        self.minimum = minimum
        self.maximum = max(minimum, maximum)
        self.images_per_second = 0.0
        self._last: tuple[float, int] | None = None  # (time, held) of the round before

    @property
    def size(self) -> int:
        return min(self.maximum, max(self.minimum, math.ceil(self.images_per_second * self.seconds)))

    def observe(self, now: float, held: int, released_since: int) -> None:
        """A round at `now` (seconds, monotonic) found `held` images released and not finished, after
        releasing `released_since` images since the round before."""
        if self._last is not None:
            last_time, last_held = self._last
            elapsed = now - last_time
            if elapsed > 0 and last_held + released_since > 0:  # the processors had work
                finished = max(0, last_held + released_since - held)
                weight = 1 - math.exp(-elapsed / self.seconds)
                self.images_per_second += weight * (finished / elapsed - self.images_per_second)
        self._last = (now, held)
