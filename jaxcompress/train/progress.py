"""Progress of long loops: a tqdm bar on a terminal, else log lines at most every few seconds."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Hashable

import jax
from tqdm import tqdm

# Without a terminal, long loops log a progress line at least (train) or at most (evaluation,
# latency) this often. Tests set it to 0.
PROGRESS_SECONDS = 15.0


def duration(seconds: float) -> str:
    """`4 min 12 s`, `9.8 s`, `1 h 03 min`."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        minutes, rest = divmod(int(round(seconds)), 60)
        return f"{minutes} min {rest} s"
    hours, rest = divmod(int(round(seconds)) // 60, 60)
    return f"{hours} h {rest:02d} min"


def due(since_last: float, each: float) -> bool:
    """Whether to log a progress line now: waiting for one more unit of work (`each`
    seconds) would leave more than `PROGRESS_SECONDS` between two lines."""
    return since_last + each >= PROGRESS_SECONDS


class Progress:
    """Counts `total` items of work: a tqdm bar when stderr is a terminal; otherwise a start
    line, a line often enough that no two are more than `PROGRESS_SECONDS` apart (see `due`)
    and an end line on `log`."""

    def __init__(self, log: logging.Logger, what: str, total: int, unit: str, enabled: bool = True):
        self.log, self.what, self.total = log, what, total
        self.unit = unit
        self.bar = tqdm(total=total, desc=what, unit=unit, leave=False, disable=None)
        self.logging = enabled and self.bar.disable
        self.done = 0
        self.start = self.last = time.perf_counter()
        if self.logging:
            log.info("%s: %d %s", what, total, self._units(total))

    def _units(self, count: int) -> str:
        if count == 1:
            return self.unit
        return self.unit + ("es" if self.unit.endswith(("s", "ch")) else "s")

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        if not self.logging:
            return
        now = time.perf_counter()
        each = (now - self.start) / self.done
        if due(now - self.last, each) and self.done < self.total:
            self.last = now
            left = (now - self.start) / self.done * (self.total - self.done)
            done, total = self.done, self.total
            self.log.info(
                "%s: %d/%d %s, %s left", self.what, done, total, self._units(total), duration(left)
            )

    def close(self) -> float:
        """Ends the bar; logs and returns the seconds taken."""
        self.bar.close()
        seconds = time.perf_counter() - self.start
        if self.logging:
            self.log.info(
                "%s: done, %d %s in %s",
                self.what,
                self.done,
                self._units(self.done),
                duration(seconds),
            )
        return seconds


class CompileAnnouncer:
    """Logs the first call of a jitted function on each new shape and how long it took (its
    compilation, mostly); later calls cost one set lookup. `seconds` sums those first calls."""

    def __init__(self, log: logging.Logger, what: str):
        self.log, self.what = log, what
        self.seen: set[Hashable] = set()
        self.seconds = 0.0

    def __call__(self, shape: tuple[int, ...], fn: Callable, *args):
        """`fn(*args)`, announced and waited for if `shape` is new."""
        if shape in self.seen:
            return fn(*args)
        self.seen.add(shape)
        batch = " x ".join(map(str, shape))
        self.log.info("compiling %s for batch %s ...", self.what, batch)
        t0 = time.perf_counter()
        done = threading.Event()

        def remind() -> None:  # XLA compiles in one blocking call: say it is still at it
            while PROGRESS_SECONDS > 0 and not done.wait(PROGRESS_SECONDS):
                seconds = time.perf_counter() - t0
                self.log.info("still compiling %s for batch %s (%.0f s)", self.what, batch, seconds)

        reminder = threading.Thread(target=remind, daemon=True)
        reminder.start()
        try:
            out = jax.block_until_ready(fn(*args))
        finally:
            done.set()
            reminder.join()
        took = time.perf_counter() - t0
        self.seconds += took
        self.log.info("compiled %s in %.1f s", self.what, took)
        return out
