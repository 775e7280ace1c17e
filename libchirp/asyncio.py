"""asyncio interface: ``async def handler(msg)``, awaitable send, request and release.

Theory of operation
-------------------
:class:`Chirp` is a :class:`~libchirp.chirp.ChirpBase` bound to one asyncio
event loop (the default policy's loop or uvloop). Its coroutine methods and
futures belong to that loop: ``send()``, ``request()``, ``statistics()`` and
``Message.release_slot()`` must be called on the asyncio loop's thread (or,
as libchirp 1.x allows, before that loop runs) and return asyncio futures (or
awaitables).

Embedding (the default; docs/architecture.md#embedding-in-asyncio): the asyncio
loop runs the chirp loop itself, with libuv's own embedding interface. An
:class:`_Embedder` watches the core's backend fd (``uv_backend_fd()``) with
``add_reader()`` and keeps one ``call_later()`` timer for the core's next
timer (``uv_backend_timeout()``, and the Python request timers); when either
fires, the asyncio thread takes the loop's ownership token, runs one libuv
iteration without blocking (``ch_loop_drive`` with CH_DRIVE_NOWAIT), handles
the events and gives the token up (``LoopCore.embed_run``). So a received
message becomes a handler task, and a send, release or request future is
completed, on the asyncio thread directly: no ``call_soon_threadsafe`` per
batch, no other thread involved. Sends made on the asyncio thread are written
directly (the submitter takes the token, runs, releases), as on threads.

Which loops are embedded: a :class:`~libchirp.Loop` is embedded in an asyncio
loop as long as every node ever started on it is an ``asyncio.Chirp`` of that
asyncio loop with ``embed=True`` (the default). The first node of another kind
(a thread interface node, an ``asyncio.Chirp`` of another asyncio loop or with
``embed=False``) ends the embedding for the rest of the Loop's life; the
Loop's background thread then drives it as for thread interfaces, and events
reach the asyncio loop through the hand-off below. Give such nodes a Loop of
their own to keep the asyncio nodes embedded. ``embed=False`` is for programs
that block their asyncio loop for long stretches.

Who holds the token while the asyncio loop is idle: nobody. The asyncio
loop's selector watches the backend fd; the Loop's background thread does not
block in the I/O poll (it would take events meant for the asyncio loop): it
waits on a condition and looks every 0.1 s (CH_EMBED_WATCH_MS) whether work
was left undone for a whole period (the asyncio loop is blocked, stopped,
not yet running or closed). Only then does it drive the loop as without
embedding, events reaching the asyncio loop through the hand-off, until the
asyncio loop drives again and takes the token back. An idle embedded node
costs the background thread ten wake-ups a second and the asyncio loop
none except the core's own timers; nothing polls.

Threads blocking on an embedded loop: a thread waiting in a threaded
future's ``result()`` (e.g. ``ChirpBase.statistics()``, a node's start or
stop) drives the loop itself only if it is the asyncio loop's own thread or
the asyncio loop is not running; otherwise it just waits, and the asyncio loop
completes the future (or the background thread, once the asyncio loop lapsed).

Hand-off (events handled on any other thread: the background thread of a
Loop that is not embedded or whose asyncio loop lapsed, a thread waiting in a
future's ``result()``; no busy polling, no per-message wake-up): everything
such a thread produces for an asyncio loop (a received message to handle, a
completed send, release or request) is appended to that loop's
:class:`_Bridge`. The first item of a batch registers an end-of-batch hook
with the core (``LoopCore.at_batch_end``); when the batch is handled the hook
flushes the whole list with **one** ``call_soon_threadsafe``. Hand-overs also
coalesce: while a hand-off is scheduled but not yet run by the asyncio loop,
later batches are appended to it instead of scheduling another (at most one
wake-up is outstanding per bridge, like libuv's ``uv_async_t``). One bridge
serves every node of a chirp Loop on the same asyncio loop. Items produced on
the asyncio loop's own thread are carried out at once, never handed over.

Handlers: every received message that does not answer a request runs
``handler(msg)`` in its own task. With ``Config.AUTO_RELEASE`` (default) the slot
is released after the handler returns **or raises** (the exception is logged
with its traceback through the ``libchirp`` logger; libchirp 1.x leaked the
slot, docs/protocol.md#compatibility-with-libchirp-1x). If the handler started
sending the message back without awaiting it, the release happens when that
send completed. The default handler releases the message when AUTO_RELEASE is False.

Stopping: ``await chirp.astop()`` (or ``async with``) on the asyncio loop; it
waits (bounded by Config.TIMEOUT) for running handler tasks and then runs the
blocking node stop on a helper thread, so handlers keep running and the
asyncio loop keeps driving the chirp loop meanwhile. ``stop()`` is for other
threads (it waits for handlers on the running asyncio loop first); on the
asyncio loop's own thread it raises ``RuntimeError`` (it would block the loop
that must run the handlers). Either way the stop is bounded, every pending
send, release and request future fails with ``ChirpShutdown`` (a
``ConnectionError``) and every awaiting task is woken. When the Loop stops,
the embedder stops watching the backend fd (on the asyncio thread, or at once
if the asyncio loop is not running) before the core closes it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Callable, Dict, Generator, Generic, List, Optional, Tuple, Type, TypeVar

from ._core import START_LIMIT, LoopCore, NodeCore, logger
from ._future import LightFuture
from .chirp import ChirpBase
from .chirp import ChirpFuture as _ThreadChirpFuture
from .config import Config
from .loop import Loop, loop_core
from .message import MessageBase, release_when_sent
from .stats import NodeStats

__all__ = ["Chirp", "ChirpFuture", "Config", "Loop", "Message"]


#: A message class (sending returns a future of the message given).
_M = TypeVar("_M", bound=MessageBase)
#: The node's own class, for ``async with Chirp(...) as node``.
_Self = TypeVar("_Self", bound="Chirp")


# -- the hand-off ----------------------------------------------------------------------------------

#: One piece of work for the asyncio loop: ``func(*args)``.
_Item = Tuple[Callable[..., Any], Tuple[Any, ...]]

_running_loop = asyncio.events._get_running_loop
#: When another thread holds the chirp loop's token, the embedder stops watching
#: the backend fd and looks again after this many seconds.
EMBED_RETRY = 0.001
#: The embedder's timer may fire this much later than the core's next timer: timers
#: of libuv count whole milliseconds, and a due timer is run, never skipped.
_TIMER_SLACK = 0.001


class _Embedder:
    """Runs a chirp loop inside one asyncio loop (see the module docstring).

    Made by ``LoopCore._embed_for`` for the first node of a Loop; every method
    except :meth:`attach`, :meth:`detach`, :meth:`wait_detached` and
    :meth:`may_lead` runs on the asyncio loop's thread.
    """

    def __init__(self, core: LoopCore, aloop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self.aloop = aloop
        self.key = aloop
        self.fd = -1
        self.active = True  # False once detach() was called
        self.reading = False  # add_reader() is in effect
        self.detached = threading.Event()
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_when = float("inf")
        self.soon = False  # a run is scheduled with call_soon() (LoopCore.poke() reads it)
        self._retrying = False  # a run is scheduled after EMBED_RETRY (token busy)

    # -- any thread ----------------------------------------------------------------------------

    def on_thread(self) -> bool:
        """True on the asyncio loop's thread while it runs (also inside a blocking call)."""
        return _running_loop() is self.aloop

    def may_lead(self) -> bool:
        """May this thread drive the loop while it waits (LoopCore._lead)? Only the asyncio
        loop's own thread, or any thread while the asyncio loop is not running."""
        return _running_loop() is self.aloop or not self.aloop.is_running()

    def attach(self, fd: int) -> None:
        self.fd = fd
        self._on_loop(self._start)

    def detach(self) -> None:
        self.active = False
        self._on_loop(self._stop)

    def wait_detached(self, limit: float) -> bool:
        """Wait (at most ``limit`` s) until the asyncio loop no longer watches the fd."""
        deadline = time.monotonic() + limit
        while not self.detached.wait(0.05):
            aloop = self.aloop
            if aloop.is_closed() or not aloop.is_running():
                self._stop()  # nothing runs it any more: here (see _on_loop)
            elif time.monotonic() > deadline:
                return False
        return True

    def _on_loop(self, func: Callable[[], None]) -> None:
        """Run ``func`` on the asyncio loop: here if this is its thread or it does not
        run (1.x programs make their nodes before ``run_until_complete()``), else
        scheduled there."""
        aloop = self.aloop
        if aloop.is_closed() or self.on_thread() or not aloop.is_running():
            func()
            return
        try:
            aloop.call_soon_threadsafe(func)
        except RuntimeError:  # closed meanwhile
            func()

    # -- the asyncio loop's thread -------------------------------------------------------------

    def _start(self) -> None:
        if not self.active or self.reading or self.aloop.is_closed():
            return
        self.aloop.add_reader(self.fd, self._ready)
        self.reading = True
        self.run_soon()  # what is pending already

    def _stop(self) -> None:
        aloop = self.aloop
        if not aloop.is_closed():
            if self.reading:
                aloop.remove_reader(self.fd)
            if self._timer is not None:
                self._timer.cancel()
        self.reading = False
        self._timer = None
        self._timer_when = float("inf")
        self.detached.set()

    def _ready(self) -> None:
        # The backend fd is readable.
        if not self.active:
            self._stop()
            return
        self._run()

    def run_soon(self) -> None:
        """Run the loop soon, once (asyncio loop's thread)."""
        if not self.soon:
            self.soon = True
            self.aloop.call_soon(self._soon_run)

    def _soon_run(self) -> None:
        self.soon = False
        if self.active:
            self._run()

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_when = float("inf")
        if self.active:
            self._run()

    def _retry(self) -> None:
        self._retrying = False
        if not self.active:
            return
        if not self.reading and not self.aloop.is_closed():
            self.aloop.add_reader(self.fd, self._ready)
            self.reading = True
        self._run()

    def _run(self) -> None:
        busy, delay = self.core.embed_run()
        if busy:
            # Another thread holds the token (a direct send, a thread waiting
            # while the asyncio loop did not run, the background thread after
            # a lapse): do not spin on the readable fd meanwhile.
            if self.reading:
                self.aloop.remove_reader(self.fd)
                self.reading = False
            if not self._retrying:
                self._retrying = True
                self.aloop.call_later(EMBED_RETRY, self._retry)
            return
        if delay >= 0:
            self.timer_added(delay)

    def timer_added(self, delay: float) -> None:
        """Run the loop after ``delay`` seconds at the latest (earlier timers are kept)."""
        if delay <= 0:
            self.run_soon()
            return
        aloop = self.aloop
        when = aloop.time() + delay + _TIMER_SLACK
        if when >= self._timer_when - _TIMER_SLACK:
            return  # the timer armed fires first (and the run re-arms it)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = aloop.call_at(when, self._timer_fired)
        self._timer_when = when


