"""Sends of a node: submission to the core, the table of pending sends, their completion.

Application threads submit sends under the node's lock; every submission
carries a token (unique per loop, ``LoopCore.tokens``) and is remembered in
``sends`` as a :class:`PendingSend` until its SEND_DONE event carries the
token back. Header and data ``bytes`` of a single send are handed to C without
copying and kept alive in the pending send until then. ``send_many()`` packs small messages into one
``ch_node_send_batch()`` call, which copies them; its per-message work (the
futures, the tokens, the records, the table entries) is done by ``map()``
over the batch wherever it can, not by a Python loop. Consecutive successful
completions come as one event with a count (:meth:`Sends.on_sends_done`),
which completes the futures nobody waits on in bulk
(:func:`libchirp._future.set_results`).

A mixin of :class:`~libchirp._core.node.NodeCore`: the state it uses is made by
:meth:`Sends._init_sends`; ``on_*`` methods run on the thread handling events.
"""

from __future__ import annotations

import struct
from concurrent.futures import Future
from itertools import chain, islice, repeat
from operator import add, attrgetter, itemgetter
from typing import Any, Callable, Dict, List, Optional, Tuple

from .._future import new_futures, set_results
from ..message import MessageBase
from .capi import _text, lib
from .outcomes import _REFUSED, _error, _set_exception, _set_result, _submit_error

_sending_of = attrgetter("_sending")
_packed_of = attrgetter("_packed")
_family_of = attrgetter("_family")
_header_of = attrgetter("_header")
_data_of = attrgetter("_data")
_port_of = attrgetter("_port")
_identity_of = attrgetter("_identity")

#: One message of ch_node_send_batch() (ch_send_t, CH_SEND_SIZE bytes):
#: token, data_len, header_len, port, family, identity, addr.
_SEND_RECORD = struct.Struct("=QIHHB16s16s7x")
assert _SEND_RECORD.size == lib.CH_SEND_SIZE
#: send_many() copies messages of up to this many header + data bytes into one
#: batch (one call into the core, one lock, one wake-up); larger ones are handed
#: over without a copy, one call each.
SEND_COPY_LIMIT = 8192


