"""The node: a ``ch_node_t`` with its life cycle (start, stop, abandon); the
operations are mixins, one module each.

:class:`NodeCore` owns a ``ch_node_t``. Application threads submit sends and
releases under the node's lock; the lock also guards the "closing" and "stop
sent" flags, so that nothing is ever submitted after ``ch_node_stop()``. Every
submission carries a token (unique per loop); the matching completion event
carries it back and the dispatcher (``events.handle_batch``) calls the node's
``on_*`` method, which resolves the future stored under it:

* ``sends.Sends``: send, send_many and their completions (``PendingSend``);
* ``requests.Requests``: the request table, expiry, expired identities;
* ``receives.Receives``: received messages, delivery, releases;
* ``nodestats.Statistics``: statistics snapshots.

The mixins share the node's state, all set in ``NodeCore.__init__`` (each table
by the ``_init_*`` method of its mixin): ``loop``, ``lock``, ``c``, the flags
``closing`` and ``stop_sent``, and each other's tables where one concern meets
another (a received reply resolves a request; a finished send may release).

Events carry ``node_token`` (given to ``ch_node_new``), which the dispatcher
maps to the NodeCore. Public objects (``Loop``, ``ChirpBase``) are *not*
referenced by the threads or by the cores, so a leaked public object is
garbage-collected and can warn with ``ResourceWarning``.

Threads: every ``on_*`` method runs on the thread holding the loop's token
(``LoopCore.in_dispatcher()``); everything else may run on any thread.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as _FutureTimeout  # builtin only from 3.11 on
from concurrent.futures import wait as _wait_futures
from typing import Any, Callable, List, Optional, Set, Type

from .._future import LightFuture
from ..config import Config
from ..message import MessageBase
from .capi import _MSG_P, _cast, ffi, lib
from .cconfig import check_config, fill_config
from .log import logger
from .loopcore import LoopCore
from .nodestats import Statistics
from .outcomes import _error, _set_result, _shutdown_error
from .receives import Receives
from .requests import Requests
from .sends import Sends

#: Bound for starting a node (seconds).
START_LIMIT = 30.0

_monotonic = time.monotonic
_new_future = object.__new__


class NodeCore(Sends, Requests, Receives, Statistics):
    """A ``ch_node_t`` and the Python state of its pending operations.

    ``lock`` (reentrant, so that a ``__del__`` running during garbage collection
    cannot deadlock) guards ``closing``, ``stop_sent``, ``c`` and every
    submission to the C node.
    """

    def __init__(
        self,
        loop: LoopCore,
        config: Config,
        deliver: Optional[Callable[[MessageBase], None]],
        message_class: Type[MessageBase],
        deliver_many: Optional[Callable[[List[MessageBase]], None]] = None,
    ) -> None:
        self.loop = loop
        self.timeout = config.TIMEOUT
        self.lock = threading.RLock()
        self.c: Any = None
        self.token = loop.next_token()
        self.closing = False  # new sends fail at once
        self.stop_sent = False  # ch_node_stop() was called: submit nothing more
        self.stopped = False  # NODE_STOPPED was handled
        self.free_on_stop = False  # free the node when NODE_STOPPED arrives (abandoned)
        self.done = False  # stop() finished
        self._init_sends()
        self._init_requests()
        self._init_receives(deliver, message_class, deliver_many)
        self._init_stats()
        self.release_after_send: Set[MessageBase] = set()  # see release_when_sent()
        #: Data of the interface that owns the node (the asyncio bridge), or None.
        self.context: Any = None
        #: The host the node's loop may be embedded in (LoopCore._embed_for): its key
        #: (an asyncio loop) and a factory making the host for a LoopCore; None: the
        #: node needs the loop driven by threads.
        self.embed_key: Any = None
        self.embed_factory: Optional[Callable[[LoopCore], Any]] = None
        self.start_future: Future = Future()
        self.stop_future: Future = Future()
        self.identity = bytes(16)
        self.port = 0
        self._stop_lock = threading.Lock()

    # -- start ---------------------------------------------------------------------------------

    def start(self, config: Config) -> None:
        ccfg, keep = fill_config(config)
        check_config(ccfg)
        loop = self.loop
        loop.register(self)
        out = ffi.new("ch_node_t **")
        rc = lib.ch_node_new(loop.c, ccfg, self.token, out)
        del keep
        if rc != lib.CH_SUCCESS:
            loop.unregister(self)
            raise _error(rc, "cannot create the node")
        self.c = out[0]
        rc = lib.ch_node_start(self.c, loop.next_token())
        if rc != lib.CH_SUCCESS:
            self._free_c()
            loop.unregister(self)
            raise _error(rc, "cannot start the node")
        try:
            left = loop.lead_until(self.start_future.done, START_LIMIT)
            status, text = self.start_future.result(left)
        except _FutureTimeout:
            self.abandon()
            raise RuntimeError("the chirp node did not start within %.0f s" % START_LIMIT) from None
        if status != lib.CH_SUCCESS:
            # The core answers a failed start only after closing what it opened.
            self._free_c()
            loop.unregister(self)
            raise _error(status, text)
        ident = ffi.new("uint8_t[16]")
        lib.ch_node_identity(self.c, ident)
        self.identity = bytes(ident)
        self.port = lib.ch_node_port(self.c)

    def _free_c(self) -> None:
        """Free the C node (after NODE_STOPPED, or after a failed start) and leftovers."""
        with self.lock:
            c, self.c = self.c, None
            orphans, self.orphans = self.orphans, []
            for msg in self.held:  # received after stop() looked, never released
                if msg._c is not None:
                    orphans.append(msg._c)
                    msg._c = None
            self.held.clear()
        for cmsg in orphans:
            lib.ch_msg_free(_cast(_MSG_P, cmsg))
        if c is not None:
            lib.ch_node_free(c)

    def on_started(self, status: int, text: str) -> None:
        _set_result(self.start_future, (status, text))

    def _future(self) -> LightFuture:
        """A future completed by this loop's events (a waiter may handle them itself)."""
        fut: LightFuture = _new_future(LightFuture)  # no __init__ (see LightFuture)
        fut._leader = self.loop
        return fut

    # -- stop ----------------------------------------------------------------------------------

    def stop(
        self,
        undelivered: Optional[Callable[[], List[MessageBase]]] = None,
        parked: Optional[Callable[[], List[MessageBase]]] = None,
    ) -> None:
        """Stop the node; idempotent and bounded, see ChirpBase.stop().

        ``undelivered``: the interface's hook that takes out and returns the
        received messages it never handed to the application (a queue's
        content), called once the wait for releases is over. They are not
        released: the stop detaches them unacknowledged, so a SYNCHRONOUS
        sender's send fails instead of succeeding for a message nobody got.
        ``parked``: returns those of them that the application can no longer
        get at all (a handler interface's, see ChirpBase._park()): the wait for
        releases does not wait for them.
        """
        if self.loop.in_dispatcher():
            raise RuntimeError(
                "stop() cannot be called while handling the loop's events, as the dispatcher "
                "(from a receive handler or a call_soon() callback); call it from another thread"
            )
        with self._stop_lock:
            if self.done:
                return
            with self.lock:
                self.closing = True
            # 1. Give the application TIMEOUT to release what it holds.
            deadline = _monotonic() + self.timeout
            while self._awaited(parked) and _monotonic() < deadline:
                time.sleep(0.005)
            dropped = undelivered() if undelivered is not None else []
            with self.lock:
                leaked = list(self.held.difference(dropped))
            if dropped:
                logger.warning(
                    "libchirp: the node on port %d stops with %d received message%s never "
                    "taken by the application; %s not acknowledged (a SYNCHRONOUS sender's "
                    "send fails)",
                    self.port, len(dropped), "" if len(dropped) == 1 else "s",
                    "it is" if len(dropped) == 1 else "they are",
                )  # fmt: skip
            releases = []
            for msg in leaked:
                try:
                    releases.append(self.release(msg))
                except RuntimeError:  # still being sent: its send completes below
                    pass
            if releases:  # let the owed ACKs go out before the connections close
                left = self.loop.lead_until(lambda: all(f.done() for f in releases), self.timeout)
                _wait_futures(releases, timeout=left)
            # The same for every release submitted earlier (with or without a
            # future, e.g. release_slot() or get() with AUTO_RELEASE right
            # before stop()): the core would drop an ACK still queued.
            deadline = _monotonic() + self.timeout
            while (
                self.releases or self.quiet_done < self.quiet_submitted
            ) and _monotonic() < deadline:
                time.sleep(0.002)
            # 2. Stop the C node; the core fails queued sends with SHUTDOWN first.
            with self.lock:
                self.stop_sent = True
                rc = lib.ch_node_stop(self.c, self.loop.next_token())
            limit = 2 * self.timeout + 10.0
            stopped = False
            if rc == lib.CH_SUCCESS:
                try:
                    self.stop_future.result(self.loop.lead_until(self.stop_future.done, limit))
                    stopped = True
                except _FutureTimeout:
                    pass
            if stopped:
                self._free_c()
            else:
                with self.lock:
                    if self.stopped:
                        stopped = True
                    else:
                        self.free_on_stop = True
                if stopped:
                    self._free_c()
            # 3. Every future completes.
            self._fail_pending()
            self.done = True
            self.loop.unregister(self)
        if not stopped:
            raise RuntimeError("the chirp node did not stop within %.0f s (code %d)" % (limit, rc))
        if leaked:
            raise RuntimeError(
                "Timeout waiting for released messages, maybe a message was not released."
            )

    def _awaited(self, parked: Optional[Callable[[], List[MessageBase]]]) -> bool:
        """Whether the application still holds messages the stop waits for."""
        held = self.held
        if not held or parked is None:
            return bool(held)
        return bool(held.difference(parked()))

    def on_stopped(self) -> None:
        with self.lock:
            self.stopped = True
            abandoned = self.free_on_stop
        if abandoned:
            self._free_c()
            self._fail_pending()
            self.done = True
            self.loop.unregister(self, join=False)
        else:
            _set_result(self.stop_future, None)

    def abandon(self) -> None:
        """Stop without waiting (garbage collection, failed start); frees on NODE_STOPPED."""
        with self.lock:
            if self.stop_sent or self.c is None:
                return
            self.closing = True
            # Received messages are not released: nobody can tell whether the
            # application took them (the node was dropped with its queue), so
            # they are freed unacknowledged after NODE_STOPPED and their
            # SYNCHRONOUS senders see the send fail rather than succeed.
            self.stop_sent = True
            self.free_on_stop = True
            rc = lib.ch_node_stop(self.c, self.loop.next_token())
        if rc != lib.CH_SUCCESS:
            logger.error("libchirp: cannot stop an abandoned node (code %d)", rc)
        else:
            self.loop.poke()

    def _fail_pending(self) -> None:
        """Fail every operation still pending with SHUTDOWN (after the node stopped)."""
        self._fail_sends(_shutdown_error)
        self._fail_releases(_shutdown_error)
        self._fail_requests(_shutdown_error)
        self._fail_stats(_shutdown_error)
        with self.lock:
            self.release_after_send.clear()
