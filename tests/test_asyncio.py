"""libchirp.asyncio: coroutine handlers, awaitable send/request/release, batched wake-ups.

Every test runs on the default asyncio event loop embedding its chirp Loop
(the default, docs/architecture.md#embedding-in-asyncio), on uvloop embedding
it, and on the default event loop with ``embed=False`` (the Loop's background
thread drives it and hands events over). The asyncio loop runs in its own
thread (``AioThread``, tests/aiohelp.py); tests are coroutines run on it with a
bound, or drive it from the test thread. The thread interface peers (``qnode``)
run on a Loop of their own, so that they do not end the embedding. Shared
behaviour (delivery, back-pressure, errors, request/answer, stop with in-flight
messages) is in test_conformance.py; what only embedding does is in
test_asyncio_embed.py.

Wake-ups are counted by running the node on a subclass of the event loop whose
``call_soon_threadsafe`` counts its calls.
"""

import asyncio
import threading
import time

import pytest
from aiohelp import KINDS, WAIT, AioThread, Inbox, message
from conftest import (
    NODE_START_LIMIT,
    NODE_STOP_LIMIT,
    SANITIZER,
    call_bounded,
    make_config,
    wait_for,
)

import libchirp
import libchirp.asyncio
import libchirp.queue

#: (event loop kind, embed) of every test.
MODES = [(kind, True) for kind in KINDS] + [("default", False)]


@pytest.fixture(
    params=MODES, ids=["%s-%s" % (k, "embedded" if e else "threaded") for k, e in MODES]
)
def aio(request):
    t = AioThread(request.param[0])
    t.embed = request.param[1]
    yield t
    t.close()


config = make_config


@pytest.fixture
def start(loop, aio):
    """``start(cls=asyncio.Chirp, **config)`` from any thread; all stopped at teardown."""
    nodes = []

    def make(cls=libchirp.asyncio.Chirp, **fields):
        node = call_bounded(
            lambda: cls(loop, config(**fields), aio.loop, embed=aio.embed),
            NODE_START_LIMIT,
            "asyncio.Chirp()",
        )
        nodes.append(node)
        assert node.embedded is aio.embed
        return node

    yield make
    for node in reversed(nodes):
        try:
            call_bounded(node.stop, NODE_STOP_LIMIT, "asyncio stop() in teardown")
        except RuntimeError as exc:
            assert "releas" in str(exc), repr(exc)


@pytest.fixture
def peer_loop(bounded):
    """A Loop of its own for the thread-interface peers."""
    loop = bounded(libchirp.Loop, 10, "Loop()")
    yield loop
    bounded(loop.stop, 20, "Loop.stop()")


@pytest.fixture
def qnode(peer_loop):
    """Thread-interface (queue) peers, on ``peer_loop``; stopped at teardown."""
    nodes = []

    def make(**fields):
        node = call_bounded(
            libchirp.queue.Chirp, NODE_START_LIMIT, "queue.Chirp()", peer_loop, config(**fields)
        )
        nodes.append(node)
        return node

    yield make
    for node in reversed(nodes):
        try:
            call_bounded(node.stop, NODE_STOP_LIMIT, "queue stop() in teardown")
        except RuntimeError as exc:
            assert "releas" in str(exc), repr(exc)


# -- basics ----------------------------------------------------------------------------------------


def test_exports():
    for name in ("Chirp", "Config", "Loop", "Message"):
        assert name in libchirp.asyncio.__all__
    assert libchirp.asyncio.Config is libchirp.Config
    assert libchirp.asyncio.Loop is libchirp.Loop
    assert issubclass(libchirp.asyncio.Message, libchirp.MessageBase)


@pytest.mark.timeout(60)
def test_handler_send_and_release_on_the_asyncio_loop(aio, start):
    receiver = start(Inbox, AUTO_RELEASE=False)
    sender = start()

    async def scenario():
        msg = message(receiver.port, b"hello")
        fut = sender.send(msg)
        assert isinstance(fut, asyncio.Future)
        got = await receiver.next()
        await asyncio.sleep(0.3)
        assert not fut.done(), "synchronous send done before the release"
        assert isinstance(got, libchirp.asyncio.Message)
        assert got.data == b"hello" and got.remote_identity == sender.identity()
        rel = got.release_slot()
        assert isinstance(rel, asyncio.Future)
        assert await rel == (got.identity, got.serial)
        assert await fut is msg
        assert await got.release_slot() is None, "second release: nothing to do"
        assert await message(1, b"new").release_slot() is None

    aio.run(scenario())
    assert receiver.where == [(aio.loop, aio.thread.ident)]