class PendingSend(Tuple[Any, ...]):
    """A send handed to the core and not completed yet (``NodeCore.sends``, by token).

    ``PendingSend((future, msg))`` for a send the core copied;
    ``PendingSend((future, msg, header, data, request))`` for one it points at
    without a copy: ``header`` and ``data`` are kept alive here until SEND_DONE
    (even if the message's attributes are replaced meanwhile), ``request`` is
    the request future the send belongs to (``NodeCore.request()``) or None.
    A tuple, so that ``send_many()`` makes a batch of them with ``map()``.
    """

    __slots__ = ()

    future = property(itemgetter(0))
    msg = property(itemgetter(1))

    @property
    def request(self) -> Optional[Future]:
        return self[4] if len(self) > 2 else None


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
        n = len(msgs)
        if not all(map(isinstance, msgs, repeat(MessageBase, n))):
            for msg in msgs:
                if not isinstance(msg, MessageBase):
                    raise TypeError(
                        "send_many() needs libchirp messages, not %s" % type(msg).__name__
                    )
        if len(set(map(id, msgs))) != n:
            raise RuntimeError("Message is still being sent (given twice to send_many())")
        futs = new_futures(self.loop, n)
        failed: List[Tuple[Future, int]] = []
        with self.lock:
            if any(map(_sending_of, msgs)):
                raise RuntimeError("Message is still being sent")
            packed = list(map(_packed_of, msgs))
            if None in packed:  # received messages pack lazily; raises before any send
                for i, addr in enumerate(packed):
                    if addr is None:
                        packed[i] = msgs[i]._target()[1]
            if self.closing:
                failed = [(fut, _REFUSED) for fut in futs]
            elif n:
                self._submit_many(msgs, futs, packed, failed)
        for fut, rc in failed:
            fut.set_exception(_submit_error(rc))
        self.loop.poke()
        return futs

    def _submit_many(
        self, msgs: List[MessageBase], futs: List[Future], packed: List[bytes], failed: list
    ) -> None:
        """send_many()'s hand-over (caller holds the lock); failures go to ``failed``.

        ``packed`` holds each message's packed address (``_target()`` done).
        """
        headers = list(map(_header_of, msgs))
        datas = list(map(_data_of, msgs))
        hlens = list(map(len, headers))
        dlens = list(map(len, datas))
        if max(map(add, hlens, dlens)) > SEND_COPY_LIMIT:
            self._submit_mixed(msgs, futs, packed, failed)
            return
        # All small (the usual case): one batch, built by map() over the messages.
        n = len(msgs)
        tokens = list(islice(self.loop.tokens, n))
        records = b"".join(
            map(
                _SEND_RECORD.pack, tokens, dlens, hlens, map(_port_of, msgs),
                map(_family_of, msgs), map(_identity_of, msgs), packed,
            )
        )  # fmt: skip
        payload = b"".join(chain.from_iterable(zip(headers, datas)))
        sends = self.sends
        sends.update(zip(tokens, map(PendingSend, zip(futs, msgs))))  # the core copies them
        for msg in msgs:
            msg._sending = True
        rc = lib.ch_node_send_batch(self.c, records, n, payload, len(payload))
        if rc != 0:
            for token, msg, fut in zip(tokens, msgs, futs):
                del sends[token]
                msg._sending = False
                failed.append((fut, rc))

    def _submit_mixed(
        self, msgs: List[MessageBase], futs: List[Future], packed: List[bytes], failed: list
    ) -> None:
        """_submit_many() for a batch with large messages: those go one call each
        without a copy, the small ones between them in batches; the order is kept."""
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

        for msg, fut, addr in zip(msgs, futs, packed):
            header = msg._header
            data = msg._data
            if len(header) + len(data) > SEND_COPY_LIMIT:
                if batch:
                    flush()
                rc = self._submit_send(msg, fut, None)
                if rc != 0:
                    failed.append((fut, rc))
                continue
            token = next(tokens)
            sends[token] = PendingSend((fut, msg))  # the core copies it
            msg._sending = True
            records.append(
                pack(token, len(data), len(header), msg._port, msg._family, msg._identity, addr)
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
        self.sends[token] = PendingSend((fut, msg, header, data, request))
        msg._sending = True
        rc = lib.ch_node_send(
            self.c, token, msg._identity, family, addr, msg._port,
            header, len(header), data, len(data),
        )  # fmt: skip
        if rc != 0:
            del self.sends[token]
            msg._sending = False
        return rc

    def _sent(self, msg: MessageBase) -> None:
        """The send of ``msg`` is over: it may be sent or released again."""
        msg._sending = False
        if self.release_after_send:  # see release_when_sent() for the ordering
            with self.lock:
                if msg in self.release_after_send:
                    self.release_after_send.discard(msg)
                    self.release(msg)

    def on_send_done(self, token: int, status: int, text: Any) -> None:
        pending = self.sends.pop(token, None)
        if pending is None:
            return
        msg = pending.msg
        self._sent(msg)
        if status == 0:
            _set_result(pending.future, msg)
            return
        text = _text(text)
        _set_exception(pending.future, _error(status, text))
        request = pending.request
        if request is not None:
            self._request_send_failed(msg, request, status, text)

    def on_sends_done(self, token: int, count: int) -> None:
        """Dispatcher: the sends ``token`` .. ``token + count - 1`` all succeeded.

        The messages may be sent again from here on; then the futures nobody
        waits on are completed in bulk (set_results()), the others one by one.
        """
        done = list(map(self.sends.pop, range(token, token + count), repeat(None, count)))
        if self.release_after_send:
            for pending in done:
                if pending is not None:
                    self._sent(pending.msg)
                    _set_result(pending.future, pending.msg)
            return
        for pending in set_results(done):  # (clears the messages' _sending first)
            _set_result(pending.future, pending.msg)

    def _fail_sends(self, exc: Callable[[], BaseException]) -> None:
        """Fail every pending send with ``exc()`` (after the node stopped)."""
        sends = self.sends
        while sends:
            _, pending = sends.popitem()
            pending.msg._sending = False
            _set_exception(pending.future, exc())
