"""kiwiPy without a broker: a chirp ``kiwipy.Communicator`` (docs/kiwi.md).

Theory of operation
-------------------
Every :class:`ChirpCommunicator` is one chirp node (``libchirp.queue.Chirp``
in asynchronous mode) and a peer of a *mesh*; there is no server. The
acknowledgements kiwiPy needs are messages of their own (an RPC answer, a
task's outcome), so the chirp sends themselves need not wait for releases.

Messages: the chirp header is one kind byte followed by metadata encoded with
the safe codec below; the chirp data is the user's body, encoded with the
communicator's ``encoder``. Kinds: ``G`` gossip (the sender's view of the
mesh), ``H`` heartbeat (a digest of that view), ``X`` goodbye, ``R``/``r`` RPC
call and answer, ``T``/``t`` task and task outcome, ``c`` task credit, ``B``
broadcast.

Membership: each member has an id (new for every start), an address and port
(as its peers see them), a version and an *info* record: its RPC identifiers,
its task capacity per queue and its broadcast filters. A member bumps its
version when its info changes and pushes its view to everybody it knows; every
``heartbeat`` seconds it sends each member a heartbeat with the digest of its
view, and a member whose digest differs answers with its whole view (and asks
for the other's), so a mesh in which each knows one other converges. A member
not heard from for ``dead_after`` seconds, or to which a send fails, is
forgotten (its id is kept as a tombstone for a while, so that gossip of slower
members does not bring it back; a member that speaks to us directly is taken
in again). Configured peers that are not known members are greeted again on
every heartbeat, so a member that restarts finds its way back.

Tasks: a sender keeps every task it owns until its outcome arrives (in the
outbox too, when one is configured). It gives a task to the subscriber member
with the most *credit*: a worker reports its free capacity and how many of
this sender's tasks it has received with every outcome (and in a credit
message when a slot frees after it turned this sender away), so a fast worker
earns credit back sooner and gets more tasks. A worker that is full or whose
subscribers all reject a task sends it back; a worker that dies or leaves has
all its unfinished tasks given to others. The sender resolves a task's future
with the first outcome and ignores any later one (at-least-once delivery,
each outcome seen once).

Threads: received messages are handled (``_on_messages``) by whichever thread
holds the chirp loop's ownership token, in order, one batch at a time: the
receive thread, which waits for messages by driving the loop; a caller waiting
in ``result()`` of an RPC future (``_WaitFuture``), which drives the loop
itself so that its send is written directly and its answer needs no thread
hop; or, when neither drives, the loop's background thread. Handling never
runs a user callback: RPC and task callbacks go to a thread pool, broadcast
callbacks to one thread of their own (in arrival order). The exception: the
first RPC call of a batch the receive thread handled is run by the receive
thread itself once it has given the loop up (``_receive_loop``), so the
answer is written without waking anybody; the background thread takes the
loop over after ``CH_LAZY_MS`` if that subscriber is slow. A local thread
delivers messages a communicator sends to itself (in order, without the
network); a timer thread sends heartbeats. All shared state is under one
re-entrant lock, which is never held while a user callback runs. Futures are
resolved on the thread handling the events (or the local thread): their
done-callbacks must not block.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue as _queue
import random
import re
import threading
import time
import traceback
import uuid
import zlib
from collections import OrderedDict, deque
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Set,
    Tuple,
)

import kiwipy

from ..chirp import ChirpBase
from ..config import Config
from ..loop import Loop, loop_core
from ..message import Message
from .codec import _freeze, decode, encode
from .outbox import Outbox

__all__ = [
    "ChirpCommunicator",
    "ChirpTaskQueue",
    "ChirpIncomingTask",
    "DEFAULT_TASK_QUEUE",
]

_LOG = logging.getLogger("libchirp.kiwi")

#: Seconds the receive thread leaves the loop to callers after the last waited
#: for an answer (see ChirpCommunicator._receive_loop).
_BACKOFF = 0.05
#: Longest drive of the receive thread before it re-checks whether to go on.
_RECV_SLICE = 0.2

#: The queue of ``task_send()`` and ``add_task_subscriber()`` (kiwiPy's name).
DEFAULT_TASK_QUEUE = "kiwipy.tasks"

Encoder = Callable[[Any], bytes]
Decoder = Callable[[bytes], Any]


# ---------------------------------------------------------------------------
# Records of the mesh and of tasks.
# ---------------------------------------------------------------------------


class _Member:
    __slots__ = ("id", "address", "port", "version", "info", "last_seen")

    def __init__(
        self, mid: str, address: str, port: int, version: int, info: Dict[str, Any]
    ) -> None:
        self.id = mid
        self.address = address
        self.port = port
        self.version = version
        self.info = info
        self.last_seen = time.monotonic()


class _OutTask:
    """A task this communicator sent and owns until its outcome arrives."""

    __slots__ = ("id", "queue", "body", "no_reply", "future", "assignee", "excluded")

    def __init__(
        self, tid: str, queue: str, body: bytes, no_reply: bool, future: kiwipy.Future[Any]
    ) -> None:
        self.id = tid
        self.queue = queue
        self.body = body
        self.no_reply = no_reply
        self.future = future
        self.assignee: Optional[str] = None
        self.excluded: Set[str] = set()


class _Credit:
    """A sender's view of one worker's free capacity for one queue."""

    __slots__ = ("cap", "free", "seen", "sent")

    def __init__(self, free: int) -> None:
        self.cap = free  # capacity as last announced by gossip
        self.free = free  # free slots at the last report
        self.seen = 0  # how many of our tasks the worker had received then
        self.sent = 0  # how many we have sent it

    def available(self) -> int:
        return self.free - (self.sent - self.seen)

    def report(self, free: int, seen: int) -> None:
        if seen >= self.seen:
            self.free, self.seen = free, seen


class _Consumer:
    """The local side of one task queue: push subscribers and pull waiters."""

    def __init__(self, prefetch: int) -> None:
        self.subscribers: "OrderedDict[Any, Callable[..., Any]]" = OrderedDict()
        self.prefetch = prefetch
        self.running = 0
        self.pull_waiting = 0
        self.inbox: "_queue.Queue[ChirpIncomingTask]" = _queue.Queue()
        self.received: Dict[str, int] = {}  # tasks received per sender id
        self.origins: Dict[str, Tuple[str, int]] = {}  # where those senders are
        self.starved: Set[Tuple[str, str, int]] = set()  # senders we turned away

    def capacity(self) -> int:
        return (self.prefetch if self.subscribers else 0) + self.pull_waiting

    def free(self) -> int:
        push = self.prefetch - self.running if self.subscribers else 0
        return max(0, push) + self.pull_waiting


class _Deferred:
    """A subscriber result to wait for without a 'pending' answer (coroutines)."""

    __slots__ = ("future",)

    def __init__(self, future: concurrent.futures.Future[Any]) -> None:
        self.future = future


def _nothing() -> None:
    pass


def _exception_text(exc: BaseException) -> str:
    text = "%s: %s" % (type(exc).__name__, exc)
    tb = "".join(traceback.format_tb(exc.__traceback__)) if exc.__traceback__ else ""
    return text + ("\n" + tb if tb else "")


def _filter_spec(subscriber: Any) -> Optional[List[List[Tuple[str, int]]]]:
    """The regular expressions of a ``kiwipy.BroadcastFilter``, or None (take all)."""
    if not isinstance(subscriber, kiwipy.BroadcastFilter):
        return None
    spec: List[List[Tuple[str, int]]] = []
    for checks in (subscriber._subject_filters, subscriber._sender_filters):
        patterns = []
        for check in checks:
            owner = getattr(check, "__self__", None)
            if not isinstance(owner, re.Pattern) or getattr(check, "__name__", "") != "match":
                return None  # an equality test or something else: the receiver filters
            patterns.append((owner.pattern, owner.flags))
        spec.append(patterns)
    return spec


_regex_cache: Dict[Tuple[str, int], "re.Pattern[str]"] = {}


def _accepts(spec: Any, sender: Any, subject: Any) -> bool:
    """Mirrors ``BroadcastFilter.is_filtered`` on the sending side."""
    if spec is None:
        return True
    try:
        for value, patterns in ((subject, spec[0]), (sender, spec[1])):
            if value is None or not patterns:
                continue
            hit = False
            for pattern, flags in patterns:
                key = (pattern, flags)
                rx = _regex_cache.get(key)
                if rx is None:
                    rx = _regex_cache[key] = re.compile(pattern, flags)
                if rx.match(value):
                    hit = True
                    break
            if not hit:
                return False
    except (TypeError, re.error, IndexError, ValueError):
        return True  # not a string, or a spec we do not understand: let the receiver decide
    return True


class _MeshNode(ChirpBase):
    """The communicator's chirp node: received messages go to ``handle`` at once.

    ``handle`` runs on the thread handling the loop's events (the loop's
    background thread, or a thread waiting in :meth:`_WaitFuture.result`),
    with the messages of one batch; their slots are released afterwards.
    """

    def __init__(self, loop: Loop, config: Config, handle: Callable[[List[Message]], None]) -> None:
        self._handle = handle
        super().__init__(loop, config, recv_many=self._deliver)

    def _deliver(self, msgs: List[Message]) -> None:
        try:
            self._handle(msgs)
        finally:
            core = self._node
            if core is not None:
                core.release_many(msgs)  # type: ignore[arg-type]


#: ``lead(ready, timeout)``: drive the loop until ``ready()``, return the time left.
_Lead = Callable[[Callable[[], bool], Optional[float]], Optional[float]]


class _WaitFuture(kiwipy.Future[Any]):
    """A ``kiwipy.Future`` whose waiter handles the chirp events itself.

    The answer that completes it is a received message: a thread about to
    block in ``result()``/``exception()`` drives the communicator's loop
    (``LoopCore.lead_until``) until the future is done, instead of sleeping
    until the loop's background thread received the answer and woke it.
    """

    def __init__(self, lead: _Lead) -> None:
        super().__init__()
        self._lead = lead

    def result(self, timeout: Optional[float] = None) -> Any:
        if not self.done():
            timeout = self._lead(self.done, timeout)
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        if not self.done():
            timeout = self._lead(self.done, timeout)
        exc: Optional[BaseException] = super().exception(timeout)
        return exc


# ---------------------------------------------------------------------------
# The communicator.
# ---------------------------------------------------------------------------


class ChirpCommunicator(kiwipy.Communicator):
    """A ``kiwipy.Communicator`` whose peers form a mesh over chirp (docs/kiwi.md).

    ``port`` is the listening port (0 picks a free one, see :attr:`port`),
    ``peers`` ``(address, port)`` pairs of other members (one is enough),
    ``config`` a :class:`libchirp.Config` for TLS and timeouts (PORT and
    SYNCHRONOUS are set here; without one the node is plaintext),
    ``outbox`` a file for the durable outbox. Methods may be called from any
    thread; futures are ``kiwipy.Future[Any]``.
    """

    def __init__(
        self,
        port: int = 0,
        peers: Iterable[Tuple[str, int]] = (),
        *,
        config: Optional[Config] = None,
        outbox: Optional[str] = None,
        encoder: Encoder = encode,
        decoder: Decoder = decode,
        task_prefetch_count: int = 1,
        max_workers: int = 8,
        heartbeat: float = 0.25,
        dead_after: float = 2.0,
    ) -> None:
        if config is None:
            config = Config()
            config.DISABLE_ENCRYPTION = True
        config.PORT = port
        config.SYNCHRONOUS = False
        self._encoder = encoder
        self._decoder = decoder
        self._prefetch = max(1, int(task_prefetch_count))
        self._heartbeat = heartbeat
        self._dead_after = dead_after
        self.id = uuid.uuid4().hex
        self._lock = threading.RLock()
        self._closed = False
        self._seeds: List[Tuple[str, int]] = [(str(a), int(p)) for a, p in peers]
        # membership
        self._version = 0
        self._members: Dict[str, _Member] = {}
        self._tombstones: Dict[str, float] = {}
        self._digest = 0
        self._push_queued = False
        # local subscribers
        self._rpc_subs: Dict[Any, Callable[..., Any]] = {}
        self._bcast_subs: "OrderedDict[Any, Callable[..., Any]]" = OrderedDict()
        self._consumers: Dict[str, _Consumer] = {}
        self._task_sub_queue: Dict[Any, str] = {}
        # routing, derived from membership
        self._rpc_route: Dict[Any, str] = {}
        self._task_route: Dict[str, Dict[str, int]] = {}
        self._bcast_route: List[Tuple[str, List[Any]]] = []
        # outstanding work
        self._rpcs: Dict[str, Tuple[kiwipy.Future[Any], str]] = {}
        self._tasks: Dict[str, _OutTask] = {}
        self._pending: Dict[str, Deque[str]] = {}
        self._credit: Dict[Tuple[str, str], _Credit] = {}
        self._last_dispatch: Dict[str, float] = {}
        self._recovered: List[kiwipy.Future[Any]] = []
        # threads and the node
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, "kiwi-work")
        self._bcast_lane = concurrent.futures.ThreadPoolExecutor(1, "kiwi-bcast")
        self._local: "_queue.SimpleQueue[Optional[Tuple[bytes, Dict[str, Any], bytes]]]" = (
            _queue.SimpleQueue()
        )
        self._loop = Loop()
        self._core = loop_core(self._loop)
        try:
            self._node = _MeshNode(self._loop, config, self._on_messages)
        except BaseException:
            self._loop.stop()
            raise
        self.port: int = self._node.port
        self._outbox = Outbox(outbox) if outbox is not None else None
        self._wake = threading.Event()
        # the receive thread (see _receive_loop)
        self._recv_ident: Optional[int] = None
        self._stash: List[Tuple[Dict[str, Any], bytes, Optional[str], int]] = []
        self._waiters = 0  # threads in _lead(): callers waiting for an answer drive the loop
        self._waited_at = 0.0  # when the last of them stopped waiting
        self._waiters_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._receive_loop, name="kiwi-recv", daemon=True),
            threading.Thread(target=self._local_loop, name="kiwi-local", daemon=True),
            threading.Thread(target=self._timer_loop, name="kiwi-timer", daemon=True),
        ]
        for t in self._threads:
            t.start()
        with self._lock:
            self._refresh_routes()
            if self._outbox is not None:
                for tid, qname, body, no_reply in self._outbox.pending():
                    future = kiwipy.Future()
                    self._recovered.append(future)
                    self._tasks[tid] = _OutTask(tid, qname, body, no_reply, future)
                    self._pending.setdefault(qname, deque()).append(tid)
        self._greet_seeds()

    # -- kiwipy.Communicator --------------------------------------------------

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Leave the mesh, fail what is outstanding, stop the node (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._nudge()  # the receive thread stops driving the loop
            members = list(self._members.values())
            rpcs = list(self._rpcs.values())
            tasks = list(self._tasks.values())
            self._rpcs.clear()
            self._tasks.clear()
            self._pending.clear()
        bye = [self._make(m.address, m.port, b"X", {"f": self.id}, b"") for m in members]
        futures = self._node.send_many(bye) if bye else []
        concurrent.futures.wait(futures, timeout=1.0)
        for future, _ in rpcs:
            self._fail(future, kiwipy.CommunicatorClosed())
        for task in tasks:
            self._fail(task.future, kiwipy.CommunicatorClosed())
        self._wake.set()
        self._local.put(None)
        for t in self._threads:
            t.join(timeout=5)
        self._pool.shutdown(wait=False)
        self._bcast_lane.shutdown(wait=False)
        try:
            self._node.stop()
        finally:
            self._loop.stop()
            if self._outbox is not None:
                self._outbox.close()

    def __enter__(self) -> "ChirpCommunicator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _add_subscriber(
        self,
        table: Dict[Any, Callable[..., Any]],
        subscriber: Callable[..., Any],
        identifier: Any,
        kind: str,
    ) -> Any:
        """Enter an RPC or broadcast subscriber under its (or a new) identifier."""
        with self._lock:
            self._ensure_open()
            identifier = identifier or uuid.uuid4().hex
            if identifier in table:
                text = "%s identifier '%s'" % (kind, identifier)
                raise kiwipy.DuplicateSubscriberIdentifier(text)
            table[identifier] = subscriber
            self._changed()
        return identifier

    def _remove_subscriber(
        self, table: Dict[Any, Callable[..., Any]], identifier: Any, text: str
    ) -> None:
        """Remove an RPC or broadcast subscriber; ``text`` is the error's %-format."""
        with self._lock:
            self._ensure_open()
            if table.pop(identifier, None) is None:
                raise ValueError(text % identifier)
            self._changed()

    def add_rpc_subscriber(self, subscriber: Callable[..., Any], identifier: Any = None) -> Any:
        return self._add_subscriber(self._rpc_subs, subscriber, identifier, "RPC")

    def remove_rpc_subscriber(self, identifier: Any) -> None:
        self._remove_subscriber(self._rpc_subs, identifier, "Unknown subscriber '%s'")

    def add_task_subscriber(
        self,
        subscriber: Callable[..., Any],
        identifier: Any = None,
        queue: str = DEFAULT_TASK_QUEUE,
    ) -> Any:
        with self._lock:
            self._ensure_open()
            identifier = identifier or uuid.uuid4().hex
            if identifier in self._task_sub_queue:
                raise kiwipy.DuplicateSubscriberIdentifier("Task identifier '%s'" % identifier)
            consumer = self._consumer(queue)
            consumer.subscribers[identifier] = subscriber
            self._task_sub_queue[identifier] = queue
            self._changed()
            self._relieve(queue, consumer)
        return identifier

    def remove_task_subscriber(self, identifier: Any) -> None:
        with self._lock:
            self._ensure_open()
            queue = self._task_sub_queue.pop(identifier, None)
            if queue is None:
                raise ValueError("Unknown subscriber: '%s'" % identifier)
            del self._consumers[queue].subscribers[identifier]
            self._changed()

    def add_broadcast_subscriber(
        self, subscriber: Callable[..., Any], identifier: Any = None
    ) -> Any:
        return self._add_subscriber(self._bcast_subs, subscriber, identifier, "Broadcast")

    def remove_broadcast_subscriber(self, identifier: Any) -> None:
        self._remove_subscriber(self._bcast_subs, identifier, "Broadcast subscriber '%s' unknown")

    def rpc_send(self, recipient_id: Any, msg: Any) -> kiwipy.Future[Any]:
        """Call the member that subscribed ``recipient_id``; a future for the answer."""
        self._ensure_open()
        data = self._encoder(msg)
        with self._lock:
            owner = self._rpc_route.get(recipient_id)
            if owner is None:
                future: kiwipy.Future[Any] = kiwipy.Future()
                future.set_exception(
                    kiwipy.UnroutableError("Unknown rpc recipient '%s'" % (recipient_id,))
                )
                return future
            future = self._answer_future(owner)
            corr = uuid.uuid4().hex
            self._rpcs[corr] = (future, owner)
            self._send_to(owner, b"R", {"f": self.id, "c": corr, "to": recipient_id}, data)
        return future

    def task_send(self, task: Any, no_reply: bool = False) -> Optional[kiwipy.Future[Any]]:
        return self._task_send(DEFAULT_TASK_QUEUE, task, no_reply)

    def broadcast_send(
        self, body: Any, sender: Any = None, subject: Any = None, correlation_id: Any = None
    ) -> bool:
        """Send to every broadcast subscriber whose filters accept ``sender`` and ``subject``."""
        self._ensure_open()
        data = self._encoder(body)
        meta = {"f": self.id, "s": sender, "j": subject, "ci": correlation_id}
        with self._lock:
            targets = [
                mid
                for mid, specs in self._bcast_route
                if any(_accepts(spec, sender, subject) for spec in specs)
            ]
            for mid in targets:
                self._send_to(mid, b"B", meta, data)
        return True

    # -- beyond the interface -------------------------------------------------

    def task_queue(self, queue_name: str, prefetch_count: Optional[int] = None) -> "ChirpTaskQueue":
        """A named task queue: send to it, subscribe to it, or pull from it."""
        self._ensure_open()
        with self._lock:
            consumer = self._consumer(queue_name)
            if prefetch_count is not None:
                consumer.prefetch = max(1, int(prefetch_count))
        return ChirpTaskQueue(self, queue_name)

    def recovered_tasks(self) -> List[kiwipy.Future[Any]]:
        """Futures of the tasks taken over from the outbox when this communicator started."""
        return list(self._recovered)

    def members(self) -> Dict[str, Dict[str, Any]]:
        """The other members this one knows: id -> address, port and info."""
        with self._lock:
            return {
                m.id: {"address": m.address, "port": m.port, "info": m.info}
                for m in self._members.values()
            }

    def wait_for_members(self, count: int = 1, timeout: Optional[float] = None) -> bool:
        """Wait until this member knows ``count`` others; False on timeout."""
        return self._wait(lambda: len(self._members) >= count, timeout)

    def wait_for_rpc(self, identifier: Any, timeout: Optional[float] = None) -> bool:
        """Wait until some member of the mesh subscribed ``identifier``; False on timeout."""
        return self._wait(lambda: _freeze(identifier) in self._rpc_route, timeout)

    def _wait(self, pred: Callable[[], bool], timeout: Optional[float]) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not pred():
            self._ensure_open()
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def info(self) -> Dict[str, Any]:
        """What this member announces: RPC identifiers, task capacities, broadcast filters."""
        with self._lock:
            return self._info()

    # -- internals: sending ---------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closed:
            raise kiwipy.CommunicatorClosed()

    def _fail(self, future: Optional[kiwipy.Future[Any]], exc: BaseException) -> None:
        if future is not None and not future.done():
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_exception(exc)
            if isinstance(future, _WaitFuture):
                self._nudge()  # its waiter may sleep in the loop's I/O poll

    def _answer_future(self, owner: Any) -> kiwipy.Future[Any]:
        """The future of an answer from member ``owner``: the answer of another
        member arrives as a message, which its waiter takes itself
        (_WaitFuture); one of this member's own subscribers answers off the loop."""
        return _WaitFuture(self._lead) if owner != self.id else kiwipy.Future()

    def _nudge(self) -> None:
        """Make a thread driving the loop (asleep in its I/O poll) re-check what it
        waits for: a future completed off the loop's events, or the close."""
        if self._waiters or self._recv_ident is not None:
            with contextlib.suppress(RuntimeError):  # the loop has stopped
                self._loop.call_soon(_nothing)

    def _make(
        self, address: str, port: int, kind: bytes, meta: Dict[str, Any], data: bytes
    ) -> Message:
        msg = Message()
        msg.address = address
        msg.port = port
        msg.header = kind + encode(meta)
        msg.data = data
        return msg

    def _send_to(self, mid: Optional[str], kind: bytes, meta: Dict[str, Any], data: bytes) -> None:
        """Send to a member (or to ourselves, without the network). Lock held or not."""
        if mid == self.id:
            self._local.put((kind, meta, data))
            return
        member = self._members.get(mid) if mid is not None else None
        if member is None:
            return
        self._send_addr(member.address, member.port, kind, meta, data, mid)

    def _send_addr(
        self,
        address: str,
        port: int,
        kind: bytes,
        meta: Dict[str, Any],
        data: bytes,
        mid: Optional[str] = None,
    ) -> None:
        if self._closed and kind != b"X":
            return
        try:
            future = self._node.send(self._make(address, port, kind, meta, data))
        except Exception as exc:  # the node stopped under us
            _LOG.debug("send to %s:%s failed: %s", address, port, exc)
            return
        if mid is not None:
            future.add_done_callback(lambda f: self._sent(f, mid))

    def _sent(self, future: concurrent.futures.Future[Any], mid: str) -> None:
        if future.cancelled() or future.exception() is None:
            return
        _LOG.debug("send to member %s failed: %s", mid, future.exception())
        with self._lock:
            self._forget(mid)

    def _reply(
        self,
        meta_in: Dict[str, Any],
        address: Optional[str],
        port: int,
        kind: bytes,
        meta: Dict[str, Any],
        data: bytes,
    ) -> None:
        if meta_in.get("f") == self.id or address is None:
            self._local.put((kind, meta, data))
        else:
            self._send_addr(address, port, kind, meta, data)

    # -- internals: membership ------------------------------------------------

    def _info(self) -> Dict[str, Any]:
        return {
            "rpc": list(self._rpc_subs),
            "tq": {q: c.capacity() for q, c in self._consumers.items() if c.capacity()},
            "bc": [_filter_spec(s) for s in self._bcast_subs.values()],
        }

    def _consumer(self, queue: str) -> _Consumer:
        consumer = self._consumers.get(queue)
        if consumer is None:
            consumer = self._consumers[queue] = _Consumer(self._prefetch)
        return consumer

    def _changed(self) -> None:
        """Our info changed: new version, new routes, tell everybody."""
        self._version += 1
        self._refresh_routes()
        if not self._push_queued:  # one push for a burst of changes
            self._push_queued = True
            self._local.put((b"P", {}, b""))
        for queue in list(self._pending):
            self._dispatch(queue)

    def _push_view(self) -> None:
        """Send our view to every member (the local thread, after changes)."""
        with self._lock:
            self._push_queued = False
            view = self._view(False)
            for m in list(self._members.values()):
                self._send_addr(m.address, m.port, b"G", *view, m.id)

    def _view(self, want: bool) -> Tuple[Dict[str, Any], bytes]:
        """Gossip: our view of the mesh (in the data, which has no size limit to speak of)."""
        entries = [[self.id, None, self.port, self._version, self._info()]]
        entries.extend([m.id, m.address, m.port, m.version, m.info] for m in self._members.values())
        return {"f": self.id, "w": want}, encode(entries)

    def _refresh_routes(self) -> None:
        everyone: List[Tuple[str, Dict[str, Any]]] = [
            (m.id, m.info) for m in self._members.values()
        ]
        everyone.append((self.id, self._info()))  # our own last: we win RPC identifiers
        rpc: Dict[Any, str] = {}
        tq: Dict[str, Dict[str, int]] = {}
        bc: List[Tuple[str, List[Any]]] = []
        for mid, info in everyone:
            for ident in info.get("rpc", ()):
                rpc[_freeze(ident)] = mid
            for queue, cap in info.get("tq", {}).items():
                tq.setdefault(queue, {})[mid] = cap
            if info.get("bc"):
                bc.append((mid, info["bc"]))
        self._rpc_route, self._task_route, self._bcast_route = rpc, tq, bc
        for queue, caps in tq.items():
            for mid, cap in caps.items():
                credit = self._credit.get((mid, queue))
                if credit is None:
                    self._credit[(mid, queue)] = _Credit(cap)
                elif credit.cap != cap:
                    # announced capacity changed: count what we gave it as received
                    busy = sum(
                        1 for t in self._tasks.values() if t.assignee == mid and t.queue == queue
                    )
                    credit.cap = cap
                    credit.free, credit.seen = cap - busy, credit.sent
        parts = sorted("%s:%d" % (m.id, m.version) for m in self._members.values())
        parts.append("%s:%d" % (self.id, self._version))
        self._digest = zlib.crc32("|".join(sorted(parts)).encode())

    def _merge(self, view: Dict[str, Any], address: str, port: int) -> None:
        sender = view.get("f")
        changed = False
        new: List[_Member] = []
        for mid, addr, mport, version, info in view.get("m", ()):
            if mid == self.id:
                continue
            if mid == sender:
                addr = address
                self._tombstones.pop(mid, None)
                for other in list(self._members.values()):
                    if other.id != mid and other.address == addr and other.port == mport:
                        self._forget(other.id, refresh=False)  # an earlier life on that port
                        changed = True
            if addr is None or mid in self._tombstones:
                continue
            member = self._members.get(mid)
            if member is None:
                member = self._members[mid] = _Member(mid, addr, mport, version, info)
                new.append(member)
                changed = True
            elif version > member.version:
                member.version, member.info = version, info
                changed = True
            if mid == sender:
                member.last_seen = time.monotonic()
        if changed:
            self._refresh_routes()
            for task in self._tasks.values():
                task.excluded.clear()
            for queue in list(self._pending):
                self._dispatch(queue)
        if new or view.get("w"):
            mine = self._view(False)
            for member in new:
                self._send_addr(member.address, member.port, b"G", *mine, member.id)
            if view.get("w") and sender not in {m.id for m in new}:
                self._send_addr(address, port, b"G", *mine, sender)

    def _forget(self, mid: str, refresh: bool = True) -> None:
        member = self._members.pop(mid, None)
        if member is None:
            return
        _LOG.info("member %s at %s:%d left or died", mid, member.address, member.port)
        self._tombstones[mid] = time.monotonic()
        for corr, (future, owner) in list(self._rpcs.items()):
            if owner == mid:
                del self._rpcs[corr]
                self._fail(future, kiwipy.DeliveryFailed("member %s is gone" % mid))
        requeue: Dict[str, List[str]] = {}
        for task in self._tasks.values():
            if task.assignee == mid:
                task.assignee = None
                requeue.setdefault(task.queue, []).append(task.id)
        for queue, ids in requeue.items():
            self._pending.setdefault(queue, deque()).extendleft(reversed(ids))
        for key in [k for k in self._credit if k[0] == mid]:
            del self._credit[key]
        if refresh:
            self._refresh_routes()
            for queue in list(self._pending):
                self._dispatch(queue)

    def _greet_seeds(self) -> None:
        with self._lock:
            known = {(m.address, m.port) for m in self._members.values()}
            view = self._view(True)
        for address, port in self._seeds:
            if (address, port) not in known and not (port == self.port and self._is_me(address)):
                self._send_addr(address, port, b"G", *view)

    @staticmethod
    def _is_me(address: str) -> bool:
        return address in ("127.0.0.1", "::1", "localhost")

    def _tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            for mid, member in list(self._members.items()):
                if now - member.last_seen > self._dead_after:
                    self._forget(mid)
            for mid, when in list(self._tombstones.items()):
                if now - when > 60.0:
                    del self._tombstones[mid]
            beat = {"f": self.id, "d": self._digest}
            for member in list(self._members.values()):
                self._send_addr(member.address, member.port, b"H", beat, b"", member.id)
            # a queue that waits for credit longer than a heartbeat: probe every worker
            for queue, pending in self._pending.items():
                if pending and now - self._last_dispatch.get(queue, 0.0) > max(
                    1.0, 4 * self._heartbeat
                ):
                    for mid in self._task_route.get(queue, {}):
                        credit = self._credit.get((mid, queue))
                        if credit is not None and credit.available() <= 0:
                            credit.report(1, credit.sent)
                    self._last_dispatch[queue] = now
                    self._dispatch(queue)
        self._greet_seeds()

    # -- internals: threads ---------------------------------------------------

    def _lead(self, ready: Callable[[], bool], timeout: Optional[float]) -> Optional[float]:
        """A caller about to wait for an answer: drive the loop here until ``ready()``.

        Returns what is left of ``timeout``. While callers wait, the receive
        thread stays out of their way (see _receive_loop).
        """
        with self._waiters_lock:
            self._waiters += 1
        try:
            return self._core.lead_until(ready, timeout, messages=True)
        finally:
            with self._waiters_lock:
                self._waiters -= 1
                self._waited_at = time.monotonic()

    def _recv_ready(self) -> bool:
        return bool(self._stash) or self._closed or self._waiters > 0

    def _receive_loop(self) -> None:
        """The receive thread: drive the loop, and answer one RPC of a batch itself.

        It waits for messages by driving the loop (``lead_until``). An RPC call
        that arrives in a batch it handles is kept (the first of the batch;
        others go to the pool) and, once it has given the loop up, run here:
        its answer is written by this thread directly, nobody is woken. While
        the subscriber runs, the loop's background thread takes the loop over
        after ``CH_LAZY_MS`` (heartbeats and membership go on; calls arriving
        meanwhile go to the pool). While callers of this member wait for
        answers (they drive the loop themselves, ``_lead``), and for
        ``_BACKOFF`` seconds after the last, this thread does not drive: a
        loop held by it would make every send of theirs wake it, and it would
        hand them their answers.
        """
        self._recv_ident = threading.get_ident()
        core = self._core
        while not self._closed:
            idle = time.monotonic() - self._waited_at
            if self._waiters or idle < _BACKOFF:
                self._wake.wait(_BACKOFF if self._waiters else _BACKOFF - idle)
                continue
            left = core.lead_until(self._recv_ready, _RECV_SLICE, messages=True)
            if left and not self._recv_ready():
                # it could not drive (the loop is ending, or leading is off): no spinning
                self._wake.wait(_BACKOFF)
            while self._stash and not self._closed:
                meta, data, address, port = self._stash.pop()
                self._run_rpc(meta, data, address, port)

    def _on_messages(self, msgs: List[Message]) -> None:
        """The received messages of one batch, on the thread handling the loop's events."""
        for msg in msgs:
            header = msg.header
            try:
                meta = decode(header[1:])
                self._handle(header[:1], meta, msg.data, msg.address, msg.port)
            except Exception:
                _LOG.exception("bad message from %s:%s", msg.address, msg.port)

    def _local_loop(self) -> None:
        while True:
            item = self._local.get()
            if item is None:
                return
            try:
                if item[0] == b"P":
                    self._push_view()
                    continue
                self._handle(item[0], item[1], item[2], None, 0)
            except Exception:
                _LOG.exception("local message failed")

    def _timer_loop(self) -> None:
        while not self._wake.wait(self._heartbeat):
            try:
                self._tick()
            except Exception:
                _LOG.exception("heartbeat failed")

    # -- internals: handling messages -----------------------------------------

    def _handle(
        self, kind: bytes, meta: Dict[str, Any], data: bytes, address: Optional[str], port: int
    ) -> None:
        if self._closed:
            return
        if address is not None:
            sender = meta.get("f")
            member = self._members.get(sender) if sender is not None else None
            if member is not None:
                member.last_seen = time.monotonic()
        if kind == b"H":
            stranger = address is not None and meta.get("f") not in self._members
            if stranger or meta.get("d") != self._digest:
                # views differ, or a member we forgot (or never knew) speaks: exchange views
                with self._lock:
                    self._tombstones.pop(meta.get("f") or "", None)
                    self._send_addr(address or "127.0.0.1", port, b"G", *self._view(True))
        elif kind == b"G":
            meta["m"] = decode(data)
            with self._lock:
                self._merge(meta, address or "127.0.0.1", port)
        elif kind == b"X":
            with self._lock:
                self._forget(meta["f"])
        elif kind == b"R":
            if not self._stash and threading.get_ident() == self._recv_ident:
                self._stash.append((meta, data, address, port))  # run after the batch
            else:
                self._pool.submit(self._run_rpc, meta, data, address, port)
        elif kind == b"r":
            self._on_rpc_answer(meta, data)
        elif kind == b"T":
            self._on_task(meta, data, address, port)
        elif kind == b"t":
            self._on_task_answer(meta, data)
        elif kind == b"c":
            with self._lock:
                credit = self._credit.get((meta["f"], meta["q"]))
                if credit is not None:
                    credit.report(meta["fr"], meta["n"])
                self._dispatch(meta["q"])
        elif kind == b"B":
            self._bcast_lane.submit(self._run_broadcast, meta, data)

    def _follow(
        self, value: Any, pending: Callable[[], None], done: Callable[[str, Any], None]
    ) -> None:
        """Resolve a subscriber's result: futures (of futures) first say 'pending'."""
        if isinstance(value, _Deferred):
            value.future.add_done_callback(lambda f: self._settled(f, pending, done, True))
        elif isinstance(value, concurrent.futures.Future):
            pending()
            value.add_done_callback(lambda f: self._settled(f, pending, done, False))
        else:
            done("ok", value)

    def _settled(
        self,
        future: Any,
        pending: Callable[[], None],
        done: Callable[[str, Any], None],
        deferred: bool,
    ) -> None:
        if future.cancelled():
            done("cancel", None)
            return
        exc = future.exception()
        if exc is not None:
            done("exc", _exception_text(exc))
            return
        result = future.result()
        if deferred and isinstance(result, _Deferred):
            result = result.future  # nothing deeper expected
        self._follow(result, pending, done)

    def _run_rpc(
        self, meta: Dict[str, Any], data: bytes, address: Optional[str], port: int
    ) -> None:
        corr = meta["c"]

        def answer(kind: str, value: Any) -> None:
            out = b""
            if kind == "ok":
                try:
                    out = self._encoder(value)
                except Exception as exc:
                    kind, value = "exc", _exception_text(exc)
            if kind == "exc":
                out = value.encode()
            self._reply(meta, address, port, b"r", {"f": self.id, "c": corr, "k": kind}, out)

        subscriber = self._rpc_subs.get(_freeze(meta["to"]))
        if subscriber is None:
            answer("unroutable", None)
            return
        try:
            value = subscriber(self, self._decoder(data))
        except Exception as exc:
            answer("exc", _exception_text(exc))
            return
        self._follow(value, lambda: answer("pend", None), answer)

    def _on_rpc_answer(self, meta: Dict[str, Any], data: bytes) -> None:
        corr, kind = meta["c"], meta["k"]
        with self._lock:
            entry = self._rpcs.pop(corr, None)
            if entry is None:
                return
            future, owner = entry
            if kind == "pend":
                inner = self._answer_future(owner)
                self._rpcs[corr] = (inner, owner)
        self._resolve(future, kind, data, inner if kind == "pend" else None)

    def _resolve(
        self,
        future: Optional[kiwipy.Future[Any]],
        kind: str,
        data: bytes,
        inner: Optional[kiwipy.Future[Any]] = None,
    ) -> None:
        if future is None or future.done():
            return
        try:
            if kind == "ok":
                future.set_result(self._decoder(data) if data else None)
            elif kind == "exc":
                future.set_exception(kiwipy.RemoteException(data.decode(errors="replace")))
            elif kind == "pend":
                future.set_result(inner)
            elif kind == "cancel":
                future.cancel()
                future.set_running_or_notify_cancel()
            elif kind == "unroutable":
                future.set_exception(kiwipy.UnroutableError("the recipient unsubscribed"))
        except concurrent.futures.InvalidStateError:
            pass
        except Exception as exc:
            self._fail(future, exc)

    # -- tasks: the sending side ----------------------------------------------

    def _task_send(self, queue: str, task: Any, no_reply: bool) -> Optional[kiwipy.Future[Any]]:
        self._ensure_open()
        body = self._encoder(task)
        tid = uuid.uuid4().hex
        future = kiwipy.Future()
        if self._outbox is not None:
            self._outbox.add(tid, queue, body, no_reply)
        with self._lock:
            self._ensure_open()
            self._tasks[tid] = _OutTask(tid, queue, body, no_reply, future)
            self._pending.setdefault(queue, deque()).append(tid)
            self._dispatch(queue)
        return None if no_reply else future

    def _dispatch(self, queue: str) -> None:
        """Give waiting tasks of ``queue`` to the workers with credit (lock held)."""
        pending = self._pending.get(queue)
        caps = self._task_route.get(queue)
        if not pending or not caps:
            return
        while pending:
            task = self._tasks.get(pending[0])
            if task is None:
                pending.popleft()
                continue
            best: List[str] = []
            best_credit = 0
            for mid in caps:
                credit = self._credit.get((mid, queue))
                if credit is None or mid in task.excluded:
                    continue
                avail = credit.available()
                if avail > best_credit:
                    best, best_credit = [mid], avail
                elif avail == best_credit and avail > 0:
                    best.append(mid)
            if not best:
                return
            chosen = random.choice(best)
            pending.popleft()
            task.assignee = chosen
            self._credit[(chosen, queue)].sent += 1
            self._last_dispatch[queue] = time.monotonic()
            self._send_to(
                chosen,
                b"T",
                {"f": self.id, "c": task.id, "q": queue, "nr": task.no_reply},
                task.body,
            )

    def _on_task_answer(self, meta: Dict[str, Any], data: bytes) -> None:
        tid, kind, queue, mid = meta["c"], meta["k"], meta["q"], meta["f"]
        inner: Optional[kiwipy.Future[Any]] = None
        with self._lock:
            credit = self._credit.get((mid, queue))
            if credit is not None and "fr" in meta:
                credit.report(meta["fr"], meta["n"])
            task = self._tasks.get(tid)
            if task is None:
                self._dispatch(queue)
                return  # a second outcome of a task already done: ignored
            future = task.future
            if kind in ("busy", "rej", "requeue"):
                if task.assignee == mid:
                    task.assignee = None
                    if kind == "rej":
                        task.excluded.add(mid)
                    self._pending.setdefault(queue, deque()).appendleft(tid)
                self._dispatch(queue)
                return
            if kind == "pend":
                if task.no_reply:
                    return
                inner = kiwipy.Future()
                task.future = inner
            else:
                del self._tasks[tid]
            self._dispatch(queue)
        if kind != "pend" and self._outbox is not None:
            self._outbox.remove(tid)
        self._resolve(future, kind, data, inner)

    # -- tasks: the working side ----------------------------------------------

    def _on_task(
        self, meta: Dict[str, Any], data: bytes, address: Optional[str], port: int
    ) -> None:
        sender, queue = meta["f"], meta["q"]
        with self._lock:
            consumer = self._consumer(queue)
            consumer.received[sender] = consumer.received.get(sender, 0) + 1
            consumer.origins[sender] = (address or "", port)
            if consumer.subscribers and consumer.running < consumer.prefetch:
                consumer.running += 1
            elif consumer.pull_waiting > 0:
                consumer.pull_waiting -= 1
                consumer.inbox.put(ChirpIncomingTask(self, queue, meta, data, address, port))
                return
            else:
                consumer.starved.add((sender, address or "", port))
                self._reply(meta, address, port, b"t", self._outcome_meta(meta, "busy"), b"")
                return
        self._pool.submit(self._run_task, consumer, meta, data, address, port)

    def _outcome_meta(self, meta: Dict[str, Any], kind: str) -> Dict[str, Any]:
        consumer = self._consumers.get(meta["q"])
        free = consumer.free() if consumer is not None else 0
        seen = consumer.received.get(meta["f"], 0) if consumer is not None else 0
        return {"f": self.id, "c": meta["c"], "q": meta["q"], "k": kind, "fr": free, "n": seen}

    def _finish_task(
        self,
        meta: Dict[str, Any],
        address: Optional[str],
        port: int,
        kind: str,
        value: Any,
        pulled: bool = False,
    ) -> None:
        """A task of ours is done (or given back): free the slot, tell the sender."""
        out = b""
        if kind == "ok" and not meta.get("nr"):
            try:
                out = self._encoder(value)
            except Exception as exc:
                kind, value = "exc", _exception_text(exc)
        if kind == "exc":
            out = value.encode()
        with self._lock:
            consumer = self._consumer(meta["q"])
            if not pulled:
                consumer.running = max(0, consumer.running - 1)
            self._reply(meta, address, port, b"t", self._outcome_meta(meta, kind), out)
            self._relieve(meta["q"], consumer, meta["f"])

    def _relieve(
        self, queue: str, consumer: _Consumer, skip: Optional[str] = None, everyone: bool = False
    ) -> None:
        """A slot is free: give credit to the senders we turned away (lock held).

        With ``everyone`` (a pull waiter came) to every sender we ever had.
        """
        if consumer.free() <= 0 or not (consumer.starved or everyone):
            return
        starved, consumer.starved = consumer.starved, set()
        if everyone:
            starved |= {(mid, a, p) for mid, (a, p) in consumer.origins.items()}
        for sender, address, port in starved:
            if sender == skip:
                continue
            meta = {
                "f": self.id,
                "q": queue,
                "fr": consumer.free(),
                "n": consumer.received.get(sender, 0),
            }
            self._reply({"f": sender}, address or None, port, b"c", meta, b"")

    def _run_task(
        self,
        consumer: _Consumer,
        meta: Dict[str, Any],
        data: bytes,
        address: Optional[str],
        port: int,
    ) -> None:
        def pending() -> None:
            if not meta.get("nr"):
                self._reply(meta, address, port, b"t", self._outcome_meta(meta, "pend"), b"")

        def done(kind: str, value: Any) -> None:
            self._finish_task(meta, address, port, kind, value)

        try:
            body = self._decoder(data)
        except Exception as exc:
            done("exc", _exception_text(exc))
            return
        for subscriber in list(consumer.subscribers.values()):
            try:
                value = subscriber(self, body)
            except kiwipy.TaskRejected:
                continue
            except concurrent.futures.CancelledError:
                done("cancel", None)
                return
            except Exception as exc:
                _LOG.exception("task subscriber failed")
                done("exc", _exception_text(exc))
                return
            self._follow(value, pending, done)
            return
        done("rej", None)

    def _pull(self, queue: str, timeout: Optional[float]) -> Optional["ChirpIncomingTask"]:
        with self._lock:
            self._ensure_open()
            consumer = self._consumer(queue)
            try:
                return consumer.inbox.get_nowait()
            except _queue.Empty:
                pass
            consumer.pull_waiting += 1
            self._changed()
            self._relieve(queue, consumer, everyone=True)
        try:
            return consumer.inbox.get(timeout=timeout)
        except _queue.Empty:
            with self._lock:
                try:
                    return consumer.inbox.get_nowait()
                except _queue.Empty:
                    consumer.pull_waiting = max(0, consumer.pull_waiting - 1)
                    if not self._closed:
                        self._changed()
                    return None

    # -- broadcasts -----------------------------------------------------------

    def _run_broadcast(self, meta: Dict[str, Any], data: bytes) -> None:
        try:
            body = self._decoder(data)
        except Exception:
            _LOG.exception("undecodable broadcast")
            return
        for subscriber in list(self._bcast_subs.values()):
            try:
                subscriber(
                    self,
                    body=body,
                    sender=meta.get("s"),
                    subject=meta.get("j"),
                    correlation_id=meta.get("ci"),
                )
            except Exception:
                _LOG.exception("broadcast subscriber failed")