@pytest.mark.timeout(60)
def test_calls_off_the_asyncio_loop_are_rejected(aio, start):
    node = start()
    with pytest.raises(RuntimeError, match="asyncio loop"):
        node.send(message(node.port))
    with pytest.raises(RuntimeError, match="asyncio loop"):
        node.request(message(node.port))
    with pytest.raises(TypeError):
        libchirp.asyncio.Chirp(libchirp.Loop(run_loop=False), config(), object())


@pytest.mark.timeout(60)
def test_request_awaitable_and_send_result(aio, start):
    class Echo(libchirp.asyncio.Chirp):
        async def handler(self, msg):
            msg.data = b"re: " + msg.data
            await self.send(msg)

    responder = start(Echo)
    requester = start(Inbox)

    async def scenario():
        msg = message(responder.port, b"q1")
        req = requester.request(msg)
        reply = await req
        assert reply.data == b"re: q1" and reply.identity == msg.identity
        assert not reply.has_slot, "auto_release=True releases the reply"
        assert await req.send_result() is msg
        assert req.done() and req.result() is reply

        msg = message(responder.port, b"q2")
        req = requester.request(msg, auto_release=False)
        reply = await asyncio.wait_for(req, WAIT)  # works with asyncio helpers too
        assert reply.has_slot
        assert await reply.release_slot() == (reply.identity, reply.serial)
        assert await req.send_result() is msg
        assert requester.inbox.empty(), "replies are not delivered to the handler"
        stats = await requester.statistics()
        assert stats["pending_requests"] == 0 and stats["late_replies"] == 0

    aio.run(scenario())


@pytest.mark.timeout(60)
def test_cancelled_request_releases_a_later_reply(aio, start):
    holder = start(Inbox, AUTO_RELEASE=False)
    requester = start(Inbox, TIMEOUT=5.0)

    async def scenario():
        msg = message(holder.port, b"slow")
        req = requester.request(msg)
        question = await holder.next()
        await question.release_slot()  # acknowledge, but answer only later
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(req, 0.3)
        assert req.cancelled()
        answer = holder.send(question)  # synchronous: done once the requester released it
        assert await asyncio.wait_for(answer, WAIT) is question
        await asyncio.sleep(0.2)
        assert requester.inbox.empty()
        stats = await requester.statistics()
        assert stats["held_messages"] == 0 and stats["pending_requests"] == 0

    aio.run(scenario())


@pytest.mark.timeout(60)
def test_handler_may_send_back_without_awaiting(aio, start):
    class Echo(libchirp.asyncio.Chirp):
        async def handler(self, msg):
            self.send(msg)  # not awaited: AUTO_RELEASE waits for the send, then releases

    responder = start(Echo)
    requester = start()

    async def scenario():
        for i in range(5):
            msg = message(responder.port, b"%d" % i)
            req = requester.request(msg)
            assert (await req).data == b"%d" % i
            assert await asyncio.wait_for(req.send_result(), WAIT) is msg

    aio.run(scenario())


@pytest.mark.timeout(60)
def test_default_handler_releases_without_auto_release(aio, start, qnode):
    receiver = start(AUTO_RELEASE=False)
    sender = qnode()
    for i in range(3):
        fut = sender.send(message(receiver.port, b"%d" % i, libchirp.queue.Message))
        assert fut.result(WAIT) is not None


# -- wake-ups --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_burst_needs_far_fewer_wakeups_than_messages(aio, start, qnode):
    total = 600
    done = threading.Event()
    count = [0]

    class Counter(libchirp.asyncio.Chirp):
        async def handler(self, msg):
            count[0] += 1
            if count[0] == total:
                done.set()

    receiver = start(Counter, SYNCHRONOUS=False, MAX_SLOTS=16)
    sender = qnode(SYNCHRONOUS=False)
    before = aio.loop.threadsafe_calls
    futs = [
        sender.send(message(receiver.port, b"%d" % i, libchirp.queue.Message)) for i in range(total)
    ]
    for f in futs:
        assert f.result(WAIT) is not None
    assert done.wait(WAIT), "only %d of %d messages handled" % (count[0], total)
    calls = aio.loop.threadsafe_calls - before
    if aio.embed:
        # The asyncio loop handles the events itself: nothing is handed over.
        assert calls == 0, "%d call_soon_threadsafe calls while embedded" % calls
        assert receiver._bridge.wakeups == 0
        return
    # Typically one wake-up per 16-message slot window (about 40); never one per message.
    # A sanitizer build handles events slower, so batches are smaller.
    limit = total // (2 if SANITIZER else 4)
    assert calls <= limit, "%d call_soon_threadsafe calls for %d messages" % (calls, total)
    assert calls >= 1


