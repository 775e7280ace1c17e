"""The node base class and the request future (docs/interfaces.md, docs/protocol.md#answering).

Theory of operation
-------------------
:class:`ChirpBase` is the public face of one chirp node; the work is done by
``libchirp._core.node.NodeCore``. The constructor seals the config, validates it with
the C core (``ValueError`` with the reference message prefixes), starts the node
on the loop and blocks (bounded) until the core answered.

Delivery: every received message is first matched against open requests by
identity (8.3); otherwise it goes to the ``recv`` callable given to the
constructor, on the thread handling the loop's events (the background thread
or a thread waiting in ``get()``/``result()``; the interfaces ``libchirp.queue``,
``libchirp.pool`` and ``libchirp.asyncio`` pass their own). With ``recv=None``
every message is released at once. Callables that are bound methods of the
node itself are held weakly, so a node that is dropped without ``stop()`` can be
garbage-collected, warns with ``ResourceWarning`` and stops in the background.

``send()`` and ``request()`` are thread-safe and return futures that always
complete: after ``stop()`` began they are already failed with
:class:`~libchirp.errors.ChirpShutdown`. ``stop()`` is idempotent and bounded.

Late replies (a change from libchirp 1.x): a reply that arrives after
its request timed out is released at once (its sender still gets its ACK),
counted in ``late_replies`` / ``statistics()["late_replies"]`` and dropped; it
is never delivered as an ordinary message.

``statistics()`` returns a snapshot of the node (``libchirp.stats.NodeStats``):
totals, open connections, late replies and one entry per remote.

After ``os.fork()`` the node belongs to the parent: in the child, ``send()``,
``request()``, ``statistics()``, ``stop()`` (and ``get()`` of the queue
interface) raise ``libchirp.loop.ChirpForkError`` (a ``RuntimeError``) at once.
"""

from __future__ import annotations

import inspect
import threading
import warnings
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as _FutureTimeout  # builtin only from 3.11 on
from types import TracebackType
from typing import Any, Callable, Generic, Iterable, List, Optional, Type, TypeVar

from . import _process
from ._core import START_LIMIT, NodeCore, Timer
from ._future import LightFuture
from .config import Config
from .loop import Loop, loop_core
from .message import Message, MessageBase, release_when_sent
from .stats import NodeStats

__all__ = ["ChirpBase", "ChirpFuture"]

#: A message class (sending returns a future of the message given).
_M = TypeVar("_M", bound=MessageBase)
#: The node's own class, for ``with Chirp(loop, config) as node``.
_Self = TypeVar("_Self", bound="ChirpBase")


class ChirpFuture(LightFuture, Generic[_M]):
    """The future of ``ChirpBase.request()``: resolves to the reply message.

    ``result()`` releases the reply's slot when ``auto_release`` was True (the
    ``request()`` argument, independent of ``Config.AUTO_RELEASE``).
    ``send_result()`` waits for the underlying send and returns the sent message.
    The future fails with ``TimeoutError`` ("Chirp request timed out: no answer
    from 127.0.0.1:3000 within 5.0 s (TIMEOUT)") when no reply arrived within
    Config.TIMEOUT (send and queue time included); a reply
    arriving after that is dropped and counted as a late reply.
    """

    def __init__(self, auto_release: bool = True) -> None:
        super().__init__()
        self._auto_release = auto_release
        self._send_future: Optional[Future[_M]] = None
        self._timer: Optional[Timer] = None  # the expiry, armed by NodeCore.request()

    def result(self, timeout: Optional[float] = None) -> _M:
        """The reply message (its slot released when ``auto_release``)."""
        msg: _M = super().result(timeout)
        if self._auto_release and msg is not None:
            msg.release_slot()
        return msg

    def send_result(self, timeout: Optional[float] = None) -> _M:
        """Wait for the send of the request; return the sent message or raise."""
        send_future = self._send_future
        if send_future is None:  # request() raised before sending
            raise RuntimeError("the request was not sent")
        return send_future.result(timeout)


