"""The protocol between handles and hosts: header, message kinds, batches, limits.

Part of :mod:`libchirp.mp` (its docstring has the overview; docs/mp.md the
interface). Clients talk to a host with chirp messages in SYNCHRONOUS mode.
The header (:data:`_HDR`) names the kind, the box, a request id, a count, a
wait and flags; the data is a batch of items: their count, their lengths and
the items back to back (:func:`_pack`); receivers keep the items as slices of
the message's data. The host never unpickles items.

* ``P`` put: a batch of items. The host appends it and *then* releases the
  message, which acknowledges it to the producer (SYNCHRONOUS): an acknowledged
  batch is in the host's memory. A producer keeps at most :data:`PUT_WINDOW`
  batches unacknowledged and collects new items meanwhile, so batches grow
  while the host is busy. A box with ``maxsize`` that is full keeps the message
  unreleased until there is room, which stalls the producer (slots).
* ``W`` want (pull mode): "give me up to n items, wait at most w ms", its data
  naming a lease slot (:mod:`.lease`; empty without one). The host
  releases it at once and answers later with exactly one message to the
  client's node: ``D`` with items, or ``E`` (empty, or end of file for a
  pipe), flagged :data:`_F_LEASE` if the host holds the lease. The host sends
  ``D`` synchronously; the client releases it only when it has handed out
  its last item (or given the rest back), so if the client dies first the
  send fails and the host puts back the items the lease counter says were
  not handed out (all of them without a lease) at the front of the box.
* ``S``/``U`` subscribe/unsubscribe (push mode): the host sends ``D`` batches
  ahead of demand, round-robin over subscribers, at most :data:`PUSH_WINDOW`
  unacknowledged batches per subscriber. The client releases a pushed batch
  when its last item was handed out; a failed delivery puts the batch back
  (once no other batch to that client is in flight, all of them in the box's
  order). The host answers ``U`` with ``E`` after the last batch it pushed to
  that client, so the client knows when it has every batch it must give back.
* ``O`` open (a pipe's reader in another process): "push me this box's
  items as they come", its data naming a lease slot that stays the
  subscription's (``n`` is the subscription id, the slot's generation). The
  host subscribes the client if it holds the lease and answers ``E`` (flagged
  :data:`_F_LEASE` if subscribed, :data:`_F_EOF` if the writer closed and the
  box is empty); without the lease the client reads with ``W`` requests.
  Pushed batches (``D`` flagged :data:`_F_PUSH` and :data:`_F_PIPE`) carry
  their position in the subscription's stream of items in the ``wait`` field
  (modulo 2**32); the client's counter in the slot is the number of items of
  the stream it handed out, so the host knows of any failed batch exactly
  which items were handed out (:meth:`.lease.HostLeases.handed_out_stream`).
  When the writer closed and the box is empty, the host pushes ``E`` flagged
  :data:`_F_EOF` (after the last batch). A waiting reader sends ``O`` again
  every :data:`CHUNK` (a liveness probe; the host subscribes it again if it
  dropped the subscription after a failed delivery). ``U`` ends it.
* ``R`` return: items a closing client had received but not handed out go back
  to the front of the box. ``C`` close: the writing end of a pipe closed.
  ``Z`` stat: the host answers ``E`` with the box's size (also a liveness probe).

This module also holds how the nodes of :mod:`libchirp.mp` are configured
(:func:`_node_config`: SYNCHRONOUS, manual release, :data:`SLOTS`), since the
acknowledgements above rely on it, and how a queue's name becomes its box id
(:func:`_name_qid`), on which a host and :func:`~libchirp.mp.attach` agree.
"""

from __future__ import annotations

import hashlib
import queue as _queue
import struct
import threading
from typing import Iterator, List, Optional, Tuple, Union

from .. import mp  # the settings (mp.CONFIG, mp.TIMEOUT) are read from the package at use
from ..config import Config
from ..message import Message, MessageBase
from ..queue import Chirp

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
#: Items a pull consumer asks for per request at most (its credit, see
#: :mod:`.lease`), and how much of its own consumption time it holds ahead.
PULL_BATCH = 256
PULL_AHEAD = 0.01
#: Slots per connection of this module's nodes.
SLOTS = 16
#: Longest wait of one pull request; longer waits are repeated (liveness).
CHUNK = 1.0
#: The wait of a pipe reader's request for its next item, sent as soon as it
#: took one (an answer that comes quickly needs no request after the recv()).
AHEAD_WAIT = 0.05
#: A queue consumer whose credit is at least this asks for its next batch when
#: it has handed out half of its last one (the same way).
AHEAD_CREDIT = 16
#: Longest read of a node by a waiting thread before it re-checks what it waits for.
READ_SLICE = 0.2
#: How long a host's own thread leaves the reading to the hosting process's
#: threads after one of them stopped reading (it may be back at once).
READ_LAZY = 0.002
#: How long past its wait a client waits for the host's answer before it
#: declares the host unreachable.
SLACK = 30.0

