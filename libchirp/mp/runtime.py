"""What exists once per process: the client node, the registry of hosts, fork and exit.

Part of :mod:`libchirp.mp` (its docstring has the overview). Handles of boxes
hosted elsewhere talk to their host through this process's :class:`_Runtime`
for their TLS setting: a Loop and a chirp node on a free port. There is no
reader thread: a thread that waits for an answer or a pushed batch reads the
node itself and sorts what arrives (:meth:`_Runtime.wait`), so a message
reaches the thread waiting for it without a hop. Messages nobody waits for
(pushed batches while no thread is in ``get()``) stay in the node's queue
until somebody waits, holding their slots as they would in the inbox. The
registry makes one :class:`_Runtime` per TLS setting and one
:class:`~libchirp.mp.host._Host` per TLS setting and port (:func:`_runtime`,
:func:`_host`).

Fork: a child made by ``fork`` inherits the registry, but not the threads of
its Loops. :func:`_after_fork_in_child` empties the registry (and takes a new
lock) so that the child makes nodes of its own; the inherited chirp objects
are kept referenced in :data:`_graveyard` for ever, never stopped, so their
finalizers never run in the child. Handles notice the new pid themselves
(:mod:`.handles`). Exit: :func:`_shutdown` flushes and closes client handles
and stops the clients, then the hosts; it runs at exit (``atexit``) and at the
exit of a ``multiprocessing`` child (:func:`_register_finalizer`).
"""

from __future__ import annotations

import atexit
import logging
import os
import struct
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Set, Tuple

