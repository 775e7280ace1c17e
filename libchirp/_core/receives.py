"""Received messages of a node: matching replies to requests, delivery, and the
release of their slots.

A RECV event becomes a message of the node's message class, which keeps the C
record's address (an int) in ``_c`` until its release is submitted; the node
holds it (``held``) until then. A message carrying the identity of a pending
request resolves that request; one of an expired request is a late reply
(``Requests``); the others go to the interface (``deliver``, or
``deliver_many`` with the messages of a whole batch at its end).

Releases: :meth:`Receives.release` submits one release with a future
(completed by RELEASE_DONE through the token); :meth:`Receives.release_many`
releases many with one call and no futures (their completions are only
counted, ``quiet_submitted``/``quiet_done``, so that ``stop()`` can let the owed
ACKs go out first); :meth:`Receives.release_when_sent` waits for a pending
send of the message (an answer sent back) before it releases.

A mixin of :class:`~libchirp._core.node.NodeCore` (state made by
:meth:`Receives._init_receives`).
"""

from __future__ import annotations

from concurrent.futures import Future
from operator import attrgetter
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type

from ..message import MessageBase
from .capi import _MSG_P, _MSG_PP, _cast, _text, ffi, lib
from .events import _QUIET_RELEASE, Payloads, _address, _peer, _peers
from .log import logger
from .outcomes import _REFUSED, _error, _set_exception, _set_result
from .requests import DROP_LATE_REPLIES
from .timers import cancel_timer

_new = object.__new__
_c_of = attrgetter("_c")
_sending_of = attrgetter("_sending")

#: Token of releases nobody waits for (release_many): their completions are only
#: counted, so that stop() can let the owed ACKs go out first (successful ones
#: by events.handle_batch itself). Real tokens start at 2.


class Receives:
    """Receiving and releasing (mixin of NodeCore, see the module docstring)."""

    def _init_receives(
        self,
        deliver: Optional[Callable[[MessageBase], None]],
        message_class: Type[MessageBase],
        deliver_many: Optional[Callable[[List[MessageBase]], None]],
    ) -> None:
        self.deliver = deliver
        #: Takes the messages of a batch at once (instead of deliver), if given.
        self.deliver_many = deliver_many
        self.inbox: List[MessageBase] = []  # deliver_many: received in the current batch
        self.message_class = message_class
        self.held: Set[MessageBase] = set()
        self.orphans: List[Any] = []  # C messages received after ch_node_stop()
        self.releases: Dict[int, Tuple[Future, bytes, int]] = {}
        self.quiet_submitted = 0  # releases without a future, submitted (under lock)
        self.quiet_done = 0  # ... and completed (by the thread handling events)

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
                cancel_timer(req._timer)
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
        if self.closing:
            # The node stops: nobody gets this message, so it is not
            # acknowledged either (a SYNCHRONOUS sender's send fails); its
            # record is freed after the stop, like one received after it.
            with self.lock:
                msg._c = None
                self.orphans.append(cmsg)
            return
        if self.deliver is None and self.deliver_many is None:
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

    def on_recvs(self, recs: List[tuple], payloads: Payloads) -> None:
        """Thread handling events: consecutive RECV events of this node, decoded.

        The usual case (the node runs, no request is pending or expired, the
        interface takes whole batches) builds the messages in one loop and
        hands them to the inbox at once; otherwise each goes through on_recv().
        """
        if (
            self.deliver_many is None
            or self.stop_sent
            or self.closing
            or self.requests
            or self.expired
        ):
            for rec in recs:
                try:
                    header, data = payloads.of(rec)
                    self.on_recv(rec, header, data)
                except Exception:
                    logger.exception("libchirp: exception while handling a received message")
            return
        cls = self.message_class
        arena = payloads.arena
        base = payloads.base
        end = payloads.end
        peers = _peers
        msgs = []
        append = msgs.append
        for rec in recs:
            # the fields of _EVENT (events.py), in its order
            _, _, _, _, cmsg, identity, serial, _, h, _, dl, hl, port, remote, raw = rec
            if base <= h < end:
                off = h - base
                hend = off + hl
                header = arena[off:hend]
                data = arena[hend : hend + dl]
            else:
                header, data = payloads.of(rec)
            msg = _new(cls)  # as MessageBase._received(), inline
            msg._identity = identity
            msg._serial = serial
            msg._header = header
            msg._data = data
            # the sender's address, packed already (sending back needs no parsing)
            msg._family, msg._packed, msg._address = peers.get(raw) or _peer(raw)
            msg._port = port
            msg._remote_identity = remote
            msg._c = cmsg
            msg._node = self
            msg._sending = False
            append(msg)
        self.held.update(msgs)
        inbox = self.inbox
        if not inbox:
            self.loop.at_batch_end(self._deliver_inbox)
        inbox.extend(msgs)

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
            cmsgs = list(map(_c_of, msgs))
            if None in cmsgs:  # some have no slot (released already, or never received)
                msgs = [msg for msg, cmsg in zip(msgs, cmsgs) if cmsg is not None]
                if not msgs:
                    return
                cmsgs = list(map(_c_of, msgs))
            if any(map(_sending_of, msgs)):
                raise RuntimeError("Message is still being sent; release it when the send is done")
            for msg in msgs:
                msg._c = None
            self.held.difference_update(msgs)
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
        token = next(self.loop.tokens)
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

    def on_release_done(self, token: int, status: int, text: Any, count: int) -> None:
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

    def _fail_releases(self, exc: Callable[[], BaseException]) -> None:
        """Fail every pending release with ``exc()`` (after the node stopped)."""
        releases = self.releases
        while releases:
            _, rel = releases.popitem()
            _set_exception(rel[0], exc())
