"""libchirp.asyncio embedded in the asyncio loop (docs/architecture.md#embedding-in-asyncio).

The asyncio loop runs the chirp loop itself: it watches the core's backend fd,
arms a timer for the core's next timer and drives the loop on its own thread.
These tests check that, on the default event loop and on uvloop:

* events are handled on the asyncio thread without a thread pass: no
  ``call_soon_threadsafe`` (the event loops count their calls, tests/aiohelp.py),
  no batch handled by the Loop's background thread, no new thread;
* ``embed=False`` and a thread-interface node on the Loop fall back to the
  background thread and the batched hand-over;
* a blocked asyncio loop lapses (the background thread drives) and takes the
  loop back afterwards; threads blocking in ``result()`` do not compete;
* stopping from another thread or with ``astop()`` while a handler awaits fails
  the pending futures clearly and never hangs; a peer process that dies
  mid-request fails the request at once;
* interop with a thread-interface node in another process (tests/nodeproc.py);
* an idle embedded node wakes at most ten times a second;
* the 1.x usage without an explicit asyncio loop.
"""

import asyncio
import queue
import socket
import threading
import time

import pytest
from aiohelp import KINDS, WAIT, AioThread, Inbox, message, uvloop
from conftest import NODE_START_LIMIT, NODE_STOP_LIMIT, call_bounded, make_config
from test_multiprocess import NodeProcess

import libchirp
import libchirp.asyncio
import libchirp.queue

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=KINDS)
def aio(request):
    t = AioThread(request.param)
    yield t
    t.close()


@pytest.fixture
def loops(bounded):
    """``loops()``: a new Loop each call; all stopped at teardown (after their nodes)."""
    made = []

    def make():
        loop = bounded(libchirp.Loop, 10, "Loop()")
        made.append(loop)
        return loop

    yield make
    for loop in made:
        bounded(loop.stop, 20, "Loop.stop()")


@pytest.fixture
def nodes():
    """Every node a test registers here is stopped at teardown, last first."""
    made = []
    yield made
    for node in reversed(made):
        try:
            call_bounded(node.stop, NODE_STOP_LIMIT, "stop() in teardown")
        except RuntimeError as exc:
            assert "releas" in str(exc), repr(exc)


@pytest.fixture
def start(aio, loops, nodes):
    """``start(cls=asyncio.Chirp, loop=None, embed=True, **config)``: a node on ``aio``,
    on a Loop of its own unless ``loop`` is given."""

    def make(cls=libchirp.asyncio.Chirp, loop=None, embed=True, **fields):
        loop = loop or loops()
        node = call_bounded(
            lambda: cls(loop, make_config(**fields), aio.loop, embed=embed),
            NODE_START_LIMIT,
            "asyncio.Chirp()",
        )
        nodes.append(node)
        return node

    return make


@pytest.fixture
def qnode(loops, nodes):
    """``qnode(loop=None, **config)``: a queue node, on a Loop of its own unless given."""

    def make(loop=None, **fields):
        loop = loop or loops()
        node = call_bounded(
            libchirp.queue.Chirp, NODE_START_LIMIT, "queue.Chirp()", loop, make_config(**fields)
        )
        nodes.append(node)
        return node

    return make


@pytest.fixture
def spawn():
    procs = []

    def start(*args):
        p = NodeProcess(*[str(a) for a in args])
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.cleanup()