def _weak_recv(
    recv: Callable[[Any], Any], owner: object, many: bool = False
) -> Callable[[Any], Any]:
    """Hold ``recv`` weakly if it is a bound method of ``owner`` (avoids a cycle).

    ``recv`` takes one message, or with ``many`` a list of them.
    """
    if not (inspect.ismethod(recv) and recv.__self__ is owner):
        return recv
    ref = weakref.WeakMethod(recv)

    def deliver(arg: Any) -> None:
        func = ref()
        if func is None:  # the node object is gone
            for msg in arg if many else (arg,):
                msg.release_slot()
            return
        func(arg)

    return deliver


class ChirpBase:
    """A chirp node on ``loop`` configured by ``config`` (see the module docstring).

    Raises the mapped exception if the node cannot start (``ValueError`` for a
    bad config, ``OSError`` for a port in use, ...).
    """

    #: The class of received messages.
    _message_class: Type[MessageBase] = Message

    def __init__(
        self,
        loop: Loop,
        config: Config,
        recv: Optional[Callable[[Any], Any]] = None,
        recv_many: Optional[Callable[[List[Any]], Any]] = None,
    ) -> None:
        self._node: Optional[NodeCore] = None
        self._stopped = False
        #: Received messages the interface will never hand to the application
        #: (they arrived while it stops): not acknowledged (see _park()).
        self._parked: List[MessageBase] = []
        self._parked_lock = threading.Lock()
        if not isinstance(loop, Loop):
            raise TypeError("loop must be a libchirp.Loop, not %s" % type(loop).__name__)
        if not isinstance(config, Config):
            raise TypeError("config must be a libchirp.Config, not %s" % type(config).__name__)
        config._check_start()  # the cross-field rules, with texts naming the fields
        self._loop = loop
        self._config = config
        was_sealed = config.sealed
        config._seal()
        deliver = None if recv is None else _weak_recv(recv, self)
        deliver_many = None if recv_many is None else _weak_recv(recv_many, self, many=True)
        node = NodeCore(loop_core(loop), config, deliver, self._message_class, deliver_many)
        self._prepare_node(node)
        try:
            node.start(config)
        except BaseException:
            if not was_sealed:
                config._unseal()
            raise
        self._node = node

    def _prepare_node(self, node: NodeCore) -> None:
        """Hook for interfaces: called with the NodeCore before the node starts."""

    # -- properties ----------------------------------------------------------------------------

    @property
    def loop(self) -> Loop:
        """The Loop the node runs on."""
        return self._loop

    @property
    def config(self) -> Config:
        """The (sealed) Config the node was started with."""
        return self._config

    def identity(self) -> bytes:
        """The node's 16-byte identity (a method, as in libchirp 1.x)."""
        assert self._node is not None
        return self._node.identity

    @property
    def port(self) -> int:
        """The port the node listens on."""
        assert self._node is not None
        return self._node.port

    def _check_process(self) -> None:
        """Raise ``ChirpForkError`` in a process forked after the node's Loop was made."""
        self._loop._check_process()

    @property
    def late_replies(self) -> int:
        """Replies that arrived after their request timed out; they were dropped (released)."""
        assert self._node is not None
        return self._node.late_replies

    # -- statistics ----------------------------------------------------------------------------

    def statistics(self, timeout: Optional[float] = None) -> NodeStats:
        """Return a snapshot of the node's statistics (see :mod:`libchirp.stats`).

        Thread-safe; blocks until the core answered, at most ``timeout``
        seconds (None: 30 s), else raises ``TimeoutError``. Raises
        :class:`~libchirp.errors.ChirpShutdown` (a ``ConnectionError``) once the
        node is stopped. Cannot be called while handling the loop's events (from a
        ``call_soon()`` or future callback); the asyncio interface has an awaitable
        variant.
        """
        self._check_process()
        node = self._node
        assert node is not None
        if node.loop.in_dispatcher():
            raise RuntimeError(
                "statistics() cannot wait while handling the loop's events (as the dispatcher)"
            )
        limit = START_LIMIT if timeout is None else timeout
        fut = node.stats()
        try:
            stats: NodeStats = fut.result(limit)
            return stats
        except _FutureTimeout:
            raise TimeoutError("statistics were not answered within %.1f s" % limit) from None

    def _release_after_handler(self, msg: MessageBase) -> None:
        """AUTO_RELEASE after a handler: release now, or when the message's send is done."""
        release_when_sent(msg)

    # -- sending -------------------------------------------------------------------------------

    def send(self, msg: _M) -> Future[_M]:
        """Send ``msg``; the future resolves to ``msg`` (docs/modes.md) or fails.

        Thread-safe. ``RuntimeError`` if ``msg`` is still being sent.
        """
        if not isinstance(msg, MessageBase):
            raise TypeError("send() needs a libchirp message, not %s" % type(msg).__name__)
        self._check_process()
        assert self._node is not None
        return self._node.send(msg)

    def send_many(self, msgs: Iterable[_M]) -> List[Future[_M]]:
        """Send several messages; returns one future per message, in order.

        Equivalent to ``[send(m) for m in msgs]`` but hands them to the loop
        thread under one lock acquisition, which is what makes long streams of
        small messages fast. Raises (before sending any) ``TypeError`` for a
        non-message and ``RuntimeError`` for a message that is being sent or is
        given twice.
        """
        batch: List[MessageBase] = list(msgs)
        self._check_process()
        assert self._node is not None
        return self._node.send_many(batch)

    def request(self, msg: _M, auto_release: bool = True) -> ChirpFuture[_M]:
        """Send ``msg``; return a :class:`ChirpFuture` for the reply (docs/protocol.md#answering).

        The first received message carrying ``msg.identity`` resolves the future;
        it is not delivered to the interface. Without a reply within
        Config.TIMEOUT the future fails with ``TimeoutError``; a reply arriving
        later is released, counted (``late_replies``) and dropped.
        """
        if not isinstance(msg, MessageBase):
            raise TypeError("request() needs a libchirp message, not %s" % type(msg).__name__)
        self._check_process()
        assert self._node is not None
        req: ChirpFuture[_M] = ChirpFuture(auto_release)
        self._node.request(msg, req)
        return req

    # -- stopping ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the node; idempotent and bounded (docs/interfaces.md#common-to-all-interfaces).

        Waits up to Config.TIMEOUT for delivered messages to be released; if some
        are not, releases them itself and raises ``RuntimeError("Timeout waiting
        for released messages, maybe a message was not released.")`` after the
        node stopped. Messages the interface still queues then (never handed to
        the application) are not acknowledged: a SYNCHRONOUS sender's send
        fails. Queued sends fail with SHUTDOWN; every pending future completes.
        If the loop was asked to stop and this was its last node, the loop's
        threads end here.
        """
        node = self._node
        if node is None:
            return
        self._check_process()
        try:
            node.stop(self._take_undelivered, self._parked_now)
        finally:
            self._stopped = node.done

    def _park(self, msg: MessageBase) -> None:
        """Keep ``msg`` unhandled and unacknowledged: the interface stops and will
        never hand it to the application (a handler interface's message that
        arrived after ``stop()`` began, or whose handler was cancelled). The stop
        does not wait for its release and detaches it unacknowledged, so a
        SYNCHRONOUS sender's send fails instead of succeeding for a message
        nobody handled (docs/reliability.md)."""
        with self._parked_lock:
            self._parked.append(msg)

    def _parked_now(self) -> List[MessageBase]:
        with self._parked_lock:
            return list(self._parked)

    def _take_undelivered(self) -> List[MessageBase]:
        """The interface's received messages never handed to the application,
        taken out (called by the stop once it waited for releases; see
        ``NodeCore.stop``): the parked ones; interfaces that queue messages
        add their queue."""
        with self._parked_lock:
            msgs, self._parked = self._parked, []
        return msgs

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        node = getattr(self, "_node", None)
        if node is None or node.done or node.stop_sent:
            return
        loop = getattr(self, "_loop", None)
        if loop is not None and getattr(loop, "_pid", None) != _process.PID:
            return  # an inherited copy in a forked child: nothing of it runs here
        warnings.warn(
            "libchirp node was not stopped; call stop() or use it as a context manager",
            ResourceWarning,
            stacklevel=2,
        )
        try:
            node.abandon()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        node = self._node
        if node is None:
            return "<%s (not started)>" % type(self).__name__
        state = "stopped" if node.done else ("stopping" if node.closing else "running")
        return "<%s %s port=%d identity=%s>" % (
            type(self).__name__,
            state,
            node.port,
            node.identity.hex(),
        )
