"""libchirp.pool: handlers on a thread pool, AUTO_RELEASE, stop() (docs/flow-control.md#releasing).

Behaviour shared with the other interfaces (delivery, back-pressure, errors,
request/answer, stop with in-flight messages) is in test_conformance.py; this
file covers what is particular to the pool.
"""

import concurrent.futures
import logging
import threading
import time

import pytest
from conftest import NODE_START_LIMIT, NODE_STOP_LIMIT, call_bounded, make_config, wait_for

import libchirp
import libchirp.pool

WAIT = 10.0


def settle(fut, limit=WAIT, what="future"):
    done, _ = concurrent.futures.wait([fut], timeout=limit)
    assert done, "%s still pending after %.0f s" % (what, limit)
    return fut.exception()


config = make_config


@pytest.fixture
def start(loop):
    """``start(cls, pool_kwargs={}, **config)`` starts a node; all are stopped at teardown."""
    nodes = []

    def make(cls=libchirp.pool.Chirp, pool_kwargs=None, **fields):
        cfg = config(**fields)
        node = call_bounded(cls, NODE_START_LIMIT, "pool.Chirp()", loop, cfg, **(pool_kwargs or {}))
        nodes.append(node)
        return node

    yield make
    for node in reversed(nodes):
        try:
            call_bounded(node.stop, NODE_STOP_LIMIT, "pool stop() in teardown")
        except RuntimeError as exc:
            assert "releas" in str(exc), repr(exc)


def message(node, data=b"", header=b""):
    msg = libchirp.pool.Message()
    msg.address = "127.0.0.1"
    msg.port = node.port
    msg.data = data
    msg.header = header
    return msg


class Recorder(libchirp.pool.Chirp):
    """Records (thread name, message) and sets ``seen`` per message."""

    def __init__(self, *args, **kwargs):
        self.records = []
        self.seen = threading.Semaphore(0)
        super().__init__(*args, **kwargs)

    def handler(self, msg):
        self.records.append((threading.current_thread().name, msg))
        self.seen.release()

    def wait_seen(self, n=1, limit=WAIT):
        for _ in range(n):
            assert self.seen.acquire(timeout=limit), "handler did not run within %.0f s" % limit


def test_exports():
    for name in ("Chirp", "Config", "Loop", "Message"):
        assert name in libchirp.pool.__all__
    assert libchirp.pool.Config is libchirp.Config
    assert libchirp.pool.Loop is libchirp.Loop
    assert issubclass(libchirp.pool.Chirp, libchirp.ChirpBase)


@pytest.mark.timeout(60)
def test_handler_runs_on_the_pool_with_executor_kwargs(start):
    receiver = start(Recorder, pool_kwargs={"max_workers": 2, "thread_name_prefix": "mypool"})
    sender = start()
    for i in range(4):
        assert settle(sender.send(message(receiver, b"%d" % i))) is None
    receiver.wait_seen(4)
    names = {name for name, _ in receiver.records}
    assert all(name.startswith("mypool") for name in names), names
    assert [m.data for _, m in receiver.records] == [b"0", b"1", b"2", b"3"]
    assert all(not m.has_slot for _, m in receiver.records), "AUTO_RELEASE after the handler"


@pytest.mark.timeout(60)
def test_max_workers_bounds_concurrency(start):
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()
    done = threading.Semaphore(0)

    class Slow(libchirp.pool.Chirp):
        def handler(self, msg):
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
            time.sleep(0.1)
            with lock:
                state["now"] -= 1
            done.release()

    receiver = start(Slow, pool_kwargs={"max_workers": 2}, SYNCHRONOUS=False, MAX_SLOTS=8)
    sender = start(SYNCHRONOUS=False)
    futs = [sender.send(message(receiver, b"%d" % i)) for i in range(8)]
    for f in futs:
        assert settle(f) is None
    for _ in range(8):
        assert done.acquire(timeout=WAIT)
    assert state["peak"] == 2, state


@pytest.mark.timeout(60)
def test_auto_release_waits_for_the_handler(start):
    gate = threading.Event()
    entered = threading.Event()

    class Gated(libchirp.pool.Chirp):
        def handler(self, msg):
            entered.set()
            assert gate.wait(WAIT)

    receiver = start(Gated)
    sender = start()
    fut = sender.send(message(receiver, b"x"))
    assert entered.wait(WAIT)
    time.sleep(0.3)
    assert not fut.done(), "released before the handler returned"
    gate.set()
    assert settle(fut) is None


@pytest.mark.timeout(60)
def test_handler_exception_is_logged_and_released(start, caplog):
    class Raising(libchirp.pool.Chirp):
        def handler(self, msg):
            raise KeyError("no such thing")

    receiver = start(Raising)
    sender = start()
    with caplog.at_level(logging.ERROR, logger="libchirp"):
        assert settle(sender.send(message(receiver, b"a"))) is None
        assert settle(sender.send(message(receiver, b"b"))) is None
    recs = [r for r in caplog.records if r.exc_info and r.exc_info[0] is KeyError]
    assert len(recs) == 2
    assert "Raising.handler" in recs[0].getMessage()
    assert recs[0].name == "libchirp"


@pytest.mark.timeout(60)
def test_default_handler_releases_without_auto_release(start):
    receiver = start(AUTO_RELEASE=False)  # the default handler
    sender = start()
    for i in range(3):
        assert settle(sender.send(message(receiver, b"%d" % i))) is None
    assert receiver.statistics()["held_messages"] == 0