@pytest.fixture
def silent_port():
    """A port that accepts connections (in the backlog) and never answers the handshake."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv.getsockname()[1]
    srv.close()


class Echo(libchirp.asyncio.Chirp):
    async def handler(self, msg):
        msg.data = b"re: " + msg.data
        await self.send(msg)


def qmessage(port, data=b""):
    return message(port, data, libchirp.queue.Message)


def wait_until(pred, what, limit=WAIT):
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail("%s not reached within %.0f s" % (what, limit), pytrace=False)
        time.sleep(0.01)


def core(node):
    return node.loop._core


# -- no thread pass --------------------------------------------------------------------------------


def test_events_are_handled_on_the_asyncio_thread_without_a_hand_over(aio, start, qnode):
    if aio.kind == "uvloop":
        assert isinstance(aio.loop, uvloop.Loop)
    receiver = start(Inbox, SYNCHRONOUS=False, MAX_SLOTS=16)
    echo = start(Echo)
    requester = start()
    sender = qnode(SYNCHRONOUS=False)
    assert receiver.embedded and echo.embedded and requester.embedded
    total = 300

    def burst():  # a thread-interface peer on a Loop of its own
        futs = [sender.send(qmessage(receiver.port, b"%d" % i)) for i in range(total)]
        for f in futs:
            f.result(WAIT)

    async def scenario():
        threads = threading.active_count()
        before = aio.loop.threadsafe_calls  # aio.run() itself made one
        t = threading.Thread(target=burst)
        t.start()
        for i in range(20):
            msg = message(echo.port, b"q%d" % i)
            reply = await requester.request(msg)
            assert reply.data == b"re: q%d" % i
            assert await requester.send(message(receiver.port, b"s%d" % i)) is not None
        stats = await requester.statistics()
        assert stats["pending_requests"] == 0
        while receiver.inbox.qsize() < total + 20:
            await asyncio.sleep(0.01)
        t.join(WAIT)
        return aio.loop.threadsafe_calls - before, threading.active_count() - threads

    calls, new_threads = aio.run(scenario())
    assert calls == 0, "%d call_soon_threadsafe calls while embedded" % calls
    assert new_threads == 0, "a thread was started (and is still running)"
    for node in (receiver, echo, requester):
        assert node._bridge.wakeups == 0
        assert core(node).bg_batches == 0, "the background thread handled events"
        assert core(node).embed_runs > 0
    assert {where for where in receiver.where} == {(aio.loop, aio.thread.ident)}


def test_blocking_waits_on_an_embedded_loop_do_not_compete(aio, start):
    node = start()
    # Another thread waits for a threaded future: the asyncio loop completes it.
    stats = call_bounded(libchirp.ChirpBase.statistics, 20, "statistics()", node, WAIT)
    assert stats["port"] == node.port

    async def blocking():  # the asyncio thread itself blocks: it drives the loop
        return libchirp.ChirpBase.statistics(node, timeout=WAIT)

    assert aio.run(blocking())["port"] == node.port
    assert core(node).bg_batches == 0


def test_idle_embedded_node_wakes_at_most_ten_times_a_second(aio, start):
    node = start()
    c = core(node)
    time.sleep(0.3)
    runs, wakes, t0 = c.embed_runs, c.bg_wakes, time.monotonic()
    time.sleep(1.0)
    elapsed = time.monotonic() - t0
    runs, wakes = c.embed_runs - runs, c.bg_wakes - wakes
    bound = 10 * elapsed + 2  # (a look may fall on either side of the window)
    assert runs <= bound, "the asyncio loop ran the idle chirp loop %d times" % runs
    assert wakes <= bound, "the background thread woke %d times" % wakes


# -- falling back to threads -----------------------------------------------------------------------


def test_embed_false_uses_the_background_thread(aio, start, qnode):
    node = start(Inbox, embed=False)
    assert not node.embedded
    sender = qnode()
    for i in range(5):
        sender.send(qmessage(node.port, b"%d" % i)).result(WAIT)
    wait_until(lambda: node.inbox.qsize() == 5, "5 messages handled")
    assert core(node).bg_batches >= 1
    assert node._bridge.wakeups >= 1
    assert {where for where in node.where} == {(aio.loop, aio.thread.ident)}


def test_a_thread_node_ends_the_embedding_of_its_loop(aio, start, qnode, loops):
    loop = loops()
    a = start(Inbox, loop=loop)
    host = loop._core.embedder
    assert a.embedded and host is not None
    q = qnode(loop=loop)  # a thread-interface node on the same Loop
    assert not a.embedded and loop._core.embedder is None
    assert host.detached.wait(WAIT) and not host.reading
    q.send(qmessage(a.port, b"to asyncio")).result(WAIT)
    assert aio.run(a.next()).data == b"to asyncio"

    async def send_back():  # (synchronous: done once q got and released it)
        return a.send(message(q.port, b"to the queue"))

    sent = aio.run(send_back())
    assert q.get(timeout=WAIT).data == b"to the queue"

    async def outcome():
        return await asyncio.wait_for(sent, WAIT)

    assert aio.run(outcome()).data == b"to the queue"
    b = start(loop=loop)
    assert not b.embedded, "the Loop stays with its background thread"


def test_a_blocked_asyncio_loop_lapses_and_takes_the_loop_back(aio, start, qnode):
    node = start(Inbox, SYNCHRONOUS=False)
    sender = qnode(SYNCHRONOUS=False)
    c = core(node)
    sender.send(qmessage(node.port, b"warm-up")).result(WAIT)
    assert aio.run(node.next()).data == b"warm-up"
    assert c.bg_batches == 0
    blocked, unblock = threading.Event(), threading.Event()
    aio.loop.call_soon_threadsafe(lambda: (blocked.set(), unblock.wait(WAIT)))
    assert blocked.wait(WAIT)
    try:
        sender.send(qmessage(node.port, b"while blocked")).result(WAIT)
        # Nobody attends to the loop: the background thread takes over.
        wait_until(lambda: c.bg_batches >= 1, "the background thread driving")
    finally:
        unblock.set()
    assert aio.run(node.next()).data == b"while blocked"
    # The hand-over made the asyncio loop drive again, which ended the lapse (the
    # background thread gives the token up when it next looks).
    time.sleep(0.05)
    lapsed_batches = c.bg_batches
    for i in range(20):
        sender.send(qmessage(node.port, b"%d" % i)).result(WAIT)
    for i in range(20):
        assert aio.run(node.next()).data == b"%d" % i
    assert c.bg_batches == lapsed_batches, "the background thread still drives"


# -- stopping --------------------------------------------------------------------------------------


def test_stop_from_another_thread_while_a_handler_awaits(aio, start, qnode, silent_port, bounded):
    outcome = queue.Queue()
    b = start(TIMEOUT=30.0)

    class Waiter(libchirp.asyncio.Chirp):
        async def handler(self, msg):
            try:
                await b.request(message(silent_port, b"never answered"))
            except Exception as exc:
                outcome.put(exc)

    a = start(Waiter)
    qnode(SYNCHRONOUS=False).send(qmessage(a.port, b"go")).result(WAIT)
    wait_until(lambda: b._node.requests, "the handler's request")
    t0 = time.monotonic()
    bounded(b.stop, 20, "stop() of the node a handler awaits")
    exc = outcome.get(timeout=WAIT)
    assert isinstance(exc, libchirp.ChirpShutdown), repr(exc)
    assert time.monotonic() - t0 < 25, "the request did not wait for its 30 s TIMEOUT"
    bounded(a.stop, 20, "stop() after the handler ended")


def test_astop_fails_pending_futures_and_wakes_their_tasks(aio, start, silent_port):
    node = start(TIMEOUT=30.0)

    async def scenario():
        sent = node.send(message(silent_port, b"s"))
        req = node.request(message(silent_port, b"r"))

        async def waiter():
            return await req

        task = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.1)
        await asyncio.wait_for(node.astop(), 25)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(sent, WAIT)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(task, WAIT)

    aio.run(scenario(), limit=40)
    assert core(node).embedder is not None  # the Loop itself still runs, embedded


def test_loop_stop_on_the_asyncio_thread_detaches_before_the_free(aio):
    async def scenario():
        with libchirp.Loop() as loop:
            async with libchirp.asyncio.Chirp(loop, make_config()) as node:
                assert node.embedded
                host = loop._core.embedder
        return loop, host

    loop, host = aio.run(scenario())
    assert host.detached.is_set() and not host.reading
    assert loop._core.c is None, "the C loop was freed"


# -- other processes -------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_peer_dies_mid_request(aio, start, spawn, free_ports):
    port = free_ports()
    peer = spawn("hold", "--port", port, "--timeout", 30)
    peer.ready()
    node = start(SYNCHRONOUS=True, TIMEOUT=30.0)

    async def ask():
        return node.request(message(port, b"question"))

    req = aio.run(ask())
    assert peer.expect("GOT")[1] == "question"
    t0 = time.monotonic()
    peer.kill()

    async def outcome():
        try:
            await asyncio.wait_for(req, 20)
        except asyncio.TimeoutError:
            return None
        except Exception as exc:
            return exc
        return "answered"

    exc = aio.run(outcome())
    assert isinstance(exc, libchirp.ChirpError) and isinstance(exc, ConnectionError), repr(exc)
    assert "closed" in str(exc), str(exc)
    assert time.monotonic() - t0 < 20, "failed at once, not after the request's TIMEOUT"


@pytest.mark.multiprocess
def test_interop_with_a_thread_node_in_another_process(aio, start, spawn, free_ports):
    port = free_ports()
    echo = spawn("echo", "--port", port)
    echo.ready()
    node = start(Inbox, SYNCHRONOUS=True)

    async def ask():
        for i in range(20):
            reply = await node.request(message(port, b"%d" % i))
            assert reply.data == b"%d" % i and reply.port == port
        return (await node.statistics())["totals"]["messages_out"]

    assert aio.run(ask()) == 20
    sender = spawn("send", "--port", free_ports(), "--to-port", node.port, "--count", 20)
    sender.ready()
    assert sender.expect("DONE")[1:] == ["ok=20", "err=0"]
    got = sorted(int(aio.run(node.next()).data) for _ in range(20))
    assert got == list(range(20))
    sender.finish()
    echo.finish()
    assert core(node).bg_batches == 0


# -- libchirp 1.x usage ----------------------------------------------------------------------------


def test_1x_usage_without_an_asyncio_loop_argument(loops, qnode, nodes):
    """``Loop(); loop.run(); Chirp(loop, config)``: the policy's loop, run afterwards."""
    echo = qnode()
    aloop = asyncio.new_event_loop()
    asyncio.set_event_loop(aloop)
    try:
        loop = loops()
        loop.run()  # (a no-op: Loop() runs already)
        node = Echo(loop, make_config())
        nodes.append(node)
        assert node.asyncio_loop is aloop and node.embedded
        sent = node.send(message(echo.port, b"before the loop runs"))

        async def main():
            got = await aloop.run_in_executor(None, echo.get, True, WAIT)  # (and releases)
            assert got.data == b"before the loop runs"
            await asyncio.wait_for(sent, WAIT)
            got.data = b"answer me"
            answered = echo.request(got)  # Echo answers with "re: "
            reply = await aloop.run_in_executor(None, answered.result, WAIT)
            assert reply.data == b"re: answer me"
            inner = libchirp.asyncio.Chirp(
                loops(), make_config()
            )  # in a coroutine: the running loop
            nodes.append(inner)
            assert inner.asyncio_loop is aloop and inner.embedded
            await inner.astop()

        aloop.run_until_complete(asyncio.wait_for(main(), 30))
        aloop.run_until_complete(node.astop())
    finally:
        asyncio.set_event_loop(None)
        aloop.close()
