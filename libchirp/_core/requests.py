"""Requests of a node: the table of pending requests by identity, their expiry, and
the identities of expired ones (docs/protocol.md#answering).

``request()`` registers a ChirpFuture under the message's identity, arms a
timer of the loop (``Config.TIMEOUT``) and sends; the first message received
with that identity resolves it (``Receives.on_recv``). A request that expires
or whose send fails is removed from the table and its identity remembered
(up to ``EXPIRED_MEMORY``): a reply that arrives later is counted
(``late_replies``) and, with ``DROP_LATE_REPLIES``, released at once (so the
peer still gets its ACK) and never delivered as an ordinary message
(libchirp 1.x delivered it).

A mixin of :class:`~libchirp._core.node.NodeCore` (state made by
:meth:`Requests._init_requests`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Callable, Dict

from ..errors import ChirpTimeoutError
from ..message import MessageBase
from .capi import lib
from .outcomes import _error, _set_exception
from .timers import cancel_timer

#: How many expired request identities are remembered (late replies are dropped).
EXPIRED_MEMORY = 10000
#: What happens to a reply that arrives after its request timed out: it is always
#: counted (``late_replies``). True (the default) drops it: it is
#: released at once, so the peer still gets its ACK, and never delivered. False
#: restores libchirp 1.x (docs/protocol.md#answering): it is delivered as an ordinary message.
DROP_LATE_REPLIES = True
_TIMEOUT = lib.CH_TIMEOUT
#: libuv's clock counts whole milliseconds: deadlines of the core and of Python
#: timers set within the same millisecond may end in either order by this much.
_CLOCK_SLACK = 0.002

_monotonic = time.monotonic


def _pending_request(requests: Dict[bytes, Any], identity: bytes, req: Any) -> bool:
    """True if ``req`` is the request registered under ``identity``."""
    return identity in requests and requests[identity] is req


class Requests:
    """The request table of a node (mixin of NodeCore, see the module docstring)."""

    def _init_requests(self) -> None:
        self.requests: Dict[bytes, Any] = {}  # identity -> ChirpFuture (has ._timer)
        self.expired: OrderedDict[bytes, None] = OrderedDict()
        self.late_replies = 0

    def request(self, msg: MessageBase, req: Any) -> Future:
        """Register ``req`` (a ChirpFuture) under msg.identity, arm its timer, send.

        Returns the future of the send (also kept in ``req._send_future``).
        """
        identity = msg._identity
        req._leader = self.loop
        with self.lock:
            if identity in self.requests:
                raise RuntimeError("a request with this message identity is already pending")
            self.requests[identity] = req
            self.expired.pop(identity, None)
        req._timer = self.loop.add_timer(self.timeout, self._expire, identity, req, msg)
        try:
            send_future = self.send(msg, req)
        except BaseException:
            with self.lock:
                if self.requests.get(identity) is req:
                    del self.requests[identity]
            cancel_timer(req._timer)
            raise
        req._send_future = send_future
        if send_future.done() and send_future.exception() is not None:
            with self.lock:
                if self.requests.get(identity) is req:
                    del self.requests[identity]
            cancel_timer(req._timer)
            exc = send_future.exception()
            if exc is not None:
                _set_exception(req, exc)
        return send_future

    def _expire(self, identity: bytes, req: Any, msg: MessageBase) -> None:
        if not _pending_request(self.requests, identity, req):
            return
        del self.requests[identity]
        self._remember_expired(identity)
        _set_exception(req, self._request_timeout(msg))

    def _request_timeout(self, msg: MessageBase) -> ChirpTimeoutError:
        address = msg.address
        peer = ("[%s]:%d" if ":" in address else "%s:%d") % (address, msg.port)
        exc = ChirpTimeoutError(
            "Chirp request timed out: no answer from %s within %.1f s (TIMEOUT)"
            % (peer, self.timeout)
        )
        exc.ecode = lib.CH_TIMEOUT
        return exc

    def _remember_expired(self, identity: bytes) -> None:
        expired = self.expired
        expired[identity] = None
        if len(expired) > EXPIRED_MEMORY:
            expired.popitem(last=False)

    def _request_send_failed(self, msg: MessageBase, req: Any, status: int, text: str) -> None:
        """The send of request ``req`` failed with ``status`` (``Sends.on_send_done``)."""
        if not _pending_request(self.requests, msg._identity, req):
            return
        del self.requests[msg._identity]
        timer = req._timer
        cancel_timer(timer)
        self._remember_expired(msg._identity)
        if (
            status == _TIMEOUT
            and timer is not None
            and timer.deadline <= _monotonic() + _CLOCK_SLACK
        ):
            # The send's TIMEOUT started after the request's (at the write), but
            # libuv's clock counts whole milliseconds, so it may end first by a
            # fraction of one: the request ran out of time all the same.
            _set_exception(req, self._request_timeout(msg))
        else:
            _set_exception(req, _error(status, text))

    def _fail_requests(self, exc: Callable[[], BaseException]) -> None:
        """Fail every pending request with ``exc()`` (after the node stopped)."""
        requests = self.requests
        while requests:
            _, req = requests.popitem()
            cancel_timer(req._timer)
            _set_exception(req, exc())
