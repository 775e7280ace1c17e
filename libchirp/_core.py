"""The one internal module that talks to the compiled core (``libchirp._ffi``).

Theory of operation
-------------------
Everything that touches ``ffi``/``lib`` lives here; the public modules
(``loop``, ``chirp``, ``queue``, ...) are thin shells over two classes:

* :class:`LoopCore` owns a ``ch_loop_t`` and one daemon thread, the
  **background thread** (see docs/architecture.md). libuv is not thread-safe:
  whichever thread holds the loop's ownership token runs it
  (``ch_loop_drive()``, the GIL released while it blocks in the I/O poll) and
  then handles the events it produced, in batches of up to 256, holding the
  token, so Python is entered once per batch and events are handled in order.
  A thread that waits for a result (``get()``, a future's ``result()``)
  drives the loop itself (:meth:`LoopCore.lead_until`); the background thread
  drives it whenever no such thread does. The holder also runs ``call_soon()``
  callbacks (queued in a deque and announced with ``ch_loop_wake()``) and the
  request timers (a heap of deadlines; the drive's timeout is the time to the
  earliest deadline).

* :class:`NodeCore` owns a ``ch_node_t``. Application threads submit sends and
  releases under the node's lock; the lock also guards the "closing" and "stop
  sent" flags, so that nothing is ever submitted after ``ch_node_stop()``. Every
  submission carries a token (unique per loop); the matching completion event
  carries it back and the dispatcher resolves the future stored under it.
  Header and data ``bytes`` of a send are handed to C without copying
  (``ffi.from_buffer``) and kept alive in the pending entry until SEND_DONE.

Batches: after the token holder has handled one batch of events (and the timers
that were due), it runs the *end-of-batch hooks* registered during that batch
(:meth:`LoopCore.at_batch_end`). Interfaces that hand work to another event loop
(``libchirp.asyncio``) collect what a batch produced and flush it there with one
wake-up per batch instead of one per message.

Requests (docs/protocol.md#answering, a change from libchirp 1.x): a reply that arrives after its
request timed out is counted (``late_replies``) and dropped: its slot is
released at once (so the peer still gets its ACK) and it is never delivered as
an ordinary message (libchirp 1.x delivered it; see ``DROP_LATE_REPLIES``).

Statistics: ``ch_node_stats()`` is answered by a STATS event carrying a C
snapshot; the dispatcher copies it into plain dicts (``libchirp.stats``) and
frees it with ``ch_stats_free()`` whatever happens.

Events carry ``node_token`` (given to ``ch_node_new``), which the dispatcher
maps to the NodeCore. Public objects (``Loop``, ``ChirpBase``) are *not*
referenced by the threads or by the cores, so a leaked public object is
garbage-collected and can warn with ``ResourceWarning``.

Embedding (docs/architecture.md#embedding-in-asyncio): a LoopCore may be run
by another event loop instead (``libchirp.asyncio``): :meth:`LoopCore.register`
decides (``LoopCore._embed_for``), the host object watches the backend fd and
calls :meth:`LoopCore.embed_run` on its thread, and :meth:`LoopCore.poke` arms
that run after a submission made on the host's own thread. The background
thread then only watches that the host attends to the loop, and threads that
wait drive the loop only where the host allows it (``host.may_lead()``).

Threads: every ``on_*`` method runs on the thread holding the loop's token
(the background thread, a waiting application thread or the embedding event
loop's thread, see ``LoopCore.in_dispatcher()``); everything else may run on
any thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as _FutureTimeout  # builtin only from 3.11 on
from concurrent.futures import wait as _wait_futures
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple, Type

from ._future import LightFuture
from .config import Config
from .errors import ChirpError, ChirpShutdown, ChirpTimeoutError, chirp_error_to_exception
from .message import MessageBase
from .stats import CounterStats, NodeStats, RemoteStats, remote_key

try:
    from ._ffi import ffi, lib
except ImportError as _exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "libchirp: the compiled core libchirp._ffi cannot be imported (%s); "
        "build it with `make build`" % (_exc,)
    ) from _exc

#: The C API version this Python code was written against (CH_VERSION_STAMP).
_EXPECTED_STAMP = 10011

_stamp = lib.ch_version_stamp()
if _stamp != _EXPECTED_STAMP:  # pragma: no cover - depends on the build
    raise ImportError(
        "libchirp: the compiled core is stale (stamp %d, expected %d); rebuild with `make build`"
        % (_stamp, _EXPECTED_STAMP)
    )

__all__ = ["ffi", "lib", "LoopCore", "NodeCore", "fill_config", "check_config", "logger"]

logger = logging.getLogger("libchirp")

#: Events per ch_loop_drive() batch.
BATCH = 256
#: Bound for starting a node (seconds).
START_LIMIT = 30.0
#: Bound for joining the loop's threads when the loop stops (seconds).
JOIN_LIMIT = 10.0
#: How many expired request identities are remembered (late replies are dropped).
EXPIRED_MEMORY = 10000
#: What happens to a reply that arrives after its request timed out: it is always
#: counted (``late_replies``). True (the default) drops it: it is
#: released at once, so the peer still gets its ACK, and never delivered. False
#: restores libchirp 1.x (docs/protocol.md#answering): it is delivered as an ordinary message.
DROP_LATE_REPLIES = True
#: call_soon() callbacks run per wake-up before yielding to other events.
CALLS_PER_WAKE = 10000

_EV_NODE_STARTED = lib.CH_EV_NODE_STARTED
_EV_NODE_STOPPED = lib.CH_EV_NODE_STOPPED
_EV_SEND_DONE = lib.CH_EV_SEND_DONE
_EV_RECV = lib.CH_EV_RECV
_EV_RELEASE_DONE = lib.CH_EV_RELEASE_DONE
_EV_LOG = lib.CH_EV_LOG
_EV_WAKE = lib.CH_EV_WAKE
_EV_STATS = lib.CH_EV_STATS
_NULL = ffi.NULL

_WAKE_CALLS = 1  # token of the wake-up that announces call_soon() callbacks
_DRIVE_AGAIN = lib.CH_DRIVE_AGAIN  # -CH_BUSY: no token, re-check
#: What ch_loop_drive() answers once the loop has ended (csrc/error.h: -CH_<NAME>).
_LOOP_ENDED = -lib.CH_SHUTDOWN
_DRIVE_MESSAGES = lib.CH_DRIVE_MESSAGES
_DRIVE_BACKGROUND = lib.CH_DRIVE_BACKGROUND
_DRIVE_NOWAIT = lib.CH_DRIVE_NOWAIT
#: Token of releases nobody waits for (release_many): their completions are only
#: counted, so that stop() can let the owed ACKs go out first. Real tokens start at 2.
_QUIET_RELEASE = 1
_TIMEOUT = lib.CH_TIMEOUT
#: libuv's clock counts whole milliseconds: deadlines of the core and of Python
#: timers set within the same millisecond may end in either order by this much.
_CLOCK_SLACK = 0.002
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

_monotonic = time.monotonic
_get_ident = threading.get_ident
_drive = lib.ch_loop_drive
_release = lib.ch_loop_release
_backend_timeout = lib.ch_loop_backend_timeout
_buffer = ffi.buffer
_string = ffi.string


def _event_struct() -> struct.Struct:
    """A struct.Struct unpacking one ch_event_t (the fields Python reads).

    Built from the compiled layout (ffi.offsetof), so it follows the header.
    A batch is then one bytes copy and struct.iter_unpack() instead of one
    cffi attribute access per field. Pointers come out as integers.
    """
    fields = [
        ("type", "i"), ("status", "i"), ("node_token", "Q"), ("token", "Q"), ("msg", "Q"),
        ("identity", "16s"), ("serial", "I"), ("count", "I"), ("header", "Q"), ("data", "Q"),
        ("data_len", "I"), ("header_len", "H"), ("port", "H"), ("remote_identity", "16s"),
        ("text", "46s"),  # RECV: the address (INET6_ADDRSTRLEN), NUL padded
    ]  # fmt: skip
    fmt, pos = "=", 0
    for name, code in fields:
        offset = ffi.offsetof("ch_event_t", name)
        if offset > pos:
            fmt += "%dx" % (offset - pos)
        fmt += code
        pos = offset + struct.calcsize("=" + code)
    size = ffi.sizeof("ch_event_t")
    return struct.Struct(fmt + "%dx" % (size - pos))


_EVENT = _event_struct()
_EVENT_SIZE = _EVENT.size
#: Bytes per poll for copies of small payloads (ch_arena_t).
ARENA_SIZE = 256 * 1024
_cast = ffi.cast
_MSG_P = ffi.typeof("ch_message_t *")
_MSG_PP = ffi.typeof("ch_message_t **")
_CHAR_P = ffi.typeof("char *")


class _PollBuffers:
    """What one driving thread hands to ch_loop_drive(): events and an arena."""

    __slots__ = ("events", "arena", "arena_buf", "arena_base", "seq")

    def __init__(self) -> None:
        self.events = ffi.new("ch_event_t[]", BATCH)
        self.arena_buf = ffi.new("char[]", ARENA_SIZE)
        self.arena = ffi.new("ch_arena_t *", {"buf": self.arena_buf, "cap": ARENA_SIZE})
        self.arena_base = int(ffi.cast("uintptr_t", self.arena_buf))
        self.seq = ffi.new("uint64_t *")


def _addresses() -> Callable[[bytes], str]:
    """Text of a RECV event's address field (NUL padded bytes), remembered."""
    known: Dict[bytes, str] = {}

    def address(raw: bytes) -> str:
        text = known.get(raw)
        if text is None:
            text = raw.split(b"\0", 1)[0].decode("ascii")
            if len(known) < 4096:
                known[raw] = text
        return text

    return address


