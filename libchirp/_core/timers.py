"""The Python timers of a loop (request deadlines): a heap run by the thread holding the loop.

A :class:`Timer` is the handle of one timer; the heap holds ``(deadline, seq,
timer)`` tuples, so that ordering them is done by tuple comparison in C (the
sequence number breaks ties, the timer itself is never compared). Cancelling is
lazy: the timer forgets its callback and arguments, and its heap entry is
dropped when it comes up. The thread holding the loop runs the timers that are
due after each batch of events, and bounds its drive by the earliest deadline
(:meth:`TimerHeap.timeout`).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from .log import logger

_monotonic = time.monotonic


class Timer:
    """One timer: ``func(*args)`` at ``deadline`` (``time.monotonic()``); ``func`` is
    None once cancelled."""

    __slots__ = ("deadline", "func", "args")

    def __init__(self, deadline: float, func: Optional[Callable[..., Any]], args: tuple) -> None:
        self.deadline = deadline
        self.func = func
        self.args = args


def cancel_timer(timer: Optional[Timer]) -> None:
    """Cancel ``timer`` (None: nothing); it stays in the heap until it comes up."""
    if timer is not None:
        timer.func = None
        timer.args = ()  # do not keep the request and its reply alive until the deadline


class TimerHeap:
    """The timers of one loop. ``heap`` is read without the lock (a non-empty list
    means there may be work); it is changed under ``lock``."""

    __slots__ = ("heap", "lock", "_seq", "_poll_deadline")

    def __init__(self) -> None:
        self.heap: List[Tuple[float, int, Timer]] = []
        self.lock = threading.Lock()
        self._seq = itertools.count()
        #: The deadline the thread holding the loop drives towards at most (timeout()).
        self._poll_deadline = float("inf")

    def push(self, delay: float, func: Callable[..., Any], args: tuple) -> Tuple[Timer, bool]:
        """Add a timer due in ``delay`` s; returns it and whether it is due before the
        deadline the driving thread waits for (then that thread must be woken)."""
        deadline = _monotonic() + delay
        timer = Timer(deadline, func, args)
        with self.lock:
            heapq.heappush(self.heap, (deadline, next(self._seq), timer))
            wake = deadline < self._poll_deadline
        return timer, wake

    def timeout(self) -> float:
        """Seconds until the earliest timer not cancelled is due (0.0 if due), -1.0 if none."""
        with self.lock:
            heap = self.heap
            while heap and heap[0][2].func is None:  # cancelled: no need to wake for it
                heapq.heappop(heap)
            if not heap:
                self._poll_deadline = float("inf")
                return -1.0
            deadline = heap[0][0]
            self._poll_deadline = deadline
        return max(0.0, deadline - _monotonic())

    def overdue(self, late: float) -> bool:
        """A timer that is not cancelled was due more than ``late`` seconds ago."""
        with self.lock:
            heap = self.heap
            while heap and heap[0][2].func is None:
                heapq.heappop(heap)
            return bool(heap) and heap[0][0] < _monotonic() - late

    def run_due(self) -> None:
        """Run the timers that are due (the thread holding the loop); exceptions are logged."""
        now = _monotonic()
        due = []
        with self.lock:
            heap = self.heap
            while heap and heap[0][0] <= now:
                due.append(heapq.heappop(heap)[2])
        for timer in due:
            func = timer.func
            if func is None:
                continue
            try:
                func(*timer.args)
            except Exception:
                logger.exception("libchirp: exception in a timer callback %r", func)
