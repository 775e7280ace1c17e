"""Queue interface: received messages are taken with ``get()`` (docs/flow-control.md#releasing).

Theory of operation
-------------------
:class:`Chirp` is both a :class:`~libchirp.chirp.ChirpBase` and a
``queue.Queue``. The thread handling the loop's events (often the one waiting
in ``get()`` itself) puts every received message that does
not answer a request into the queue; application threads take them with
``get()`` / ``get_nowait()``. With ``Config.AUTO_RELEASE`` (default) the slot
is released when ``get()`` hands the message out (as in libchirp 1.x), i.e.
before the application processed it; with AUTO_RELEASE False the application
calls ``msg.release_slot()`` itself. ``disable_queue = True`` releases such
messages at once and never queues them (useful for a node that only sends and
makes requests).

``stop()`` wakes the threads blocked in ``get()`` on an empty queue with
:class:`~libchirp.errors.ChirpShutdown`; ``get()`` on a stopped node raises it
at once.
"""

from __future__ import annotations

import queue as _queue
from time import monotonic as _monotonic
from typing import List, Optional, cast

from .chirp import ChirpBase
from .config import Config
from .errors import ChirpShutdown
from .loop import Loop
from .message import Message, MessageBase

__all__ = ["Chirp", "Config", "Loop", "Message"]


class Chirp(ChirpBase, _queue.Queue[Message]):
    """A chirp node whose received messages are read with ``get()``."""

    def __init__(self, loop: Loop, config: Config) -> None:
        _queue.Queue.__init__(self)
        self._shut_down = False  # stop() began: waiting get() calls give up
        self._disable_queue = False
        self._auto_release = config.AUTO_RELEASE
        ChirpBase.__init__(self, loop, config, recv_many=self._enqueue_many)

    @property
    def disable_queue(self) -> bool:
        """When True, messages that do not answer a request are released, not queued."""
        return self._disable_queue

    @disable_queue.setter
    def disable_queue(self, value: bool) -> None:
        self._disable_queue = bool(value)

    def _enqueue_many(self, msgs: List[Message]) -> None:
        """Thread handling events: the messages of one batch (one lock, one wake-up)."""
        if self._disable_queue:
            self._release_taken(msgs)
            return
        n = len(msgs)
        with self.mutex:
            self.queue.extend(msgs)
            self.unfinished_tasks += n
            self.not_empty.notify(n)

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Message:
        """Remove and return a received message (``queue.Empty`` as usual).

        With ``Config.AUTO_RELEASE`` the message's slot is released here. Raises
        :class:`~libchirp.errors.ChirpShutdown` at once on a stopped node, and in
        threads waiting here when ``stop()`` begins and nothing is queued.
        """
        return self._take(1, block, timeout)[0]

    def get_many(
        self, max_count: int = 1024, block: bool = True, timeout: Optional[float] = None
    ) -> List[Message]:
        """Remove and return up to ``max_count`` received messages, at least one.

        Waits like ``get()`` for the first message (``queue.Empty`` when
        ``block`` is False or ``timeout`` passes without one), then takes what
        else is queued without waiting. With ``Config.AUTO_RELEASE`` their slots
        are released here, in one hand-over to the core. Raises
        ``ChirpShutdown`` like ``get()``.
        """
        if max_count < 1:
            raise ValueError("get_many(): max_count must be at least 1 (%r)" % (max_count,))
        return self._take(max_count, block, timeout)

    def _take(self, max_count: int, block: bool, timeout: Optional[float]) -> List[Message]:
        self._check_process()
        if self._shut_down and (self._stopped or not self._qsize()):
            raise ChirpShutdown("the node is stopped")
        if block and not self._qsize():
            if timeout is not None and timeout < 0:
                raise ValueError("'timeout' must be a non-negative number")
            timeout = self._lead(timeout)
        with self.not_empty:
            if not block:
                if not self._qsize():
                    raise _queue.Empty
            elif timeout is None:
                while not self._qsize() and not self._shut_down:
                    self.not_empty.wait()
            else:
                end = _monotonic() + timeout
                while not self._qsize() and not self._shut_down:
                    remaining = end - _monotonic()
                    if remaining <= 0.0:
                        raise _queue.Empty
                    self.not_empty.wait(remaining)
            if not self._qsize():
                raise ChirpShutdown("the node was stopped while waiting for a message")
            items = self.queue
            if max_count >= len(items):
                msgs = list(items)
                items.clear()
            else:
                msgs = [items.popleft() for _ in range(max_count)]
            # (no not_full.notify(): the queue is unbounded, nobody waits in put())
        if self._auto_release:
            self._release_taken(msgs)
        return msgs

    def stop(self) -> None:
        """Stop the node (see ``ChirpBase.stop()``).

        Threads blocked in ``get()``/``get_many()`` on an empty queue are woken
        at once with :class:`~libchirp.errors.ChirpShutdown`; messages already
        queued are still handed out while the node stops (their releases are
        what the stop waits for). Afterwards ``get()`` raises at once.
        """
        self._check_process()
        with self.mutex:
            self._shut_down = True
            self.not_empty.notify_all()
        ChirpBase.stop(self)

    def _take_undelivered(self) -> List[MessageBase]:
        """Empty the queue for the stop: nobody took these messages, so they
        are not acknowledged (get() raises ChirpShutdown from now on)."""
        with self.mutex:
            msgs = list(self.queue)
            self.queue.clear()
            self.unfinished_tasks = max(0, self.unfinished_tasks - len(msgs))
            if msgs:
                self.all_tasks_done.notify_all()
        return ChirpBase._take_undelivered(self) + cast(List[MessageBase], msgs)

    def _lead(self, timeout: Optional[float]) -> Optional[float]:
        """Handle the loop's events on this thread until a message is queued.

        Returns what is left of ``timeout`` for the ordinary wait that follows
        (see ``LoopCore.lead_until``: the thread that waits for a message takes
        the events itself instead of waiting for another thread to hand it over).
        """
        node = self._node
        if node is None or (timeout is not None and timeout < 0):
            return timeout
        return node.loop.lead_until(self._ready, timeout, messages=True)

    def _ready(self) -> bool:
        return bool(self._qsize()) or self._shut_down

    def _release_taken(self, msgs: List[Message]) -> None:
        """Release without futures (nobody sees them): AUTO_RELEASE of messages
        handed out, or messages not queued because of ``disable_queue``."""
        node = self._node
        if node is not None:
            node.release_many(cast(List[MessageBase], msgs))