@pytest.mark.timeout(60)
def test_hand_offs_coalesce_while_the_asyncio_loop_is_busy(aio, start, qnode):
    count = [0]

    class Counter(libchirp.asyncio.Chirp):
        async def handler(self, msg):
            count[0] += 1

    receiver = start(Counter, SYNCHRONOUS=False, MAX_SLOTS=16)
    sender = qnode(SYNCHRONOUS=False)
    # Warm up the connection, then block the asyncio loop for a while.
    sender.send(message(receiver.port, b"warm-up", libchirp.queue.Message)).result(WAIT)
    deadline = time.monotonic() + WAIT
    while count[0] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    blocked, unblock = threading.Event(), threading.Event()
    aio.loop.call_soon_threadsafe(lambda: (blocked.set(), unblock.wait(WAIT)))
    assert blocked.wait(WAIT)
    before = aio.loop.threadsafe_calls
    try:
        for i in range(10):  # ten separate dispatcher batches
            sender.send(message(receiver.port, b"%d" % i, libchirp.queue.Message)).result(WAIT)
            time.sleep(0.05)
        calls = aio.loop.threadsafe_calls - before
    finally:
        unblock.set()
    assert calls <= 1, "%d wake-ups queued for a busy asyncio loop" % calls
    deadline = time.monotonic() + WAIT
    while count[0] < 11 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert count[0] == 11


@pytest.mark.timeout(30)
def test_end_of_batch_hooks(loop, caplog):
    core = loop._core
    order = []
    done = threading.Event()

    def boom():
        raise ValueError("hook failure")

    def cb():
        for i in range(3):
            core.at_batch_end(lambda i=i: order.append(("hook", i)))
        core.at_batch_end(boom)
        core.at_batch_end(lambda: core.at_batch_end(done.set))  # registered while flushing
        order.append("callback")

    loop.call_soon(cb)
    assert done.wait(WAIT)
    assert order == ["callback", ("hook", 0), ("hook", 1), ("hook", 2)]
    assert any(r.exc_info and r.exc_info[0] is ValueError for r in caplog.records)


@pytest.mark.timeout(60)
def test_nodes_on_one_asyncio_loop_share_the_hand_off(aio, start, loop):
    a, b = start(), start()
    assert a._bridge is b._bridge
    # A second libchirp loop gets its own hand-off to the same asyncio loop.
    with libchirp.Loop() as other:
        c = call_bounded(
            lambda: libchirp.asyncio.Chirp(other, config(), aio.loop, embed=aio.embed),
            NODE_START_LIMIT,
            "asyncio.Chirp()",
        )
        try:
            assert c._bridge is not a._bridge
        finally:
            call_bounded(c.stop, NODE_STOP_LIMIT, "stop()")


# -- stop ------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_stop_on_the_loop_raises_and_astop_works(aio, start, qnode):
    finished = []

    class Slow(libchirp.asyncio.Chirp):
        async def handler(self, msg):
            await asyncio.sleep(0.5)
            finished.append(msg.data)

    node = start(Slow, SYNCHRONOUS=False)
    sender = qnode(SYNCHRONOUS=False)
    sender.send(message(node.port, b"slow", libchirp.queue.Message)).result(WAIT)

    async def scenario():
        deadline = time.monotonic() + WAIT
        while not node._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert node._tasks, "the handler did not start"
        with pytest.raises(RuntimeError, match="astop"):
            node.stop()
        await node.astop()
        assert finished == [b"slow"], "astop() waits for running handlers"
        await node.astop()  # idempotent
        with pytest.raises(ConnectionError):
            await node.statistics()

    aio.run(scenario())
    node.stop()  # idempotent from another thread as well


@pytest.mark.timeout(60)
def test_async_with(aio, loop):
    async def scenario():
        cfg = config()
        async with libchirp.asyncio.Chirp(loop, cfg, embed=aio.embed) as node:
            assert node.asyncio_loop is asyncio.get_running_loop()
            assert node.embedded is aio.embed
            port = node.port
            assert (await node.statistics())["port"] == port
        return node

    node = aio.run(scenario())
    assert "stopped" in repr(node)


