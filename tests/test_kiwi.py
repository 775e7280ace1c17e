"""libchirp.kiwi on one member and between members of this process (docs/kiwi.md).

The behaviours of the kiwipy.Communicator interface, each checked on one
communicator (everything goes through the same message handling as between
processes, without the network) and, where it matters, between two members
of one mesh in this process: close and the context manager, RPC with answers,
exceptions, nested futures, unroutable calls and add/remove/re-add; tasks with
results, exceptions, futures, no_reply, rejection and subscriber removal;
broadcasts with every filter form; named queues with pull-style consumption;
the codec; the outbox; the asyncio flavour. Processes, crashes, speed and TLS
are in test_kiwi_mesh.py and test_kiwi_tls.py.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

import kiwipy
import pytest

from libchirp.kiwi import (
    AsyncChirpCommunicator,
    ChirpCommunicator,
    Outbox,
    decode,
    encode,
)

pytestmark = pytest.mark.timeout(30)

WAIT = 5.0


@pytest.fixture
def comm():
    c = ChirpCommunicator(0)
    yield c
    c.close()


@pytest.fixture
def pair():
    """Two members of one mesh; the second knows the first."""
    a = ChirpCommunicator(0, heartbeat=0.05, dead_after=1.0)
    b = ChirpCommunicator(0, [("127.0.0.1", a.port)], heartbeat=0.05, dead_after=1.0)
    wait_until(lambda: len(a.members()) == 1 and len(b.members()) == 1, "two members")
    yield a, b
    b.close()
    a.close()


def wait_until(pred, what, limit=WAIT):
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail("%s not reached within %s s" % (what, limit))
        time.sleep(0.01)


# -- lifecycle -----------------------------------------------------------------------------


def test_close_refuses_everything(comm):
    comm.close()
    assert comm.is_closed()
    for call in (
        lambda: comm.add_rpc_subscriber(None, "rpc"),
        lambda: comm.rpc_send("rpc", None),
        lambda: comm.add_task_subscriber(None),
        lambda: comm.task_send(None),
        lambda: comm.add_broadcast_subscriber(None),
        lambda: comm.broadcast_send(None),
        lambda: comm.task_queue("q"),
    ):
        with pytest.raises(kiwipy.CommunicatorClosed):
            call()
    comm.close()  # twice is fine


def test_context_manager():
    with ChirpCommunicator(0) as c:
        assert not c.is_closed()
        assert c.port > 0
    assert c.is_closed()


def test_close_fails_outstanding_futures(comm):
    future = comm.task_send("nobody takes this")
    comm.close()
    with pytest.raises(kiwipy.CommunicatorClosed):
        future.result(WAIT)


# -- RPC -----------------------------------------------------------------------------------


def test_rpc_send_receive(comm):
    got = []
    comm.add_rpc_subscriber(lambda _c, msg: got.append(msg) or "answer", "rpc")
    assert comm.rpc_send("rpc", {"q": (1, 2), "b": b"\x00"}).result(WAIT) == "answer"
    assert got == [{"q": (1, 2), "b": b"\x00"}]


def test_rpc_add_remove_readd(comm):
    ident = comm.add_rpc_subscriber(lambda _c, _m: True)
    assert comm.rpc_send(ident, None).result(WAIT) is True
    with pytest.raises(kiwipy.DuplicateSubscriberIdentifier):
        comm.add_rpc_subscriber(lambda _c, _m: 1, ident)
    comm.remove_rpc_subscriber(ident)
    with pytest.raises(kiwipy.UnroutableError):
        comm.rpc_send(ident, None).result(WAIT)
    with pytest.raises(ValueError):
        comm.remove_rpc_subscriber(ident)
    comm.add_rpc_subscriber(lambda _c, _m: True, ident)
    assert comm.rpc_send(ident, None).result(WAIT) is True


def test_local_rpc_answers_promptly(comm):
    """Answers of this member's own subscribers do not wait for the loop's events."""
    comm.add_rpc_subscriber(lambda _c, msg: msg, "self")
    t0 = time.monotonic()
    for i in range(20):
        assert comm.rpc_send("self", i).result(WAIT) == i
    assert time.monotonic() - t0 < 2.0  # a waiter asleep in the loop's poll took 0.2 s each


def test_rpc_nested_futures(comm):
    def subscriber(_c, _m):
        f1, f2 = kiwipy.Future(), kiwipy.Future()
        f1.set_result(f2)
        f2.set_result("bottom")
        return f1

    comm.add_rpc_subscriber(subscriber, "nested")
    f1 = comm.rpc_send("nested", None).result(WAIT)
    assert isinstance(f1, kiwipy.Future)
    f2 = f1.result(WAIT)
    assert isinstance(f2, kiwipy.Future)
    assert f2.result(WAIT) == "bottom"


def test_rpc_exception_and_unroutable(comm):
    def boom(_c, _m):
        raise RuntimeError("I cannae do it")

    comm.add_rpc_subscriber(boom, "boom")
    with pytest.raises(kiwipy.RemoteException, match="I cannae do it"):
        comm.rpc_send("boom", "x").result(WAIT)
    with pytest.raises(kiwipy.UnroutableError):
        comm.rpc_send("noone", "nothing").result(1.0)


def test_rpc_between_members(pair):
    a, b = pair
    a.add_rpc_subscriber(lambda _c, msg: ("a", msg), "on-a")
    wait_until(lambda: "on-a" in b.info() or b._rpc_route.get("on-a"), "route to on-a")
    assert b.rpc_send("on-a", 7).result(WAIT) == ("a", 7)
    a.remove_rpc_subscriber("on-a")
    wait_until(lambda: "on-a" not in b._rpc_route, "route removed")
    with pytest.raises(kiwipy.UnroutableError):
        b.rpc_send("on-a", 7).result(WAIT)


def test_slow_rpc_subscriber_keeps_members_alive(pair):
    """A subscriber slower than dead_after (the receive thread runs it) does not
    stop heartbeats and membership, nor calls meanwhile (docs/kiwi.md#how-it-works)."""
    a, b = pair  # heartbeat 0.05 s, dead_after 1.0 s
    ran_on = []

    def slow(_c, msg):
        ran_on.append(threading.current_thread().name)
        time.sleep(msg)
        return "slept"

    b.add_rpc_subscriber(slow, "slow")
    b.add_rpc_subscriber(lambda _c, msg: msg, "fast")
    wait_until(lambda: "slow" in a._rpc_route and "fast" in a._rpc_route, "routes")
    assert a.rpc_send("fast", 1).result(WAIT) == 1
    time.sleep(0.1)  # b's receive thread is idle again, driving the loop
    slow_future = a.rpc_send("slow", 2.0)
    wait_until(lambda: ran_on, "the slow call started")
    started = time.monotonic()
    while time.monotonic() - started < 1.8:
        assert b.id in a.members() and a.id in b.members()
        assert a.rpc_send("fast", 2).result(WAIT) == 2  # b still answers
        time.sleep(0.05)
    assert slow_future.result(WAIT) == "slept"
    assert ran_on == ["kiwi-recv"]
    assert b.id in a.members() and a.id in b.members()


def test_rpc_waiter_handles_its_answer(pair):
    """The caller waiting in result() receives the answer itself (no thread hop)."""
    a, b = pair
    b.add_rpc_subscriber(lambda _c, msg: msg, "echo")
    wait_until(lambda: "echo" in a._rpc_route, "route")
    me = threading.current_thread()
    threads = []
    for i in range(20):
        future = a.rpc_send("echo", i)
        future.add_done_callback(lambda _f: threads.append(threading.current_thread()))
        assert future.result(WAIT) == i
        assert future.exception(WAIT) is None
    assert me in threads  # at least mostly; another thread may be faster on a busy machine


def test_many_rpc_identifiers_travel(pair):
    """Thousands of identifiers (one per running process, as workflow engines have)."""
    a, b = pair
    for i in range(2000):
        a.add_rpc_subscriber(lambda _c, _m, i=i: i, "process-%d-with-a-long-identifier" % i)
    assert b.wait_for_rpc("process-1999-with-a-long-identifier", timeout=WAIT)
    assert b.rpc_send("process-1234-with-a-long-identifier", None).result(WAIT) == 1234


# -- tasks ---------------------------------------------------------------------------------


def test_task_send_result_exception_future(comm):
    later = kiwipy.Future()
    seen = []

    def on_task(_c, task):
        seen.append(task)
        if task == "fail":
            raise RuntimeError("no way")
        if task == "later":
            return later
        return 42

    comm.add_task_subscriber(on_task)
    assert comm.task_send("now").result(WAIT) == 42
    with pytest.raises(kiwipy.RemoteException, match="no way"):
        comm.task_send("fail").result(WAIT)
    pending = comm.task_send("later").result(WAIT)
    assert isinstance(pending, kiwipy.Future) and not pending.done()
    later.set_result(43)
    assert pending.result(WAIT) == 43
    assert seen == ["now", "fail", "later"]


def test_task_no_reply(comm):
    done = kiwipy.Future()
    comm.add_task_subscriber(lambda _c, task: done.set_result(task))
    assert comm.task_send("fire and forget", no_reply=True) is None
    assert done.result(WAIT) == "fire and forget"


def test_task_subscriber_removed_and_unknown(comm):
    ident = comm.add_task_subscriber(lambda *_: None)
    comm.remove_task_subscriber(ident)
    with pytest.raises(kiwipy.TimeoutError):
        comm.task_send("task").result(0.05)
    with pytest.raises(ValueError):
        comm.remove_task_subscriber("unknown")


def test_rejected_task_goes_to_another_member(pair):
    a, b = pair

    def reject(_c, _task):
        raise kiwipy.TaskRejected()

    a.add_task_subscriber(reject)
    b.add_task_subscriber(lambda _c, task: ("b", task))
    wait_until(lambda: len(a._task_route.get("kiwipy.tasks", {})) == 2, "two workers known")
    for i in range(10):
        assert a.task_send(i).result(WAIT) == ("b", i)


def test_tasks_between_members_and_pending_queue(pair):
    a, b = pair
    futures = [a.task_send(i) for i in range(20)]  # nobody subscribed yet: they wait
    time.sleep(0.1)
    assert not any(f.done() for f in futures)
    b.add_task_subscriber(lambda _c, task: task * 2)
    assert [f.result(WAIT) for f in futures] == [i * 2 for i in range(20)]


def test_named_queue_pull(pair):
    a, b = pair
    queue_a = a.task_queue("jobs")
    queue_b = b.task_queue("jobs")
    result = queue_b.task_send("pull me")
    with queue_a.next_task(timeout=WAIT) as task:
        assert task.body == "pull me" and not task.no_reply
        with task.processing() as outcome:
            outcome.set_result("pulled")
    assert result.result(WAIT) == "pulled"
    with pytest.raises(kiwipy.QueueEmpty):
        with queue_a.next_task(timeout=0.2):
            pass
    # a task taken but not processed goes back; iteration sees it again
    second = queue_b.task_send("again")
    with queue_a.next_task(timeout=WAIT) as task:
        assert task.body == "again"
    for task in queue_a:
        assert task.body == "again"
        task.process().set_result("second time")
        break
    assert second.result(WAIT) == "second time"


def test_named_queue_push_subscriber(comm):
    jobs = comm.task_queue("jobs", prefetch_count=4)
    ident = jobs.add_task_subscriber(lambda _c, task: task + 1)
    assert [jobs.task_send(i).result(WAIT) for i in range(5)] == [1, 2, 3, 4, 5]
    jobs.remove_task_subscriber(ident)
    with pytest.raises(kiwipy.TimeoutError):
        comm.task_send(1).result(0.05)  # the default queue is a different queue


# -- broadcasts ----------------------------------------------------------------------------

SENDERS = ["bob.jones", "bob.smith", "martin.uhrin", "alice.jones"]
SUBJECTS = ["purchase.car", "purchase.piano", "sell.guitar", "sell.house"]


def collect(comm, subscriber_filter, expected):
    got = []
    done = threading.Event()

    def on(_c, body, sender=None, subject=None, correlation_id=None):
        got.append((sender, subject))
        if len(got) == expected:
            done.set()

    if subscriber_filter is None:
        comm.add_broadcast_subscriber(on)
    else:
        comm.add_broadcast_subscriber(subscriber_filter(on))
    return got, done


def test_broadcast_full_message(comm):
    got = []
    done = threading.Event()

    def on(_c, body, sender, subject, correlation_id):
        got.append((body, sender, subject, correlation_id))
        done.set()

    comm.add_broadcast_subscriber(on)
    assert comm.broadcast_send({"x": 1}, "me", "subj", "corr") is True
    assert done.wait(WAIT)
    assert got == [({"x": 1}, "me", "subj", "corr")]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda on: kiwipy.BroadcastFilter(on, subject="purchase.*"), 8),
        (lambda on: kiwipy.BroadcastFilter(on, sender="*.jones"), 8),
        (lambda on: kiwipy.BroadcastFilter(on, sender="alice.jones"), 4),
        (lambda on: kiwipy.BroadcastFilter(on, sender="*.jones", subject="purchase.*"), 4),
    ],
)
def test_broadcast_filters(pair, make, expected):
    a, b = pair
    got, done = collect(b, make, expected)
    wait_until(lambda: a._bcast_route, "filter known to the sender")
    for sender in SENDERS:
        for subject in SUBJECTS:
            a.broadcast_send(None, sender=sender, subject=subject)
    assert done.wait(WAIT)
    time.sleep(0.1)
    assert len(got) == expected