# ---------------------------------------------------------------------------
# Named task queues with pull-style consumption.
# ---------------------------------------------------------------------------

TASK_PENDING = "pending"
TASK_PROCESSING = "processing"
TASK_FINISHED = "finished"
TASK_REQUEUED = "requeued"


class ChirpIncomingTask:
    """A task taken with :meth:`ChirpTaskQueue.next_task` (as kiwiPy's incoming task)."""

    def __init__(
        self,
        comm: ChirpCommunicator,
        queue: str,
        meta: Dict[str, Any],
        data: bytes,
        address: Optional[str],
        port: int,
    ) -> None:
        self._comm = comm
        self._queue = queue
        self._meta = meta
        self._address = address
        self._port = port
        self._body = comm._decoder(data)
        self._state = TASK_PENDING

    @property
    def body(self) -> Any:
        return self._body

    @property
    def no_reply(self) -> bool:
        return bool(self._meta.get("nr"))

    @property
    def state(self) -> str:
        return self._state

    def process(self) -> kiwipy.Future[Any]:
        """Take the task on: its outcome is what the returned future is set to."""
        if self._state != TASK_PENDING:
            raise kiwipy.InvalidStateError("The task is %s" % self._state)
        self._state = TASK_PROCESSING
        outcome = kiwipy.Future()
        outcome.add_done_callback(self._done)
        return outcome

    def requeue(self) -> None:
        """Give the task back: the sender sends it to a worker again."""
        if self._state not in (TASK_PENDING, TASK_PROCESSING):
            raise kiwipy.InvalidStateError("The task is %s" % self._state)
        self._state = TASK_REQUEUED
        self._comm._finish_task(self._meta, self._address, self._port, "requeue", None, True)

    @contextlib.contextmanager
    def processing(self) -> Iterator[kiwipy.Future[Any]]:
        """Process in a ``with`` block; if the outcome is not set by its end, requeue."""
        outcome = self.process()
        try:
            yield outcome
        except Exception as exc:
            if not outcome.done():
                outcome.set_exception(exc)
            raise
        finally:
            if not outcome.done():
                self._state = TASK_PENDING
                self.requeue()

    def _done(self, outcome: kiwipy.Future[Any]) -> None:
        if self._state != TASK_PROCESSING:
            return
        if outcome.cancelled():
            self._state = TASK_REQUEUED
            self._comm._finish_task(self._meta, self._address, self._port, "requeue", None, True)
            return
        self._state = TASK_FINISHED
        exc = outcome.exception()
        if exc is not None:
            self._comm._finish_task(
                self._meta, self._address, self._port, "exc", _exception_text(exc), True
            )
        else:
            self._comm._finish_task(
                self._meta, self._address, self._port, "ok", outcome.result(), True
            )


