"""The producers' CPU priority, and when to give up on a low one.

On two cores the training step of a CPU backend uses every core, and a producer thread
that takes one makes the whole step wait for its slowest shard. Producers therefore run
at idle priority by default: they decode in the cores' idle moments. On a machine that
other processes keep busy there are no idle moments, the producers starve and the
consumer waits for every batch. :class:`WaitWindow` notices that: when the consumer has
spent ``STARVED_SHARE`` of the last ``STARVED_WINDOW_S`` seconds waiting for batches,
the producers are raised to normal priority (see ``Prefetcher``).

Example::

    waits = WaitWindow(3.0)
    waits.add(start=10.0, end=10.4)          # the consumer waited 0.4 s for a batch
    waits.waited(now=11.0)                   # 0.4 seconds in [8.0, 11.0]
    waits.waited(now=11.5, waiting_since=11.0)  # 0.9: the wait going on counts too
"""

from __future__ import annotations

import collections
import os
import threading

PRIORITIES = ("idle", "low", "normal")
STARVED_WINDOW_S = 3.0  # the consumer's recent past that the starvation rule looks at
STARVED_SHARE = 0.3  # waiting for over this share of it means the producers starve


def set_priority(priority: str, tid: int | None = None) -> bool:
    """Set a thread's CPU priority (the calling thread's by default); Linux only, and
    False where it is not allowed.

    At idle priority the producers decode in the cores' idle moments (measured on 2
    cores, W1: epochs 1.76 s at normal priority, 1.45 s at nice 19, 1.36 s idle; train
    alone 1.05 s).
    """
    if not hasattr(os, "sched_setscheduler"):
        return False
    tid = threading.get_native_id() if tid is None else tid
    try:
        if priority == "idle":
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        else:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, tid, 19 if priority == "low" else 0)
    except OSError:  # not permitted here
        return False
    return True


class WaitWindow:
    """Seconds the consumer spent waiting for batches within the last ``window_s``
    seconds of (monotonic) time: a sliding window, so one slow batch does not count as
    starving and a steady 40% input-bound does, whatever the batch rate. Constant time
    per batch."""

    def __init__(self, window_s: float = STARVED_WINDOW_S):
        self.window_s = window_s
        self._waits: collections.deque[tuple[float, float]] = collections.deque()  # (start, end)
        self._sum = 0.0  # seconds of the waits kept

    def add(self, start: float, end: float) -> None:
        """A finished wait, from ``start`` to ``end`` (in order of time)."""
        if end > start:
            self._waits.append((start, end))
            self._sum += end - start
        self._forget(end - self.window_s)

    def waited(self, now: float, waiting_since: float | None = None) -> float:
        """Seconds spent waiting in [now - window_s, now], with the wait going on since
        ``waiting_since`` (if any)."""
        edge = now - self.window_s
        self._forget(edge)
        waited = self._sum - (max(0.0, edge - self._waits[0][0]) if self._waits else 0.0)
        if waiting_since is not None:
            waited += max(0.0, now - max(waiting_since, edge))
        return max(0.0, waited)

    def _forget(self, edge: float) -> None:
        """Drop the waits that ended before ``edge``."""
        while self._waits and self._waits[0][1] <= edge:
            start, end = self._waits.popleft()
            self._sum -= end - start
        if not self._waits:
            self._sum = 0.0  # no drift from adding and taking away

    def starved(self, now: float, waiting_since: float | None = None) -> bool:
        """Whether the consumer waited for over ``STARVED_SHARE`` of the window."""
        return self.waited(now, waiting_since) > STARVED_SHARE * self.window_s