_address = _addresses()

#: One message of ch_node_send_batch() (ch_send_t, CH_SEND_SIZE bytes):
#: token, data_len, header_len, port, family, identity, addr.
_SEND_RECORD = struct.Struct("=QIHHB16s16s7x")
assert _SEND_RECORD.size == lib.CH_SEND_SIZE
#: send_many() copies messages of up to this many header + data bytes into one
#: batch (one call into the core, one lock, one wake-up); larger ones are handed
#: over without a copy, one call each.
SEND_COPY_LIMIT = 8192


def _text(raw: Any) -> str:
    return _string(raw).decode("utf-8", "replace")


def _set_result(fut: Future, value: Any) -> None:
    try:
        fut.set_result(value)
    except InvalidStateError:  # cancelled by the application
        pass


def _set_exception(fut: Future, exc: BaseException) -> None:
    try:
        fut.set_exception(exc)
    except InvalidStateError:
        pass


def _error(code: int, text: Optional[str] = None) -> ChirpError:
    """chirp_error_to_exception() for a code known to be an error (not SUCCESS)."""
    exc = chirp_error_to_exception(code, text)
    if exc is None:  # pragma: no cover - the core never reports SUCCESS as a failure
        exc = ChirpError("unexpected success code")
    return exc


#: A submission refused here, before the core (the node is stopping, or a release has
#: nothing to release). Positive, so it never equals a core code: those are negative
#: (csrc/error.h).
_REFUSED = 1