@pytest.mark.timeout(60)
def test_without_auto_release_the_handler_releases(start):
    receiver = start(Recorder, AUTO_RELEASE=False)
    sender = start()
    fut = sender.send(message(receiver, b"hold"))
    receiver.wait_seen()
    _, msg = receiver.records[0]
    time.sleep(0.3)
    assert msg.has_slot and not fut.done()
    rel = msg.release_slot()
    assert isinstance(rel, concurrent.futures.Future)
    assert settle(rel) is None and rel.result() == (msg.identity, msg.serial)
    assert settle(fut) is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_echo_without_waiting_releases_after_the_send(start, sync):
    class Echo(libchirp.pool.Chirp):
        def handler(self, msg):
            msg.data = msg.data.upper()
            self.send(msg)  # AUTO_RELEASE waits for this send, then releases

    responder = start(Echo, SYNCHRONOUS=sync)
    requester = start(SYNCHRONOUS=sync)
    for i in range(5):
        msg = message(responder, b"ping %d" % i)
        req = requester.request(msg)
        assert req.result(timeout=WAIT).data == b"PING %d" % i
        assert req.send_result(timeout=WAIT) is msg, "acknowledged after the echo was sent"
    deadline = time.monotonic() + WAIT
    while responder.statistics()["held_messages"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert responder.statistics()["held_messages"] == 0


@pytest.mark.timeout(60)
def test_stop_waits_for_running_handlers(start, bounded):
    finished = []
    entered = threading.Event()

    class Busy(libchirp.pool.Chirp):
        def handler(self, msg):
            entered.set()
            time.sleep(0.5)
            finished.append(msg.data)

    receiver = start(Busy, SYNCHRONOUS=False)
    sender = start(SYNCHRONOUS=False)
    assert settle(sender.send(message(receiver, b"work"))) is None
    assert entered.wait(WAIT)
    bounded(receiver.stop, 20, "pool stop() with a running handler")
    assert finished == [b"work"], "stop() returned before the running handler finished"


@pytest.mark.timeout(60)
def test_stop_is_bounded_when_a_handler_hangs(start, bounded):
    gate = threading.Event()
    entered = threading.Event()

    class Hang(libchirp.pool.Chirp):
        def handler(self, msg):
            entered.set()
            gate.wait(60)

    receiver = start(Hang, TIMEOUT=1.0)
    sender = start(TIMEOUT=10.0)
    fut = sender.send(message(receiver, b"stuck"))
    assert entered.wait(WAIT)
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="releas"):
            bounded(receiver.stop, 20, "pool stop() with a hanging handler")
        assert time.monotonic() - started < 10
        settle(fut, 20, "send to a node that stopped")
    finally:
        gate.set()


@pytest.mark.timeout(60)
def test_messages_after_stop_began_are_not_handled(start, bounded):
    handled = []

    class Rec(libchirp.pool.Chirp):
        def handler(self, msg):
            handled.append(msg.data)

    receiver = start(Rec)
    sender = start()
    assert settle(sender.send(message(receiver, b"before"))) is None
    bounded(receiver.stop, 20, "stop()")
    exc = settle(sender.send(message(receiver, b"after")), 20, "send after stop")
    assert isinstance(exc, ConnectionError), repr(exc)
    assert handled == [b"before"]
    bounded(receiver.stop, 20, "second stop()")  # idempotent


@pytest.mark.timeout(60)
def test_context_manager(loop, bounded):
    def scenario():
        with libchirp.pool.Chirp(loop, config()) as node:
            assert node.port
        return node

    node = bounded(scenario, 30, "pool.Chirp as a context manager")
    assert "stopped" in repr(node)


@pytest.mark.timeout(60)
def test_messages_no_handler_ran_are_not_acknowledged(start, bounded):
    """A SYNCHRONOUS send succeeds only for a message a handler ran: one that
    arrives while the pool stops, and one whose queued handler the stop
    cancels, fail at the sender instead (docs/reliability.md)."""
    gate = threading.Event()
    entered = threading.Event()
    handled = []

    class Slow(libchirp.pool.Chirp):
        def handler(self, msg):
            handled.append(msg.data)
            entered.set()
            gate.wait(30)

    receiver = start(Slow, pool_kwargs={"max_workers": 1}, TIMEOUT=2.0)
    sender = start(TIMEOUT=20.0)
    busy = sender.send(message(receiver, b"busy"))
    assert entered.wait(WAIT)
    # From another node (the first keeps its next message back until "busy" is
    # acknowledged: one unacknowledged message per peer): it reaches the
    # receiver and its handler waits in the pool's queue behind the busy one.
    queued = start(TIMEOUT=20.0).send(message(receiver, b"queued"))
    wait_for(lambda: receiver.statistics()["held_messages"] == 2, WAIT, "both messages held")
    stopper = threading.Thread(target=lambda: pytest.raises(RuntimeError, receiver.stop))
    stopper.start()
    try:
        wait_for(lambda: receiver._closing, WAIT, "the stop to begin")
        late = sender.send(message(receiver, b"late"))  # arrives while the pool stops
        for fut, what in ((queued, "queued"), (late, "late")):
            exc = settle(fut, 20, "send of the %s message" % what)
            assert isinstance(exc, ConnectionError), "%s: %r" % (what, exc)
    finally:
        gate.set()
        stopper.join(20)
    assert not stopper.is_alive()
    assert handled == [b"busy"]
    settle(busy, 20, "send of the busy message")  # released by the stop (it raised for it)
