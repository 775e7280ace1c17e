"""Queues and pipes that span processes and machines, with the ``multiprocessing`` interface.

See docs/mp.md for the interface, the guarantees and the security note.

Theory of operation
-------------------
The process that creates a :class:`Queue`, :class:`SimpleQueue` or :func:`Pipe`
*hosts* it: a per-process :class:`_Host` runs one chirp node (``Config.PORT =
0``, a free port) and a thread that serves every object hosted there. Each
queue is one *box* (a deque of pickled items, keyed by a random 64-bit id); a
pipe is two boxes, one per direction. The object itself is only a description
(box ids, the host's advertised address and port, the mode, TLS settings):
pickling it (to a ``multiprocessing.Process``, or through another queue or
pipe) gives the receiver a handle of the same box. Whether a handle talks to
the box directly (it lives in the hosting process) or as a client is decided on
use, by comparing ``os.getpid()``: a child made by ``fork`` inherits the
object, notices the new pid and becomes a client with a Loop of its own (the
parent's loop threads do not exist there; the inherited chirp objects are kept
referenced for ever, never stopped, so their finalizers never run).

Clients (one :class:`_Runtime` per process: a Loop, a node on a free port and a
reader thread) talk to the host with chirp messages in SYNCHRONOUS mode. The
header (:data:`_HDR`) names the kind, the box, a request id, a count, a wait
and flags; the data is a pickled list of item bytes. The host never unpickles
items.

* ``P`` put: a batch of items. The host appends it and *then* releases the
  message, which acknowledges it to the producer (SYNCHRONOUS): an acknowledged
  batch is in the host's memory. A producer keeps at most :data:`PUT_WINDOW`
  batches unacknowledged and collects new items meanwhile, so batches grow
  while the host is busy. A box with ``maxsize`` that is full keeps the message
  unreleased until there is room, which stalls the producer (slots).
* ``W`` want (pull mode): "give me up to n items, wait at most w ms". The host
  releases it at once and answers later with exactly one message to the
  client's node: ``D`` with items, or ``E`` (empty, or end of file for a
  pipe). The host sends ``D`` synchronously; the client releases it only when
  its thread has taken the items, so if the client dies first the send fails
  and the host puts the items back at the front of the box.
* ``S``/``U`` subscribe/unsubscribe (push mode): the host sends ``D`` batches
  ahead of demand, round-robin over subscribers, at most :data:`PUSH_WINDOW`
  unacknowledged batches per subscriber. The client releases a pushed batch
  when its last item was handed out; a failed delivery puts the batch back
  (once no other batch to that client is in flight, all of them in the box's
  order). The host answers ``U`` with ``E`` after the last batch it pushed to
  that client, so the client knows when it has every batch it must give back.
* ``R`` return: items a closing client had received but not handed out go back
  to the front of the box. ``C`` close: the writing end of a pipe closed.
  ``Z`` stat: the host answers ``E`` with the box's size (also a liveness probe).

Threads: the host's state is guarded by one condition variable
(``_Host.cond``); its thread takes received messages in batches; delivery
callbacks run on whichever thread handles the loop's events and only take the
lock, requeue and send. Sends are issued outside the lock, but in the order
they were collected under it: the host queues them and one thread at a time
sends the queue (``_Host._flush``); a producer handle likewise sends its
batches one thread at a time (``_Remote._pump``). Chirp writes the messages to
one peer in the order they were sent, so batches reach a consumer, and put
batches reach the host, in the order they were made.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import itertools
import logging
import os
import pickle
import queue as _queue
import struct
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from typing import (
    Any,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Tuple,
    Type,
    TypedDict,
    TypeVar,
    Union,
)

from .config import Config
from .loop import Loop
from .message import Message, MessageBase
from .queue import Chirp

__all__ = [
    "ADDRESS",
    "CONFIG",
    "TIMEOUT",
    "Queue",
    "SimpleQueue",
    "Pipe",
    "Connection",
    "attach",
    "Empty",
    "Full",
]

_log = logging.getLogger("libchirp")

Empty = _queue.Empty
Full = _queue.Full

#: The address a host advertises when none is given (use the machine's address
#: that other hosts reach, for queues that span machines).
ADDRESS: str = "127.0.0.1"
#: A Config whose TLS and bind fields the nodes of this module copy (None:
#: plaintext on loopback, ``DISABLE_ENCRYPTION`` left False so that any
#: non-loopback peer would need TLS and fail).
CONFIG: Optional[Config] = None
#: Config.TIMEOUT of this module's nodes: bounds the acknowledgement of a batch
#: held by a full queue or by a consumer that has not taken it yet. A peer that
#: dies is noticed at once (the connection closes), not after TIMEOUT.
TIMEOUT: float = 1200.0

#: Unacknowledged put batches per producer handle.
PUT_WINDOW = 4
#: Items and bytes per put batch at most.
PUT_BATCH = 4096
PUT_BATCH_BYTES = 1 << 20
#: Items a producer handle holds unacknowledged before put() blocks.
PUT_LIMIT = 65536
#: Pushed batches in flight per subscriber, and items per pushed batch.
PUSH_WINDOW = 4
PUSH_BATCH = 256
PUSH_BATCH_BYTES = 1 << 20
#: Slots per connection of this module's nodes.
SLOTS = 16
#: Longest wait of one pull request; longer waits are repeated (liveness).
CHUNK = 1.0
#: How long past its wait a client waits for the host's answer before it
#: declares the host unreachable.
SLACK = 30.0

_HDR = struct.Struct("!cQQIIB")
_P, _R, _W, _S, _U, _C, _Z, _D, _E = (b"P", b"R", b"W", b"S", b"U", b"C", b"Z", b"D", b"E")
_F_EOF = 1
_F_PUSH = 2

_Key = Tuple[str, int]
#: A handle's TLS setting: (CERT_CHAIN_PEM, DH_PARAMS_PEM, DISABLE_ENCRYPTION, BIND_V4, BIND_V6).
_TLS = Tuple[Optional[str], Optional[str], bool, str, str]


class _Spec(TypedDict):
    """What a handle is, and all that pickling it carries."""

    #: box ids: [the queue's] or [receiving, sending] for a Connection (0: none).
    qids: List[int]
    address: str
    port: int
    tls: _TLS
    mode: str
    maxsize: int


_reqids = itertools.count(1)
_registry_lock = threading.Lock()
_hosts: Dict[Tuple[_TLS, int], "_Host"] = {}
_runtimes: Dict[_TLS, "_Runtime"] = {}
#: chirp objects inherited through fork: kept alive, never touched.
_graveyard: List[Any] = []


def _after_fork_in_child() -> None:
    global _registry_lock
    _graveyard.extend(_hosts.values())
    _graveyard.extend(_runtimes.values())
    _hosts.clear()
    _runtimes.clear()
    _registry_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _tls_of(config: Optional[Config]) -> _TLS:
    c = config if config is not None else CONFIG
    if c is None:
        return (None, None, False, "0.0.0.0", "::")
    return (c.CERT_CHAIN_PEM, c.DH_PARAMS_PEM, c.DISABLE_ENCRYPTION, c.BIND_V4, c.BIND_V6)


def _node_config(tls: _TLS, port: int = 0) -> Config:
    cfg = Config()
    cfg.PORT = port
    cfg.SYNCHRONOUS = True
    cfg.AUTO_RELEASE = False
    cfg.MAX_SLOTS = SLOTS
    cfg.TIMEOUT = TIMEOUT
    cert, dh, disable, bind4, bind6 = tls
    cfg.BIND_V4, cfg.BIND_V6 = bind4, bind6
    if cert is not None:
        cfg.CERT_CHAIN_PEM = cert
    if dh is not None:
        cfg.DH_PARAMS_PEM = dh
    # Without certificates, loopback is the only place a node can talk at all.
    cfg.DISABLE_ENCRYPTION = disable or (cert is None and dh is None)
    return cfg


def _header(
    kind: bytes, qid: int, reqid: int = 0, n: int = 0, wait: float = 0.0, f: int = 0
) -> bytes:
    return _HDR.pack(kind, qid, reqid, n, int(max(0.0, wait) * 1000), f)


def _pack(items: List[bytes]) -> bytes:
    return pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)


def _unpack(data: bytes) -> List[bytes]:
    items = pickle.loads(data) if data else []
    if type(items) is not list:
        raise ValueError("malformed batch")
    return items


def _late_messages(node: Chirp) -> Iterator[MessageBase]:
    """The messages still queued on ``node`` once its thread has ended, without blocking."""
    while True:
        try:
            late = node.get_many(1024, block=False)
        except _queue.Empty:
            return
        yield from late


def _to_msg(key: _Key, header: bytes, data: bytes = b"") -> MessageBase:
    msg = Message()
    msg.address, msg.port = key
    msg.header = header
    msg.data = data
    return msg


# ------------------------------------------------------------------------------------------
# The host: boxes served by one node
# ------------------------------------------------------------------------------------------


class _Box:
    """One queue (or one direction of a pipe) in its hosting process."""

    __slots__ = (
        "qid",
        "maxsize",
        "items",
        "held",
        "waiters",
        "subs",
        "rr",
        "eof",
        "taken",
        "flying",
        "failed",
    )

    def __init__(self, qid: int, maxsize: int) -> None:
        self.qid = qid
        self.maxsize = maxsize
        self.items: Deque[bytes] = deque()
        #: put messages not yet accepted because the box is full.
        self.held: Deque[Tuple[MessageBase, List[bytes]]] = deque()
        #: pull requests: (client, reqid, n, expiry).
        self.waiters: Deque[Tuple[_Key, int, int, float]] = deque()
        #: push subscribers: client -> [batches in flight, subscription id].
        self.subs: Dict[_Key, List[int]] = {}
        self.rr = 0
        self.eof = False
        #: items handed out so far: the position of the next batch in the box's order.
        self.taken = 0
        #: deliveries (D batches) in flight per client.
        self.flying: Dict[_Key, int] = {}
        #: failed deliveries per client, (position, items), kept until none is in flight.
        self.failed: Dict[_Key, List[Tuple[int, List[bytes]]]] = {}

    def hand_out(self, key: _Key, batch: List[bytes]) -> int:
        """Note a batch on its way to ``key``; its position in the box's order."""
        pos = self.taken
        self.taken += len(batch)
        self.flying[key] = self.flying.get(key, 0) + 1
        return pos

    def full(self) -> bool:
        return bool(self.maxsize) and len(self.items) >= self.maxsize


