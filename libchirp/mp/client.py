"""How a handle reaches its box: directly in the hosting process, or as a client.

Part of :mod:`libchirp.mp` (its docstring has the overview, :mod:`.wire` the
messages). A handle (:mod:`.handles`) has one endpoint per box it uses:
:class:`_Local` in the process that hosts the box (calls into the
:class:`~libchirp.mp.host._Host`, under its lock), :class:`_Remote` in any
other process (messages through this process's
:class:`~libchirp.mp.runtime._Runtime`). A :class:`_Remote` producer sends its
items in batches in the background, at most :data:`~libchirp.mp.wire.PUT_WINDOW`
unacknowledged; a consumer asks for items (pull) or subscribes and takes what
the host pushes (push), and gives back what it received but did not hand out
when it closes. A pipe's reader has the host push its items to it, under a
lease of its subscription (``O`` in :mod:`.wire`), or pulls where the host
cannot open the lease.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future
from queue import Empty, Full
from typing import Deque, List, Optional, Tuple

from ..message import MessageBase
from .host import _Host
from .runtime import _Inbound, _Runtime
from .wire import (
    _C,
    _D,
    _F_EOF,
    _F_LEASE,
    _HDR,
    _MASK,
    _O,
    _P,
    _S,
    _U,
    _W,
    _Z,
    AHEAD_CREDIT,
    AHEAD_WAIT,
    CHUNK,
    PULL_AHEAD,
    PULL_BATCH,
    PUT_BATCH,
    PUT_BATCH_BYTES,
    PUT_WINDOW,
    SLACK,
    _header,
    _Item,
    _Key,
    _pack,
    _to_msg,
)

#: Request ids of this process (pull requests, subscriptions, probes).
_reqids = itertools.count(1)


class _Local:
    """A handle in the hosting process: direct access to the box."""

    def __init__(self, host: _Host, qid: int) -> None:
        self.host = host
        self.qid = qid
        self.closed = False

    def put(self, item: bytes, block: bool, timeout: Optional[float]) -> None:
        self.host.put_local(self.qid, [item], block, timeout)

    def put_many(self, items: List[_Item]) -> None:
        self.host.put_local(self.qid, items, True, None)

    def get(self, n: int, block: bool, timeout: Optional[float]) -> List[_Item]:
        return self.host.get_local(self.qid, n, block, timeout, self)

    def poll(self, timeout: Optional[float]) -> bool:
        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self.host.lock:
            box = self.host.boxes[self.qid]
            while not box.items and not box.eof:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.host._wait(left)
            return True

    def size(self) -> Tuple[int, bool]:
        return self.host.size_local(self.qid)

    def flush(self, timeout: Optional[float]) -> None:
        pass

    def close_writer(self) -> None:
        self.host.close_local(self.qid)

    def close(self, flush_limit: Optional[float] = None) -> None:
        self.closed = True
        with self.host.lock:
            self.host.cond.notify_all()


class _Remote:
    """A handle in another process: talks to the host's node."""

    def __init__(self, rt: _Runtime, key: _Key, qid: int, push: bool) -> None:
        self.rt = rt
        self.key = key
        self.qid = qid
        self.push = push
        self.subscribed = 0
        self.buffer: Deque[_Item] = deque()
        #: batches held too long (_Inbound.expires): they go back, see _give_back_stale
        self.stale: List[_Inbound] = []
        # pull credit: items asked for per get() (grows while this consumer is
        # fast, see _credit); items handed out so far, and the count and time
        # at the start of the current measurement of the consumer's rate
        self.credit = 1
        self.handed = 0
        self.rate_n = 0
        self.rate_at = 0.0
        #: a pipe's reader (set by the Connection): its items are pushed to it
        #: (``piped``, see _open_pipe) or, without a lease the host can open, it
        #: asks for the next item as soon as it has taken one (``ahead``: that
        #: request, its send and its deadline), see _pull
        self.read_ahead = False
        self.want_ahead = False
        #: a pipe's reader: whether the host pushes the items to this process
        #: (None: not asked yet; False: it cannot, the reader pulls)
        self.piped: Optional[bool] = None
        self.ahead: Optional[Tuple[int, Future[MessageBase], float]] = None
        # producer state
        self.plock = threading.Lock()
        self.pcond = threading.Condition(self.plock)
        self.outbox: List[_Item] = []
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
        with self.plock:
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
            # with the window full (or a send under way) the acknowledgement
            # callbacks send this item; most puts of a stream end here
            if self.sending or self.inflight >= PUT_WINDOW:
                return
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
            with self.plock:
                if self.sending or self.error is not None:
                    return
                batch = self._take_batch()
                if not batch:
                    return
                self.sending = True
            try:
                self._send_batch(batch)
            finally:
                with self.plock:
                    self.sending = False

    def _take_batch(self) -> Optional[List[_Item]]:
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

    def _send_batch(self, batch: List[_Item]) -> None:
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
        with self.plock:
            self.inflight -= 1
            if exc is not None:
                if self.error is None:
                    self.error = exc
                    self.lost = self.unacked
            else:
                self.unacked -= n
            self.pcond.notify_all()
            if not self.outbox:
                return  # nothing to send (a pipe's ping-pong)
        self._pump()

    def _failure(self) -> ConnectionError:
        return ConnectionError(
            "put to %s:%d failed (%s); %d item(s) put since the last confirmed one "
            "are not known to have arrived" % (self.key[0], self.key[1], self.error, self.lost)
        )

    def flush(self, timeout: Optional[float]) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        with self.plock:
            while self.unacked and self.error is None:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("%d item(s) not yet confirmed by the host" % self.unacked)
                self.pcond.wait(left)
            if self.error is not None:
                raise self._failure()

    # -- consuming -------------------------------------------------------------------------

    def _from_inbox(self, n: int) -> List[_Item]:
        """Items already here (rt.lock held): the local buffer, then pushed/late batches."""
        out: List[_Item] = []
        buf = self.buffer
        while buf and len(out) < n:
            out.append(buf.popleft())
        box = self.rt.inbox.get(self.qid)
        if box and box[0].expires <= time.monotonic():
            while box and box[0].expires <= time.monotonic():
                self.stale.append(box.popleft())
        while box and len(out) < n:
            entry = box[0]
            items, pos = entry.items, entry.pos
            k = min(n - len(out), len(items) - pos)
            self.handed += k
            entry.pos = pos = pos + k
            c = entry.counter
            if c is not None:
                c[0](c[1], c[2], c[3] | (entry.base + pos) & _MASK)
                if pos >= len(items):
                    box.popleft()
                    self.rt.ack(entry)
            elif pos >= len(items):
                box.popleft()
                entry.done()
            out.extend(items[pos - k : pos])
        return out

    def _give_back_stale(self) -> None:
        """Give back what is left of batches held too long (see _Inbound), and
        the later batches held (so that the items come again in their order)."""
        self._settle_ahead()
        with self.rt.lock:
            stale, self.stale = self.stale, []
            stale += self.rt.inbox.pop(self.qid, ())
        now = time.monotonic()
        back = [e for e in stale if e.abandon > now]
        if back:
            self.rt.give_back(self.key, self.qid, [], back)

    def _settle_ahead(self) -> None:
        """Wait for the answer to the request ahead (the host answers within
        AHEAD_WAIT) and put its items into the inbox. An answer later than
        AHEAD_WAIT + 1 s goes to the inbox when it comes (given back when the
        runtime stops, or handed out)."""
        if self.ahead is None:
            return
        rt = self.rt
        reqid, fut, deadline = self.ahead
        self.ahead = None
        try:
            deadline = min(deadline, time.monotonic() + AHEAD_WAIT + CHUNK)
            answer = rt.answer(self.key, reqid, fut, deadline)
        except ConnectionError:
            return
        assert answer is not None
        kind, _, _, _, _, flags = _HDR.unpack(answer.header)
        with rt.lock:
            lease = rt.lease_answer(reqid, kind, flags)
            if kind == _D:
                rt.inbox.setdefault(self.qid, deque()).append(_Inbound(answer, lease))
        if kind != _D:
            answer.release_slot()

    def _credit(self) -> int:
        """Items to ask for in a get(): about PULL_AHEAD seconds of this
        consumer's consumption, at most twice the last credit (rt.lock held).

        The rate is the items handed out since the last measurement over the
        time since, which is the consumer's own time: a measurement starts
        again when a batch arrives after the consumer waited for it. A
        consumer that needs more than PULL_AHEAD per item asks for one item
        at a time.
        """
        k = self.handed - self.rate_n
        if k > 0:
            now = time.monotonic()
            dt = now - self.rate_at
            target = int(k * PULL_AHEAD / dt) if dt > 0 else PULL_BATCH
            self.credit = max(1, min(PULL_BATCH, 2 * self.credit, target))
            self.rate_n, self.rate_at = self.handed, now
        return self.credit

    def get(self, n: int, block: bool, timeout: Optional[float]) -> List[_Item]:
        rt = self.rt
        if self.read_ahead and self.piped is not False:
            if self.piped or self._open_pipe():
                end = None if timeout is None else time.monotonic() + max(0.0, timeout)
                return self._get_piped(n, block, end)
        with rt.lock:
            out = self._from_inbox(n)
            if self.credit >= AHEAD_CREDIT and self.ahead is None and not self.push:
                # a fast consumer asks for its next batch when it has handed out
                # half of its last one, so that the answer is here when it needs it
                box = rt.inbox.get(self.qid)
                entry = box[-1] if box else None
                half = entry is not None and 2 * entry.pos >= len(entry.items)
            else:
                half = False
        if half:
            self.want_ahead = True
            self.ask_ahead()
        if self.stale:
            self._give_back_stale()
        if out:
            return out
        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        if self.push:
            return self._get_pushed(n, block, end)
        return self._pull(n, block, end)

    def _pull(self, n: int, block: bool, end: Optional[float], take: bool = True) -> List[_Item]:
        """Ask the host for items until some come (pull mode); hand out up to ``n``.

        ``get()`` (n == 1) asks for its credit, leased (:mod:`.lease`): the
        items it does not hand out stay in the inbox, acknowledged to the host
        when the last one was handed out. Without a lease the host holds, a
        request asks for ``n`` items only. With ``take`` false, the items stay
        in the inbox (poll).
        """
        rt = self.rt
        self.want_ahead = False
        while True:
            if self.closed:
                raise ValueError("closed while waiting in get()")
            left = None if end is None else end - time.monotonic()
            wait = 0.0 if not block else min(CHUNK, left) if left is not None else CHUNK
            wait = max(0.0, wait)
            if self.ahead is not None:
                reqid, fut, deadline = self.ahead
                got = rt.answer(self.key, reqid, fut, deadline, end)
                if got is None:
                    raise Empty  # the request stays out; the next call waits for it
                answer = got
                self.ahead = None
            else:
                with rt.lock:
                    out = self._from_inbox(n) if take else []
                    if out or (not take and rt.inbox.get(self.qid)):
                        return out  # another thread's request brought them
                reqid, fut = self._ask(n, wait)
                got = rt.answer(self.key, reqid, fut, time.monotonic() + wait + SLACK)
                assert got is not None
                answer = got
            kind, _, _, _, _, flags = _HDR.unpack(answer.header)
            if kind == _D:
                entry = _Inbound(answer)
                with rt.lock:
                    entry.set_lease(rt.lease_answer(reqid, kind, flags))
                    rt.inbox.setdefault(self.qid, deque()).append(entry)
                    self.rate_n, self.rate_at = self.handed, time.monotonic()
                    out = self._from_inbox(n) if take else []
                    self.want_ahead = self.read_ahead and take and not rt.inbox.get(self.qid)
                if out or not take:
                    return out
                continue
            with rt.lock:
                rt.lease_answer(reqid, kind, flags)
            answer.release_slot()
            if flags & _F_EOF or not block or (end is not None and time.monotonic() >= end):
                with rt.lock:
                    out = self._from_inbox(n) if take else []
                    if out or (not take and rt.inbox.get(self.qid)):
                        return out
                if flags & _F_EOF:
                    raise EOFError
                raise Empty

    # -- a pipe's reader, its items pushed to it -------------------------------------------

    def _open_pipe(self) -> bool:
        """Ask the host to push this pipe box's items to this process (``O``), under
        a lease the subscription keeps: then a recv() takes what is here or waits
        for the next push, no request per item. False where the host cannot read
        the lease (another machine): the reader pulls (``W``), asking ahead."""
        rt = self.rt
        with rt.lock:
            if self.qid in rt.piped:  # another handle of this end in this process
                self.piped = True
                self.subscribed = rt.piped[self.qid][2]
                return True
            sid = next(_reqids)
            data = rt.lease_for(self.key, sid) if rt.leases.get(self.key, 1) else b""
            if not data:
                self.piped = False
                return False
            # before the answer: batches pushed right after it are sorted with the lease
            _, lf, slot = rt.leased[sid]
            rt.piped[self.qid] = (lf, slot, sid)
        reqid = next(_reqids)
        try:
            answer = rt.request(self.key, _header(_O, self.qid, reqid, sid), reqid, SLACK, data)
        except BaseException:
            with rt.lock:
                rt.piped.pop(self.qid, None)
                rt.leased.pop(sid, None)
                lf.give(slot)
            raise
        flags = _HDR.unpack(answer.header)[5]
        answer.release_slot()
        with rt.lock:
            ok = rt.pipe_answer(sid, flags)
            if not ok:
                rt.piped.pop(self.qid, None)
            elif flags & _F_EOF:
                rt.ended.add(self.qid)
        self.piped = ok
        self.subscribed = sid if ok else 0
        return ok

    def _probe_pipe(self) -> None:
        """A waiting reader's liveness probe (``O`` again, every CHUNK): raises
        ConnectionError if the host is gone; the host subscribes this process
        again if a failed delivery had dropped it; the answer says end of file."""
        rt = self.rt
        with rt.lock:
            sub = rt.piped.get(self.qid)
        if sub is None:
            # another handle of this end in this process asked at the same time
            # and the host refused (no lease), or closed it: this one pulls
            self.piped = False
            return
        lf, slot, sid = sub
        reqid = next(_reqids)
        hdr = _header(_O, self.qid, reqid, sid)
        answer = rt.request(self.key, hdr, reqid, SLACK, lf.data(slot))
        flags = _HDR.unpack(answer.header)[5]
        answer.release_slot()
        with rt.lock:
            if flags & _F_EOF:
                rt.ended.add(self.qid)
            if not flags & _F_LEASE:
                # the host no longer holds the lease (it dropped the file): what
                # is here is handed out, then the reader pulls
                self.piped = False

    def _get_piped(
        self, n: int, block: bool, end: Optional[float], take: bool = True
    ) -> List[_Item]:
        """Hand out items pushed to this pipe reader, waiting for the next push
        (reading the node itself, see :meth:`_Runtime.wait`); ``EOFError`` once the
        writer closed and everything was handed out. With ``take`` false the
        items stay in the inbox (poll)."""
        rt = self.rt
        qid = self.qid
        probe_at = time.monotonic() + CHUNK
        looked = False  # at the node's queue once at least (a poll(0) must see what came)
        while True:
            with rt.lock:
                while True:
                    if take:
                        out = self._from_inbox(n)
                        if out or self.stale:
                            break
                    elif self.buffer or rt.inbox.get(qid):
                        return []
                    if qid in rt.ended:
                        raise EOFError
                    if self.closed:
                        raise ValueError("closed while waiting in get()")
                    now = time.monotonic()
                    if not block or (end is not None and now >= end):
                        if looked:
                            raise Empty
                        looked = True
                        rt.wait(0.0)
                        continue
                    if now >= probe_at or not self.piped:
                        out = []
                        break
                    rt.wait((probe_at if end is None else min(probe_at, end)) - now)
                    looked = True
            if self.stale:
                self._give_back_stale()
                if not out:
                    continue
            if out:
                return out
            if not self.piped:
                return self._pull(n, block, end, take)
            self._probe_pipe()
            probe_at = time.monotonic() + CHUNK

    def ask_ahead(self) -> None:
        """Ask for the next items before they are needed: a pipe's reader that
        took an item and answers with a send asks before that send, so that the
        host can hand the reply out as soon as the other end sends it (instead
        of after this end's next recv()); a fast queue consumer asks when half of
        its last batch is handed out. The request waits AHEAD_WAIT at most; the
        next get() waits for its answer (see _pull)."""
        if self.want_ahead and self.ahead is None and not self.closed:
            self.want_ahead = False
            reqid, fut = self._ask(1, AHEAD_WAIT)
            self.ahead = (reqid, fut, time.monotonic() + AHEAD_WAIT + SLACK)

    def _ask(self, n: int, wait: float) -> Tuple[int, Future[MessageBase]]:
        """Send a pull request for ``n`` items (or the credit), leased if possible."""
        rt = self.rt
        reqid = next(_reqids)
        with rt.lock:
            data = rt.lease_for(self.key, reqid)
            want = max(n, self._credit()) if self.key in rt.lease_ok else n
        return reqid, rt.ask(self.key, _header(_W, self.qid, reqid, want, wait), reqid, data)

    def _get_pushed(self, n: int, block: bool, end: Optional[float]) -> List[_Item]:
        rt = self.rt
        if not self.subscribed:
            self.subscribed = next(_reqids)
            rt.node.send(_to_msg(self.key, _header(_S, self.qid, self.subscribed)))
        probe_at = time.monotonic() + CHUNK
        looked = False  # at the node's queue: pushed batches wait there until read
        while True:
            with rt.lock:
                while True:
                    out = self._from_inbox(n)
                    if out:
                        return out
                    now = time.monotonic()
                    if self.closed:
                        raise ValueError("closed while waiting in get()")
                    if not block or (end is not None and now >= end):
                        if looked:
                            raise Empty
                        looked = True
                        rt.wait(0.0)
                        continue
                    if now >= probe_at:
                        break
                    left = probe_at - now if end is None else min(probe_at, end) - now
                    rt.wait(left)
                    looked = True
            # Nothing for a while: make sure the host is still there (and learn EOF),
            # and that it has our subscription (S is idempotent; a delivery that
            # failed, or an S that got lost, would otherwise leave us waiting).
            rt.node.send(_to_msg(self.key, _header(_S, self.qid, self.subscribed)))
            _, eof = self.size()
            if eof:
                raise EOFError
            probe_at = time.monotonic() + CHUNK

    def poll(self, timeout: Optional[float]) -> bool:
        block = timeout is None or timeout > 0
        with self.rt.lock:
            if self.buffer or self.rt.inbox.get(self.qid):
                return True
        if self.read_ahead and self.piped is None:
            self._open_pipe()
        try:
            if self.piped:
                end = None if timeout is None else time.monotonic() + max(0.0, timeout)
                self._get_piped(1, block, end, take=False)
            elif self.push:
                items = self.get(1, block, timeout)
                with self.rt.lock:
                    self.buffer.extendleft(reversed(items))
            else:  # fetch without handing out: the items stay leased
                end = None if timeout is None else time.monotonic() + max(0.0, timeout)
                self._pull(1, block, end, take=False)
        except Empty:
            return False
        except EOFError:
            return True
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
        try:
            if not self.no_flush:
                self.flush(flush_limit)
        finally:
            self._settle_ahead()  # its items go back below
            # another handle of this pipe end in this process may read on
            if not (self.piped and self._pipe_shared()):
                self._unsubscribe()

    def _unsubscribe(self) -> None:
        """End the subscription (push mode, a pipe's reader) and give back what
        was received and not handed out."""
        rt = self.rt
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
        with rt.lock:
            rt.flush_acks()
            back = list(self.buffer)
            self.buffer.clear()
            now = time.monotonic()
            entries = [e for e in self.stale if e.abandon > now]
            entries += rt.inbox.pop(self.qid, ())
            self.stale = []
        rt.give_back(self.key, self.qid, back, entries)
        if self.piped:
            with rt.lock:
                sub = rt.piped.pop(self.qid, None)
            if sub is not None:  # every batch of the subscription is settled
                sub[0].give(sub[1])

    def _pipe_shared(self) -> bool:
        """Whether another open handle of this pipe end in this process uses the
        subscription (it then stays, with the items pushed)."""
        return any(
            ep is not self and ep.qid == self.qid and ep.piped and not ep.closed
            for ep in list(self.rt.endpoints)
        )