def _submit_error(rc: int) -> ChirpError:
    """The failure of a submission: a negative core code, or _REFUSED (node stopping)."""
    return _shutdown_error("node is stopping") if rc == _REFUSED else _error(rc)


def _shutdown_error(text: str = "node stopped") -> ChirpShutdown:
    exc = chirp_error_to_exception(lib.CH_SHUTDOWN, text)
    assert isinstance(exc, ChirpShutdown)
    return exc


# -- configuration -------------------------------------------------------------------------------


def fill_config(config: Config) -> Tuple[Any, List[Any]]:
    """Return a ``ch_config_t *`` filled from ``config`` and the objects it points into.

    The second element keeps the path strings alive; ``ch_node_new`` copies them.
    """
    c = ffi.new("ch_config_t *")
    c.reuse_time = config.REUSE_TIME
    c.timeout = config.TIMEOUT
    c.port = config.PORT
    c.backlog = config.BACKLOG
    c.max_slots = config.MAX_SLOTS
    c.synchronous = 1 if config.SYNCHRONOUS else 0
    c.disable_signals = 1 if config.DISABLE_SIGNALS else 0
    c.buffer_size = config.BUFFER_SIZE
    c.max_msg_size = config.MAX_MSG_SIZE
    ffi.memmove(c.bind_v6, socket.inet_pton(socket.AF_INET6, config.BIND_V6), 16)
    ffi.memmove(c.bind_v4, socket.inet_pton(socket.AF_INET, config.BIND_V4), 4)
    ffi.memmove(c.identity, config.IDENTITY, 16)
    keep: List[Any] = []
    if config.CERT_CHAIN_PEM is not None:
        s = ffi.new("char[]", os.fsencode(config.CERT_CHAIN_PEM))
        keep.append(s)
        c.cert_chain_pem = s
    if config.DH_PARAMS_PEM is not None:
        s = ffi.new("char[]", os.fsencode(config.DH_PARAMS_PEM))
        keep.append(s)
        c.dh_params_pem = s
    c.disable_encryption = 1 if config.DISABLE_ENCRYPTION else 0
    c.max_send_queue = config.MAX_SEND_QUEUE
    c.max_connections = config.MAX_CONNECTIONS
    c.max_connections_per_address = config.MAX_CONNECTIONS_PER_ADDRESS
    return c, keep


def check_config(ccfg: Any) -> None:
    """Run ``ch_config_check`` (docs/config.md); raise ValueError with its text."""
    err = ffi.new("char[]", 512)
    rc = lib.ch_config_check(ccfg, err, 512)
    if rc != lib.CH_SUCCESS:
        raise _error(rc, _text(err))