@pytest.mark.timeout(60)
def test_stop_completes_every_asyncio_future(aio, start, bounded):
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)  # accepts (in the backlog), never answers the handshake
    try:
        node = start(TIMEOUT=30.0)

        async def send_all():
            futs = [node.send(message(srv.getsockname()[1], b"%d" % i)) for i in range(10)]
            req = node.request(message(srv.getsockname()[1], b"r"))
            return futs, req

        futs, req = aio.run(send_all())
        bounded(node.stop, 20, "stop() with pending asyncio sends")

        async def outcomes():
            excs = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), WAIT)
            try:
                await asyncio.wait_for(req, WAIT)
            except ConnectionError as exc:
                excs.append(exc)
            return excs

        excs = aio.run(outcomes())
        assert len(excs) == 11 and all(isinstance(e, ConnectionError) for e in excs), excs
    finally:
        srv.close()


@pytest.mark.timeout(60)
def test_stop_after_the_asyncio_loop_ended(aio, start, qnode, bounded):
    node = start(Inbox)
    sender = qnode()
    sender.send(message(node.port, b"1", libchirp.queue.Message)).result(WAIT)
    aio.close()
    assert aio.loop.is_closed()
    # The asyncio loop is gone: the message is released, not leaked.
    fut = sender.send(message(node.port, b"2", libchirp.queue.Message))
    assert fut.result(WAIT) is not None
    bounded(node.stop, 20, "stop() after the asyncio loop closed")


@pytest.mark.timeout(60)
def test_asyncio_loop_closed_with_a_wakeup_queued(aio, start, qnode, bounded):
    node = start(Inbox, SYNCHRONOUS=False, MAX_SLOTS=16)

    def held(node):  # the thread-safe, blocking variant (the asyncio one is a coroutine)
        return libchirp.ChirpBase.statistics(node, timeout=WAIT)["held_messages"]

    sender = qnode(SYNCHRONOUS=False)
    blocked, unblock = threading.Event(), threading.Event()

    def block():
        blocked.set()
        unblock.wait(WAIT)
        aio.loop.stop()  # the hand-off queued meanwhile never runs

    aio.loop.call_soon_threadsafe(block)
    assert blocked.wait(WAIT)
    try:
        sender.send(message(node.port, b"1", libchirp.queue.Message)).result(WAIT)
        deadline = time.monotonic() + WAIT
        while held(node) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        unblock.set()
    aio.thread.join(WAIT)
    aio.loop.close()
    # The next hand-off notices the closed loop and releases both messages.
    sender.send(message(node.port, b"2", libchirp.queue.Message)).result(WAIT)
    deadline = time.monotonic() + WAIT
    while held(node) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held(node) == 0
    assert node.inbox.empty(), "no handler can run on a closed asyncio loop"
    bounded(node.stop, 20, "stop() after the asyncio loop closed")


@pytest.mark.timeout(90)
def test_messages_no_handler_ran_are_not_acknowledged(aio, start, qnode):
    """A message that arrives while the node stops gets no handler and no ACK:
    its SYNCHRONOUS send fails instead of succeeding (docs/reliability.md)."""
    gate = threading.Event()
    entered = threading.Event()
    handled = []

    class Slow(libchirp.asyncio.Chirp):
        async def handler(self, msg):
            handled.append(msg.data)
            entered.set()
            while not gate.is_set():
                await asyncio.sleep(0.01)

    node = start(Slow, TIMEOUT=2.0)
    sender = qnode(SYNCHRONOUS=True, TIMEOUT=20.0)
    busy = sender.send(message(node.port, b"busy", libchirp.queue.Message))
    assert entered.wait(WAIT)
    stopper = threading.Thread(target=lambda: pytest.raises(RuntimeError, node.stop))
    stopper.start()
    try:
        wait_for(lambda: node._closing, WAIT, "the stop to begin")
        # From another node: the first sender keeps its next message back until
        # "busy" is acknowledged (one unacknowledged message per peer here).
        late = qnode(SYNCHRONOUS=True, TIMEOUT=20.0).send(
            message(node.port, b"late", libchirp.queue.Message)
        )
        with pytest.raises(libchirp.ChirpError):
            late.result(30)
    finally:
        gate.set()
        stopper.join(30)
    assert not stopper.is_alive()
    assert handled == [b"busy"]
    busy.result(30)  # its handler ran: the stop released it
