"""One conformance suite for the three interfaces: queue, pool and asyncio.

Every test runs against each interface through a small adapter that gives the
test thread the same view of all of them:

* ``kit.node(behaviour, **config)`` starts a node of the interface under test.
  ``behaviour`` is what the node does with a received message: ``"record"``
  (hand it to the test; the queue interface is read with ``get()``), ``"echo"``
  (send it back to its sender: an answer) or ``"raise"`` (record it, then raise
  in the handler; pool and asyncio only).
* ``node.get()`` returns the next received message (the test fails if none
  arrives), ``node.nothing(wait)`` asserts that none arrives.
* ``node.send(msg)``, ``node.request(msg)``, ``node.release(msg)`` and
  ``node.statistics()`` go through the interface's own API (for asyncio: on the
  asyncio loop, via ``run_coroutine_threadsafe``) and give the test
  ``concurrent.futures.Future`` objects or plain values.

The asyncio interface runs twice: on the default event loop and on uvloop.
"""

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time

import pytest
from conftest import (
    NODE_START_LIMIT,
    NODE_STOP_LIMIT,
    call_bounded,
    find_free_port,
    make_config,
    wait_for,
)
from rawpeer import SilentServer

import libchirp
import libchirp.asyncio
import libchirp.pool
import libchirp.queue

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in requirements-dev.txt
    uvloop = None

WAIT = 10.0  # generous upper bound for anything that should happen "now"


def settle(fut, limit=WAIT, what="future"):
    """Wait until ``fut`` is done; return its exception or None."""
    done, _ = concurrent.futures.wait([fut], timeout=limit)
    assert done, "%s still pending after %.0f s" % (what, limit)
    return fut.exception()


# -- asyncio loop in a thread ----------------------------------------------------------------------