def test_broadcast_regex_and_added_filters(pair):
    a, b = pair
    regex_got, regex_done = collect(
        b, lambda on: _filtered(on, re.compile(".*.jones"), re.compile("purchase.*")), 4
    )
    wait_until(lambda: a._bcast_route, "filter known to the sender")
    for sender in SENDERS:
        for subject in SUBJECTS:
            a.broadcast_send(None, sender=sender, subject=subject)
    assert regex_done.wait(WAIT)
    assert set(regex_got) == {(s, j) for s in ("bob.jones", "alice.jones") for j in SUBJECTS[:2]}


def _filtered(on, sender, subject):
    flt = kiwipy.BroadcastFilter(on)
    flt.add_sender_filter(sender)
    flt.add_subject_filter(subject)
    return flt


def test_broadcast_filter_order_and_remove(comm):
    subjects = []
    done = threading.Event()

    def on(_c, _body, _sender=None, subject=None, _correlation_id=None):
        subjects.append(subject)
        if len(subjects) == 2:
            done.set()

    ident = comm.add_broadcast_subscriber(kiwipy.BroadcastFilter(on, subject="purchase.*"))
    for subject in SUBJECTS:
        comm.broadcast_send(None, subject=subject)
    assert done.wait(WAIT)
    assert subjects == ["purchase.car", "purchase.piano"]
    comm.remove_broadcast_subscriber(ident)
    comm.broadcast_send(None, subject="purchase.boat")
    time.sleep(0.1)
    assert subjects == ["purchase.car", "purchase.piano"]
    assert comm.broadcast_send("into the ether") is True