class ChirpTaskQueue:
    """A named task queue of the mesh (as kiwiPy's ``RmqThreadTaskQueue``)."""

    def __init__(self, comm: ChirpCommunicator, name: str) -> None:
        self._comm = comm
        self.name = name

    def task_send(self, task: Any, no_reply: bool = False) -> Optional[kiwipy.Future[Any]]:
        return self._comm._task_send(self.name, task, no_reply)

    def add_task_subscriber(self, subscriber: Callable[..., Any], identifier: Any = None) -> Any:
        return self._comm.add_task_subscriber(subscriber, identifier, queue=self.name)

    def remove_task_subscriber(self, identifier: Any) -> None:
        self._comm.remove_task_subscriber(identifier)

    @contextlib.contextmanager
    def next_task(
        self, timeout: float = 5.0, fail: bool = True
    ) -> Iterator[Optional[ChirpIncomingTask]]:
        """The next task of this queue; one not processed by the end is requeued.

        Raises ``kiwipy.QueueEmpty`` after ``timeout`` seconds without a task
        (or yields None with ``fail=False``).
        """
        task = self._comm._pull(self.name, timeout)
        if task is None:
            if fail:
                raise kiwipy.QueueEmpty("no task in %r within %s s" % (self.name, timeout))
            yield None
            return
        try:
            yield task
        finally:
            if task.state == TASK_PENDING:
                task.requeue()

    def __iter__(self) -> Iterator[ChirpIncomingTask]:
        """Tasks until none comes for a second; unprocessed ones are requeued at the end."""
        taken: List[ChirpIncomingTask] = []
        try:
            while True:
                task = self._comm._pull(self.name, 1.0)
                if task is None:
                    return
                taken.append(task)
                yield task
        finally:
            for task in taken:
                if task.state == TASK_PENDING:
                    task.requeue()
