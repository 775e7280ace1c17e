"""The host: the boxes (queues, pipe directions) this process hosts, and their node.

Part of :mod:`libchirp.mp` (its docstring has the overview, :mod:`.wire` the
messages). A :class:`_Host` exists once per TLS setting and port in the
process that created queues or pipes; it runs one chirp node and a thread
that serves every box hosted there. The hosting process's own handles work on
the boxes directly (``put_local``, ``get_local``, ...; see :mod:`.client`).

Threads: the host's state is guarded by one condition variable
(``_Host.cond``, taken as its lock ``_Host.lock`` where nobody waits); its
thread (or a waiting thread of the hosting process) takes received messages
in batches; delivery callbacks run on whichever thread handles the loop's events and only take the
lock, requeue and send. Sends are issued outside the lock, but in the order
they were collected under it: the host queues them and one thread at a time
sends the queue (``_Host._flush``); a producer handle likewise sends its
batches one thread at a time (``_Remote._pump`` in :mod:`.client`). Chirp
writes the messages to one peer in the order they were sent, so batches reach
a consumer, and put batches reach the host, in the order they were made.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import struct
import threading
import time
from collections import deque
from concurrent.futures import Future
from queue import Empty, Full
from typing import TYPE_CHECKING, Deque, Dict, List, Optional, Tuple

from ..loop import Loop
from ..message import Message, MessageBase
from ..queue import Chirp
from .lease import HostLeases, Lease
from .wire import (
    _C,
    _D,
    _E,
    _F_EOF,
    _F_LEASE,
    _F_PIPE,
    _F_PUSH,
    _HDR,
    _MASK,
    _O,
    _P,
    _R,
    _S,
    _TLS,
    _U,
    _W,
    _Z,
    PUSH_BATCH,
    PUSH_BATCH_BYTES,
    PUSH_WINDOW,
    READ_LAZY,
    READ_SLICE,
    _header,
    _Item,
    _Key,
    _late_messages,
    _node_config,
    _pack,
    _Reader,
    _release_all,
    _to_msg,
    _unpack,
)

if TYPE_CHECKING:
    from .client import _Local

_log = logging.getLogger("libchirp")


class _Sub:
    """A push subscriber of a box: a queue consumer in push mode (``S``), or a
    pipe's reader in another process (``O``, with the subscription's lease)."""

    __slots__ = ("flying", "sid", "lease", "pos", "eof_told")

    def __init__(self, sid: int, lease: Optional[Lease] = None, pos: int = 0) -> None:
        #: batches in flight to it
        self.flying = 0
        self.sid = sid
        #: a pipe reader's lease: its counter is its position in the stream of items
        #: pushed to it; ``pos`` is where the next batch starts (modulo 2**32)
        self.lease = lease
        self.pos = pos
        #: a pipe reader was told end of file
        self.eof_told = False


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
        self.items: Deque[_Item] = deque()
        #: put messages not yet accepted because the box is full.
        self.held: Deque[Tuple[MessageBase, List[_Item]]] = deque()
        #: pull requests: (client, reqid, n, expiry, lease).
        self.waiters: Deque[_Waiter] = deque()
        #: push subscribers (and pipe readers in other processes) by client.
        self.subs: Dict[_Key, _Sub] = {}
        self.rr = 0
        self.eof = False
        #: items handed out so far: the position of the next batch in the box's order.
        self.taken = 0
        #: deliveries (D batches) in flight per client.
        self.flying: Dict[_Key, int] = {}
        #: failed deliveries per client, (position, items not handed out), kept
        #: until none is in flight.
        self.failed: Dict[_Key, List[Tuple[int, List[_Item]]]] = {}

    def hand_out(self, key: _Key, batch: List[_Item]) -> int:
        """Note a batch on its way to ``key``; its position in the box's order."""
        pos = self.taken
        self.taken += len(batch)
        self.flying[key] = self.flying.get(key, 0) + 1
        return pos

    def full(self) -> bool:
        return bool(self.maxsize) and len(self.items) >= self.maxsize


#: A put batch of at least this many bytes is remembered (:attr:`_Host.whole`): if
#: its items leave the box together as one batch, the host sends its data as is.
FORWARD_MIN = 1 << 16