def test_unwanted_broadcasts_stay_home(pair):
    a, b = pair
    b.add_broadcast_subscriber(kiwipy.BroadcastFilter(lambda *_: None, subject="wanted"))
    wait_until(lambda: a._bcast_route, "filter known to the sender")
    before = a._node.statistics()["totals"]["messages_out"]
    for _ in range(50):
        a.broadcast_send(None, subject="unwanted")
    assert a._node.statistics()["totals"]["messages_out"] - before < 10  # heartbeats only


# -- membership in one process -------------------------------------------------------------


def test_leaving_member_is_forgotten_and_its_tasks_move(pair):
    a, b = pair
    c = ChirpCommunicator(0, [("127.0.0.1", b.port)], heartbeat=0.05, dead_after=1.0)
    try:
        wait_until(lambda: len(a.members()) == 2, "a learns of c through b")
        stuck = threading.Event()
        c.add_task_subscriber(lambda _c, _t: stuck.wait(WAIT) and None)
        wait_until(lambda: len(a._task_route.get("kiwipy.tasks", {})) == 1, "c's capacity")
        future = a.task_send("moves")
        time.sleep(0.1)
        b.add_task_subscriber(lambda _c, task: ("b", task))
    finally:
        c.close()  # goodbye: the task goes to b
        stuck.set()
    assert future.result(WAIT) == ("b", "moves")
    assert c.id not in a.members()