#: The header of every message: kind, box id, request id (or subscription id),
#: count of items, wait in ms, flags.
_HDR = struct.Struct("!cQQIIB")
#: The kinds (see the module docstring).
_P, _R, _W, _S, _U, _C, _Z, _D, _E = (b"P", b"R", b"W", b"S", b"U", b"C", b"Z", b"D", b"E")
_O = b"O"
#: Flags: end of file (a pipe's writer closed, or no such box); a pushed D batch;
#: the host holds the lease named in the W (or O) request this answers (:mod:`.lease`);
#: pushed to a pipe's reader (the lease is the subscription's, see ``O``).
_F_EOF = 1
_F_PUSH = 2
_F_LEASE = 4
_F_PIPE = 8
#: Stream positions of pipe subscriptions are counted modulo 2**32.
_MASK = 0xFFFFFFFF

_Key = Tuple[str, int]
#: A handle's TLS setting: (CERT_CHAIN_PEM, DH_PARAMS_PEM, DISABLE_ENCRYPTION, BIND_V4, BIND_V6).
_TLS = Tuple[Optional[str], Optional[str], bool, str, str]


def _tls_of(config: Optional[Config]) -> _TLS:
    """The TLS setting of ``config``, by default of ``mp.CONFIG`` (None: plaintext)."""
    c = config if config is not None else mp.CONFIG
    if c is None:
        return (None, None, False, "0.0.0.0", "::")
    return (c.CERT_CHAIN_PEM, c.DH_PARAMS_PEM, c.DISABLE_ENCRYPTION, c.BIND_V4, c.BIND_V6)


def _node_config(tls: _TLS, port: int = 0) -> Config:
    """The Config of a host's or a client's node."""
    cfg = Config()
    cfg.PORT = port
    cfg.SYNCHRONOUS = True
    cfg.AUTO_RELEASE = False
    cfg.MAX_SLOTS = SLOTS
    cfg.TIMEOUT = mp.TIMEOUT
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


#: An item as a handle or host holds it: the pickle's bytes, or a slice of the
#: batch it came in (nobody copies it out: the host hands it on, the consumer
#: unpickles it from there).
_Item = Union[bytes, memoryview]
_COUNT = struct.Struct("!I")


def _pack(items: List[_Item]) -> bytes:
    """A batch: the count, the lengths, then the items back to back (one copy)."""
    n = len(items)
    return b"".join([_COUNT.pack(n), struct.pack("!%dI" % n, *map(len, items)), *items])


def _unpack(data: bytes) -> List[_Item]:
    """The items of a batch, as slices of ``data`` (no copy)."""
    if not data:
        return []
    try:
        (n,) = _COUNT.unpack_from(data)
        lengths = struct.unpack_from("!%dI" % n, data, _COUNT.size)
    except struct.error:
        raise ValueError("malformed batch") from None
    view = memoryview(data)
    off = _COUNT.size + 4 * n
    items: List[_Item] = []
    for size in lengths:
        items.append(view[off : off + size])
        off += size
    if off != len(data):
        raise ValueError("malformed batch")
    return items


class _Reader:
    """Whoever waits reads: the role of reading a node, for threads waiting for what it brings.

    A thread that waits for a message (an answer, an item) takes the
    messages from the node itself, if no other thread does, instead of
    sleeping until another thread took them and woke it: the thread that
    waits in ``get_many()`` runs the node's loop itself (docs/architecture.md),
    so a message goes from the socket to a waiting thread without a hop. The
    others wait on ``cond`` and are woken after each read. Methods are called
    with ``cond`` held.
    """

    def __init__(self, node: Chirp, cond: threading.Condition) -> None:
        self.node = node
        self.cond = cond
        self.reading = False

    def take(self, timeout: float) -> List[Message]:
        """What arrives within ``timeout`` (0: what is there), the lock released meanwhile."""
        self.reading = True
        self.cond.release()
        try:
            if timeout > 0:
                return self.node.get_many(1024, timeout=timeout)
            return self.node.get_many(1024, block=False)
        except _queue.Empty:
            return []
        finally:
            self.cond.acquire()
            self.reading = False
            self.cond.notify_all()


def _release_all(msgs: List[MessageBase]) -> None:
    """Release the slots of ``msgs`` (send their acknowledgements), without futures.

    This package never looks at a release's future; the core's batch release
    (the one AUTO_RELEASE uses) makes no future, no token entry and no
    completion event to handle per message, and one call into the core for
    messages of one node.
    """
    if not msgs:
        return
    core = msgs[0]._node
    if core is None or any(m._node is not core for m in msgs):
        for m in msgs:
            m.release_slot()
        return
    core.release_many(msgs)


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


def _name_qid(name: str) -> int:
    """The box id of the queue called ``name`` (``Queue(name=...)``, ``attach``)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") or 1
