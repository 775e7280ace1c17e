"""Sends of a node: submission to the core, the table of pending sends, their completion.

Application threads submit sends under the node's lock; every submission
carries a token (unique per loop, ``LoopCore.tokens``) and is remembered in
``sends`` as a :class:`PendingSend` until its SEND_DONE event carries the token
back. Header and data ``bytes`` of a single send are handed to C without
copying (``ffi.from_buffer``) and kept alive in the pending send until then;
``send_many()`` packs small messages into one ``ch_node_send_batch()`` call,
which copies them. Consecutive successful completions come as one event with a
count (:meth:`Sends.on_sends_done`).

A mixin of :class:`~libchirp._core.node.NodeCore`: the state it uses is made by
:meth:`Sends._init_sends`; ``on_*`` methods run on the thread handling events.
"""

from __future__ import annotations

import struct
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..message import MessageBase
from .capi import _text, lib
from .outcomes import _REFUSED, _error, _set_exception, _set_result, _submit_error

#: One message of ch_node_send_batch() (ch_send_t, CH_SEND_SIZE bytes):
#: token, data_len, header_len, port, family, identity, addr.
_SEND_RECORD = struct.Struct("=QIHHB16s16s7x")
assert _SEND_RECORD.size == lib.CH_SEND_SIZE
#: send_many() copies messages of up to this many header + data bytes into one
#: batch (one call into the core, one lock, one wake-up); larger ones are handed
#: over without a copy, one call each.
SEND_COPY_LIMIT = 8192


class PendingSend:
    """A send handed to the core and not completed yet (``NodeCore.sends``, by token).

    ``header`` and ``data`` are the ``bytes`` the core points at without a copy
    (kept alive until SEND_DONE, even if the message's attributes are replaced
    meanwhile); None for sends the core copied. ``request`` is the request
    future the send belongs to (``NodeCore.request()``), or None.
    """

    __slots__ = ("future", "msg", "header", "data", "request")

    def __init__(
        self,
        future: Future,
        msg: MessageBase,
        header: Optional[bytes] = None,
        data: Optional[bytes] = None,
        request: Optional[Future] = None,
    ) -> None:
        self.future = future
        self.msg = msg
        self.header = header
        self.data = data
        self.request = request


class Sends:
    """The send half of a node (mixin of NodeCore, see the module docstring)."""

    def _init_sends(self) -> None:
        self.sends: Dict[int, PendingSend] = {}  # token -> the pending send

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
        tokens = self.loop.tokens
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
                    pending = sends.pop(token)
                    pending.msg._sending = False
                    failed.append((pending.future, rc))
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
            sends[token] = PendingSend(fut, msg)  # the core copies it
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
        pending send keeps them alive until SEND_DONE, even if the message's
        attributes are replaced meanwhile.
        """
        if self.closing:
            return _REFUSED
        if msg._sending:
            raise RuntimeError("Message is still being sent")
        family, addr = msg._target()
        header = msg._header
        data = msg._data
        token = next(self.loop.tokens)
        self.sends[token] = PendingSend(fut, msg, header, data, request)
        msg._sending = True
        rc = lib.ch_node_send(
            self.c, token, msg._identity, family, addr, msg._port,
            header, len(header), data, len(data),
        )  # fmt: skip
        if rc != 0:
            del self.sends[token]
            msg._sending = False
        return rc

    def _sent(self, pending: PendingSend) -> MessageBase:
        """The send ``pending`` is over: the message may be sent or released again."""
        msg = pending.msg
        msg._sending = False
        if self.release_after_send:  # see release_when_sent() for the ordering
            with self.lock:
                if msg in self.release_after_send:
                    self.release_after_send.discard(msg)
                    self.release(msg)
        return msg

    def on_send_done(self, token: int, status: int, text: Any) -> None:
        pending = self.sends.pop(token, None)
        if pending is None:
            return
        msg = self._sent(pending)
        if status == 0:
            _set_result(pending.future, msg)
            return
        text = _text(text)
        _set_exception(pending.future, _error(status, text))
        if pending.request is not None:
            self._request_send_failed(msg, pending.request, status, text)

    def on_sends_done(self, token: int, count: int) -> None:
        """Dispatcher: the sends ``token`` .. ``token + count - 1`` all succeeded."""
        pop = self.sends.pop
        sent = self._sent
        for t in range(token, token + count):
            pending = pop(t, None)
            if pending is not None:
                _set_result(pending.future, sent(pending))

    def _fail_sends(self, exc: Callable[[], BaseException]) -> None:
        """Fail every pending send with ``exc()`` (after the node stopped)."""
        sends = self.sends
        while sends:
            _, pending = sends.popitem()
            pending.msg._sending = False
            _set_exception(pending.future, exc())