#: a message to send, and for a D batch: (box, items, client, pushed, position).
_Track = Tuple["_Box", List[bytes], _Key, bool, int]
_Send = Tuple[MessageBase, Optional[_Track]]


class _Host:
    """The boxes hosted by this process for one TLS setting, and their node."""

    def __init__(self, tls: _TLS, port: int = 0) -> None:
        self.tls = tls
        self.loop = Loop()
        try:
            self.node = Chirp(self.loop, _node_config(tls, port))
        except BaseException:
            self.loop.stop()
            raise
        self.port = self.node.port
        self.cond = threading.Condition(threading.Lock())
        self.boxes: Dict[int, _Box] = {}
        self.stopping = False
        #: sends and releases collected under the lock, issued in this order by _flush.
        self.outq: List[_Send] = []
        self.outrel: List[MessageBase] = []
        self.flushing = False
        self.thread = threading.Thread(target=self._run, name="libchirp.mp host", daemon=True)
        self.thread.start()

    def new_box(self, maxsize: int, qid: int = 0) -> int:
        with self.cond:
            if qid:
                if qid not in self.boxes:
                    self.boxes[qid] = _Box(qid, maxsize)
                return qid
            while True:
                qid = int.from_bytes(os.urandom(8), "big") or 1
                if qid not in self.boxes:
                    self.boxes[qid] = _Box(qid, maxsize)
                    return qid

    # -- the host thread -------------------------------------------------------------------

    def _run(self) -> None:
        node = self.node
        idle = 0.2
        while not self.stopping:
            try:
                msgs = node.get_many(1024, timeout=idle)
            except _queue.Empty:
                msgs = []
            except Exception:
                if self.stopping:
                    return
                raise
            sends: List[_Send] = []
            release: List[MessageBase] = []
            with self.cond:
                touched = set()
                for m in msgs:
                    try:
                        box = self._handle(m, sends, release)
                    except Exception:
                        _log.exception("libchirp.mp: bad message from %s:%d", m.address, m.port)
                        release.append(m)
                        continue
                    if box is not None:
                        touched.add(box)
                for box in touched:
                    self._serve(box, sends, release)
                idle = self._expire(sends)
                self._enqueue(sends, release)
                if msgs:
                    self.cond.notify_all()
            self._flush()

    def _handle(
        self, m: MessageBase, sends: List[_Send], release: List[MessageBase]
    ) -> Optional[_Box]:
        try:
            kind, qid, reqid, n, wait_ms, flags = _HDR.unpack(m.header)
        except struct.error:
            release.append(m)
            return None
        box = self.boxes.get(qid)
        key = (m.address, m.port)
        if box is None:
            release.append(m)
            if kind in (_W, _Z):
                sends.append((_to_msg(key, _header(_E, qid, reqid, 0, 0, _F_EOF)), None))
            return None
        if kind == _P:
            items = _unpack(m.data)
            if box.full() or box.held:
                box.held.append((m, items))
            else:
                box.items.extend(items)
                release.append(m)
        elif kind == _R:
            box.items.extendleft(reversed(_unpack(m.data)))
            release.append(m)
        elif kind == _W:
            release.append(m)
            box.waiters.append((key, reqid, max(1, n), time.monotonic() + wait_ms / 1000.0))
        elif kind == _S:
            release.append(m)
            box.subs.setdefault(key, [0, reqid])
        elif kind == _U:
            release.append(m)
            box.subs.pop(key, None)
            # the answer follows every batch pushed to this client before
            sends.append((_to_msg(key, _header(_E, qid, reqid, 0, 0, 0)), None))
        elif kind == _C:
            release.append(m)
            box.eof = True
        elif kind == _Z:
            release.append(m)
            f = _F_EOF if box.eof else 0
            sends.append((_to_msg(key, _header(_E, qid, reqid, len(box.items), 0, f)), None))
        else:
            release.append(m)
        return box

    def _expire(self, sends: List[_Send]) -> float:
        """Answer pull requests whose wait is over; return the time to the next expiry."""
        now = time.monotonic()
        nearest = 0.2
        for box in self.boxes.values():
            if not box.waiters:
                continue
            keep: Deque[Tuple[_Key, int, int, float]] = deque()
            for w in box.waiters:
                if w[3] <= now or (box.eof and not box.items):
                    f = _F_EOF if box.eof else 0
                    sends.append((_to_msg(w[0], _header(_E, box.qid, w[1], 0, 0, f)), None))
                else:
                    keep.append(w)
                    nearest = min(nearest, w[3] - now)
            box.waiters = keep
        return max(0.001, nearest)

    def _serve(self, box: _Box, sends: List[_Send], release: List[MessageBase]) -> None:
        """Hand out what the box can (lock held); collect the messages to send."""
        items = box.items
        while box.waiters and items:
            key, reqid, n, _ = box.waiters.popleft()
            k = min(n, len(items))
            batch = [items.popleft() for _ in range(k)]
            msg = _to_msg(key, _header(_D, box.qid, reqid, k), _pack(batch))
            sends.append((msg, (box, batch, key, False, box.hand_out(key, batch))))
        if box.eof and not items and box.waiters:
            for key, reqid, _, _ in box.waiters:
                sends.append((_to_msg(key, _header(_E, box.qid, reqid, 0, 0, _F_EOF)), None))
            box.waiters.clear()
        if items and box.subs:
            keys = list(box.subs)
            idle = 0
            while items and idle < len(keys):
                box.rr = (box.rr + 1) % len(keys)
                key = keys[box.rr]
                sub = box.subs[key]
                if sub[0] >= PUSH_WINDOW:
                    idle += 1
                    continue
                idle = 0
                # an even share of what is there now, for each subscriber in turn
                k = min(PUSH_BATCH, -(-len(items) // len(keys)))
                batch = []
                size = 0
                while len(batch) < k and size < PUSH_BATCH_BYTES:
                    item = items.popleft()
                    batch.append(item)
                    size += len(item)
                k = len(batch)
                sub[0] += 1
                msg = _to_msg(key, _header(_D, box.qid, sub[1], k, 0, _F_PUSH), _pack(batch))
                sends.append((msg, (box, batch, key, True, box.hand_out(key, batch))))
        while box.held and not box.full():
            m, batch = box.held.popleft()
            items.extend(batch)
            release.append(m)

    def _enqueue(self, sends: List[_Send], release: List[MessageBase]) -> None:
        """Queue what a locked section collected for :meth:`_flush` (lock held).

        The order of this queue is the order in which the boxes handed out
        their items; sending it in that order is what keeps the batches of one
        producer in order at a consumer that has several in flight.
        """
        self.outq.extend(sends)
        self.outrel.extend(release)

    def _flush(self) -> None:
        """Issue the queued sends and releases (lock not held), one thread at a time.

        Several threads serve boxes (the host thread, delivery callbacks, the
        hosting process's own handles). If each sent what it had collected on
        its own, a thread that collected batch 1 for a consumer could be
        overtaken by one that collected batch 2 after it. So whoever finds no
        flush under way sends the whole queue, in order, until it is empty;
        the others leave their sends to it.
        """
        while True:
            with self.cond:
                if self.flushing or not (self.outq or self.outrel):
                    return
                self.flushing = True
                sends, self.outq = self.outq, []
                release, self.outrel = self.outrel, []
            try:
                for m in release:
                    m.release_slot()
                if not sends:
                    continue
                try:
                    futs = self.node.send_many([s[0] for s in sends])
                except Exception:
                    if self.stopping:
                        return
                    raise
                for (_, track), fut in zip(sends, futs):
                    if track is not None:
                        fut.add_done_callback(functools.partial(self._delivered, track=track))
            finally:
                with self.cond:
                    self.flushing = False

    def _delivered(self, fut: Future[MessageBase], track: _Track) -> None:
        box, batch, key, pushed, pos = track
        failed = fut.exception() is not None
        sends: List[_Send] = []
        release: List[MessageBase] = []
        with self.cond:
            left = box.flying.get(key, 1) - 1
            if left:
                box.flying[key] = left
            else:
                box.flying.pop(key, None)
            if failed:
                # The client did not take them. They go back to the front once
                # no other batch to this client is in flight, all at once and
                # in the box's order (the failures of several batches may be
                # reported in any order).
                box.failed.setdefault(key, []).append((pos, batch))
                box.subs.pop(key, None)
                box.waiters = deque(w for w in box.waiters if w[0] != key)
            elif pushed:
                sub = box.subs.get(key)
                if sub is not None:
                    sub[0] -= 1
            if not left and key in box.failed:
                for _, back in sorted(box.failed.pop(key), key=lambda e: e[0], reverse=True):
                    box.items.extendleft(reversed(back))
            if self.stopping:
                return
            self._serve(box, sends, release)
            self._enqueue(sends, release)
            self.cond.notify_all()
        self._flush()

    # -- the hosting process's own handles ---------------------------------------------------

    def put_local(
        self, qid: int, items: List[bytes], block: bool, timeout: Optional[float]
    ) -> None:
        sends: List[_Send] = []
        release: List[MessageBase] = []
        with self.cond:
            box = self.boxes[qid]
            if box.full():
                if not block:
                    raise Full
                end = None if timeout is None else time.monotonic() + timeout
                while box.full():
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        raise Full
                    self.cond.wait(left)
            box.items.extend(items)
            self._serve(box, sends, release)
            self._enqueue(sends, release)
            self.cond.notify_all()
        self._flush()

    def get_local(
        self, qid: int, n: int, block: bool, timeout: Optional[float], ep: Any = None
    ) -> List[bytes]:
        sends: List[_Send] = []
        release: List[MessageBase] = []
        with self.cond:
            box = self.boxes[qid]
            if not box.items:
                if box.eof:
                    raise EOFError
                if not block:
                    raise Empty
                end = None if timeout is None else time.monotonic() + timeout
                while not box.items:
                    if box.eof:
                        raise EOFError
                    if self.stopping:
                        raise OSError("the host of this queue stopped")
                    if ep is not None and ep.closed:
                        raise ValueError("closed while waiting in get()")
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        raise Empty
                    self.cond.wait(left)
            k = min(n, len(box.items))
            out = [box.items.popleft() for _ in range(k)]
            if box.held:
                self._serve(box, sends, release)
                self._enqueue(sends, release)
        self._flush()
        return out

    def close_local(self, qid: int) -> None:
        sends: List[_Send] = []
        release: List[MessageBase] = []
        with self.cond:
            box = self.boxes[qid]
            box.eof = True
            self._serve(box, sends, release)
            self._enqueue(sends, release)
            self.cond.notify_all()
        self._flush()

    def size_local(self, qid: int) -> Tuple[int, bool]:
        with self.cond:
            box = self.boxes[qid]
            return len(box.items), box.eof

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            held = [m for box in self.boxes.values() for m, _ in box.held]
            for box in self.boxes.values():
                box.held.clear()
            self.cond.notify_all()
        for m in held:
            m.release_slot()
        self.thread.join(5)
        for m in _late_messages(self.node):
            m.release_slot()
        try:
            self.node.stop()
        finally:
            self.loop.stop()


def _host(tls: _TLS, port: int = 0) -> _Host:
    with _registry_lock:
        host = _hosts.get((tls, port))
        if host is None:
            _register_finalizer()
            host = _hosts[(tls, port)] = _Host(tls, port)
        return host


def _name_qid(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") or 1


# ------------------------------------------------------------------------------------------
# The client side: one node per process, a reader thread that sorts the answers
# ------------------------------------------------------------------------------------------


class _Inbound:
    """A D batch a client received and has not handed out completely."""

    __slots__ = ("msg", "items", "pos")

    def __init__(self, msg: MessageBase) -> None:
        self.msg = msg
        self.items = _unpack(msg.data)
        #: the next item to hand out; the message is released after the last one.
        self.pos = 0


class _Runtime:
    """This process's client node for one TLS setting (used by handles of remote boxes)."""

    def __init__(self, tls: _TLS) -> None:
        self.loop = Loop()
        try:
            self.node = Chirp(self.loop, _node_config(tls))
        except BaseException:
            self.loop.stop()
            raise
        self.cond = threading.Condition(threading.Lock())
        #: request id -> answer, for requests somebody waits for.
        self.pending: Dict[int, Optional[MessageBase]] = {}
        #: pushed batches and late answers per box.
        self.inbox: Dict[int, Deque[_Inbound]] = {}
        self.endpoints: "weakref.WeakSet[_Remote]" = weakref.WeakSet()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="libchirp.mp client", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                msgs = self.node.get_many(1024, timeout=0.2)
            except _queue.Empty:
                continue
            except Exception:
                if self.stopping:
                    return
                raise
            drop: List[Message] = []
            with self.cond:
                for m in msgs:
                    try:
                        kind, qid, reqid, n, _, flags = _HDR.unpack(m.header)
                    except struct.error:
                        drop.append(m)
                        continue
                    if reqid in self.pending and not flags & _F_PUSH:
                        self.pending[reqid] = m
                    elif kind == _D:
                        self.inbox.setdefault(qid, deque()).append(_Inbound(m))
                    else:
                        drop.append(m)
                self.cond.notify_all()
            for m in drop:
                m.release_slot()

    def request(self, key: _Key, header: bytes, reqid: int, limit: float) -> MessageBase:
        """Send a request and wait for its answer (``ConnectionError`` if none comes)."""
        with self.cond:
            self.pending[reqid] = None
        fut = self.node.send(_to_msg(key, header))
        fut.add_done_callback(lambda f: self._wake())
        end = time.monotonic() + limit
        with self.cond:
            try:
                while self.pending[reqid] is None:
                    if fut.done() and fut.exception() is not None:
                        raise ConnectionError(
                            "cannot reach the host of this queue at %s:%d: %s"
                            % (key[0], key[1], fut.exception())
                        )
                    left = end - time.monotonic()
                    if left <= 0 or self.stopping:
                        raise ConnectionError(
                            "the host of this queue at %s:%d did not answer" % key
                        )
                    self.cond.wait(left)
                answer = self.pending[reqid]
                assert answer is not None
                return answer
            finally:
                self.pending.pop(reqid, None)

    def _wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def give_back(self, key: _Key, qid: int, items: List[bytes], entries: List[_Inbound]) -> None:
        """Return items received but not handed out to the front of their box, then
        release their messages (so that the host never counts them as delivered
        before it has them back)."""
        back = list(items)
        for entry in entries:
            back.extend(entry.items[entry.pos :])
        if back:
            try:
                hdr = _header(_R, qid, 0, len(back))
                self.node.send(_to_msg(key, hdr, _pack(back))).result(SLACK)
            except Exception:
                _log.warning("libchirp.mp: could not return %d item(s) to %s:%d", len(back), *key)
        for entry in entries:
            entry.msg.release_slot()

    def stop(self) -> None:
        for ep in list(self.endpoints):
            try:
                ep.close(flush_limit=30.0)
            except Exception:
                pass
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(5)
        for m in _late_messages(self.node):
            kind, qid = _HDR.unpack(m.header)[:2] if len(m.header) == _HDR.size else (b"", 0)
            if kind == _D:
                self.inbox.setdefault(qid, deque()).append(_Inbound(m))
            else:
                m.release_slot()
        with self.cond:
            inbox = list(self.inbox.items())
            self.inbox.clear()
            stale = [m for m in self.pending.values() if m is not None]
        for qid, entries in inbox:
            if entries:
                m = entries[0].msg
                self.give_back((m.address, m.port), qid, [], list(entries))
        for m in stale:
            m.release_slot()
        try:
            self.node.stop()
        finally:
            self.loop.stop()


def _runtime(tls: _TLS) -> _Runtime:
    with _registry_lock:
        rt = _runtimes.get(tls)
        if rt is None:
            _register_finalizer()
            rt = _runtimes[tls] = _Runtime(tls)
        return rt


def _shutdown() -> None:
    """At exit: flush and close client handles, then stop clients and hosts."""
    with _registry_lock:
        runtimes = list(_runtimes.values())
        hosts = list(_hosts.values())
        _runtimes.clear()
        _hosts.clear()
    for rt in runtimes:
        try:
            rt.stop()
        except Exception:
            pass
    for host in hosts:
        try:
            host.stop()
        except Exception:
            pass


atexit.register(_shutdown)


_finalizer_pid = 0


def _register_finalizer() -> None:
    """Also stop at the exit of a ``multiprocessing`` child (registry lock held).

    Children started by fork leave through ``os._exit`` without running atexit,
    after multiprocessing's own finalizers, whose registry a new child empties;
    so register once per process, when this process first needs a node.
    """
    global _finalizer_pid
    if _finalizer_pid == os.getpid():
        return
    _finalizer_pid = os.getpid()
    from multiprocessing import util

    util.Finalize(None, _shutdown, exitpriority=100)


# ------------------------------------------------------------------------------------------
# Endpoints: how a handle reaches its box (directly in the host, or as a client)
# ------------------------------------------------------------------------------------------


class _Local:
    """A handle in the hosting process: direct access to the box."""

    def __init__(self, host: _Host, qid: int) -> None:
        self.host = host
        self.qid = qid
        self.closed = False

    def put(self, item: bytes, block: bool, timeout: Optional[float]) -> None:
        self.host.put_local(self.qid, [item], block, timeout)

    def put_many(self, items: List[bytes]) -> None:
        self.host.put_local(self.qid, items, True, None)

    def get(self, n: int, block: bool, timeout: Optional[float]) -> List[bytes]:
        return self.host.get_local(self.qid, n, block, timeout, self)

    def poll(self, timeout: Optional[float]) -> bool:
        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self.host.cond:
            box = self.host.boxes[self.qid]
            while not box.items and not box.eof:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.host.cond.wait(left)
            return True

    def size(self) -> Tuple[int, bool]:
        return self.host.size_local(self.qid)

    def flush(self, timeout: Optional[float]) -> None:
        pass

    def close_writer(self) -> None:
        self.host.close_local(self.qid)

    def close(self, flush_limit: Optional[float] = None) -> None:
        self.closed = True
        with self.host.cond:
            self.host.cond.notify_all()


class _Remote:
    """A handle in another process: talks to the host's node."""

    def __init__(self, rt: _Runtime, key: _Key, qid: int, push: bool) -> None:
        self.rt = rt
        self.key = key
        self.qid = qid
        self.push = push
        self.subscribed = 0
        self.buffer: Deque[bytes] = deque()
        # producer state
        self.pcond = threading.Condition(threading.Lock())
        self.outbox: List[bytes] = []
        self.outbytes = 0
        self.inflight = 0
        self.sending = False
        self.unacked = 0
        self.error: Optional[BaseException] = None
        self.lost = 0
        self.closed = False
        self.no_flush = False
        rt.endpoints.add(self)

    # -- producing -------------------------------------------------------------------------

    def put(self, item: bytes, block: bool, timeout: Optional[float], limit: int) -> None:
        with self.pcond:
            if self.error is not None:
                raise self._failure()
            if self.unacked >= limit:
                if not block:
                    raise Full
                end = None if timeout is None else time.monotonic() + timeout
                while self.unacked >= limit:
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        raise Full
                    self.pcond.wait(left)
                    if self.error is not None:
                        raise self._failure()
            self.outbox.append(item)
            self.outbytes += len(item)
            self.unacked += 1
        self._pump()

    def _pump(self) -> None:
        """Send the batches the window has room for, one thread at a time.

        Both the putting thread and the acknowledgement callbacks send batches.
        A batch is taken under the lock but sent after it (pickling it takes a
        while), so two threads sending on their own could send them in the
        other order and the host would queue the later items first. So only the
        thread that finds no send under way takes and sends, until the window
        is full or the outbox empty; the others leave their batches to it.
        """
        while True:
            with self.pcond:
                if self.sending or self.error is not None:
                    return
                batch = self._take_batch()
                if not batch:
                    return
                self.sending = True
            try:
                self._send_batch(batch)
            finally:
                with self.pcond:
                    self.sending = False

    def _take_batch(self) -> Optional[List[bytes]]:
        """A batch to send now, if the window has room (pcond held)."""
        if self.inflight >= PUT_WINDOW or not self.outbox:
            return None
        out = self.outbox
        if len(out) > PUT_BATCH or self.outbytes > PUT_BATCH_BYTES:
            n, size = 0, 0
            while n < len(out) and n < PUT_BATCH and (n == 0 or size < PUT_BATCH_BYTES):
                size += len(out[n])
                n += 1
            batch, self.outbox = out[:n], out[n:]
            self.outbytes -= size
        else:
            batch, self.outbox, self.outbytes = out, [], 0
        self.inflight += 1
        return batch

    def _send_batch(self, batch: List[bytes]) -> None:
        msg = _to_msg(self.key, _header(_P, self.qid, 0, len(batch)), _pack(batch))
        try:
            fut = self.rt.node.send(msg)
        except Exception as exc:
            self._sent(None, len(batch), exc)
            return
        n = len(batch)
        fut.add_done_callback(lambda f: self._sent(f, n, None))

    def _sent(
        self, fut: Optional[Future[MessageBase]], n: int, exc: Optional[BaseException]
    ) -> None:
        if fut is not None:
            exc = fut.exception()
        with self.pcond:
            self.inflight -= 1
            if exc is not None:
                if self.error is None:
                    self.error = exc
                    self.lost = self.unacked
            else:
                self.unacked -= n
            self.pcond.notify_all()
        self._pump()

    def _failure(self) -> ConnectionError:
        return ConnectionError(
            "put to %s:%d failed (%s); %d item(s) put since the last confirmed one "
            "are not known to have arrived" % (self.key[0], self.key[1], self.error, self.lost)
        )

    def flush(self, timeout: Optional[float]) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        with self.pcond:
            while self.unacked and self.error is None:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("%d item(s) not yet confirmed by the host" % self.unacked)
                self.pcond.wait(left)
            if self.error is not None:
                raise self._failure()

    # -- consuming -------------------------------------------------------------------------

    def _from_inbox(self, n: int) -> List[bytes]:
        """Items already here (rt.cond held): the local buffer, then pushed/late batches."""
        out: List[bytes] = []
        buf = self.buffer
        while buf and len(out) < n:
            out.append(buf.popleft())
        box = self.rt.inbox.get(self.qid)
        while box and len(out) < n:
            entry = box[0]
            items, pos = entry.items, entry.pos
            k = min(n - len(out), len(items) - pos)
            out.extend(items[pos : pos + k])
            entry.pos = pos + k
            if entry.pos >= len(items):
                box.popleft()
                entry.msg.release_slot()
        return out

    def get(self, n: int, block: bool, timeout: Optional[float]) -> List[bytes]:
        rt = self.rt
        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with rt.cond:
            out = self._from_inbox(n)
        if out:
            return out
        if self.push:
            return self._get_pushed(n, block, end)
        while True:
            if self.closed:
                raise ValueError("closed while waiting in get()")
            left = None if end is None else end - time.monotonic()
            wait = 0.0 if not block else min(CHUNK, left) if left is not None else CHUNK
            wait = max(0.0, wait)
            reqid = next(_reqids)
            answer = rt.request(
                self.key, _header(_W, self.qid, reqid, n, wait), reqid, wait + SLACK
            )
            kind, _, _, _, _, flags = _HDR.unpack(answer.header)
            if kind == _D:
                items = _unpack(answer.data)
                answer.release_slot()  # taken: the host's delivery completes now
                return items
            answer.release_slot()
            if flags & _F_EOF:
                with rt.cond:
                    out = self._from_inbox(n)
                if out:
                    return out
                raise EOFError
            if not block or (end is not None and time.monotonic() >= end):
                with rt.cond:
                    out = self._from_inbox(n)
                if out:
                    return out
                raise Empty

    def _get_pushed(self, n: int, block: bool, end: Optional[float]) -> List[bytes]:
        rt = self.rt
        if not self.subscribed:
            self.subscribed = next(_reqids)
            rt.node.send(_to_msg(self.key, _header(_S, self.qid, self.subscribed)))
        probe_at = time.monotonic() + CHUNK
        while True:
            with rt.cond:
                while True:
                    out = self._from_inbox(n)
                    if out:
                        return out
                    now = time.monotonic()
                    if self.closed:
                        raise ValueError("closed while waiting in get()")
                    if not block or (end is not None and now >= end):
                        raise Empty
                    if now >= probe_at:
                        break
                    left = probe_at - now if end is None else min(probe_at, end) - now
                    rt.cond.wait(left)
            # Nothing for a while: make sure the host is still there (and learn EOF).
            _, eof = self.size()
            if eof:
                raise EOFError
            probe_at = time.monotonic() + CHUNK

    def poll(self, timeout: Optional[float]) -> bool:
        try:
            items = self.get(1, timeout is None or timeout > 0, timeout)
        except Empty:
            return False
        except EOFError:
            return True
        with self.rt.cond:
            self.buffer.extendleft(reversed(items))
        return True

    def size(self) -> Tuple[int, bool]:
        reqid = next(_reqids)
        answer = self.rt.request(self.key, _header(_Z, self.qid, reqid), reqid, SLACK)
        _, _, _, n, _, flags = _HDR.unpack(answer.header)
        answer.release_slot()
        return n, bool(flags & _F_EOF)

    def close_writer(self) -> None:
        self.rt.node.send(_to_msg(self.key, _header(_C, self.qid))).result(SLACK)

    def close(self, flush_limit: Optional[float] = None) -> None:
        """Flush puts, stop the subscription, return items received but not handed out."""
        if self.closed:
            return
        self.closed = True
        rt = self.rt
        try:
            if not self.no_flush:
                self.flush(flush_limit)
        finally:
            if self.subscribed:
                # The host answers after it sent its last batch to us (in order
                # on the connection), so once the answer is here every pushed
                # batch is in the inbox and goes back below, in order.
                reqid = next(_reqids)
                try:
                    answer = rt.request(self.key, _header(_U, self.qid, reqid), reqid, SLACK)
                    answer.release_slot()
                except ConnectionError:
                    pass
            with rt.cond:
                back = list(self.buffer)
                self.buffer.clear()
                entries = list(rt.inbox.pop(self.qid, ()))
            rt.give_back(self.key, self.qid, back, entries)


# ------------------------------------------------------------------------------------------
# Public objects
# ------------------------------------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


#: How a handle reaches one of its boxes.
_Endpoint = Union["_Local", "_Remote"]


class _Handle:
    """What queues and connections share: where the host is, and the pid check."""

    _spec: _Spec

    def _setup(self, spec: _Spec, host: Optional[_Host]) -> None:
        self._spec = spec
        self._pid = os.getpid()
        self._host_obj = host
        self._eps: Dict[int, _Endpoint] = {}
        self._closed = False

    def _ep(self, qid: int) -> _Endpoint:
        if self._pid != os.getpid():  # inherited through fork: become a client
            _graveyard.append(self.__dict__.copy())
            self._pid = os.getpid()
            self._host_obj = None
            self._eps = {}
        ep = self._eps.get(qid)
        if ep is None:
            if self._closed:
                raise ValueError("%s is closed" % type(self).__name__)
            spec = self._spec
            if self._host_obj is not None:
                ep = _Local(self._host_obj, qid)
            else:
                rt = _runtime(_tls_of(CONFIG) if CONFIG is not None else spec["tls"])
                ep = _Remote(rt, (spec["address"], spec["port"]), qid, spec["mode"] == "push")
            self._eps[qid] = ep
        return ep

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return (_rebuild, (type(self), self._spec))

    def __getstate__(self) -> _Spec:
        return self._spec


_H = TypeVar("_H", bound=_Handle)


def _new_handle(cls: Type[_H], spec: _Spec, host: Optional[_Host]) -> _H:
    obj = cls.__new__(cls)
    obj._setup(spec, host)
    return obj


def _rebuild(cls: Type[_H], spec: _Spec) -> _H:
    """Unpickle (or copy) a handle; it reaches its box as a client, in any process."""
    return _new_handle(cls, spec.copy(), None)


def _make_spec(
    qids: List[int], address: str, port: int, tls: _TLS, mode: str, maxsize: int
) -> _Spec:
    return _Spec(
        qids=qids,
        address=address,
        port=port,
        tls=tls,
        mode=_check_mode(mode),
        maxsize=maxsize,
    )


def _check_mode(mode: str) -> str:
    if mode not in ("pull", "push"):
        raise ValueError("mode must be 'pull' or 'push', not %r" % (mode,))
    return mode


class Queue(_Handle):
    """A queue hosted by the creating process, usable from any process that can reach it.

    ``maxsize`` bounds the items in the queue (0: no bound). ``mode="pull"``:
    a consumer gets an item only when it asks; ``mode="push"``: the host sends
    items to consumers ahead of demand. ``address`` is what other processes
    connect to (default :data:`ADDRESS`); ``config`` supplies the TLS files
    (default :data:`CONFIG`). ``port`` fixes the port of the hosting node (0:
    a free one) and ``name`` makes the queue reachable with :func:`attach`
    from processes that were not handed it. See docs/mp.md.
    """

    def __init__(
        self,
        maxsize: int = 0,
        mode: str = "pull",
        *,
        address: Optional[str] = None,
        config: Optional[Config] = None,
        port: int = 0,
        name: Optional[str] = None,
    ) -> None:
        if maxsize < 0:
            maxsize = 0
        host = _host(_tls_of(config), port)
        qid = host.new_box(maxsize, _name_qid(name) if name else 0)
        spec = _make_spec([qid], address or ADDRESS, host.port, host.tls, mode, maxsize)
        self._setup(spec, host)

    @property
    def _qid(self) -> int:
        return self._spec["qids"][0]

    @property
    def address(self) -> Tuple[str, int]:
        """The host's advertised address and port."""
        return self._spec["address"], self._spec["port"]

    def _limit(self) -> int:
        m = self._spec["maxsize"]
        return min(PUT_LIMIT, m) if m else PUT_LIMIT

    def put(self, obj: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Put ``obj`` (pickled) into the queue; ``queue.Full`` as ``multiprocessing``.

        In another process than the host, the item is sent in the background;
        :meth:`join_thread` (also run at :meth:`close` and at exit) waits until
        the host confirmed every item, and a failure is raised by the next call.
        """
        self._check_open()
        ep = self._ep(self._qid)
        data = _dumps(obj)
        if isinstance(ep, _Remote):
            ep.put(data, block, timeout, self._limit())
        else:
            ep.put(data, block, timeout)

    def put_nowait(self, obj: Any) -> None:
        self.put(obj, False)

    def put_many(self, objs: Iterable[Any]) -> None:
        """Put several objects (blocking while the queue is full); in the hosting
        process they enter the queue at once."""
        self._check_open()
        ep = self._ep(self._qid)
        if isinstance(ep, _Local):
            ep.put_many([_dumps(o) for o in objs])
            return
        for obj in objs:
            self.put(obj)

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """Remove and return an item; ``queue.Empty`` when none comes in time."""
        self._check_open()
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        return pickle.loads(self._ep(self._qid).get(1, block, timeout)[0])

    def get_nowait(self) -> Any:
        return self.get(False)

    def get_many(
        self, max_count: int = 1024, block: bool = True, timeout: Optional[float] = None
    ) -> List[Any]:
        """Remove and return up to ``max_count`` items, at least one (waits like get())."""
        self._check_open()
        if max_count < 1:
            raise ValueError("max_count must be at least 1")
        return [pickle.loads(b) for b in self._ep(self._qid).get(max_count, block, timeout)]

    def qsize(self) -> int:
        """Items in the host's queue (not counting items on their way)."""
        return self._ep(self._qid).size()[0]

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        m = self._spec["maxsize"]
        return bool(m) and self.qsize() >= m

    def join_thread(self, timeout: Optional[float] = None) -> None:
        """Wait until the host confirmed every item this process put (raises a failure)."""
        ep = self._eps.get(self._qid)
        if ep is not None and self._pid == os.getpid():
            ep.flush(timeout)

    def cancel_join_thread(self) -> None:
        """Do not wait at close or exit for the host to confirm this process's puts
        (unconfirmed items may then be lost, as with ``multiprocessing``)."""
        if self._pid == os.getpid():
            ep = self._ep(self._qid)
            if isinstance(ep, _Remote):
                ep.no_flush = True

    def close(self) -> None:
        """This process will use the queue no more: flush puts, give back unread items."""
        if self._closed:
            return
        try:
            for ep in self._eps.values():
                if self._pid == os.getpid():
                    ep.close()
        finally:
            self._closed = True
            self._eps = {}

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("Queue is closed")

    def __repr__(self) -> str:
        s = self._spec
        return "<libchirp.mp.%s %s:%d %s>" % (
            type(self).__name__,
            s["address"],
            s["port"],
            s["mode"],
        )


def attach(
    address: str,
    port: int,
    name: str,
    *,
    mode: str = "pull",
    maxsize: int = 0,
    config: Optional[Config] = None,
    simple: bool = False,
) -> Queue:
    """A handle of the queue called ``name`` hosted at ``address``:``port``.

    For processes that were not handed the queue (for example on another
    machine, started on their own). ``maxsize`` only bounds this handle's
    unconfirmed puts; the host enforces its own. ``config`` supplies the TLS
    files (default :data:`CONFIG`).
    """
    cls = SimpleQueue if simple else Queue
    spec = _make_spec([_name_qid(name)], address, int(port), _tls_of(config), mode, maxsize)
    return _new_handle(cls, spec, None)


class SimpleQueue(Queue):
    """An unbounded queue (``multiprocessing.SimpleQueue``'s interface)."""

    def __init__(
        self,
        mode: str = "pull",
        *,
        address: Optional[str] = None,
        config: Optional[Config] = None,
        port: int = 0,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(0, mode, address=address, config=config, port=port, name=name)


class Connection(_Handle):
    """One end of a :func:`Pipe` (``multiprocessing.connection.Connection``'s interface)."""

    @property
    def _rq(self) -> int:
        return self._spec["qids"][0]

    @property
    def _sq(self) -> int:
        return self._spec["qids"][1]

    @property
    def readable(self) -> bool:
        return bool(self._rq)

    @property
    def writable(self) -> bool:
        return bool(self._sq)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check(self, readable: bool) -> None:
        if self._closed:
            raise OSError("handle is closed")
        if readable and not self._rq:
            raise OSError("connection is write-only")
        if not readable and not self._sq:
            raise OSError("connection is read-only")

    def send_bytes(self, buf: Any, offset: int = 0, size: Optional[int] = None) -> None:
        """Send a bytes-like object (or a part of it)."""
        self._check(False)
        m = memoryview(buf).cast("B")
        if offset < 0 or offset > len(m):
            raise ValueError("offset out of range")
        if size is None:
            size = len(m) - offset
        if size < 0 or offset + size > len(m):
            raise ValueError("size out of range")
        self._put(bytes(m[offset : offset + size]))

    def send(self, obj: Any) -> None:
        """Send a picklable object."""
        self._check(False)
        self._put(_dumps(obj))

    def _put(self, data: bytes) -> None:
        ep = self._ep(self._sq)
        if isinstance(ep, _Remote):
            ep.put(data, True, None, PUT_LIMIT)
        else:
            ep.put(data, True, None)

    def recv_bytes(self, maxlength: Optional[int] = None) -> bytes:
        """Receive the bytes of one send; ``EOFError`` once the other end closed."""
        self._check(True)
        data = self._ep(self._rq).get(1, True, None)[0]
        if maxlength is not None and len(data) > maxlength:
            raise OSError("bad message length")
        return data

    def recv(self) -> Any:
        """Receive one object; ``EOFError`` once the other end closed and all was read."""
        return pickle.loads(self.recv_bytes())

    def poll(self, timeout: Optional[float] = 0.0) -> bool:
        """Whether there is something to receive (or end of file), waiting up to ``timeout``."""
        self._check(True)
        return self._ep(self._rq).poll(timeout)

    def close(self) -> None:
        """Close this end: the other end's recv raises ``EOFError`` after the rest."""
        if self._closed:
            return
        try:
            if self._pid == os.getpid() and self._sq:
                ep = self._ep(self._sq)
                ep.flush(SLACK)
                ep.close_writer()
            for ep in self._eps.values():
                if self._pid == os.getpid():
                    ep.close()
        finally:
            self._closed = True
            self._eps = {}

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self._spec
        return "<libchirp.mp.Connection %s:%d>" % (s["address"], s["port"])


def Pipe(
    duplex: bool = True, *, address: Optional[str] = None, config: Optional[Config] = None
) -> Tuple[Connection, Connection]:
    """Two connected :class:`Connection` objects, hosted by this process.

    ``duplex=False`` gives ``(reader, writer)`` as ``multiprocessing.Pipe``.
    """
    host = _host(_tls_of(config))
    a = host.new_box(0)
    b = host.new_box(0) if duplex else 0

    def end(rq: int, sq: int) -> Connection:
        spec = _make_spec([rq, sq], address or ADDRESS, host.port, host.tls, "pull", 0)
        return _new_handle(Connection, spec, host)

    if duplex:
        return end(a, b), end(b, a)
    return end(a, 0), end(0, a)
