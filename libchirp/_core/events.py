"""Events of the core: the event array and arena of a drive, and their decoding and dispatch.

A thread that drives the loop (``ch_loop_drive()``) hands it a
:class:`PollBuffers` (room for ``BATCH`` events and an arena for the payloads of
small received messages) and then calls :func:`handle_batch`, still holding the
loop's token. A batch is decoded with one bytes copy and
``struct.iter_unpack()`` (:data:`_EVENT`, built from the compiled layout)
instead of one cffi attribute access per field; rare fields (texts of failures
and logs, statistics) are read from the cdata event. Each event goes to the node
named by its ``node_token`` (its ``on_*`` methods; a run of consecutive RECV
events of one node in one call); then the loop's due timers and end-of-batch
hooks run.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from ..message import _parse_address
from .capi import _CHAR_P, _NULL, _buffer, _cast, _text, ffi, lib
from .log import logger

if TYPE_CHECKING:  # pragma: no cover
    from .loopcore import LoopCore
    from .node import NodeCore

#: Events per ch_loop_drive() batch.
BATCH = 256
#: Bytes per poll for copies of small payloads (ch_arena_t).
ARENA_SIZE = 256 * 1024
#: Token of the wake-up that announces call_soon() callbacks (LoopCore.call_soon()).
WAKE_CALLS = 1
#: Token of releases nobody waits for (Receives.release_many): their completions
#: are only counted. Real tokens start at 2.
_QUIET_RELEASE = 1

_EV_NODE_STARTED = lib.CH_EV_NODE_STARTED
_EV_NODE_STOPPED = lib.CH_EV_NODE_STOPPED
_EV_SEND_DONE = lib.CH_EV_SEND_DONE
_EV_RECV = lib.CH_EV_RECV
_EV_RELEASE_DONE = lib.CH_EV_RELEASE_DONE
_EV_LOG = lib.CH_EV_LOG
_EV_WAKE = lib.CH_EV_WAKE
_EV_STATS = lib.CH_EV_STATS


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


class PollBuffers:
    """What one driving thread hands to ch_loop_drive(): events and an arena."""

    __slots__ = ("events", "arena", "arena_buf", "arena_base", "seq")

    def __init__(self) -> None:
        self.events = ffi.new("ch_event_t[]", BATCH)
        self.arena_buf = ffi.new("char[]", ARENA_SIZE)
        self.arena = ffi.new("ch_arena_t *", {"buf": self.arena_buf, "cap": ARENA_SIZE})
        self.arena_base = int(ffi.cast("uintptr_t", self.arena_buf))
        self.seq = ffi.new("uint64_t *")


#: A RECV event's address field (NUL padded bytes) -> (family, packed, text).
_peers: Dict[bytes, Tuple[int, bytes, str]] = {}


def _peer(raw: bytes) -> Tuple[int, bytes, str]:
    """(family, packed address, text) of a RECV event's address field, remembered.

    The packed form is what sending a message back needs (MessageBase._target()).
    """
    known = _peers.get(raw)
    if known is None:
        text = raw.split(b"\0", 1)[0].decode("ascii")
        family, packed, _ = _parse_address(text)
        known = (family, packed, text)
        if len(_peers) < 4096:
            _peers[raw] = known
    return known


def _address(raw: bytes) -> str:
    """Text of a RECV event's address field (NUL padded bytes), remembered."""
    return _peer(raw)[2]


class Payloads:
    """Where the header and data of a batch's RECV events are: :meth:`of` a record.

    Small payloads were copied into the drive's arena (copied once more into
    ``bytes`` here, so that each message's ``bytes`` is a cheap slice of it);
    larger ones are read from the message record.
    """

    __slots__ = ("arena", "base", "end")

    def __init__(self, bufs: PollBuffers) -> None:
        used = bufs.arena[0].len
        self.arena = _buffer(bufs.arena_buf, used)[:] if used else b""
        self.base = bufs.arena_base
        self.end = self.base + used

    def of(self, rec: tuple) -> Tuple[bytes, bytes]:
        """(header, data) of the RECV record ``rec``."""
        h = rec[8]
        hl = rec[11]
        if self.base <= h < self.end:
            off = h - self.base
            return self.arena[off : off + hl], self.arena[off + hl : off + hl + rec[10]]
        header = _buffer(_cast(_CHAR_P, h), hl)[:] if hl else b""
        data = _buffer(_cast(_CHAR_P, rec[9]), rec[10])[:] if rec[10] else b""
        return header, data


def _recvs(node: Optional[NodeCore], run: List[tuple], payloads: Payloads) -> None:
    """Hand a run of consecutive RECV records of one node to it."""
    if node is None:
        logger.error("libchirp: %d message(s) for an unknown node; dropped", len(run))
        return
    try:
        node.on_recvs(run, payloads)
    except Exception:
        logger.exception("libchirp: exception while handling received messages")


def handle_batch(loop: LoopCore, bufs: PollBuffers, n: int) -> None:
    """Handle the ``n`` events in ``bufs``, then due timers and end-of-batch hooks.

    Called by the thread holding ``loop``'s token, right after its drive.
    Consecutive RECV events of one node go to it in one call
    (``Receives.on_recvs``), in order with the other events.
    """
    nodes = loop.nodes
    events = bufs.events
    payloads = Payloads(bufs)
    run: List[tuple] = []  # consecutive RECV records of run_token's node
    run_token = -1
    for i, rec in enumerate(_EVENT.iter_unpack(_buffer(events, n * _EVENT_SIZE))):
        t = rec[0]
        if t == _EV_RECV:
            if rec[2] != run_token:
                if run:
                    _recvs(nodes.get(run_token), run, payloads)
                    run = []
                run_token = rec[2]
            run.append(rec)
            continue
        if t == _EV_RELEASE_DONE and rec[3] == _QUIET_RELEASE and rec[1] == 0:
            # AUTO_RELEASE completions are only counted (Receives.release_many):
            # no need to end a run of RECV events for them.
            node = nodes.get(rec[2])
            if node is not None:
                node.quiet_done += rec[7]
            continue
        if run:
            _recvs(nodes.get(run_token), run, payloads)
            run = []
            run_token = -1
        try:
            if t == _EV_SEND_DONE:
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
                if rec[3] == WAKE_CALLS:
                    loop.run_calls()
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
    if run:
        _recvs(nodes.get(run_token), run, payloads)
    if loop.timers.heap:
        loop.timers.run_due()
    if loop.batch_end:
        loop.end_batch()
