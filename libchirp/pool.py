"""Thread-pool interface: received messages are handled by ``handler()`` on a pool.

Theory of operation
-------------------
:class:`Chirp` is a :class:`~libchirp.chirp.ChirpBase` plus a
``concurrent.futures.ThreadPoolExecutor`` (the constructor's keyword arguments
go to the executor). The thread handling the loop's events submits every received message that
does not answer a request to the pool, where ``handler(msg)`` runs; subclasses
override it.

Release (docs/flow-control.md#releasing, fixing a libchirp 1.x leak): with ``Config.AUTO_RELEASE``
(default) the slot is released after ``handler`` returns **or raises**; an
exception is logged with its traceback through the ``libchirp`` logger (libchirp
1.x leaked the slot). If the handler sent the message back (an answer) without
waiting for the send, the release happens when that send completed. With
AUTO_RELEASE False the handler must call ``msg.release_slot()``; the default
``handler`` does so, so that a node without a handler never leaks slots.

``stop()``: new messages are not handled; the pool is shut down; handlers
already submitted run to completion, waited for at most Config.TIMEOUT
(handlers still queued after that are cancelled); then the node stops as in
ChirpBase.stop(). Messages that no handler ran (new ones, cancelled ones) are
not acknowledged: the stop detaches them, so a SYNCHRONOUS sender's send fails
(docs/reliability.md). Call stop()
from outside the handlers: called from a handler it does not wait for that
handler, but the handler's own message is still held (AUTO_RELEASE happens when
the handler returns), so the node stop waits Config.TIMEOUT for it and raises.

Threads: ``_deliver`` runs on the thread handling the loop's events, ``_run`` on pool threads,
everything else on any application thread.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict

from ._core import logger
from .chirp import ChirpBase
from .config import Config
from .loop import Loop
from .message import Message

__all__ = ["Chirp", "Config", "Loop", "Message"]

_local = threading.local()


class Chirp(ChirpBase):
    """A chirp node whose received messages are handled by ``handler()`` on a thread pool.

    ``Chirp(loop, config, **kwargs)``: ``kwargs`` are passed to
    ``ThreadPoolExecutor`` (``max_workers``, ``thread_name_prefix``, ...).
    """

    def __init__(self, loop: Loop, config: Config, **kwargs: Any) -> None:
        kwargs.setdefault("thread_name_prefix", "libchirp-pool")
        self._pool = ThreadPoolExecutor(**kwargs)
        self._auto_release = config.AUTO_RELEASE
        self._closing = False
        self._tasks: Dict[Future[Any], Message] = {}
        self._tasks_lock = threading.Condition()
        try:
            ChirpBase.__init__(self, loop, config, recv=self._deliver)
        except BaseException:
            self._pool.shutdown(wait=False)
            raise

    # -- handling ------------------------------------------------------------------------------

    def handler(self, msg: Message) -> None:
        """Handle one received message; runs on a pool thread. Override this.

        The default releases the message when AUTO_RELEASE is False (with
        AUTO_RELEASE True the release happens after every handler anyway).
        """
        if not self._auto_release:
            msg.release_slot()

    def _deliver(self, msg: Message) -> None:
        # Dispatcher thread.
        if self._closing:
            self._park(msg)  # never handled: not acknowledged either
            return
        with self._tasks_lock:
            try:
                fut = self._pool.submit(self._run, msg)
            except RuntimeError:  # the pool is shut down: stop() is running
                self._park(msg)
                return
            self._tasks[fut] = msg
        fut.add_done_callback(self._task_done)

    def _task_done(self, fut: Future[Any]) -> None:
        with self._tasks_lock:
            msg = self._tasks.pop(fut, None)
            self._tasks_lock.notify_all()
        if fut.cancelled() and msg is not None:  # its handler never ran
            self._park(msg)

    def _run(self, msg: Message) -> None:
        # Pool thread.
        _local.node = self
        try:
            self.handler(msg)
        except Exception:
            logger.exception(
                "libchirp: exception in %s.handler(); the message is released"
                if self._auto_release
                else "libchirp: exception in %s.handler()",
                type(self).__name__,
            )
        finally:
            _local.node = None
            if self._auto_release:
                self._release_after_handler(msg)

    # -- stopping ------------------------------------------------------------------------------

    def _wait_handlers(self, limit: float) -> bool:
        """Wait up to ``limit`` s until no handler (but the calling one) is pending."""
        own = 1 if getattr(_local, "node", None) is self else 0
        deadline = time.monotonic() + limit
        with self._tasks_lock:
            while len(self._tasks) > own:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._tasks_lock.wait(left)
        return True

    def stop(self) -> None:
        """Stop the pool (bounded wait for submitted handlers), then the node.

        See the module documentation; raises like ChirpBase.stop(). Idempotent.
        """
        if self._node is not None and not self._node.done:
            self._closing = True
            self._pool.shutdown(wait=False)
            if not self._wait_handlers(self._config.TIMEOUT):
                logger.warning(
                    "libchirp: pool handlers still running after %.1f s; stopping the node",
                    self._config.TIMEOUT,
                )
                with self._tasks_lock:
                    queued = list(self._tasks)
                for fut in queued:
                    fut.cancel()  # the done callback releases its message
        else:
            self._pool.shutdown(wait=False)
        ChirpBase.stop(self)

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            try:
                pool.shutdown(wait=False)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass
        ChirpBase.__del__(self)
