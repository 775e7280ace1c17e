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

An interface that follows the future into another event loop (``libchirp.asyncio``)
registers one *hook* with :meth:`LightFuture._when_done` instead of a done
callback: it is called with the future by the thread that completes (or
cancels) it, right after the completion, and needs no condition either.

Both the lazy creation and the completion without a condition run under one
module-wide lock (``_LOCK``), held for a few attribute operations only. That
orders them: a completion either happens before the condition exists (a
waiter that creates it then sees the final state under the condition), or it
sees the condition and takes the standard path, which notifies waiters and
runs callbacks. :func:`set_results` completes many futures under one
acquisition of the lock (the node's successful sends): those nobody touched
(no condition, no hook) get their two attributes set there, the others go the
standard way one by one. Reading a finished future (``done()``, ``result()`` and
``exception()`` of a finished future) needs no lock at all: the state only
ever moves forward and attribute reads are atomic.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING
from itertools import repeat
from typing import Any, Callable, Iterable, List, Optional, Tuple

__all__ = ["LightFuture", "new_futures", "set_results"]

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
    #: Called with the future once it is complete (see _when_done()), or None.
    _hook: Optional[Callable[["LightFuture"], None]] = None
    # The state of a new future, as class attributes: a future made with
    # ``LightFuture.__new__(LightFuture)`` (no __init__, see new_future()) is a
    # valid pending future; completing it sets the instance's own attributes.
    _state = PENDING
    _result: Any = None
    _exception: Optional[BaseException] = None

    def __init__(self) -> None:  # no super().__init__(): that would build the condition
        self._state = PENDING
        self._result = None
        self._exception = None

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

    def _when_done(self, fn: Callable[["LightFuture"], None]) -> None:
        """Call ``fn(self)`` once the future is complete, on the completing thread.

        Like ``add_done_callback()`` (at once if already done), but while nobody
        waits the future stays without a condition. One hook per future; later
        registrations become ordinary done callbacks. ``fn`` must not raise.
        """
        with _LOCK:
            if self._state not in _DONE and self._hook is None:
                self._hook = fn
                return
        self.add_done_callback(fn)  # type: ignore[arg-type]  # (called with self)

    def _run_hook(self) -> None:
        hook = self._hook
        if hook is not None:
            self._hook = None
            hook(self)

    def set_result(self, result: Any) -> None:
        with _LOCK:
            fast = "_condition" not in self.__dict__ and self._state not in _DONE
            if fast:
                self._result = result
                self._state = FINISHED
        if not fast:
            super().set_result(result)  # notifies waiters, or raises InvalidStateError
        if self._hook is not None:
            self._run_hook()

    def set_exception(self, exception: Optional[BaseException]) -> None:
        with _LOCK:
            fast = "_condition" not in self.__dict__ and self._state not in _DONE
            if fast:
                self._exception = exception
                self._state = FINISHED
        if not fast:
            super().set_exception(exception)
        if self._hook is not None:
            self._run_hook()

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        if self._hook is not None:
            self._run_hook()
        return True


_new = object.__new__


def new_futures(leader: Any, n: int) -> List[LightFuture]:
    """``n`` pending LightFutures led by ``leader`` (no __init__ call each).

    Their only own attribute is ``_leader`` until they are used (see set_results()).
    """
    futs: List[LightFuture] = list(map(_new, repeat(LightFuture, n)))
    for fut in futs:
        fut._leader = leader
    return futs


def set_results(pairs: Iterable[Optional[Tuple[Any, ...]]]) -> List[Tuple[Any, ...]]:
    """Complete many futures at once: ``pair[0].set_result(pair[1])`` for each.

    ``pair[1]`` must be an object with a ``_sending`` attribute (a message whose
    send the future stands for): it is set to False first, before the future
    completes. One acquisition of ``_LOCK`` for all of them: a future made by
    new_futures() (or made the same way) that nobody touched since, i.e. whose
    only own attribute is still ``_leader`` (no condition, no hook, no state of
    its own), is completed by setting its two attributes, as set_result()
    does. The others (a waiter, a callback, a hook, cancelled) are returned,
    in order, for the caller to complete with set_result() after the lock
    (that notifies, runs callbacks and hooks). A ``None`` in ``pairs`` is skipped.
    """
    slow: List[Tuple[Any, ...]] = []
    with _LOCK:
        for pair in pairs:
            if pair is None:
                continue
            fut, value = pair[0], pair[1]
            value._sending = False
            if len(fut.__dict__) == 1:  # only _leader: see new_futures()
                fut._result = value
                fut._state = FINISHED
            else:
                slow.append(pair)
    return slow
