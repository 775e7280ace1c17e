"""The public event loop (docs/interfaces.md#common-to-all-interfaces).

Theory of operation
-------------------
A :class:`Loop` is a thin shell over ``libchirp._core.LoopCore``: it owns the C
loop and two daemon threads, the libuv **loop thread** (never runs Python) and
the **dispatcher thread** (runs every Python callback: future resolution,
message delivery, ``call_soon()``). See docs/architecture.md.

``stop()`` marks the loop stopped at once (``running`` becomes False, ``run()``
raises ``Cannot restart loop``); the threads end as soon as no node uses the
loop: at once if none, otherwise inside the last node's ``stop()``. Stopping
never hangs: the threads are joined with a bound.

The threads reference only the core, never the Loop object, so a Loop that is
dropped while running is garbage-collected; it then warns with
``ResourceWarning`` and asks its core to stop.
"""

from __future__ import annotations

import warnings
from types import TracebackType
from typing import Any, Callable, Optional, Type

from ._core import LoopCore

__all__ = ["Loop"]


class Loop:
    """An event loop running in background threads; ``run_loop=False`` defers ``run()``."""

    def __init__(self, run_loop: bool = True) -> None:
        self._core = LoopCore()
        if run_loop:
            self.run()

    def run(self) -> None:
        """Start the threads; no-op if started; ``RuntimeError`` after ``stop()``."""
        self._core.run()

    def stop(self) -> None:
        """Mark the loop stopped; its threads end once no node uses it (bounded wait)."""
        self._core.request_stop(join=True)

    @property
    def running(self) -> bool:
        """True when the loop was started and not stopped."""
        return self._core.running

    def call_soon(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``func(*args, **kwargs)`` on the dispatcher thread, asynchronously.

        Exceptions raised by ``func`` are logged (logger ``libchirp``). Raises
        ``RuntimeError`` once the loop has ended.
        """
        self._core.call_soon(func, args, kwargs)

    def __enter__(self) -> Loop:
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
        if core is None:
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