# -- loop ----------------------------------------------------------------------------------------


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
        self._tokens = itertools.count(2)  # 0 and 1 are wake-up tokens
        self.started = False
        self.stop_requested = False
        self.c_stopped = False  # ch_loop_stop() was called
        self.ended = False  # the dispatcher has finished (or the loop never ran)
        self.calls: Deque[Tuple[Callable[..., Any], tuple, dict]] = deque()
        self._timers: List[list] = []
        self._timer_lock = threading.Lock()
        self._timer_seq = itertools.count()
        self._poll_deadline = float("inf")
        self.bg_thread: Optional[threading.Thread] = None
        self.bg_ident: Optional[int] = None
        #: The application thread holding the loop's token right now (see lead_until()).
        self.lead_ident: Optional[int] = None
        self._app_polling = 0  # application threads inside ch_loop_drive (under lock)
        self._app_idle = threading.Condition(self.lock)
        self._lead_buffers = threading.local()
        self._batch_end: List[Callable[[], None]] = []  # the thread handling events only
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
        self._embed_bufs: Optional[_PollBuffers] = None  # the embedding loop's thread only

    def next_token(self) -> int:
        return next(self._tokens)

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
            bufs = self._embed_bufs = _PollBuffers()
        self.embed_runs += 1
        try:
            for _ in range(EMBED_BATCHES):
                n = _drive(c, bufs.events, BATCH, 0.0, bufs.seq, _DRIVE_NOWAIT, bufs.arena)
                if n < 0:
                    return n == _DRIVE_AGAIN, -1.0
                self.lead_ident = _get_ident()
                try:
                    self._handle(bufs, n)
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
        if self._timers:
            t = self._poll_timeout()
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
                lib.ch_loop_wake(self.c, _WAKE_CALLS)
        if was_empty:
            self.poke()

    def _run_calls(self) -> None:
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
                lib.ch_loop_wake(self.c, _WAKE_CALLS)

    def add_timer(self, delay: float, func: Callable[..., Any], *args: Any) -> list:
        """Run ``func(*args)`` on the thread holding the loop after ``delay`` s; returns a handle.

        ``cancel_timer(handle)`` cancels it (lazily: the entry stays in the heap).
        """
        deadline = _monotonic() + delay
        entry = [deadline, next(self._timer_seq), func, args]
        with self._timer_lock:
            heapq.heappush(self._timers, entry)
            wake = deadline < self._poll_deadline
        if wake and not self.in_dispatcher():
            host = self.embedder
            if host is not None and host.on_thread():
                host.timer_added(delay)  # the embedding loop's timer, no wake-up
                return entry
            with self.lock:
                if self.c is not None and not self.ended:
                    lib.ch_loop_kick(self.c)
        return entry

    # -- end-of-batch hooks and shared objects ------------------------------------------------

    def at_batch_end(self, func: Callable[[], None]) -> None:
        """Run ``func()`` once the thread handling events has handled the current batch.

        Event-handling thread only. Every registration runs once (register once per
        batch if you want one call per batch). Hooks registered while the hooks
        run are run in the same round. Exceptions are logged.
        """
        self._batch_end.append(func)

    def _end_batch(self) -> None:
        hooks = self._batch_end
        while hooks:
            self._batch_end = []
            for func in hooks:
                try:
                    func()
                except Exception:
                    logger.exception("libchirp: exception in an end-of-batch hook %r", func)
            hooks = self._batch_end

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

    @staticmethod
    def cancel_timer(entry: Optional[list]) -> None:
        if entry is not None:
            entry[2] = None
            entry[3] = ()  # do not keep the request and its reply alive until the deadline

    def _poll_timeout(self) -> float:
        with self._timer_lock:
            timers = self._timers
            while timers and timers[0][2] is None:  # cancelled: no need to wake for it
                heapq.heappop(timers)
            if not timers:
                self._poll_deadline = float("inf")
                return -1.0
            deadline = timers[0][0]
            self._poll_deadline = deadline
        return max(0.0, deadline - _monotonic())

    def _timers_overdue(self, late: float) -> bool:
        """A Python timer that is not cancelled was due more than ``late`` seconds ago."""
        with self._timer_lock:
            timers = self._timers
            while timers and timers[0][2] is None:
                heapq.heappop(timers)
            return bool(timers) and timers[0][0] < _monotonic() - late

    def _run_timers(self) -> None:
        now = _monotonic()
        due = []
        with self._timer_lock:
            timers = self._timers
            while timers and timers[0][0] <= now:
                due.append(heapq.heappop(timers))
        for entry in due:
            func = entry[2]
            if func is None:
                continue
            try:
                func(*entry[3])
            except Exception:
                logger.exception("libchirp: exception in a timer callback %r", func)

    # -- driving the loop ----------------------------------------------------------------------

    def _background(self) -> None:
        """The background thread: drive the loop whenever no application thread does."""
        self.bg_ident = threading.get_ident()
        c = self.c
        bufs = _PollBuffers()
        events, arena, seq = bufs.events, bufs.arena, bufs.seq
        drive = lib.ch_loop_drive
        release = lib.ch_loop_release
        try:
            while True:
                if self.embedder is not None:
                    # Embedded: the core watches every EMBED_WATCH that the embedding
                    # loop attends to the loop; a Python timer it left undone
                    # counts as work left (the kick).
                    timeout = EMBED_WATCH
                    if self._timers and self._timers_overdue(EMBED_WATCH):
                        lib.ch_loop_kick(c)
                else:
                    timeout = self._poll_timeout() if self._timers else -1.0
                n = drive(c, events, BATCH, timeout, seq, _DRIVE_BACKGROUND, arena)
                self.bg_wakes += 1
                if n < 0:
                    if n == _DRIVE_AGAIN:
                        continue
                    break
                if n:
                    self.bg_batches += 1
                try:
                    self._handle(bufs, n)
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
            bufs = local.bufs = _PollBuffers()
        events, arena, seq = bufs.events, bufs.arena, bufs.seq
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
        while not ready():
            wait = LEAD_SLICE
            if deadline is not None:
                wait = min(wait, deadline - _monotonic())
                if wait <= 0:
                    return
            if self._timers:
                wait = min(wait, self._poll_timeout())
            polling = False
            try:
                with lock:
                    c = self.c
                    if c is None or self.ended or self.c_stopped:
                        return
                    self._app_polling += 1
                    polling = True
                n = drive(c, events, BATCH, wait, seq, flags, arena)  # GIL released meanwhile
                if n >= 0:
                    self.lead_ident = ident
                    try:
                        self._handle(bufs, n)
                    finally:
                        self.lead_ident = None
                        release(c)
            except BaseException:
                # A signal's exception (Ctrl-C's KeyboardInterrupt) can be raised
                # between drive() returning with the token and the try above:
                # give the token up, or every other thread waits for it for ever.
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

    def _handle(self, bufs: _PollBuffers, n: int) -> None:
        """Handle one batch of events, then due timers and end-of-batch hooks.

        The batch is decoded with one bytes copy and struct.iter_unpack();
        rare fields (texts of failures and logs, statistics) are read from
        the cdata event. Payloads copied to the arena are sliced out of it.
        """
        nodes = self.nodes
        events = bufs.events
        used = bufs.arena[0].len
        arena = _buffer(bufs.arena_buf, used) if used else None
        base = bufs.arena_base
        end = base + used
        for i, rec in enumerate(_EVENT.iter_unpack(_buffer(events, n * _EVENT_SIZE))):
            t = rec[0]
            try:
                if t == _EV_RECV:
                    node = nodes.get(rec[2])
                    if node is not None:
                        h = rec[8]
                        if arena is not None and base <= h < end:
                            off = h - base
                            hl, dl = rec[11], rec[10]
                            header = arena[off : off + hl] if hl else b""
                            data = arena[off + hl : off + hl + dl] if dl else b""
                        else:
                            header = _buffer(_cast(_CHAR_P, h), rec[11])[:] if rec[11] else b""
                            data = _buffer(_cast(_CHAR_P, rec[9]), rec[10])[:] if rec[10] else b""
                        node.on_recv(rec, header, data)
                    else:
                        logger.error("libchirp: message for an unknown node; dropped")
                elif t == _EV_SEND_DONE:
                    node = nodes.get(rec[2])
                    if node is not None:
                        count = rec[7]
                        status = rec[1]
                        if count == 1:
                            node.on_send_done(rec[3], status, events[i].text if status else b"")
                        else:
                            node.on_sends_done(rec[3], count)
                elif t == _EV_RELEASE_DONE:
                    node = nodes.get(rec[2])
                    if node is not None:
                        status = rec[1]
                        text = events[i].text if status else b""
                        node.on_release_done(rec[3], status, text, rec[7])
                elif t == _EV_LOG:
                    level = rec[1]
                    if logger.isEnabledFor(level):
                        logger.log(level, "%s", _text(events[i].text))
                elif t == _EV_WAKE:
                    if rec[3] == _WAKE_CALLS:
                        self._run_calls()
                elif t == _EV_NODE_STARTED:
                    node = nodes.get(rec[2])
                    if node is not None:
                        node.on_started(rec[1], _text(events[i].text))
                elif t == _EV_NODE_STOPPED:
                    node = nodes.get(rec[2])
                    if node is not None:
                        node.on_stopped()
                elif t == _EV_STATS:
                    ev = events[i]
                    st = ev.stats
                    try:
                        node = nodes.get(rec[2])
                        if node is not None:
                            node.on_stats(rec[3], rec[1], ev.text, st)
                    finally:
                        if st != _NULL:
                            lib.ch_stats_free(st)
                else:
                    logger.warning("libchirp: unknown event type %d", t)
            except Exception:
                logger.exception("libchirp: exception while handling event type %d", t)
        if self._timers:
            self._run_timers()
        if self._batch_end:
            self._end_batch()

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
        self._end_batch()