class _Bridge:
    """Batched hand-off from the thread handling chirp events to one asyncio loop."""

    def __init__(self, core: LoopCore, aloop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self.aloop = aloop
        self._items: List[_Item] = []  # dispatcher thread only
        self._lock = threading.Lock()
        #: Items handed over whose wake-up the asyncio loop has not run yet (under _lock).
        self._scheduled: Optional[List[_Item]] = None
        #: Number of call_soon_threadsafe() calls made (for tests and diagnostics).
        self.wakeups = 0
        #: The nodes using this bridge (told when the asyncio loop is found closed).
        self.nodes: weakref.WeakSet[Chirp] = weakref.WeakSet()

    def post(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func(*args)`` on the asyncio loop: at once on its own thread (an
        embedded loop's events), else handed over, batched on a thread handling events."""
        if _running_loop() is self.aloop:
            try:
                func(*args)
            except Exception:
                logger.exception("libchirp: exception in an asyncio hand-off %r", func)
            return
        if self.core.in_dispatcher():
            if not self._items:
                self.core.at_batch_end(self._flush)
            self._items.append((func, args))
        else:
            self._hand_over([(func, args)])

    def _flush(self) -> None:
        # Dispatcher thread, end of a batch.
        items, self._items = self._items, []
        if items:
            self._hand_over(items)

    def _hand_over(self, items: List[_Item]) -> None:
        with self._lock:
            schedule = self._scheduled is None
            if schedule:
                self._scheduled = items
                self.wakeups += 1
            else:  # a wake-up is on its way: ride along
                self._scheduled.extend(items)  # type: ignore[union-attr]
        if schedule:
            try:
                self.aloop.call_soon_threadsafe(self._run)
                return
            except RuntimeError:  # the asyncio loop is closed
                pass
        elif not self.aloop.is_closed():
            return
        # The asyncio loop is closed (perhaps with our wake-up still queued in it).
        with self._lock:
            items, self._scheduled = self._scheduled or [], None
        self._orphaned(items)

    def _run(self) -> None:
        # asyncio loop thread.
        host = self.core.embedder_for(self.aloop)
        if host is not None:
            # Events came from another thread: the embedded loop lapsed (the asyncio
            # loop was blocked or not running) or a thread drove it while waiting.
            # Drive it here again (a lapse ends: the background thread stands aside).
            host.run_soon()
        with self._lock:
            items, self._scheduled = self._scheduled or [], None
        for func, args in items:
            try:
                func(*args)
            except Exception:
                logger.exception("libchirp: exception in an asyncio hand-off %r", func)

    def _orphaned(self, items: List[_Item]) -> None:
        """The asyncio loop is closed: release received messages, drop the rest."""
        for node in list(self.nodes):
            node._release_abandoned()
        for func, args in items:
            try:
                if func is _start_handler:
                    _release_quietly(args[1])
                elif func is _copy and args[2]:  # a request's reply
                    cf = args[0]
                    if not cf.cancelled() and cf.exception() is None:
                        _release_quietly(cf.result())
            except Exception:  # pragma: no cover - best effort
                logger.exception("libchirp: cannot release an orphaned message")
        logger.warning("libchirp: the asyncio loop is closed; %d hand-off(s) dropped", len(items))

    def wrap(self, cf: Future[Any], reply: bool = False) -> asyncio.Future[Any]:
        """An asyncio future (of this loop) that follows ``cf``; call on the asyncio loop.

        With ``reply``, ``cf`` resolves to a received message: if ``af`` was
        cancelled by then, the message is released instead of leaked.
        """
        af = self.aloop.create_future()
        if cf.done():
            _copy(cf, af, reply)
        elif isinstance(cf, LightFuture):
            cf._when_done(lambda f: self.post(_copy, f, af, reply))  # no condition made
        else:
            cf.add_done_callback(lambda f: self.post(_copy, f, af, reply))
        return af


def _copy(cf: Future[Any], af: asyncio.Future[Any], reply: bool = False) -> None:
    """Copy the outcome of ``cf`` into ``af`` (asyncio loop thread)."""
    if af.done():  # cancelled by the application
        if reply and not cf.cancelled() and cf.exception() is None:
            _release_quietly(cf.result())  # nobody will see this reply
        return
    if cf.cancelled():
        af.cancel()
        return
    exc = cf.exception()
    if exc is not None:
        af.set_exception(exc)
    else:
        af.set_result(cf.result())


def _release_quietly(msg: Any) -> None:
    if isinstance(msg, MessageBase):
        release_when_sent(msg)


def _start_handler(chirp: Chirp, msg: Message) -> None:
    chirp._start_handler(msg)


# -- messages and futures --------------------------------------------------------------------------


class Message(MessageBase):
    """A message whose ``release_slot()`` returns an asyncio future.

    This is the class of messages received by :class:`Chirp`. Call
    ``release_slot()`` on the asyncio loop's thread.
    """

    __slots__ = ()

    def release_slot(self) -> asyncio.Future[Any]:  # type: ignore[override]
        """Release the slot; returns an asyncio future of ``(identity, serial)`` or None.

        The future resolves when the release is done (the owed ACK was handed to
        the connection), or at once to None if the message has no slot.
        """
        cf = MessageBase.release_slot(self)
        node = self._node
        bridge = node.context if node is not None else None
        if isinstance(bridge, _Bridge):
            return bridge.wrap(cf)
        af = asyncio.get_running_loop().create_future()
        _copy(cf, af)
        return af


class ChirpFuture(Generic[_M]):
    """The awaitable of ``Chirp.request()``: ``await`` it for the reply.

    Awaiting returns the reply message and releases its slot when
    ``auto_release`` was True. ``await fut.send_result()`` waits for the send
    of the request and returns the sent message (or raises). Like an asyncio
    future it offers ``done()``, ``cancel()``, ``result()``, ``exception()`` and
    ``add_done_callback()``; cancelling it releases a reply that arrives later.
    """

    def __init__(
        self,
        reply: asyncio.Future[Any],
        send: Future[Any],
        bridge: _Bridge,
        auto_release: bool = True,
    ) -> None:
        self._reply = reply
        self._send = send  # the concurrent future of the send, wrapped on demand
        self._bridge = bridge
        self._auto_release = auto_release

    def __await__(self) -> Generator[Any, None, _M]:
        msg: _M = yield from self._reply.__await__()
        if self._auto_release:
            _release_quietly(msg)
        return msg

    async def send_result(self) -> _M:
        """Wait for the send of the request; return the sent message or raise."""
        msg: _M = await self._bridge.wrap(self._send)
        return msg

    def done(self) -> bool:
        return self._reply.done()

    def cancelled(self) -> bool:
        return self._reply.cancelled()

    def cancel(self) -> bool:
        return self._reply.cancel()

    def result(self) -> _M:
        """The reply (released when ``auto_release``); raises like asyncio.Future.result()."""
        msg: _M = self._reply.result()
        if self._auto_release:
            _release_quietly(msg)
        return msg

    def exception(self) -> Optional[BaseException]:
        return self._reply.exception()

    def add_done_callback(self, fn: Callable[[asyncio.Future[Any]], Any]) -> None:
        self._reply.add_done_callback(fn)

    def __repr__(self) -> str:
        return "<libchirp.asyncio.ChirpFuture %r>" % (self._reply,)


# -- the node --------------------------------------------------------------------------------------


class Chirp(ChirpBase):
    """A chirp node bound to the asyncio loop ``asyncio_loop``; override ``handler()``.

    ``Chirp(loop, config, asyncio_loop=None, *, embed=True)``: ``loop`` is the
    libchirp.Loop that carries the node, ``asyncio_loop`` the asyncio loop
    (default policy or uvloop) that runs ``handler`` and owns every future
    this node returns; without it, the running loop (or the policy's current
    loop, as ``asyncio.get_event_loop()`` outside a coroutine). ``embed``:
    the asyncio loop drives ``loop`` itself while every node on ``loop`` is
    an embedded node of it (see the module docstring); ``embed=False``
    leaves ``loop`` to its background thread (for programs that block their
    asyncio loop) and ends the embedding of ``loop`` for its other nodes too.
    """

    _message_class = Message

    def __init__(
        self,
        loop: Loop,
        config: Config,
        asyncio_loop: Optional[asyncio.AbstractEventLoop] = None,
        *,
        embed: bool = True,
    ) -> None:
        if asyncio_loop is None:
            try:
                asyncio_loop = asyncio.get_running_loop()
            except RuntimeError:
                asyncio_loop = asyncio.get_event_loop_policy().get_event_loop()
        if not isinstance(asyncio_loop, asyncio.AbstractEventLoop):
            raise TypeError(
                "asyncio_loop must be an asyncio event loop, not %s" % type(asyncio_loop).__name__
            )
        if not isinstance(loop, Loop):
            raise TypeError("loop must be a libchirp.Loop, not %s" % type(loop).__name__)
        self._aloop = asyncio_loop
        self._embed = bool(embed)
        self._auto_release = config.AUTO_RELEASE
        self._closing = False
        #: Handler tasks not yet done, with their messages (asyncio loop thread).
        self._tasks: Dict[asyncio.Task[None], MessageBase] = {}
        core = loop_core(loop)
        self._bridge_key = ("asyncio", id(asyncio_loop))
        self._bridge: _Bridge = core.acquire_shared(
            self._bridge_key, lambda: _Bridge(core, asyncio_loop)
        )
        self._bridge_held = True
        self._bridge.nodes.add(self)
        try:
            ChirpBase.__init__(self, loop, config, recv=self._deliver)
        except BaseException:
            self._drop_bridge()
            raise

    def _prepare_node(self, node: NodeCore) -> None:
        node.context = self._bridge
        if self._embed:
            aloop = self._aloop
            node.embed_key = aloop
            node.embed_factory = lambda core: None if aloop.is_closed() else _Embedder(core, aloop)

    def _drop_bridge(self) -> None:
        if self._bridge_held:
            self._bridge_held = False
            self._bridge.nodes.discard(self)
            self._bridge.core.release_shared(self._bridge_key)

    @property
    def asyncio_loop(self) -> asyncio.AbstractEventLoop:
        """The asyncio loop the node is bound to."""
        return self._aloop

    @property
    def embedded(self) -> bool:
        """True while the node's Loop is embedded in its asyncio loop (module docstring)."""
        return self._bridge.core.embedder_for(self._aloop) is not None

    def _check_thread(self, what: str) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is None and not self._aloop.is_running() and not self._aloop.is_closed():
            return  # before the asyncio loop runs (as libchirp 1.x allows): its futures wait for it
        if running is not self._aloop:
            raise RuntimeError(
                "%s() must be called on the thread of the node's asyncio loop" % what
            )

    # -- handling ------------------------------------------------------------------------------

    async def handler(self, msg: Message) -> None:
        """Handle one received message on the asyncio loop. Override this coroutine.

        The default releases the message when AUTO_RELEASE is False (with
        AUTO_RELEASE True the release happens after every handler anyway).
        """
        if not self._auto_release:
            _release_quietly(msg)

    def _deliver(self, msg: Message) -> None:
        # Dispatcher thread.
        self._bridge.post(_start_handler, self, msg)

    def _start_handler(self, msg: Message) -> None:
        # asyncio loop thread.
        if self._closing:
            self._park(msg)  # never handled: not acknowledged either
            return
        task = self._aloop.create_task(self._run_handler(msg))
        self._tasks[task] = msg
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    def _release_abandoned(self) -> None:
        """The asyncio loop is closed: release the messages of handlers that never finished."""
        tasks, self._tasks = self._tasks, {}
        for task, msg in tasks.items():
            if task.done():
                continue
            try:  # the task can never run: silence asyncio's complaints about it
                task._log_destroy_pending = False  # type: ignore[attr-defined]
                task.get_coro().close()
            except Exception:  # pragma: no cover - other Task implementations
                pass
            _release_quietly(msg)

    async def _run_handler(self, msg: Message) -> None:
        try:
            await self.handler(msg)
        except Exception:
            logger.exception(
                "libchirp: exception in %s.handler()%s",
                type(self).__name__,
                "; the message is released" if self._auto_release else "",
            )
        finally:
            if self._auto_release:
                self._release_after_handler(msg)

    # -- sending -------------------------------------------------------------------------------

    def send(self, msg: _M) -> asyncio.Future[_M]:  # type: ignore[override]
        """Send ``msg``; returns an asyncio future resolving to ``msg`` (docs/modes.md).

        Call on the asyncio loop's thread, or before that loop runs (as in
        libchirp 1.x; the future completes once it runs). ``RuntimeError`` if
        ``msg`` is still being sent.
        """
        self._check_thread("send")
        return self._bridge.wrap(ChirpBase.send(self, msg))

    def request(  # type: ignore[override]
        self, msg: _M, auto_release: bool = True
    ) -> ChirpFuture[_M]:
        """Send ``msg`` and return an awaitable :class:`ChirpFuture` for the reply.

        ``await chirp.request(msg)`` returns the reply (its slot released when
        ``auto_release``); ``await fut.send_result()`` the sent message. Fails
        with ``TimeoutError`` after Config.TIMEOUT without a reply; a reply that
        arrives later is released, counted (``late_replies``) and dropped.
        """
        self._check_thread("request")
        if not isinstance(msg, MessageBase):
            raise TypeError("request() needs a libchirp message, not %s" % type(msg).__name__)
        node = self._node
        assert node is not None
        req: _ThreadChirpFuture[_M] = _ThreadChirpFuture(auto_release=False)
        send_cf = node.request(msg, req)
        reply = self._bridge.wrap(req, reply=True)
        reply.add_done_callback(lambda af: req.cancel() if af.cancelled() else None)
        return ChirpFuture(reply, send_cf, self._bridge, auto_release)

    # -- statistics ----------------------------------------------------------------------------

    async def statistics(  # type: ignore[override]
        self, timeout: Optional[float] = None
    ) -> NodeStats:
        """Return a snapshot of the node's statistics (see :mod:`libchirp.stats`).

        Awaitable; at most ``timeout`` seconds (None: 30 s), else ``TimeoutError``.
        """
        self._check_thread("statistics")
        node = self._node
        assert node is not None
        limit = START_LIMIT if timeout is None else timeout
        try:
            return await asyncio.wait_for(self._bridge.wrap(node.stats()), limit)
        except asyncio.TimeoutError:
            raise TimeoutError("statistics were not answered within %.1f s" % limit) from None

    # -- stopping ------------------------------------------------------------------------------

    async def _wait_handlers(self, limit: float) -> None:
        current = asyncio.current_task()
        tasks = [t for t in list(self._tasks) if t is not current]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=limit)
            if pending:
                logger.warning(
                    "libchirp: %d asyncio handler(s) still running after %.1f s; stopping the node",
                    len(pending),
                    limit,
                )

    async def astop(self) -> None:
        """Stop the node from the asyncio loop without blocking it; idempotent.

        Waits (at most Config.TIMEOUT) for running handlers, then stops the
        node like ChirpBase.stop() on a helper thread while the asyncio loop
        keeps running. Raises what ChirpBase.stop() raises. Awaited inside a
        handler, it does not wait for that handler, but the handler's own message
        is still held (AUTO_RELEASE happens when it returns): release it first or
        stop from outside the handlers.
        """
        node = self._node
        if node is None or node.done:
            return
        self._closing = True
        await self._wait_handlers(self._config.TIMEOUT)
        done = self._aloop.create_future()

        def finish(exc: Optional[BaseException]) -> None:
            if not done.done():
                if exc is None:
                    done.set_result(None)
                else:
                    done.set_exception(exc)

        def run() -> None:
            exc: Optional[BaseException] = None
            try:
                self._stop_node()
            except BaseException as e:  # handed to the awaiting coroutine
                exc = e
            try:
                self._aloop.call_soon_threadsafe(finish, exc)
            except RuntimeError:  # pragma: no cover - the asyncio loop was closed meanwhile
                pass

        threading.Thread(target=run, name="libchirp-astop", daemon=True).start()
        await asyncio.shield(done)

    def stop(self) -> None:
        """Stop the node from a thread other than the asyncio loop's; idempotent.

        If the asyncio loop is running, waits (at most Config.TIMEOUT) for
        running handlers first. On the asyncio loop's own thread this raises
        ``RuntimeError``: use ``await chirp.astop()`` there.
        """
        node = self._node
        if node is None or node.done:
            self._drop_bridge()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._aloop.is_closed():
            self._release_abandoned()
        elif running is self._aloop:
            raise RuntimeError(
                "stop() would block the asyncio loop that runs the handlers; "
                "use 'await chirp.astop()' on the asyncio loop"
            )
        self._closing = True
        limit = self._config.TIMEOUT
        if self._aloop.is_running() and not self._aloop.is_closed():
            try:
                cf = asyncio.run_coroutine_threadsafe(self._wait_handlers(limit), self._aloop)
                cf.result(limit + 5.0)
            except Exception:  # the asyncio loop stopped meanwhile; the node stop is bounded
                pass
        self._stop_node()

    def _stop_node(self) -> None:
        try:
            ChirpBase.stop(self)
        finally:
            node = self._node
            if node is not None and node.done:
                self._drop_bridge()

    def __del__(self) -> None:
        try:
            self._drop_bridge()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass
        ChirpBase.__del__(self)

    async def __aenter__(self: _Self) -> _Self:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.astop()
