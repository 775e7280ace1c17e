"""A ``concurrent.futures.Future`` that costs little until somebody waits on it.

Theory of operation
-------------------
Every ``send()`` returns a future, so on a stream of small messages the cost of
the future itself matters: the standard ``Future.__init__`` builds a
``threading.Condition`` (a lock and its bookkeeping) for every future, although
most futures of a stream are completed before anyone looks at them, or are
never waited on at all.

:class:`LightFuture` is a real ``Future`` subclass (``isinstance`` checks,
``concurrent.futures.wait()``, ``as_completed()`` and ``asyncio.wrap_future()``
work unchanged) whose condition is created on first use: ``__getattr__`` makes
``_condition`` (and the lists ``_waiters`` and ``_done_callbacks`` that are only
touched under it) when a waiter, a callback, ``cancel()`` or ``wait()`` asks
for it.
While no condition exists, nobody can be waiting and no callback can be
registered, so completing the future is just setting two attributes.

Both the lazy creation and the completion without a condition run under one
module-wide lock (``_LOCK``), held for a few attribute operations only. That
orders them: a completion either happens before the condition exists (a
waiter that creates it then sees the final state under the condition), or it
sees the condition and takes the standard path, which notifies waiters and
runs callbacks. Reading a finished future (``done()``, ``result()`` and
``exception()`` of a finished future) needs no lock at all: the state only
ever moves forward and attribute reads are atomic.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING
from typing import Any, Optional

__all__ = ["LightFuture"]

_LOCK = threading.Lock()
_DONE = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))
_LAZY = frozenset(("_condition", "_waiters", "_done_callbacks"))


class LightFuture(Future[Any]):
    """A Future whose condition is created lazily (see the module docstring).

    ``_leader`` (set by the node for its own futures) is the LoopCore whose
    events complete the future: a thread about to wait in ``result()`` or
    ``exception()`` handles those events itself (``LoopCore.lead_until``)
    instead of sleeping until another thread did.
    """

    _leader: Any = None

    def __init__(self) -> None:  # no super().__init__(): that would build the condition
        self._state = PENDING
        self._result: Any = None
        self._exception: Optional[BaseException] = None

    def __getattr__(self, name: str) -> Any:
        # Only called for missing attributes: creates the condition, and the
        # lists of waiters and callbacks that are only used under it, on first use.
        if name not in _LAZY:
            raise AttributeError(name)
        with _LOCK:
            d = self.__dict__
            if "_condition" not in d:
                d["_waiters"] = []
                d["_done_callbacks"] = []
                d["_condition"] = threading.Condition()
        return d[name]

    def done(self) -> bool:
        return self._state in _DONE

    def result(self, timeout: Optional[float] = None) -> Any:
        if self._state == PENDING and self._leader is not None:
            timeout = self._leader.lead_until(self.done, timeout)
        if self._state == FINISHED:
            exc = self._exception
            if exc is not None:
                try:
                    raise exc
                finally:
                    exc = None  # break the reference cycle through the traceback
            return self._result
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        if self._state == PENDING and self._leader is not None:
            timeout = self._leader.lead_until(self.done, timeout)
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)

    def set_result(self, result: Any) -> None:
        with _LOCK:
            if "_condition" not in self.__dict__ and self._state not in _DONE:
                self._result = result
                self._state = FINISHED
                return
        super().set_result(result)  # notifies waiters, or raises InvalidStateError

    def set_exception(self, exception: Optional[BaseException]) -> None:
        with _LOCK:
            if "_condition" not in self.__dict__ and self._state not in _DONE:
                self._exception = exception
                self._state = FINISHED
                return
        super().set_exception(exception)