# -- node ----------------------------------------------------------------------------------------


class NodeCore:
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
        self.deliver = deliver
        #: Takes the messages of a batch at once (instead of deliver), if given.
        self.deliver_many = deliver_many
        self.inbox: List[MessageBase] = []  # deliver_many: received in the current batch
        self.message_class = message_class
        self.lock = threading.RLock()
        self.c: Any = None
        self.token = loop.next_token()
        self.closing = False  # new sends fail at once
        self.stop_sent = False  # ch_node_stop() was called: submit nothing more
        self.stopped = False  # NODE_STOPPED was handled
        self.free_on_stop = False  # free the node when NODE_STOPPED arrives (abandoned)
        self.done = False  # stop() finished
        self.sends: Dict[int, list] = {}  # token -> [future, msg, header, data, request]
        self.releases: Dict[int, Tuple[Future, bytes, int]] = {}
        self.quiet_submitted = 0  # releases without a future, submitted (under lock)
        self.quiet_done = 0  # ... and completed (by the thread handling events)
        self.requests: Dict[bytes, Any] = {}  # identity -> ChirpFuture (has ._timer)
        self.expired: OrderedDict[bytes, None] = OrderedDict()
        self.late_replies = 0
        self.stats_pending: Dict[int, Future] = {}
        self.release_after_send: Set[MessageBase] = set()  # see release_when_sent()
        #: Data of the interface that owns the node (the asyncio bridge), or None.
        self.context: Any = None
        #: The host the node's loop may be embedded in (LoopCore._embed_for): its key
        #: (an asyncio loop) and a factory making the host for a LoopCore; None: the
        #: node needs the loop driven by threads.
        self.embed_key: Any = None
        self.embed_factory: Optional[Callable[[LoopCore], Any]] = None
        self.held: Set[MessageBase] = set()
        self.orphans: List[Any] = []  # C messages received after ch_node_stop()
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

    # -- send ----------------------------------------------------------------------------------

    def _future(self) -> LightFuture:
        """A future completed by this loop's events (a waiter may handle them itself)."""
        fut = LightFuture()
        fut._leader = self.loop
        return fut

    def send(self, msg: MessageBase, request: Optional[Future] = None) -> Future:
        fut = self._future()
        with self.lock:
            rc = self._submit_send(msg, fut, request)
        if rc != 0:
            fut.set_exception(_submit_error(rc))
        else:
            self.loop.poke()
        return fut

    def send_many(self, msgs: List[MessageBase]) -> List[Future]:
        """send() for each message, in order; all or nothing on misuse.

        Small messages (up to SEND_COPY_LIMIT bytes) go to the core in batches:
        one ch_node_send_batch() call copies them, takes the loop's lock once
        and wakes the loop's owner at most once (or writes them itself when
        nobody owns the loop). Each C call releases the GIL, so one call per
        message would also hand the GIL to any other thread waiting for it,
        once per message.
        """
        for msg in msgs:
            if not isinstance(msg, MessageBase):
                raise TypeError("send_many() needs libchirp messages, not %s" % type(msg).__name__)
        if len(set(map(id, msgs))) != len(msgs):
            raise RuntimeError("Message is still being sent (given twice to send_many())")
        futs = [self._future() for _ in msgs]
        failed: List[Tuple[Future, int]] = []
        with self.lock:
            for msg in msgs:
                if msg._sending:
                    raise RuntimeError("Message is still being sent")
                msg._target()  # parses a received message's address; raises before any send
            if self.closing:
                failed = [(fut, _REFUSED) for fut in futs]
            else:
                self._submit_many(msgs, futs, failed)
        for fut, rc in failed:
            fut.set_exception(_submit_error(rc))
        self.loop.poke()
        return futs

    def _submit_many(self, msgs: List[MessageBase], futs: List[Future], failed: list) -> None:
        """send_many()'s hand-over (caller holds the lock); failures go to ``failed``."""
        sends = self.sends
        tokens = self.loop._tokens
        pack = _SEND_RECORD.pack
        records: List[bytes] = []
        parts: List[bytes] = []
        batch: List[int] = []

        def flush() -> None:
            payload = b"".join(parts)
            rc = lib.ch_node_send_batch(
                self.c, b"".join(records), len(batch), payload, len(payload)
            )
            if rc != 0:
                for token in batch:
                    entry = sends.pop(token)
                    entry[1]._sending = False
                    failed.append((entry[0], rc))
            records.clear()
            parts.clear()
            batch.clear()

        for msg, fut in zip(msgs, futs):
            header = msg._header
            data = msg._data
            if len(header) + len(data) > SEND_COPY_LIMIT:
                if batch:
                    flush()
                rc = self._submit_send(msg, fut, None)
                if rc != 0:
                    failed.append((fut, rc))
                continue
            family, addr = msg._target()
            token = next(tokens)
            sends[token] = [fut, msg, header, data, None]
            msg._sending = True
            records.append(
                pack(token, len(data), len(header), msg._port, family, msg._identity, addr)
            )
            parts.append(header)
            parts.append(data)
            batch.append(token)
        if batch:
            flush()

    def _submit_send(self, msg: MessageBase, fut: Future, request: Optional[Future]) -> int:
        """Hand one send to the core (caller holds the lock): 0, a negative core code, or
        _REFUSED (closing).

        header and data are ``bytes`` passed to C as they are (no copy); the
        pending entry keeps them alive until SEND_DONE, even if the message's
        attributes are replaced meanwhile.
        """
        if self.closing:
            return _REFUSED
        if msg._sending:
            raise RuntimeError("Message is still being sent")
        family, addr = msg._target()
        header = msg._header
        data = msg._data
        token = next(self.loop._tokens)
        self.sends[token] = [fut, msg, header, data, request]
        msg._sending = True
        rc = lib.ch_node_send(
            self.c, token, msg._identity, family, addr, msg._port,
            header, len(header), data, len(data),
        )  # fmt: skip
        if rc != 0:
            del self.sends[token]
            msg._sending = False
        return rc

    def _sent(self, entry: list) -> MessageBase:
        """The send of ``entry`` is over: the message may be sent or released again."""
        msg = entry[1]
        msg._sending = False
        if self.release_after_send:  # see release_when_sent() for the ordering
            with self.lock:
                if msg in self.release_after_send:
                    self.release_after_send.discard(msg)
                    self.release(msg)
        return msg

    def on_send_done(self, token: int, status: int, text: Any) -> None:
        entry = self.sends.pop(token, None)
        if entry is None:
            return
        fut = entry[0]
        msg = self._sent(entry)
        if status == 0:
            _set_result(fut, msg)
            return
        text = _text(text)
        _set_exception(fut, _error(status, text))
        req: Any = entry[4]
        if req is not None and _pending_request(self.requests, msg._identity, req):
            del self.requests[msg._identity]
            timer = req._timer
            LoopCore.cancel_timer(timer)
            self._remember_expired(msg._identity)
            if status == _TIMEOUT and timer is not None and timer[0] <= _monotonic() + _CLOCK_SLACK:
                # The send's TIMEOUT started after the request's (at the write), but
                # libuv's clock counts whole milliseconds, so it may end first by a
                # fraction of one: the request ran out of time all the same.
                _set_exception(req, self._request_timeout(msg))
            else:
                _set_exception(req, _error(status, text))

    def on_sends_done(self, token: int, count: int) -> None:
        """Dispatcher: the sends ``token`` .. ``token + count - 1`` all succeeded."""
        pop = self.sends.pop
        sent = self._sent
        for t in range(token, token + count):
            entry = pop(t, None)
            if entry is not None:
                _set_result(entry[0], sent(entry))

    # -- request -------------------------------------------------------------------------------

    def request(self, msg: MessageBase, req: Any) -> None:
        """Register ``req`` (a ChirpFuture) under msg.identity, arm its timer, send."""
        identity = msg._identity
        req._leader = self.loop
        with self.lock:
            if identity in self.requests:
                raise RuntimeError("a request with this message identity is already pending")
            self.requests[identity] = req
            self.expired.pop(identity, None)
        req._timer = self.loop.add_timer(self.timeout, self._expire, identity, req, msg)
        try:
            send_future = self.send(msg, req)
        except BaseException:
            with self.lock:
                if self.requests.get(identity) is req:
                    del self.requests[identity]
            LoopCore.cancel_timer(req._timer)
            raise
        req._send_future = send_future
        if send_future.done() and send_future.exception() is not None:
            with self.lock:
                if self.requests.get(identity) is req:
                    del self.requests[identity]
            LoopCore.cancel_timer(req._timer)
            exc = send_future.exception()
            if exc is not None:
                _set_exception(req, exc)

    def _expire(self, identity: bytes, req: Any, msg: MessageBase) -> None:
        if not _pending_request(self.requests, identity, req):
            return
        del self.requests[identity]
        self._remember_expired(identity)
        _set_exception(req, self._request_timeout(msg))

    def _request_timeout(self, msg: MessageBase) -> ChirpTimeoutError:
        address = msg.address
        peer = ("[%s]:%d" if ":" in address else "%s:%d") % (address, msg.port)
        exc = ChirpTimeoutError(
            "Chirp request timed out: no answer from %s within %.1f s (TIMEOUT)"
            % (peer, self.timeout)
        )
        exc.ecode = lib.CH_TIMEOUT
        return exc

    def _remember_expired(self, identity: bytes) -> None:
        expired = self.expired
        expired[identity] = None
        if len(expired) > EXPIRED_MEMORY:
            expired.popitem(last=False)

    # -- receive and release -------------------------------------------------------------------

    def on_recv(self, rec: tuple, header: bytes, data: bytes) -> None:
        """Thread handling events: a RECV event, decoded (see LoopCore._handle).

        The message keeps the C record's address (an int) in ``_c`` until
        its release is submitted.
        """
        cmsg = rec[4]
        identity = rec[5]
        msg = self.message_class._received(
            identity, rec[6], header, data, _address(rec[14]), rec[12], rec[13], cmsg, self
        )
        if self.stop_sent:
            with self.lock:
                msg._c = None
                self.orphans.append(cmsg)
            return
        if self.requests:
            req = self.requests.pop(identity, None)
            if req is not None:
                LoopCore.cancel_timer(req._timer)
                self.held.add(msg)
                if req.done():  # cancelled by the application
                    self.release(msg)
                else:
                    _set_result(req, msg)
                return
        if self.expired and identity in self.expired:
            del self.expired[identity]
            self.late_replies += 1
            if DROP_LATE_REPLIES:
                self.release(msg)
                return
        if self.closing or (self.deliver is None and self.deliver_many is None):
            self.release(msg)
            return
        self.held.add(msg)
        if self.deliver_many is not None:
            inbox = self.inbox
            if not inbox:
                self.loop.at_batch_end(self._deliver_inbox)
            inbox.append(msg)
            return
        try:
            self.deliver(msg)
        except Exception:
            logger.exception("libchirp: exception while delivering a message; released")
            self.release(msg)

    def _deliver_inbox(self) -> None:
        """End of a batch: hand the messages received in it over in one call."""
        msgs = self.inbox
        self.inbox = []
        try:
            self.deliver_many(msgs)
        except Exception:
            logger.exception("libchirp: exception while delivering messages; released")
            self.release_many(msgs)

    def release(self, msg: MessageBase) -> Future:
        """Submit the release of ``msg``'s slot; see MessageBase.release_slot()."""
        fut = self._future()
        with self.lock:
            rc = self._submit_release(msg, fut)
        if rc < 0:
            fut.set_exception(_error(rc))
        elif rc == _REFUSED:
            fut.set_result(None)
        else:
            self.loop.poke()
        return fut

    def release_many(self, msgs: List[MessageBase]) -> None:
        """Release the slots of ``msgs`` (those that have one) without futures.

        One lock acquisition and no future per message: the cheap path of
        ``get()``/``get_many()`` with AUTO_RELEASE, which would discard the
        futures. Their completions are only counted (see stop()).
        Raises RuntimeError (before releasing anything) if one is being sent.
        """
        failed = 0
        with self.lock:
            cmsgs = []
            for msg in msgs:
                if msg._c is not None:
                    if msg._sending:
                        raise RuntimeError(
                            "Message is still being sent; release it when the send is done"
                        )
                    cmsgs.append(msg)
            if not cmsgs:
                return
            held = self.held
            for i, msg in enumerate(cmsgs):
                cmsgs[i] = msg._c
                msg._c = None
                held.discard(msg)
            if self.stop_sent:  # cannot happen for held messages; be safe
                self.orphans.extend(cmsgs)
                return
            n = len(cmsgs)
            self.quiet_submitted += n
            addrs = ffi.new("uintptr_t[]", cmsgs)  # (the cast below does not keep it alive)
            rc = lib.ch_node_release_batch(self.c, _cast(_MSG_PP, addrs), n, _QUIET_RELEASE)
            if rc != 0:
                self.quiet_submitted -= n
                self.orphans.extend(cmsgs)
                failed = n
        if failed:
            logger.error("libchirp: %d slot release(s) could not be submitted", failed)
        else:
            self.loop.poke()

    def _submit_release(self, msg: MessageBase, fut: Future) -> int:
        """Hand one release, completed by ``fut``, to the core (caller holds the lock).

        Returns 0 (submitted), _REFUSED (nothing to release: no slot, or the node
        is stopping and frees it itself) or a negative core error code. Releases without a
        future go through release_many().
        """
        cmsg = msg._c
        if cmsg is None:
            return _REFUSED
        if msg._sending:
            raise RuntimeError("Message is still being sent; release it when the send is done")
        msg._c = None
        self.held.discard(msg)
        if self.stop_sent:  # cannot happen for held messages; be safe
            self.orphans.append(cmsg)
            return _REFUSED
        token = next(self.loop._tokens)
        self.releases[token] = (fut, msg._identity, msg._serial)
        rc = lib.ch_node_release(self.c, _cast(_MSG_P, cmsg), token)
        if rc != 0:
            del self.releases[token]
            self.orphans.append(cmsg)
        return rc

    def release_when_sent(self, msg: MessageBase) -> None:
        """Release ``msg``'s slot now, or as soon as its pending send completed.

        Used for AUTO_RELEASE after a handler, which may have sent the message
        back (an answer) without waiting for the send. No-op without a slot.
        """
        with self.lock:
            if msg._c is None:
                return
            if msg._sending:
                self.release_after_send.add(msg)
                # on_send_done() clears _sending *before* it looks at the set; if it
                # did so meanwhile, it may have missed the entry: release here.
                if msg._sending:
                    return
                self.release_after_send.discard(msg)
            self.release(msg)

    def on_release_done(self, token: int, status: int, text: Any, count: int = 1) -> None:
        if token == _QUIET_RELEASE:
            self.quiet_done += count  # only ever written by the thread handling events
            if status != 0:
                logger.warning("libchirp: a slot release failed: %s", _text(text))
            return
        entry = self.releases.pop(token, None)
        if entry is None:
            return
        if status == 0:
            _set_result(entry[0], (entry[1], entry[2]))
        else:
            _set_exception(entry[0], _error(status, _text(text)))

    # -- statistics ----------------------------------------------------------------------------

    def stats(self) -> Future:
        """Ask the core for a snapshot; the future resolves to a :class:`NodeStats` dict.

        Fails with ChirpShutdown once the node is stopping for good.
        """
        fut: Future = self._future()
        with self.lock:
            if self.stop_sent or self.c is None:
                fut.set_exception(_shutdown_error("node is stopped"))
                return fut
            token = next(self.loop._tokens)
            self.stats_pending[token] = fut
            rc = lib.ch_node_stats(self.c, token)
            if rc != 0:
                del self.stats_pending[token]
        if rc != 0:
            fut.set_exception(_error(rc, "cannot ask for statistics"))
        else:
            self.loop.poke()
        return fut

    def on_stats(self, token: int, status: int, text: Any, st: Any) -> None:
        """Dispatcher: copy the snapshot ``st`` (the caller frees it) and resolve."""
        with self.lock:
            fut = self.stats_pending.pop(token, None)
        if fut is None:
            return
        if status != 0 or st == _NULL:
            _set_exception(fut, _error(status or lib.CH_ENOMEM, _text(text)))
            return
        remotes: Dict[str, RemoteStats] = {}
        for i in range(st.nremotes):
            r = st.remotes[i]
            address = _string(r.address).decode("ascii")
            remotes[remote_key(address, r.port)] = RemoteStats(
                address=address,
                port=r.port,
                connections=r.connections,
                slots_in_use=r.slots_in_use,
                send_queue=r.send_queue,
                in_flight=r.in_flight,
                idle=r.idle,
                counters=_counters(r.counters),
            )
        result = NodeStats(
            port=self.port,
            identity=self.identity.hex(),
            connections=st.connections,
            totals=_counters(st.totals),
            late_replies=self.late_replies,
            pending_requests=len(self.requests),
            pending_sends=len(self.sends),
            held_messages=len(self.held),
            remotes=remotes,
        )
        _set_result(fut, result)

    # -- stop ----------------------------------------------------------------------------------

    def stop(self, undelivered: Optional[Callable[[], List[MessageBase]]] = None) -> None:
        """Stop the node; idempotent and bounded, see ChirpBase.stop().

        ``undelivered``: the interface's hook that takes out and returns the
        received messages it never handed to the application (a queue's
        content), called once the wait for releases is over. They are not
        released: the stop detaches them unacknowledged, so a SYNCHRONOUS
        sender's send fails instead of succeeding for a message nobody got.
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
            while self.held and _monotonic() < deadline:
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
        while self.sends:
            _, entry = self.sends.popitem()
            entry[1]._sending = False
            _set_exception(entry[0], _shutdown_error())
        while self.releases:
            _, rel = self.releases.popitem()
            _set_exception(rel[0], _shutdown_error())
        while self.requests:
            _, req = self.requests.popitem()
            LoopCore.cancel_timer(req._timer)
            _set_exception(req, _shutdown_error())
        with self.lock:
            stats, self.stats_pending = self.stats_pending, {}
            self.release_after_send.clear()
        for fut in stats.values():
            _set_exception(fut, _shutdown_error())


def _pending_request(requests: Dict[bytes, Any], identity: bytes, req: Any) -> bool:
    """True if ``req`` is the request registered under ``identity``."""
    return identity in requests and requests[identity] is req


def _counters(c: Any) -> CounterStats:
    """Copy a ``ch_counters_t`` into a dict."""
    return CounterStats(
        messages_in=c.msgs_in,
        bytes_in=c.bytes_in,
        messages_out=c.msgs_out,
        bytes_out=c.bytes_out,
        send_failures=c.send_failures,
        timeouts=c.timeouts,
        protocol_errors=c.protocol_errors,
        tls_errors=c.tls_errors,
        connects=c.connects,
        connections_refused=c.conns_refused,
        connections_evicted=c.conns_evicted,
    )
