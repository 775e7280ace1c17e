"""The public event loop (docs/interfaces.md#common-to-all-interfaces).

Theory of operation
-------------------
A :class:`Loop` is a thin shell over ``libchirp._core.loopcore.LoopCore``: it owns the C
loop and one daemon thread, the **background thread**. The libuv loop is run
by one thread at a time, the one holding the loop's ownership token: a thread
waiting in ``get()``/``get_many()`` or a future's ``result()`` runs it itself,
and the background thread runs it whenever no such thread does. That thread
also handles the events (every Python callback: future resolution, message
delivery, ``call_soon()``); the code calls it "the dispatcher"
(``LoopCore.in_dispatcher()``). See docs/architecture.md. A Loop whose nodes
are all ``libchirp.asyncio`` nodes of one asyncio loop is run by that asyncio
loop instead; its background thread then only watches
(docs/architecture.md#embedding-in-asyncio).

``stop()`` before ``run()`` does nothing (libchirp 1.x programs call it in
cleanup paths that may run before the loop was started). After ``run()``, it
marks the loop stopped at once (``running`` becomes False, ``run()``
raises ``Cannot restart loop``); the threads end as soon as no node uses the
loop: at once if none, otherwise inside the last node's ``stop()``. Stopping
never hangs: the background thread is joined with a bound.

The background thread references only the core, never the Loop object, so a Loop that is
dropped while running is garbage-collected; it then warns with
``ResourceWarning`` and asks its core to stop.

``os.fork()`` copies a Loop but not its thread: in the child the copy can
never run. A Loop remembers the process that created it, and every use of it
or of its nodes in another process raises :class:`ChirpForkError` at once
(docs/reliability.md); the child starts a Loop of its own. Dropping the copy
in the child does nothing (the parent's sockets are not touched).
"""

from __future__ import annotations

import os
import warnings
from types import TracebackType
from typing import Any, Callable, Optional, Type, TypeVar

from . import _process
from ._core import LoopCore, logger
from .errors import ChirpError

__all__ = ["Loop", "ChirpForkError"]


class ChirpForkError(ChirpError, RuntimeError):
    """A Loop (or one of its nodes) was used in a process forked from the one that created it."""

    def __init__(self, pid: int) -> None:
        super().__init__(
            "this Loop was created in process %d, and this is process %d (a fork): its "
            "threads do not exist here; start a new Loop in the child" % (pid, os.getpid())
        )
        self.pid = pid


_Self = TypeVar("_Self", bound="Loop")


class Loop:
    """An event loop running in background threads; ``run_loop=False`` defers ``run()``."""

    def __init__(self, run_loop: bool = True) -> None:
        self._pid = _process.PID
        self._core = LoopCore()
        if run_loop:
            self.run()

    def _check_process(self) -> None:
        """Raise :class:`ChirpForkError` in a process forked after this Loop was made."""
        if self._pid != _process.PID:
            raise ChirpForkError(self._pid)

    def run(self) -> None:
        """Start the threads; no-op if started; ``RuntimeError`` after ``stop()``."""
        self._check_process()
        core = self._core
        started = core.started
        core.run()
        if not started:
            logger.debug("loop started")

    def stop(self) -> None:
        """Mark the loop stopped; its threads end once no node uses it (bounded wait).

        Before ``run()`` this does nothing (as in libchirp 1.x): a later ``run()``
        starts the loop.
        """
        self._check_process()
        core = self._core
        if not core.started:
            return
        again = core.stop_requested
        core.request_stop(join=True)
        if again:
            return
        if core.nodes:
            logger.debug("loop stop requested; it ends with its last node")
        else:
            logger.debug("loop stopped")

    @property
    def running(self) -> bool:
        """True when the loop was started and not stopped."""
        return self._core.running

    def call_soon(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``func(*args, **kwargs)`` on the thread handling the loop's events, asynchronously.

        Exceptions raised by ``func`` are logged (logger ``libchirp``). Raises
        ``RuntimeError`` once the loop has ended.
        """
        self._check_process()
        self._core.call_soon(func, args, kwargs)

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is None or getattr(self, "_pid", None) != _process.PID:
            return
        if core.running:
            warnings.warn(
                "libchirp.Loop was not stopped; call stop() or use it as a context manager",
                ResourceWarning,
                stacklevel=2,
            )
            try:
                core.request_stop(join=False)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass
        elif not core.started and core.c is not None:
            try:
                core.request_stop(join=False)  # never ran: closes and frees inline
            except Exception:  # pragma: no cover
                pass

    def __repr__(self) -> str:
        core = self._core
        state = "running" if core.running else ("stopped" if core.stop_requested else "new")
        return "<libchirp.Loop %s nodes=%d>" % (state, len(core.nodes))


def loop_core(loop: Loop) -> LoopCore:
    """The LoopCore of ``loop``: for the interfaces of this package, not part of the API."""
    return loop._core