# -- codec and outbox ----------------------------------------------------------------------


def test_codec_round_trip_and_refusal():
    value = {"s": "x", "i": 1, "f": 1.5, "n": None, "t": (1, [2, b"\xff"]), 3: {1, 2}, (1, 2): "k"}
    assert decode(encode(value)) == value
    with pytest.raises(TypeError, match="cannot encode object"):
        encode(object())
    # a tag in the data is data, not an instruction
    tricky = {"__chirp__": "b", "v": "AAAA"}
    assert decode(encode(tricky)) == tricky


def pending_bodies(path):
    box = Outbox(path)
    try:
        return sorted(decode(row[2]) for row in box.pending())
    finally:
        box.close()


def test_outbox_keeps_undone_tasks(tmp_path):
    path = str(tmp_path / "outbox.sqlite")
    first = ChirpCommunicator(0, outbox=path)
    first.task_send("kept 1")
    first.task_send("kept 2", no_reply=True)
    assert pending_bodies(path) == ["kept 1", "kept 2"]
    first.add_task_subscriber(lambda _c, task: task)
    assert first.task_send("done").result(WAIT) == "done"
    wait_until(lambda: pending_bodies(path) == [], "outbox empty after the subscriber came")
    first.task_queue("nobody").task_send("kept 3")
    first.close()
    assert pending_bodies(path) == ["kept 3"]
    second = ChirpCommunicator(0, outbox=path)
    try:
        (recovered,) = second.recovered_tasks()
        second.task_queue("nobody").add_task_subscriber(lambda _c, task: task.upper())
        assert recovered.result(WAIT) == "KEPT 3"
        wait_until(lambda: pending_bodies(path) == [], "outbox empty")
    finally:
        second.close()


# -- asyncio -------------------------------------------------------------------------------


def test_asyncio_flavour():
    async def main():
        async with AsyncChirpCommunicator(0) as comm:

            async def double(_c, msg):
                await asyncio.sleep(0)
                return msg * 2

            await comm.add_rpc_subscriber(double, "double")
            assert await (await comm.rpc_send("double", 21)) == 42
            await comm.add_task_subscriber(lambda _c, task: task + 1)
            assert await (await comm.task_send(1)) == 2
            heard = asyncio.get_running_loop().create_future()

            async def on(_c, body, sender=None, subject=None, correlation_id=None):
                heard.set_result((body, subject))

            await comm.add_broadcast_subscriber(kiwipy.BroadcastFilter(on, subject="a.*"))
            await comm.broadcast_send("no", subject="b.x")
            await comm.broadcast_send("yes", subject="a.x")
            assert await asyncio.wait_for(heard, WAIT) == ("yes", "a.x")
        assert comm.is_closed()

    asyncio.run(main())