from .. import mp  # the settings (mp.TIMEOUT) are read from the package at use
from ..loop import Loop
from ..message import MessageBase
from ..queue import Chirp
from .host import _Host
from .lease import Counter, LeaseFile
from .wire import (
    _D,
    _F_EOF,
    _F_LEASE,
    _F_PIPE,
    _F_PUSH,
    _HDR,
    _MASK,
    _R,
    _TLS,
    READ_SLICE,
    SLACK,
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
    from .client import _Remote

_log = logging.getLogger("libchirp")


#: A lease a batch holds: its file, its slot, the request id it answers.
_Lease = Tuple[LeaseFile, int, int]


class _Inbound:
    """A D batch a client received and has not handed out completely."""

    __slots__ = ("msg", "items", "pos", "lease", "counter", "expires", "abandon", "base", "stream")

    def __init__(
        self, msg: MessageBase, lease: Optional[_Lease] = None, base: Optional[int] = None
    ) -> None:
        self.msg = msg
        #: pushed to a pipe's reader: the lease is its subscription's, and ``base``
        #: the batch's position in the subscription's stream (the counter counts
        #: the stream's items, see :mod:`.lease`)
        self.stream = base is not None
        self.base = base or 0
        self.items = _unpack(msg.data)
        # The host's node waits TIMEOUT for the acknowledgement, then puts back
        # what it believes was not handed out. So a batch held for half of that
        # gives back the rest instead of handing it out, and one held for most
        # of it is abandoned (neither handed out nor acknowledged: the host
        # puts the rest back).
        now = time.monotonic()
        self.expires = now + mp.TIMEOUT / 2
        self.abandon = now + mp.TIMEOUT * 0.9
        #: the next item to hand out; the message is released after the last one.
        self.pos = 0
        self.set_lease(lease)

    def set_lease(self, lease: Optional[_Lease]) -> None:
        """Where the count of items handed out goes (:mod:`.lease`), if the host reads it."""
        self.lease = lease
        self.counter: Optional[Counter] = None if lease is None else lease[0].counter(*lease[1:])

    def done(self) -> None:
        """Acknowledge the batch (all handed out or given back); free its slot
        (a subscription's slot is freed when the subscription ends)."""
        _release_all([self.msg])
        self.settled()

    def settled(self) -> None:
        """The batch was acknowledged: its slot is free (a subscription's is freed
        when the subscription ends)."""
        if self.lease is not None and not self.stream:
            self.lease[0].give(self.lease[1])

    def count(self, handed_out: int) -> None:
        """Note in the lease that ``handed_out`` items of this batch were handed out."""
        if self.lease is not None:
            lf, slot, reqid = self.lease
            lf.count(slot, reqid, (self.base + handed_out) & _MASK)


class _Runtime:
    """This process's client node for one TLS setting (used by handles of remote boxes)."""

    def __init__(self, tls: _TLS) -> None:
        self.loop = Loop()
        try:
            self.node = Chirp(self.loop, _node_config(tls))
        except BaseException:
            self.loop.stop()
            raise
        #: guards the runtime's state; ``with lock`` where no waiting is needed
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        #: request id -> answer, for requests somebody waits for.
        self.pending: Dict[int, Optional[MessageBase]] = {}
        #: pushed batches and late answers per box.
        self.inbox: Dict[int, Deque[_Inbound]] = {}
        self.endpoints: "weakref.WeakSet[_Remote]" = weakref.WeakSet()
        #: lease files per host (None: leases are not possible with it), the
        #: hosts that confirmed theirs, and the slots of unanswered requests.
        self.leases: Dict[_Key, Optional[LeaseFile]] = {}
        self.lease_ok: Set[_Key] = set()
        self.leased: Dict[int, Tuple[_Key, LeaseFile, int]] = {}
        #: leased batches handed out completely, acknowledged at the next wait.
        self.acks: List[_Inbound] = []
        #: pipe boxes whose items the host pushes to this process (``O``): the
        #: subscription's lease (file, slot, subscription id); and the boxes whose
        #: writer closed (the host pushed end of file after the last batch).
        self.piped: Dict[int, _Lease] = {}
        self.ended: Set[int] = set()
        self.stopping = False
        self.reader = _Reader(self.node, self.cond)

    def wait(self, limit: Optional[float]) -> None:
        """Wait up to ``limit`` (lock held) for messages: read and sort them if no
        other thread does (:class:`~.wire._Reader`), else wait until it did."""
        if self.acks:
            self.flush_acks()
        step = READ_SLICE if limit is None else max(0.0, min(READ_SLICE, limit))
        if self.reader.reading:
            if step > 0:
                self.cond.wait(step)
            return
        try:
            msgs = self.reader.take(step)
        except Exception:
            if self.stopping:
                return
            raise
        for m in msgs:
            try:
                kind, qid, reqid, n, wait_ms, flags = _HDR.unpack(m.header)
            except struct.error:
                m.release_slot()
                continue
            if reqid in self.pending and not flags & _F_PUSH:
                self.pending[reqid] = m
                continue
            if flags & _F_PIPE:
                # pushed to a pipe's reader: a batch at position n of the stream, or EOF
                if kind == _D:
                    sub = self.piped.get(qid)
                    lease = sub if sub is not None and sub[2] == reqid else None
                    entry = _Inbound(m, lease, wait_ms if lease is not None else None)
                    self.inbox.setdefault(qid, deque()).append(entry)
                else:
                    if flags & _F_EOF:
                        self.ended.add(qid)
                    m.release_slot()
                continue
            # pushed, or the late answer to a request nobody waits for
            lease = None if flags & _F_PUSH else self.lease_answer(reqid, kind, flags)
            if kind == _D:
                self.inbox.setdefault(qid, deque()).append(_Inbound(m, lease))
            else:
                m.release_slot()

    def lease_for(self, key: _Key, reqid: int) -> bytes:
        """A lease slot for the batch answering ``reqid`` from ``key``: the request's
        data naming it (empty without one). Lock held."""
        if key in self.leases:
            lf = self.leases[key]
        else:
            lf = self.leases[key] = LeaseFile.create()
        if lf is None:
            return b""
        slot = lf.take(reqid)
        if slot is None:
            return b""
        self.leased[reqid] = (key, lf, slot)
        return lf.data(slot)

    def lease_answer(self, reqid: int, kind: bytes, flags: int) -> Optional[_Lease]:
        """The lease of the batch answering ``reqid`` (None: no lease, or no batch). Lock held.

        The first answer of a host tells whether it holds the file: once it
        does, the file is unlinked (the host keeps it mapped); a host that
        could not open it gets no leases from then on.
        """
        held = self.leased.pop(reqid, None)
        if held is None:
            return None
        key, lf, slot = held
        if flags & _F_LEASE or kind == _D:
            if self._host_holds(key, lf, flags) and kind == _D:
                return (lf, slot, reqid)
        lf.give(slot)
        return None

    def _host_holds(self, key: Any, lf: Any, flags: int) -> bool:
        """Learn from a host's answer whether it holds the lease file of ``key``
        (lock held): the first answer that says so unlinks the file (the host
        keeps it mapped); one that does not ends leasing with that host."""
        if flags & _F_LEASE:
            if key not in self.lease_ok:
                self.lease_ok.add(key)
                lf.unlink()
            return True
        self.leases[key] = None
        self.lease_ok.discard(key)
        lf.unlink()
        return False

    def pipe_answer(self, sid: int, flags: int) -> bool:
        """The host's answer to a pipe reader's first ``O`` (lock held): whether it
        pushes the items (it holds the lease). The slot stays the subscription's."""
        held = self.leased.pop(sid, None)
        if held is None:
            return False
        key, lf, slot = held
        if self._host_holds(key, lf, flags):
            return True
        lf.give(slot)
        return False

    def request(
        self, key: _Key, header: bytes, reqid: int, limit: float, data: bytes = b""
    ) -> MessageBase:
        """Send a request and wait for its answer (``ConnectionError`` if none comes)."""
        fut = self.ask(key, header, reqid, data)
        answer = self.answer(key, reqid, fut, time.monotonic() + limit)
        assert answer is not None
        return answer

    def ask(self, key: _Key, header: bytes, reqid: int, data: bytes = b"") -> "Future[Any]":
        """Send a request whose answer :meth:`answer` waits for."""
        with self.lock:
            self.pending[reqid] = None
        fut = self.node.send(_to_msg(key, header, data))
        fut.add_done_callback(lambda f: self._wake())
        return fut

    def answer(
        self, key: _Key, reqid: int, fut: "Future[Any]", end: float, until: Optional[float] = None
    ) -> Optional[MessageBase]:
        """The answer to request ``reqid``; ``ConnectionError`` if none came by ``end``;
        None if ``until`` came first (the request stays pending: ask again later)."""
        looked = False  # at the node's queue once at least (a poll(0) must see what came)
        with self.lock:
            try:
                while self.pending[reqid] is None:
                    if fut.done() and fut.exception() is not None:
                        raise ConnectionError(
                            "cannot reach the host of this queue at %s:%d: %s"
                            % (key[0], key[1], fut.exception())
                        )
                    now = time.monotonic()
                    if until is not None and now >= until:
                        if looked:
                            return None
                        looked = True
                        self.wait(0.0)
                        continue
                    looked = True
                    if now >= end or self.stopping:
                        raise ConnectionError(
                            "the host of this queue at %s:%d did not answer" % key
                        )
                    self.wait(min(end, until) - now if until is not None else end - now)
            except BaseException:
                self.pending.pop(reqid, None)
                raise
            return self.pending.pop(reqid)

    def ack(self, entry: _Inbound) -> None:
        """A leased batch was handed out completely (lock held): acknowledge it at
        the next wait, not now (the lease counter already tells the host)."""
        self.acks.append(entry)
        if len(self.acks) >= 16:
            self.flush_acks()

    def flush_acks(self) -> None:
        acks, self.acks = self.acks, []
        if acks:
            _release_all([entry.msg for entry in acks])
            for entry in acks:
                entry.settled()

    def _wake(self) -> None:
        with self.lock:
            self.cond.notify_all()

    def give_back(self, key: _Key, qid: int, items: List[_Item], entries: List[_Inbound]) -> None:
        """Return items received but not handed out to the front of their box, then
        release their messages (so that the host never counts them as delivered
        before it has them back)."""
        back = list(items)
        for entry in entries:
            back.extend(entry.items[entry.pos :])
        returned = True
        if back:
            try:
                hdr = _header(_R, qid, 0, len(back))
                self.node.send(_to_msg(key, hdr, _pack(back))).result(SLACK)
            except Exception:
                returned = False
                _log.warning("libchirp.mp: could not return %d item(s) to %s:%d", len(back), *key)
        for entry in entries:
            if returned:
                # the host has the rest back: it must not put them back again
                entry.count(len(entry.items))
            entry.done()

    def stop(self) -> None:
        for ep in list(self.endpoints):
            try:
                ep.close(flush_limit=30.0)
            except Exception:
                pass
        with self.lock:
            self.stopping = True
            self.flush_acks()
            self.cond.notify_all()
        for m in _late_messages(self.node):
            kind, qid = _HDR.unpack(m.header)[:2] if len(m.header) == _HDR.size else (b"", 0)
            if kind == _D:
                self.inbox.setdefault(qid, deque()).append(_Inbound(m))
            else:
                m.release_slot()
        with self.lock:
            inbox = list(self.inbox.items())
            self.inbox.clear()
            stale = [m for m in self.pending.values() if m is not None]
        for qid, entries in inbox:
            if entries:
                m = entries[0].msg
                self.give_back((m.address, m.port), qid, [], list(entries))
        for m in stale:
            m.release_slot()
        for lf in self.leases.values():
            if lf is not None:
                lf.unlink()
        try:
            self.node.stop()
        finally:
            self.loop.stop()


# ------------------------------------------------------------------------------------------
# The registry, and what fork and exit do to it
# ------------------------------------------------------------------------------------------

_registry_lock = threading.Lock()
_hosts: Dict[Tuple[_TLS, int], _Host] = {}
_runtimes: Dict[_TLS, _Runtime] = {}
#: chirp objects inherited through fork: kept alive, never touched.
_graveyard: List[Any] = []
#: This process's id, kept up to date by the fork hook below (``os.getpid()`` is
#: a system call, and handles compare it on every use).
PID = os.getpid()


def _after_fork_in_child() -> None:
    global _registry_lock, PID
    PID = os.getpid()
    _graveyard.extend(_hosts.values())
    _graveyard.extend(_runtimes.values())
    _hosts.clear()
    _runtimes.clear()
    _registry_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _host(tls: _TLS, port: int = 0) -> _Host:
    with _registry_lock:
        host = _hosts.get((tls, port))
        if host is None:
            _register_finalizer()
            host = _hosts[(tls, port)] = _Host(tls, port)
        return host


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
