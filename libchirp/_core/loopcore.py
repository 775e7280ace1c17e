"""The loop: a ``ch_loop_t``, its ownership token and the threads that drive it.

:class:`LoopCore` owns a ``ch_loop_t`` and one daemon thread, the **background
thread** (see docs/architecture.md). libuv is not thread-safe: whichever thread
holds the loop's ownership token runs it (``ch_loop_drive()``, the GIL released
while it blocks in the I/O poll) and then handles the events it produced
(``events.handle_batch``), in batches of up to ``BATCH``, holding the token, so
Python is entered once per batch and events are handled in order. A thread that
waits for a result (``get()``, a future's ``result()``) drives the loop itself
(:meth:`LoopCore.lead_until`); the background thread drives it whenever no such
thread does. The holder also runs ``call_soon()`` callbacks (queued in a deque
and announced with ``ch_loop_wake()``) and the Python timers (``timers``; the
drive's timeout is the time to the earliest deadline).

Batches: after the token holder has handled one batch of events (and the timers
that were due), it runs the *end-of-batch hooks* registered during that batch
(:meth:`LoopCore.at_batch_end`). Interfaces that hand work to another event loop
(``libchirp.asyncio``) collect what a batch produced and flush it there with one
wake-up per batch instead of one per message.

Embedding (docs/architecture.md#embedding-in-asyncio): a LoopCore may be run by
another event loop instead (``libchirp.asyncio``): :meth:`LoopCore.register`
decides (``LoopCore._embed_for``), the host object watches the backend fd and
calls :meth:`LoopCore.embed_run` on its thread, and :meth:`LoopCore.poke` arms
that run after a submission made on the host's own thread. The background thread
then only watches that the host attends to the loop, and threads that wait drive
the loop only where the host allows it (``host.may_lead()``).

Shared objects: :meth:`LoopCore.acquire_shared` keeps one object per key for the
nodes of the loop (the asyncio interface's hand-off to one asyncio loop).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Tuple

from .capi import ffi, lib
from .events import BATCH, WAKE_CALLS, PollBuffers, handle_batch
from .log import logger
from .outcomes import _error
from .timers import Timer, TimerHeap

if TYPE_CHECKING:  # pragma: no cover
    from .node import NodeCore

#: Bound for joining the loop's threads when the loop stops (seconds).
JOIN_LIMIT = 10.0
#: call_soon() callbacks run per wake-up before yielding to other events.
CALLS_PER_WAKE = 10000
#: Longest single drive of an application thread (seconds): it gives the loop up
#: and re-checks its condition at least this often, whatever woke it or not.
LEAD_SLICE = 0.2
#: Whether waiting application threads drive the loop themselves (lead_until());
#: False leaves it to the background thread (for comparisons).
LEAD_WAITERS = True
#: The background thread of an embedded loop looks this often (seconds) whether
#: the embedding event loop attends to the loop (CH_EMBED_WATCH_MS).
EMBED_WATCH = lib.CH_EMBED_WATCH_MS / 1000.0
#: Batches of events one embedded run handles at most before it yields to the
#: embedding event loop (which runs it again at once if more are pending).
EMBED_BATCHES = 4

_DRIVE_AGAIN = lib.CH_DRIVE_AGAIN  # -CH_BUSY: no token, re-check
#: What ch_loop_drive() answers once the loop has ended (csrc/error.h: -CH_<NAME>).
_LOOP_ENDED = -lib.CH_SHUTDOWN
_DRIVE_MESSAGES = lib.CH_DRIVE_MESSAGES
_DRIVE_BACKGROUND = lib.CH_DRIVE_BACKGROUND
_DRIVE_NOWAIT = lib.CH_DRIVE_NOWAIT
_DRIVE_HOLD = lib.CH_DRIVE_HOLD

_monotonic = time.monotonic
_get_ident = threading.get_ident
_drive = lib.ch_loop_drive
_release = lib.ch_loop_release
_backend_timeout = lib.ch_loop_backend_timeout


class LoopCore:
    """A ``ch_loop_t`` with its background thread (see the module docstring).

    ``lock`` guards the life-cycle flags, the node table and the validity of
    ``c`` (it is freed, and set to None, under the lock).
    """

    def __init__(self) -> None:
        out = ffi.new("ch_loop_t **")
        rc = lib.ch_loop_new(out)
        if rc != lib.CH_SUCCESS:
            raise _error(rc, "cannot create the chirp loop")
        self.c: Any = out[0]
        self.lock = threading.RLock()
        self.nodes: Dict[int, NodeCore] = {}
        self.tokens = itertools.count(2)  # 0 and 1 are wake-up tokens
        self.started = False
        self.stop_requested = False
        self.c_stopped = False  # ch_loop_stop() was called
        self.ended = False  # the dispatcher has finished (or the loop never ran)
        self.calls: Deque[Tuple[Callable[..., Any], tuple, dict]] = deque()
        #: The Python timers (request deadlines), run by the thread holding the loop.
        self.timers = TimerHeap()
        self.bg_thread: Optional[threading.Thread] = None
        self.bg_ident: Optional[int] = None
        #: The application thread holding the loop's token right now (see lead_until()).
        self.lead_ident: Optional[int] = None
        self._app_polling = 0  # application threads inside ch_loop_drive (under lock)
        self._app_idle = threading.Condition(self.lock)
        self._lead_buffers = threading.local()
        self.batch_end: List[Callable[[], None]] = []  # the thread handling events only
        #: Objects shared by the nodes of this loop, by key (see :meth:`acquire_shared`).
        self._shared: Dict[Any, List[Any]] = {}
        #: The host embedding the loop in another event loop (see :meth:`register`),
        #: or None: then the background thread drives it. Set and cleared under lock.
        self.embedder: Any = None
        #: Every node so far could be embedded with the same host (register()).
        self.embeddable = True
        self._detaching: List[Any] = []  # hosts told to detach; waited for before the free
        #: Batches of events (n > 0) handled by the background thread, its returns
        #: from ch_loop_drive(), and runs of the embedding event loop (embed_run()):
        #: diagnostics for the tests.
        self.bg_batches = 0
        self.bg_wakes = 0
        self.embed_runs = 0
        self._embed_bufs: Optional[PollBuffers] = None  # the embedding loop's thread only

    def next_token(self) -> int:
        return next(self.tokens)

    def in_dispatcher(self) -> bool:
        """True on the background thread, and on an application thread while it
        handles events (holding the loop's token in lead_until())."""
        ident = threading.get_ident()
        return ident == self.bg_ident or ident == self.lead_ident

    # -- life cycle ----------------------------------------------------------------------------

    def run(self) -> None:
        with self.lock:
            if self.stop_requested:
                raise RuntimeError("Cannot restart loop")
            if self.started:
                return
            self.started = True
            self.bg_thread = threading.Thread(
                target=self._background, name="libchirp-loop", daemon=True
            )
            self.bg_thread.start()

    def request_stop(self, join: bool = True) -> None:
        """Mark the loop stopped; really stop it once no node uses it."""
        with self.lock:
            self.stop_requested = True
        self.maybe_finish(join)

    def maybe_finish(self, join: bool = True) -> None:
        """Stop the C loop if a stop was requested and no node is left.

        With ``join``, wait (bounded) for the background thread to finish, unless
        called on a thread handling events. A loop that never ran is closed inline.
        """
        with self.lock:
            if self.stop_requested and not self.nodes and self.c is not None and not self.c_stopped:
                self.c_stopped = True
                self._unembed()  # the background thread ends the loop
                lib.ch_loop_stop(self.c)
                if not self.started:
                    # Never ran: let ch_loop_run close the handles here, then free.
                    lib.ch_loop_run(self.c)
                    lib.ch_loop_free(self.c)
                    self.c = None
                    self.ended = True
                    self.calls.clear()
                    return
            if not (self.c_stopped and self.started):
                return
            bg = self.bg_thread
        if not join or bg is None or self.in_dispatcher():
            return
        bg.join(JOIN_LIMIT)
        if bg.is_alive():
            logger.warning(
                "libchirp: the loop's background thread did not end within %.0f s "
                "(a callback may be blocking it)",
                JOIN_LIMIT,
            )

    @property
    def running(self) -> bool:
        return self.started and not self.stop_requested

    # -- nodes ---------------------------------------------------------------------------------

    def register(self, node: NodeCore) -> None:
        with self.lock:
            if self.stop_requested:
                raise RuntimeError("Loop is stopped")
            if not self.started:
                raise RuntimeError("Loop is not running; call run() first")
            if self.in_dispatcher():
                raise RuntimeError(
                    "a node cannot be started while handling the loop's events, as the "
                    "dispatcher (from a receive handler or a call_soon() callback)"
                )
            self._embed_for(node)
            self.nodes[node.token] = node

    # -- embedding -----------------------------------------------------------------------------

    def _embed_for(self, node: NodeCore) -> None:
        """Decide how the loop is driven once ``node`` runs on it too (caller holds lock).

        The rule (docs/architecture.md#embedding-in-asyncio): a loop is embedded in
        another event loop as long as every node ever started on it asks for the
        same host (``node.embed_key``, e.g. the asyncio loop of an
        ``asyncio.Chirp``); the first node does the embedding, the first node
        that asks for another host or none ends it for the rest of the loop's
        life: the background thread drives again.
        """
        key = node.embed_key
        host = self.embedder
        if host is not None and key is not None and key is host.key:
            return
        if host is None and key is not None and self.embeddable and not self.nodes:
            host = node.embed_factory(self)
            if host is not None:
                self.embedder = host
                lib.ch_loop_embed(self.c, 1)
                host.attach(lib.ch_loop_backend_fd(self.c))
                return
        self.embeddable = False
        if host is not None:
            self._unembed()

    def _unembed(self) -> None:
        """End the embedding: the background thread drives (caller holds lock)."""
        host = self.embedder
        self.embedder = None
        self.embeddable = False
        if host is None:
            return
        if self.c is not None:
            lib.ch_loop_embed(self.c, 0)
        self._detaching.append(host)
        host.detach()

    def embedder_for(self, key: Any) -> Any:
        """The host embedding the loop if it was made for ``key`` (an asyncio loop), else None."""
        host = self.embedder
        return host if host is not None and host.key is key else None

    def poke(self) -> None:
        """After a submission to the core: on the embedding loop's own thread, arm its
        run for what the submission left (the core does not wake that thread, see
        ch_loop_embed in csrc/chirp_ffi.h); nothing elsewhere."""
        host = self.embedder
        if host is None or host.soon or not host.on_thread():
            return
        c = self.c
        if c is not None:
            ms = lib.ch_loop_backend_timeout(c)
            if ms >= 0:
                host.timer_added(ms / 1000.0)

    def embed_run(self) -> Tuple[bool, float]:
        """The embedding event loop's thread: drive the loop without blocking.

        Called when the backend fd is readable or the embedding loop's timer
        fired: takes the ownership token (``ch_loop_drive`` with
        CH_DRIVE_NOWAIT), runs one libuv iteration, handles the events (up to
        EMBED_BATCHES batches), then Python timers and end-of-batch hooks, and
        gives the token up. Returns ``(busy, delay)``: ``busy`` when another
        thread holds the token (look again shortly); ``delay`` the seconds until
        the loop needs the next run without I/O (libuv or Python timers; 0 at
        once), or -1.0 if only I/O can bring work.

        The C loop stays valid meanwhile: it is freed only after the embedding
        loop stopped calling this (``_loop_ends()`` waits for the host's detach,
        which runs on the embedding loop's thread).
        """
        c = self.c
        if c is None or self.c_stopped:
            return False, -1.0
        bufs = self._embed_bufs
        if bufs is None:
            bufs = self._embed_bufs = PollBuffers()
        self.embed_runs += 1
        try:
            for _ in range(EMBED_BATCHES):
                n = _drive(c, bufs.events, BATCH, 0.0, bufs.seq, _DRIVE_NOWAIT, bufs.arena)
                if n < 0:
                    return n == _DRIVE_AGAIN, -1.0
                self.lead_ident = _get_ident()
                try:
                    handle_batch(self, bufs, n)
                finally:
                    self.lead_ident = None
                    _release(c)
                if n < BATCH:
                    break
        except BaseException:
            lib.ch_loop_release_if_owner(c)  # a KeyboardInterrupt after _drive() (see _lead_drive)
            raise
        ms = _backend_timeout(c)
        delay = ms / 1000.0 if ms >= 0 else -1.0
        if self.timers.heap:
            t = self.timers.timeout()
            if t >= 0 and (delay < 0 or t < delay):
                delay = t
        return False, delay

    def unregister(self, node: NodeCore, join: bool = True) -> None:
        with self.lock:
            self.nodes.pop(node.token, None)
        self.maybe_finish(join)

    # -- call_soon and timers ------------------------------------------------------------------

    def call_soon(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        with self.lock:
            if self.ended or self.c is None:
                raise RuntimeError("Loop is stopped")
            was_empty = not self.calls
            self.calls.append((func, args, kwargs))
            if was_empty:
                lib.ch_loop_wake(self.c, WAKE_CALLS)
        if was_empty:
            self.poke()

    def run_calls(self) -> None:
        calls = self.calls
        for _ in range(CALLS_PER_WAKE):
            try:
                func, args, kwargs = calls.popleft()
            except IndexError:
                return
            try:
                func(*args, **kwargs)
            except Exception:
                logger.exception("libchirp: exception in a call_soon() callback %r", func)
        with self.lock:  # more left: come back after other events
            if calls and self.c is not None and not self.ended:
                lib.ch_loop_wake(self.c, WAKE_CALLS)

    def add_timer(self, delay: float, func: Callable[..., Any], *args: Any) -> Timer:
        """Run ``func(*args)`` on the thread holding the loop after ``delay`` s; returns a handle.

        ``timers.cancel_timer(handle)`` cancels it (lazily: the entry stays in the heap).
        """
        timer, wake = self.timers.push(delay, func, args)
        if wake and not self.in_dispatcher():
            host = self.embedder
            if host is not None and host.on_thread():
                host.timer_added(delay)  # the embedding loop's timer, no wake-up
                return timer
            with self.lock:
                if self.c is not None and not self.ended:
                    lib.ch_loop_kick(self.c)
        return timer

    # -- end-of-batch hooks and shared objects ------------------------------------------------

    def at_batch_end(self, func: Callable[[], None]) -> None:
        """Run ``func()`` once the thread handling events has handled the current batch.

        Event-handling thread only. Every registration runs once (register once per
        batch if you want one call per batch). Hooks registered while the hooks
        run are run in the same round. Exceptions are logged.
        """
        self.batch_end.append(func)

    def end_batch(self) -> None:
        hooks = self.batch_end
        while hooks:
            self.batch_end = []
            for func in hooks:
                try:
                    func()
                except Exception:
                    logger.exception("libchirp: exception in an end-of-batch hook %r", func)
            hooks = self.batch_end

    def acquire_shared(self, key: Any, factory: Callable[[], Any]) -> Any:
        """Return the object shared under ``key``, made by ``factory()`` for the first user.

        Every call must be paired with :meth:`release_shared`; the object is
        forgotten when its last user released it.
        """
        with self.lock:
            entry = self._shared.get(key)
            if entry is None:
                entry = self._shared[key] = [factory(), 0]
            entry[1] += 1
            return entry[0]

    def release_shared(self, key: Any) -> None:
        """Drop one use of the object shared under ``key``."""
        with self.lock:
            entry = self._shared.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._shared[key]

    # -- driving the loop ----------------------------------------------------------------------

    def _background(self) -> None:
        """The background thread: drive the loop whenever no application thread does."""
        self.bg_ident = threading.get_ident()
        c = self.c
        bufs = PollBuffers()
        events, arena, seq = bufs.events, bufs.arena, bufs.seq
        timers = self.timers
        drive = lib.ch_loop_drive
        release = lib.ch_loop_release
        try:
            while True:
                if self.embedder is not None:
                    # Embedded: the core watches every EMBED_WATCH that the embedding
                    # loop attends to the loop; a Python timer it left undone
                    # counts as work left (the kick).
                    timeout = EMBED_WATCH
                    if timers.heap and timers.overdue(EMBED_WATCH):
                        lib.ch_loop_kick(c)
                else:
                    timeout = timers.timeout() if timers.heap else -1.0
                n = drive(c, events, BATCH, timeout, seq, _DRIVE_BACKGROUND, arena)
                self.bg_wakes += 1
                if n < 0:
                    if n == _DRIVE_AGAIN:
                        continue
                    break
                if n:
                    self.bg_batches += 1
                try:
                    handle_batch(self, bufs, n)
                finally:
                    release(c)  # sends submitted while handling are written here
        finally:
            self._loop_ends()

    def lead_until(
        self, ready: Callable[[], bool], timeout: Optional[float], messages: bool = False
    ) -> Optional[float]:
        """Application thread: drive the loop here until ``ready()`` or ``timeout``.

        Returns what is left of ``timeout`` (None for None) for the ordinary
        wait the caller does next.

        A thread that is going to wait for something the events bring (a
        message in a queue, a send future) takes the loop's ownership token and
        runs the loop itself (``ch_loop_drive()``, GIL released), instead of
        sleeping until another thread handled the events and woke it: no
        thread hop per message, and its own sends made while it holds the
        loop are written directly. One thread holds the token at a time, so
        events stay in order whichever thread handles them; the others wait
        until it gives the token up and re-check their condition (the batch
        may have been theirs). Returns early (the caller then waits the usual
        way) on a thread handling events, or once the loop is ending.

        ``messages``: the caller waits for received messages (get()), so mere
        completions need not end its drive (CH_DRIVE_MESSAGES: they come along
        with the next message, or after CH_LAZY_MS).
        """
        deadline = None if timeout is None else _monotonic() + timeout
        self._lead(ready, deadline, _DRIVE_MESSAGES if messages else 0)
        return None if deadline is None else max(0.0, deadline - _monotonic())

    def _lead(self, ready: Callable[[], bool], deadline: Optional[float], flags: int) -> None:
        if not LEAD_WAITERS or self.in_dispatcher():
            return
        host = self.embedder
        if host is not None and not host.may_lead():
            return  # the embedding loop runs and will handle the events (no competition)
        self._lead_drive(ready, deadline, flags)
        if host is not None:
            # The core does not wake the embedding loop's own thread (ch_loop_embed):
            # arm its run for what this thread's drives left behind.
            self.poke()

    def _lead_drive(self, ready: Callable[[], bool], deadline: Optional[float], flags: int) -> None:
        ident = threading.get_ident()
        local = self._lead_buffers
        bufs = getattr(local, "bufs", None)
        if bufs is None:
            bufs = local.bufs = PollBuffers()
        events, arena, seq = bufs.events, bufs.arena, bufs.seq
        timers = self.timers
        drive = lib.ch_loop_drive
        release = lib.ch_loop_release
        lock = self.lock
        with lock:
            c = self.c
            if c is None or self.ended or self.c_stopped:
                return
            # Before the first look at ready(): a token holder leaving from now
            # on (its batch possibly missed by that look) makes drive() return.
            seq[0] = lib.ch_loop_batch_seq(c)
        # After a drive that brought no events (a slice or the deadline ended, a
        # kick), the thread keeps the token while it looks at ready() and its
        # timers, and drives on with CH_DRIVE_HOLD: a long wait in slices then
        # wakes no other thread at each slice's end. It gives the token up after
        # every batch of events (waiting threads re-check) and when it leaves.
        hold = 0
        try:
            while not ready():
                wait = LEAD_SLICE
                if deadline is not None:
                    wait = min(wait, deadline - _monotonic())
                    if wait <= 0:
                        return
                if timers.heap:
                    wait = min(wait, timers.timeout())
                polling = False
                try:
                    with lock:
                        c = self.c
                        if c is None or self.ended or self.c_stopped:
                            return
                        self._app_polling += 1
                        polling = True
                    n = drive(c, events, BATCH, wait, seq, flags | hold, arena)  # GIL released
                    hold = 0
                    if n >= 0:
                        self.lead_ident = ident
                        try:
                            handle_batch(self, bufs, n)
                        finally:
                            self.lead_ident = None
                            if n:
                                release(c)
                            else:
                                hold = _DRIVE_HOLD
                except BaseException:
                    # A signal's exception (Ctrl-C's KeyboardInterrupt) can be raised
                    # between drive() returning with the token and the try above:
                    # give the token up, or every other thread waits for it for ever.
                    hold = 0
                    if polling:
                        lib.ch_loop_release_if_owner(c)
                    raise
                finally:
                    if polling:
                        with lock:
                            self._app_polling -= 1
                            if not self._app_polling and self.ended:  # see _loop_ends()
                                self._app_idle.notify_all()
                if n == _LOOP_ENDED:
                    return
        finally:
            if hold:
                release(c)

    def _loop_ends(self) -> None:
        # The backend fd closes with the loop: every embedding loop stops watching it first.
        detached = all(host.wait_detached(JOIN_LIMIT) for host in list(self._detaching))
        with self.lock:
            self.ended = True
            if not detached:
                logger.error("libchirp: an embedding event loop still watches the loop; not freed")
            # Application threads still inside ch_loop_drive() get -CH_SHUTDOWN at once
            # (the loop has ended); the loop is freed only after they left.
            if not self._app_idle.wait_for(lambda: not self._app_polling, JOIN_LIMIT):
                logger.error("libchirp: a thread still drives the loop; the loop is not freed")
            elif self.c is not None and detached:
                lib.ch_loop_free(self.c)
                self.c = None
        # Callbacks queued before the end still run, here on the background thread.
        while self.calls:
            func, args, kwargs = self.calls.popleft()
            try:
                func(*args, **kwargs)
            except Exception:
                logger.exception("libchirp: exception in a call_soon() callback %r", func)
        self.end_batch()