#: a pull request: (client, reqid, n, expiry, lease).
_Waiter = Tuple[_Key, int, int, float, Optional[Lease]]
#: a message to send, and for a D batch: (box, items, client, pushed, position, lease,
#: position in a pipe subscription's stream or -1).
_Track = Tuple["_Box", List[_Item], _Key, bool, int, Optional[Lease], int]
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
        #: guards the host's state; ``with lock`` (a Condition's __enter__ is Python code)
        self.lock = lock = threading.Lock()
        self.cond = threading.Condition(lock)
        #: what the host thread waits on while this process's threads read (on the
        #: same lock; nobody but stop() notifies it, so their reads do not wake it)
        self.idle = threading.Condition(lock)
        self.boxes: Dict[int, _Box] = {}
        self.stopping = False
        #: sends and releases collected under the lock, issued in this order by _flush.
        self.outq: List[_Send] = []
        self.outrel: List[MessageBase] = []
        self.flushing = False
        self.leases = HostLeases()
        #: big put batches whose items are in a box, by the id of their first item:
        #: (items, data). A batch that is exactly these items, in this order (the
        #: same objects), is packed as ``data``: no copy (see :meth:`_pack_out`).
        self.whole: Dict[int, Tuple[List[_Item], bytes]] = {}
        self.reader = _Reader(self.node, self.cond)
        #: when the next pull request's wait is over (the readers' timeout).
        self.next_expiry = 0.0
        #: until when the host thread leaves the reading to this process's threads.
        self.lazy_until = 0.0
        self.thread = threading.Thread(target=self._run, name="libchirp.mp host", daemon=True)
        self.thread.start()

    def new_box(self, maxsize: int, qid: int = 0) -> int:
        with self.lock:
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
        reader = self.reader
        while not self.stopping:
            with self.lock:
                # A thread of this process that waits reads the node itself (see
                # _wait); leave it the reading while it does, and for READ_LAZY
                # after, since it may be back at once (a ping-pong).
                lazy = self.lazy_until - time.monotonic()
                if reader.reading or lazy > 0:
                    self.idle.wait(max(lazy, READ_LAZY))
                    continue
                try:
                    msgs = reader.take(max(0.0, self.next_expiry - time.monotonic()))
                except Exception:
                    if self.stopping:
                        return
                    raise
                self._process(msgs)
            self._flush()

    def _process(self, msgs: List[Message]) -> None:
        """Handle what a reader took from the node, serve, expire (lock held); the
        sends are queued for :meth:`_flush`."""
        sends: List[_Send] = []
        release: List[MessageBase] = []
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
        self.next_expiry = time.monotonic() + self._expire(sends)
        self._enqueue(sends, release)
        if msgs:
            self.cond.notify_all()

    def _wait(self, limit: Optional[float]) -> None:
        """A thread of the hosting process waits up to ``limit`` (lock held) for a
        change of the boxes: it reads and serves the node itself if no other
        thread does (so an item a client puts reaches it without a hop through
        the host thread), else it waits until the reader woke it."""
        reader = self.reader
        step = READ_SLICE if limit is None else max(0.0, min(READ_SLICE, limit))
        if reader.reading or self.stopping:
            if step > 0:
                self.cond.wait(step)
            return
        if self.outq or self.outrel:
            # what the last round left (releases, see below) goes out before this one blocks
            self._flush_unlocked()
            return
        try:
            msgs = reader.take(max(0.0, min(step, self.next_expiry - time.monotonic())))
        except Exception:
            if self.stopping:
                return
            raise
        finally:
            self.lazy_until = time.monotonic() + READ_LAZY
        self._process(msgs)
        if self.outq:
            self._flush_unlocked()
        # else only releases: they go with the next flush (this thread's next put
        # or wait, the host thread's next round), not before this thread's item

    def _flush_unlocked(self) -> None:
        """:meth:`_flush` from a thread that holds the lock."""
        self.cond.release()
        try:
            self._flush()
        finally:
            self.cond.acquire()

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
            if kind in (_W, _Z, _O):
                sends.append((_to_msg(key, _header(_E, qid, reqid, 0, 0, _F_EOF)), None))
            return None
        if kind == _P:
            items = _unpack(m.data)
            if len(m.data) >= FORWARD_MIN and items:
                self.whole[id(items[0])] = (items, m.data)
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
            lease = self.leases.lease(m.data, reqid) if m.data else None
            expiry = time.monotonic() + wait_ms / 1000.0
            box.waiters.append((key, reqid, max(1, n), expiry, lease))
        elif kind == _S:
            release.append(m)
            if key not in box.subs:
                box.subs[key] = _Sub(reqid)
        elif kind == _O:
            release.append(m)
            self._open(box, key, reqid, n, m.data, sends)
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

    def _open(
        self, box: _Box, key: _Key, reqid: int, sid: int, data: bytes, sends: List[_Send]
    ) -> None:
        """A pipe's reader in another process asks to have the items pushed (``O``;
        also its liveness probe). Subscribed only with the lease it names."""
        sub = box.subs.get(key)
        if sub is None or sub.sid != sid or sub.lease is None:
            lease = self.leases.lease(data, sid) if data else None
            if lease is not None:
                # (again, after a failed delivery dropped it: the stream goes on
                # from the items the reader handed out, the rest went back)
                sub = box.subs[key] = _Sub(sid, lease, self.leases.stream_count(lease))
            else:
                sub = None
        f = _F_LEASE if sub is not None else 0
        if box.eof and not box.items:
            f |= _F_EOF
            if sub is not None:
                sub.eof_told = True
        sends.append((_to_msg(key, _header(_E, box.qid, reqid, 0, 0, f)), None))

    def _expire(self, sends: List[_Send]) -> float:
        """Answer pull requests whose wait is over; return the time to the next expiry."""
        now = time.monotonic()
        nearest = 0.2
        for box in self.boxes.values():
            if not box.waiters:
                continue
            keep: Deque[_Waiter] = deque()
            for w in box.waiters:
                if w[3] <= now or (box.eof and not box.items):
                    f = (_F_EOF if box.eof else 0) | (_F_LEASE if w[4] is not None else 0)
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
            key, reqid, n, _, lease = box.waiters.popleft()
            n = self._cut(items, n)
            batch = [items.popleft()]
            size = len(batch[0])
            while len(batch) < n and items and size < PUSH_BATCH_BYTES:
                size += len(items[0])
                batch.append(items.popleft())
            k = len(batch)
            f = _F_LEASE if lease is not None else 0
            msg = _to_msg(key, _header(_D, box.qid, reqid, k, 0, f), self._pack_out(batch))
            sends.append((msg, (box, batch, key, False, box.hand_out(key, batch), lease, -1)))
        if box.eof and not items and box.waiters:
            for key, reqid, _, _, lease in box.waiters:
                f = _F_EOF | (_F_LEASE if lease is not None else 0)
                sends.append((_to_msg(key, _header(_E, box.qid, reqid, 0, 0, f)), None))
            box.waiters.clear()
        if items and box.subs:
            keys = list(box.subs)
            idle = 0
            while items and idle < len(keys):
                box.rr = (box.rr + 1) % len(keys)
                key = keys[box.rr]
                sub = box.subs[key]
                if sub.flying >= PUSH_WINDOW:
                    idle += 1
                    continue
                idle = 0
                # an even share of what is there now, for each subscriber in turn
                k = self._cut(items, min(PUSH_BATCH, -(-len(items) // len(keys))))
                batch = []
                size = 0
                while len(batch) < k and size < PUSH_BATCH_BYTES:
                    item = items.popleft()
                    batch.append(item)
                    size += len(item)
                k = len(batch)
                sub.flying += 1
                pos = box.hand_out(key, batch)
                if sub.lease is None:
                    start = -1
                    hdr = _header(_D, box.qid, sub.sid, k, 0, _F_PUSH)
                else:
                    # a pipe's reader: the batch's position in its stream (see wire: O)
                    start = sub.pos
                    sub.pos = (start + k) & _MASK
                    hdr = _HDR.pack(_D, box.qid, sub.sid, k, start, _F_PUSH | _F_PIPE)
                track: _Track = (box, batch, key, True, pos, sub.lease, start)
                sends.append((_to_msg(key, hdr, self._pack_out(batch)), track))
        if box.eof and not items and box.subs:
            for key, sub in box.subs.items():
                if sub.lease is not None and not sub.eof_told:
                    # after the last batch pushed to it (the sends go out in order)
                    sub.eof_told = True
                    f = _F_EOF | _F_PUSH | _F_PIPE
                    sends.append((_to_msg(key, _header(_E, box.qid, sub.sid, 0, 0, f)), None))
        while box.held and not box.full():
            m, batch = box.held.popleft()
            items.extend(batch)
            release.append(m)

    def _cut(self, items: Deque[_Item], k: int) -> int:
        """How many items to take from the front of a box for a batch of ``k`` at
        most: the items of the big put batch at the front, if they fit (so that
        it goes on as is, :meth:`_pack_out`), else ``k``."""
        if self.whole:
            w = self.whole.get(id(items[0]))
            if w is not None and len(w[0]) <= k:
                return len(w[0])
        return k

    def _pack_out(self, batch: List[_Item]) -> bytes:
        """A batch leaving a box, packed (lock held): the data of the put batch it
        came in if it is exactly that batch's items in their order (a stream of
        big items goes through the host without a copy), else a new pack."""
        whole = self.whole
        if whole:
            w = whole.pop(id(batch[0]), None)
            if w is not None and len(w[0]) == len(batch) and all(map(operator.is_, w[0], batch)):
                return w[1]
            for item in batch:  # put batches split or started here are not forwarded
                whole.pop(id(item), None)
        return _pack(batch)

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
            with self.lock:
                if self.flushing or not (self.outq or self.outrel):
                    return
                self.flushing = True
                sends, self.outq = self.outq, []
                release, self.outrel = self.outrel, []
            try:
                # sends first: a release is an acknowledgement nobody waits for
                if sends:
                    try:
                        futs = self.node.send_many([s[0] for s in sends])
                    except Exception:
                        if self.stopping:
                            return
                        raise
                    for (_, track), fut in zip(sends, futs):
                        if track is not None:
                            fut.add_done_callback(functools.partial(self._delivered, track=track))
                _release_all(release)
            finally:
                with self.lock:
                    self.flushing = False

    def _delivered(self, fut: Future[MessageBase], track: _Track) -> None:
        box, batch, key, pushed, pos, lease, start = track
        failed = fut.exception() is not None
        sends: List[_Send] = []
        release: List[MessageBase] = []
        with self.lock:
            left = box.flying.get(key, 1) - 1
            if left:
                box.flying[key] = left
            else:
                box.flying.pop(key, None)
            if failed:
                # The client did not take them. They go back to the front once
                # no other batch to this client is in flight, all at once and
                # in the box's order (the failures of several batches may be
                # reported in any order). Of a leased batch, the items its
                # consumer had handed out are gone.
                if lease is not None:
                    if start < 0:
                        done = self.leases.handed_out(lease, len(batch))
                    else:
                        done = self.leases.handed_out_stream(lease, start, len(batch))
                    pos, batch = pos + done, batch[done:]
                box.failed.setdefault(key, []).append((pos, batch))
                box.subs.pop(key, None)
                box.waiters = deque(w for w in box.waiters if w[0] != key)
            elif pushed:
                sub = box.subs.get(key)
                if sub is not None:
                    sub.flying -= 1
            if not left and key in box.failed:
                for _, back in sorted(box.failed.pop(key), key=lambda e: e[0], reverse=True):
                    box.items.extendleft(reversed(back))
            elif not failed and not box.items and not box.held:
                # the usual case (a pipe's ping-pong): nothing to hand out now, and
                # nobody waits for a batch's success; this callback runs before the
                # message that came with the acknowledgement is handed on
                return
            if self.stopping:
                return
            self._serve(box, sends, release)
            self._enqueue(sends, release)
            self.cond.notify_all()
        self._flush()

    # -- the hosting process's own handles ---------------------------------------------------

    def put_local(
        self, qid: int, items: List[_Item], block: bool, timeout: Optional[float]
    ) -> None:
        sends: List[_Send] = []
        release: List[MessageBase] = []
        with self.lock:
            box = self.boxes[qid]
            if box.full():
                if not block:
                    raise Full
                end = None if timeout is None else time.monotonic() + timeout
                while box.full():
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        raise Full
                    self._wait(left)
            box.items.extend(items)
            self._serve(box, sends, release)
            self._enqueue(sends, release)
            self.cond.notify_all()
        self._flush()

    def get_local(
        self, qid: int, n: int, block: bool, timeout: Optional[float], ep: Optional[_Local] = None
    ) -> List[_Item]:
        sends: List[_Send] = []
        release: List[MessageBase] = []
        with self.lock:
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
                    self._wait(left)
            k = min(n, len(box.items))
            out = [box.items.popleft() for _ in range(k)]
            if self.whole:
                for item in out:
                    self.whole.pop(id(item), None)
            if not box.held and not self.outq:
                return out  # queued releases go with the next flush
            self._serve(box, sends, release)
            self._enqueue(sends, release)
        self._flush()
        return out

    def close_local(self, qid: int) -> None:
        sends: List[_Send] = []
        release: List[MessageBase] = []
        with self.lock:
            box = self.boxes[qid]
            box.eof = True
            self._serve(box, sends, release)
            self._enqueue(sends, release)
            self.cond.notify_all()
        self._flush()

    def size_local(self, qid: int) -> Tuple[int, bool]:
        with self.lock:
            box = self.boxes[qid]
            return len(box.items), box.eof

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.idle.notify_all()
            held = [m for box in self.boxes.values() for m, _ in box.held]
            for box in self.boxes.values():
                box.held.clear()
            self.whole.clear()
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