class AsyncioThread:
    """An asyncio loop (default or uvloop) running forever in a daemon thread."""

    def __init__(self, kind):
        self.loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="aio-" + kind)
        self.thread.daemon = True
        self.thread.start()

    def run(self, coro, limit=WAIT, what="coroutine"):
        """Run ``coro`` on the loop and return its result (bounded)."""
        cf = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return cf.result(limit)
        except concurrent.futures.TimeoutError:
            pytest.fail("%s did not finish within %.0f s" % (what, limit), pytrace=False)

    def submit(self, coro):
        """Run ``coro`` on the loop; return a concurrent future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


# -- adapters --------------------------------------------------------------------------------------


class HandlerFailure(Exception):
    """Raised by the "raise" behaviour."""


class Adapted:
    """A node of one interface, seen from the test thread."""

    def __init__(self, kit, chirp, inbox, cfg):
        self.kit = kit
        self.chirp = chirp
        self.inbox = inbox  # queue.Queue of received messages (None: the node's own get())
        self.cfg = cfg
        self.port = cfg.PORT

    def identity(self):
        return self.chirp.identity()

    def message(self, port, data=b"", header=b""):
        msg = self.kit.message_class()
        msg.address = "127.0.0.1"
        msg.port = port
        msg.data = data
        msg.header = header
        return msg

    def _take(self, timeout):
        if self.inbox is None:
            return self.chirp.get(timeout=timeout)
        return self.inbox.get(timeout=timeout)

    def get(self, limit=WAIT, what="message"):
        try:
            return self._take(limit)
        except queue.Empty:
            pytest.fail("no %s received within %.0f s" % (what, limit), pytrace=False)

    def nothing(self, wait, why):
        try:
            msg = self._take(wait)
        except queue.Empty:
            return
        pytest.fail("%s (got data %r)" % (why, msg.data[:40]), pytrace=False)

    # Thread interfaces: the node's methods as they are.
    def send(self, msg):
        return self.chirp.send(msg)

    def request(self, msg):
        """A concurrent future of the reply (its slot already released)."""
        req = self.chirp.request(msg)
        out = concurrent.futures.Future()

        def done(_):
            try:
                out.set_result(req.result())  # releases the reply
            except BaseException as exc:
                out.set_exception(exc)

        req.add_done_callback(done)
        return out

    def release(self, msg):
        return settle(msg.release_slot(), WAIT, "release_slot()")

    def statistics(self):
        return self.chirp.statistics(timeout=WAIT)

    def stop(self):
        self.chirp.stop()


class AdaptedAsyncio(Adapted):
    """An asyncio node: every call goes through the asyncio loop."""

    def send(self, msg):
        async def go():
            return await self.chirp.send(msg)

        return self.kit.aio.submit(go())

    def request(self, msg):
        async def go():
            return await self.chirp.request(msg)

        return self.kit.aio.submit(go())

    def release(self, msg):
        async def go():
            fut = msg.release_slot()
            assert isinstance(fut, asyncio.Future)
            return await fut

        cf = self.kit.aio.submit(go())
        return settle(cf, WAIT, "await release_slot()")

    def statistics(self):
        return self.kit.aio.run(self.chirp.statistics(timeout=WAIT), what="statistics()")


class Kit:
    """Starts nodes of one interface and stops them all at teardown."""

    def __init__(self, kind, loop):
        self.kind = kind
        self.loop = loop
        self.nodes = []
        self.threads = []
        self.stopping = threading.Event()
        self.aio = None
        if kind.startswith("asyncio"):
            self.aio = AsyncioThread("uvloop" if kind == "asyncio-uvloop" else "default")
            self.message_class = libchirp.asyncio.Message
        elif kind == "pool":
            self.message_class = libchirp.pool.Message
        else:
            self.message_class = libchirp.queue.Message

    def node(self, behaviour="record", **fields):
        assert behaviour in ("record", "echo", "raise")
        cfg = make_config(**fields)
        inbox = queue.Queue()
        if self.kind == "queue":
            assert behaviour != "raise", "the queue interface has no handler"
            chirp = call_bounded(
                libchirp.queue.Chirp, NODE_START_LIMIT, "queue.Chirp()", self.loop, cfg
            )
            adapted = Adapted(self, chirp, None, cfg)
            if behaviour == "echo":
                self._echo_thread(chirp)
        elif self.kind == "pool":
            chirp = call_bounded(
                self._pool_class(behaviour, inbox), NODE_START_LIMIT, "pool.Chirp()", self.loop, cfg
            )
            adapted = Adapted(self, chirp, inbox, cfg)
        else:
            cls = self._asyncio_class(behaviour, inbox)
            chirp = call_bounded(
                cls, NODE_START_LIMIT, "asyncio.Chirp()", self.loop, cfg, self.aio.loop
            )
            adapted = AdaptedAsyncio(self, chirp, inbox, cfg)
        self.nodes.append(adapted)
        return adapted

    @staticmethod
    def _pool_class(behaviour, inbox):
        class Node(libchirp.pool.Chirp):
            def handler(self, msg):
                if behaviour == "echo":
                    self.send(msg)  # not waited for: the release waits for the send
                    return
                inbox.put(msg)
                if behaviour == "raise":
                    raise HandlerFailure("handler failure %r" % msg.data)

        return Node

    @staticmethod
    def _asyncio_class(behaviour, inbox):
        class Node(libchirp.asyncio.Chirp):
            async def handler(self, msg):
                if behaviour == "echo":
                    await self.send(msg)
                    return
                inbox.put(msg)
                if behaviour == "raise":
                    raise HandlerFailure("handler failure %r" % msg.data)

        return Node

    def _echo_thread(self, chirp):
        def run():
            while not self.stopping.is_set():
                try:
                    msg = chirp.get(timeout=0.05)
                except queue.Empty:
                    continue
                except libchirp.ChirpShutdown:
                    return  # stop() woke this get() (teardown)
                try:
                    chirp.send(msg)
                except Exception:
                    pass

        t = threading.Thread(target=run, name="echo", daemon=True)
        t.start()
        self.threads.append(t)

    def close(self):
        self.stopping.set()
        problems = []
        for node in reversed(self.nodes):
            try:
                call_bounded(node.stop, NODE_STOP_LIMIT, "%s stop() in teardown" % self.kind)
            except RuntimeError as exc:
                if "releas" not in str(exc):
                    problems.append(repr(exc))
            except Exception as exc:
                problems.append(repr(exc))
        for t in self.threads:
            t.join(5)
        if self.aio is not None:
            self.aio.close()
        if problems:
            pytest.fail("stop() failed in teardown: %s" % "; ".join(problems), pytrace=False)


KINDS = ["queue", "pool", "asyncio"] + (["asyncio-uvloop"] if uvloop is not None else [])


HANDLER_KINDS = [k for k in KINDS if k != "queue"]  # interfaces that run a handler


@pytest.fixture(params=KINDS)
def kit(request, loop):
    k = Kit(request.param, loop)
    yield k
    k.close()


@pytest.fixture(params=HANDLER_KINDS)
def handler_kit(request, loop):
    k = Kit(request.param, loop)
    yield k
    k.close()


# -- delivery --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_delivery_and_content(kit):
    receiver = kit.node()
    sender = kit.node()
    payloads = [(b"", b""), (b"hdr", b"hello"), (b"h" * 100, bytes(range(256)) * 4096)]
    for header, data in payloads:
        m = sender.message(receiver.port, data, header)
        f = sender.send(m)
        got = receiver.get()  # the queue interface releases here (AUTO_RELEASE)
        assert settle(f, WAIT, "send") is None
        assert f.result() is m
        assert got.identity == m.identity
        assert (got.header, got.data) == (m.header, m.data)
        assert got.address == "127.0.0.1"
        assert got.port == sender.port, "msg.port is the sender's listening port"
        assert got.remote_identity == sender.identity()
        assert isinstance(got, kit.message_class)
    receiver.nothing(0.2, "more messages than were sent")


@pytest.mark.timeout(60)
def test_synchronous_send_waits_for_release(kit):
    receiver = kit.node(AUTO_RELEASE=False)
    sender = kit.node()
    assert sender.cfg.SYNCHRONOUS
    fut = sender.send(sender.message(receiver.port, b"wait for me"))
    got = receiver.get()
    assert got.has_slot
    time.sleep(0.5)
    assert not fut.done(), "a synchronous send completed while the receiver held the message"
    assert receiver.release(got) is None
    assert settle(fut, WAIT, "send after release") is None
    assert not got.has_slot


@pytest.mark.timeout(60)
def test_back_pressure(kit):
    receiver = kit.node(SYNCHRONOUS=False, MAX_SLOTS=2, AUTO_RELEASE=False)
    sender = kit.node(SYNCHRONOUS=False)
    total = 5
    futs = [sender.send(sender.message(receiver.port, b"%d" % i)) for i in range(total)]
    for f in futs:
        assert settle(f, WAIT, "async send") is None
    held = [receiver.get(), receiver.get()]
    receiver.nothing(0.7, "a message was delivered while both slots were held")
    receiver.release(held.pop(0))
    held.append(receiver.get(what="message after one release"))
    receiver.nothing(0.3, "one release freed one slot, but two messages were delivered")
    order = [0] + [int(m.data) for m in held]
    while held:
        receiver.release(held.pop(0))
        if len(order) < total:
            m = receiver.get(what="message %d" % len(order))
            order.append(int(m.data))
            held.append(m)
    assert sorted(order) == list(range(total))
    assert order == list(range(total)), "messages arrive in send order"


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_refused_port_is_a_connection_error(kit):
    sender = kit.node(TIMEOUT=2.0)
    closed = find_free_port()
    exc = settle(sender.send(sender.message(closed, b"nobody")), 20, "send to a closed port")
    assert isinstance(exc, ConnectionError), repr(exc)
    exc = settle(sender.request(sender.message(closed, b"nobody?")), 20, "request")
    assert isinstance(exc, ConnectionError), repr(exc)


# -- request / answer ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_request_and_answer(kit):
    responder = kit.node("echo")
    requester = kit.node()
    for i in range(3):
        msg = requester.message(responder.port, b"question %d" % i, b"q")
        reply = settle_value(requester.request(msg), "reply %d" % i)
        assert reply.identity == msg.identity
        assert (reply.header, reply.data) == (b"q", b"question %d" % i)
        assert reply.remote_identity == responder.identity()
        assert not reply.has_slot, "the reply is released when it is handed out"
    requester.nothing(0.3, "an answer to a request must not also be delivered")
    assert requester.statistics()["pending_requests"] == 0


def settle_value(fut, what):
    exc = settle(fut, WAIT, what)
    assert exc is None, "%s failed: %r" % (what, exc)
    return fut.result()


@pytest.mark.timeout(60)
def test_late_reply_is_dropped_and_counted(kit):
    responder = kit.node(AUTO_RELEASE=False)
    requester = kit.node(TIMEOUT=1.0)
    msg = requester.message(responder.port, b"anyone?")
    req = requester.request(msg)
    question = responder.get()
    responder.release(question)  # acknowledge the request, but do not answer yet
    exc = settle(req, 20, "unanswered request")
    assert isinstance(exc, TimeoutError), repr(exc)
    # Answer now, too late: dropped by the requester, but still acknowledged.
    answer = responder.send(question)
    assert settle(answer, WAIT, "late answer (synchronous)") is None
    requester.nothing(0.5, "a late reply must not be delivered")
    stats = requester.statistics()
    assert stats["late_replies"] == 1
    assert requester.chirp.late_replies == 1
    assert stats["held_messages"] == 0, "the late reply was released"


# -- handlers --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_handler_exception_still_releases(handler_kit, caplog):
    kit = handler_kit
    receiver = kit.node("raise")
    sender = kit.node()
    with caplog.at_level(logging.ERROR, logger="libchirp"):
        for i in range(3):
            fut = sender.send(sender.message(receiver.port, b"%d" % i))
            assert receiver.get().data == b"%d" % i
            assert settle(fut, WAIT, "synchronous send to a raising handler") is None
    failures = [r for r in caplog.records if r.exc_info and r.exc_info[0] is HandlerFailure]
    assert len(failures) == 3, "each handler exception is logged with its traceback"
    assert receiver.statistics()["held_messages"] == 0


# -- stop ------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_stop_with_in_flight_messages(kit, bounded):
    with SilentServer(handshake=True) as srv:
        sender = kit.node(TIMEOUT=30.0)
        futs = [sender.send(sender.message(srv.port, b"%d" % i)) for i in range(20)]
        req = sender.request(sender.message(srv.port, b"request"))
        wait_for(lambda: srv.received > 0, WAIT, "first frame written")
        start = time.monotonic()
        bounded(sender.stop, 20, "stop() with 21 messages in flight")
        assert time.monotonic() - start < 20
        excs = [settle(f, WAIT, "send %d after stop()" % i) for i, f in enumerate(futs)]
        assert all(isinstance(e, ConnectionError) for e in excs), [repr(e) for e in excs]
        assert isinstance(settle(req, WAIT, "request after stop()"), ConnectionError)
    bounded(sender.stop, 20, "second stop()")


@pytest.mark.timeout(90)
def test_stop_receiver_holding_messages(kit, bounded):
    receiver = kit.node(AUTO_RELEASE=False, TIMEOUT=1.0, SYNCHRONOUS=False, MAX_SLOTS=4)
    sender = kit.node(TIMEOUT=10.0)
    futs = [sender.send(sender.message(receiver.port, b"%d" % i)) for i in range(2)]
    held = [receiver.get()]
    try:
        bounded(receiver.stop, 20, "stop() while holding a message")
    except RuntimeError as exc:  # documented complaint about unreleased messages
        assert "releas" in str(exc), repr(exc)
    for i, f in enumerate(futs):
        settle(f, 20, "synchronous send %d to a receiver that stopped" % i)
    assert not held[0].has_slot
