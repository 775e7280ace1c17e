"""Batch forms and the cheap paths behind them.

``send_many()`` hands many sends over under one lock, ``get_many()`` takes all
queued messages and releases them in one hand-over (AUTO_RELEASE releases are
submitted without a completion event), send futures are LightFutures, new
identities come from a pool that a forked child does not share, and received
messages carry their fields in the RECV event. Small messages of a batch are
copied into one ch_node_send_batch() call, large ones go singly, in order; a
thread waiting in get() is not woken for mere completions, which still reach
their futures.
"""

import asyncio
import concurrent.futures
import os
import queue
import threading

import pytest
from conftest import NodeFactory

import libchirp
import libchirp.queue
from libchirp import _core
from libchirp._future import LightFuture


def _messages(make_node, node, count, header=b"b"):
    return [make_node.message(node, data=b"%d" % i, header=header) for i in range(count)]


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_send_many_then_get_many_delivers_everything_in_order(make_node, sync):
    fields = dict(SYNCHRONOUS=sync, MAX_SLOTS=16)
    a = make_node(**fields)
    b = make_node(**fields)
    msgs = _messages(make_node, b, 500)
    futs = a.send_many(msgs)
    assert len(futs) == 500
    assert all(isinstance(f, concurrent.futures.Future) for f in futs)
    got = []
    while len(got) < 500:
        batch = b.get_many(max_count=64, timeout=10.0)
        assert 1 <= len(batch) <= 64
        assert not any(m.has_slot for m in batch)  # AUTO_RELEASE released them
        got.extend(batch)
    assert [m.data for m in got] == [b"%d" % i for i in range(500)]
    assert [m.identity for m in got] == [m.identity for m in msgs]
    for msg, fut in zip(msgs, futs):
        assert fut.result(10.0) is msg
    stats = b.statistics()
    assert stats["held_messages"] == 0


def test_get_many_without_auto_release_keeps_the_slots(make_node):
    a = make_node(SYNCHRONOUS=True, MAX_SLOTS=4)
    b = make_node(SYNCHRONOUS=True, MAX_SLOTS=4, AUTO_RELEASE=False)
    futs = a.send_many(_messages(make_node, b, 4))
    got = []
    while len(got) < 4:
        got.extend(b.get_many(timeout=10.0))
    assert all(m.has_slot for m in got)
    # Synchronous: nothing is acknowledged before the application releases.
    assert not any(f.done() for f in futs)
    releases = [m.release_slot() for m in got]
    for r, m in zip(releases, got):
        assert r.result(10.0) == (m.identity, m.serial)
    for f in futs:
        f.result(10.0)


def test_get_many_empty_and_bad_arguments(make_node):
    b = make_node()
    with pytest.raises(queue.Empty):
        b.get_many(block=False)
    with pytest.raises(queue.Empty):
        b.get_many(timeout=0.05)
    with pytest.raises(ValueError, match="max_count"):
        b.get_many(max_count=0)
    with pytest.raises(ValueError, match="timeout"):
        b.get_many(timeout=-1)


def test_send_many_refuses_bad_batches_before_sending_anything(make_node):
    a = make_node()
    b = make_node()
    msg = make_node.message(b, data=b"x")
    with pytest.raises(TypeError, match="libchirp messages"):
        a.send_many([msg, b"not a message"])
    with pytest.raises(RuntimeError, match="given twice"):
        a.send_many([msg, msg])
    assert not msg._sending
    # The refused batches sent nothing: the only message b sees is this one.
    fut = a.send(msg)
    assert b.get(timeout=10.0).data == b"x"
    assert fut.result(10.0) is msg
    with pytest.raises(queue.Empty):
        b.get(timeout=0.2)


def test_send_many_after_stop_fails_every_future(make_node):
    a = make_node()
    b = make_node()
    msgs = _messages(make_node, b, 3)
    a.stop()
    futs = a.send_many(msgs)
    for f in futs:
        exc = f.exception(5.0)
        assert isinstance(exc, ConnectionError)
        assert "stopping" in str(exc)


def test_received_message_fields_come_from_the_event(make_node):
    a = make_node()
    b = make_node()
    msg = make_node.message(b, data=b"\0payload\xff" * 100, header=b"\1head")
    fut = a.send(msg)
    got = b.get(timeout=10.0)
    fut.result(10.0)
    assert got.identity == msg.identity
    assert got.header == b"\1head"
    assert got.data == b"\0payload\xff" * 100
    assert got.address == "127.0.0.1"
    assert got.port == make_node.port(a)
    assert got.remote_identity == a.identity()
    assert got.serial > 0


# -- LightFuture ---------------------------------------------------------------------------------


def test_light_future_behaves_like_a_future():
    f = LightFuture()
    assert not f.done()
    f.set_result(7)
    assert f.done() and f.result() == 7 and f.exception() is None
    with pytest.raises(concurrent.futures.InvalidStateError):
        f.set_result(8)
    g = LightFuture()
    g.set_exception(KeyError("k"))
    with pytest.raises(KeyError):
        g.result()
    assert isinstance(g.exception(), KeyError)
    with pytest.raises(concurrent.futures.InvalidStateError):
        g.set_exception(KeyError("again"))
    h = LightFuture()
    assert h.cancel() and h.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        h.result()
    with pytest.raises(concurrent.futures.InvalidStateError):
        h.set_result(1)
    assert "finished" in repr(f) and "cancelled" in repr(h)


def test_light_future_wakes_waiters_and_runs_callbacks():
    f = LightFuture()
    seen = []
    f.add_done_callback(lambda fut: seen.append(fut.result()))
    result = []
    t = threading.Thread(target=lambda: result.append(f.result(10.0)))
    t.start()
    done, _ = concurrent.futures.wait([f], timeout=0.05)
    assert not done
    f.set_result("r")
    t.join(10.0)
    assert result == ["r"] and seen == ["r"]
    assert list(concurrent.futures.as_completed([f], timeout=1.0)) == [f]
    late = []
    f.add_done_callback(lambda fut: late.append(1))  # already done: runs at once
    assert late == [1]


def test_light_future_many_threads_race_waiting_and_completing():
    # Completion without a condition and lazy creation of the condition must
    # never lose a wake-up: every waiter returns.
    for _ in range(200):
        f = LightFuture()
        out = []
        waiters = [
            threading.Thread(target=lambda f=f, out=out: out.append(f.result(10.0)))
            for _ in range(3)
        ]
        for t in waiters:
            t.start()
        f.set_result(1)
        for t in waiters:
            t.join(10.0)
            assert not t.is_alive()
        assert out == [1, 1, 1]


def test_light_future_with_asyncio():
    async def main():
        f = LightFuture()
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, f.set_result, 5)
        return await asyncio.wrap_future(f)

    assert asyncio.run(main()) == 5


# -- identities ----------------------------------------------------------------------------------


def test_new_identities_are_unique_and_differ_in_a_forked_child():
    ids = {libchirp.queue.Message().identity for _ in range(5000)}
    assert len(ids) == 5000
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the next identities it makes
        try:
            os.write(w, b"".join(libchirp.queue.Message().identity for _ in range(8)))
        finally:
            os._exit(0)
    os.close(w)
    child = b""
    while len(child) < 128:
        chunk = os.read(r, 128)
        if not chunk:
            break
        child += chunk
    os.close(r)
    os.waitpid(pid, 0)
    assert len(child) == 128
    mine = [libchirp.queue.Message().identity for _ in range(8)]
    theirs = [child[i : i + 16] for i in range(0, 128, 16)]
    assert not set(mine) & set(theirs)


# -- waiting threads handle the events themselves ------------------------------------------------


def test_a_waiting_thread_handles_the_events_itself(make_node):
    a = make_node(SYNCHRONOUS=False)
    b = make_node(SYNCHRONOUS=False)
    fut = a.send(make_node.message(b, data=b"x"))
    ran_on = []
    fut.add_done_callback(lambda f: ran_on.append(threading.get_ident()))
    fut.result(10.0)
    # The SEND_DONE event was handled by this thread, waiting in result(),
    # unless the dispatcher had already handled it before result() was called.
    assert len(ran_on) == 1
    assert b.get(timeout=10.0).data == b"x"


def test_several_consumer_threads_share_one_node(make_node):
    a = make_node(SYNCHRONOUS=False, MAX_SLOTS=32)
    b = make_node(SYNCHRONOUS=False, MAX_SLOTS=32)
    total = 2000
    got = []
    lock = threading.Lock()

    def consume():
        while True:
            try:
                batch = b.get_many(max_count=7, timeout=2.0)
            except queue.Empty:
                return
            with lock:
                got.extend(m.data for m in batch)
                if len(got) >= total:
                    return

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    futs = a.send_many(_messages(make_node, b, total))
    for t in threads:
        t.join(60.0)
        assert not t.is_alive()
    assert sorted(got) == sorted(b"%d" % i for i in range(total))
    for f in futs:
        f.result(10.0)


def test_request_timers_fire_while_a_thread_waits_in_get(make_node):
    a = make_node(TIMEOUT=0.5)
    silent = make_node(AUTO_RELEASE=False)  # never answers
    errors = []

    def waiter():  # leads the loop's events for a while
        try:
            a.get(timeout=3.0)
        except queue.Empty:
            pass
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    req = a.request(make_node.message(silent, data=b"q"))
    exc = req.exception(20.0)
    assert isinstance(exc, TimeoutError)
    t.join(10.0)
    assert not errors
    silent.get(timeout=10.0).release_slot()


def test_stop_while_a_thread_waits_in_get(make_node, bounded):
    b = make_node()
    out = []
    t = threading.Thread(target=lambda: out.append(_get_or_empty(b, 3.0)))
    t.start()
    bounded(b.stop, 30.0, "stop() while a thread waits in get()")
    t.join(40.0)
    assert not t.is_alive()


def _get_or_empty(node, timeout):
    try:
        return node.get(timeout=timeout)
    except (queue.Empty, libchirp.ChirpShutdown):  # stop() wakes a waiting get()
        return None


def test_stop_right_after_get_still_lets_the_ack_out(make_node, bounded):
    # get() releases without a future; stop() must still let the owed ACK go
    # out before it closes the connection, or the sender's send would fail.
    a = make_node(SYNCHRONOUS=True)
    for i in range(8):
        b = make_node(SYNCHRONOUS=True)
        fut = a.send(make_node.message(b, data=b"%d" % i))
        assert b.get(timeout=10.0).data == b"%d" % i
        bounded(b.stop, 30.0, "stop() right after get()")
        assert fut.result(10.0) is not None


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_send_many_mixes_copied_and_large_messages_in_order(make_node, sync):
    fields = dict(SYNCHRONOUS=sync, MAX_SLOTS=16)
    a = make_node(**fields)
    b = make_node(**fields)
    limit = _core.SEND_COPY_LIMIT
    # Around the limit (header + data), empty ones, and large ones in between.
    sizes = [0, 1, limit - 1, limit, limit + 1, 3 * limit, 5, 0, limit + 7, 64] * 6
    msgs = []
    for i, size in enumerate(sizes):
        header = b"h%d" % i
        data = bytes([i % 251]) * max(0, size - len(header))
        msgs.append(make_node.message(b, data=data, header=header))
    futs = a.send_many(msgs)
    got = []
    while len(got) < len(msgs):
        got.extend(b.get_many(timeout=10.0))
    assert [(m.header, m.data) for m in got] == [(m.header, m.data) for m in msgs]
    assert [m.identity for m in got] == [m.identity for m in msgs]
    for msg, fut in zip(msgs, futs):
        assert fut.result(10.0) is msg
    # The copied messages may be changed or sent again at once afterwards.
    again = a.send_many(msgs[:3])
    resent = []
    while len(resent) < 3:  # (synchronous: acknowledged once taken here)
        resent.extend(b.get_many(max_count=3, timeout=10.0))
    assert [m.data for m in resent] == [m.data for m in msgs[:3]]
    assert [f.result(10.0) for f in again] == msgs[:3]


def test_completions_reach_callbacks_while_a_thread_waits_for_messages(make_node):
    """A thread in get() (CH_POLL_MESSAGES) is not woken for a send's completion
    alone; the completion must still arrive (parked, then handed on)."""
    other = libchirp.Loop()
    far = NodeFactory(other)
    try:
        b = far(SYNCHRONOUS=False)  # on another loop: its RECV does not wake ours
        a = make_node(SYNCHRONOUS=False)
        idle = make_node(SYNCHRONOUS=False)
        a.send(far.message(b, data=b"setup")).result(10.0)  # connection and its logs
        assert b.get(timeout=10.0).data == b"setup"
        waited = []
        waiter = threading.Thread(target=lambda: waited.append(idle.get(timeout=20.0)))
        waiter.start()
        try:
            for i in range(20):
                fut = a.send(far.message(b, data=b"%d" % i))
                done = threading.Event()
                fut.add_done_callback(lambda f, done=done: done.set())
                assert done.wait(10.0), "a send's completion was stranded"
                assert fut.result(0) is not None
                assert b.get(timeout=10.0).data == b"%d" % i
        finally:
            a.send(make_node.message(idle, data=b"end")).result(10.0)
            waiter.join(30.0)
        assert [m.data for m in waited] == [b"end"]
    finally:
        far.stop_all()
        other.stop()


def test_releases_without_a_following_command_are_carried_out(make_node):
    """AUTO_RELEASE releases that owe no ACK may wait for the loop thread's next
    iteration (no wake-up of their own); with one slot, every further message
    needs the previous release to have happened, and nothing else is sent."""
    a = make_node(SYNCHRONOUS=False, MAX_SLOTS=1)
    b = make_node(SYNCHRONOUS=False, MAX_SLOTS=1)
    msgs = _messages(make_node, b, 200)
    a.send_many(msgs)
    got = [b.get(timeout=10.0).data for _ in msgs]
    assert got == [m.data for m in msgs]
    stats = b.statistics()
    assert stats["held_messages"] == 0


def test_stream_into_full_slots_keeps_moving():
    """A receiver on its own loop whose slots are all taken: the releases of
    get_many() let its reader take buffered messages, and the thread driving
    the loop gets them at once (not after its drive's time slice)."""
    from conftest import find_free_port, make_config

    count = 94 * 64
    with libchirp.Loop() as la, libchirp.Loop() as lb:
        a = libchirp.queue.Chirp(la, make_config(PORT=find_free_port(), SYNCHRONOUS=False))
        b = libchirp.queue.Chirp(
            lb, make_config(PORT=find_free_port(), SYNCHRONOUS=False, MAX_SLOTS=32)
        )
        try:
            got = [0]

            def serve():
                while got[0] < count:
                    got[0] += len(b.get_many(256, timeout=10))

            t = threading.Thread(target=serve)
            t.start()
            futs = []
            for _ in range(0, count, 64):
                msgs = []
                for _ in range(64):
                    m = libchirp.queue.Message()
                    m.address, m.port, m.data = "127.0.0.1", b.port, b"x" * 64
                    msgs.append(m)
                futs.extend(a.send_many(msgs))
                while len(futs) > 1024:
                    futs.pop(0).result(10)
            for f in futs:
                f.result(10)
            t.join(20)
            assert not t.is_alive() and got[0] == count
        finally:
            a.stop()
            b.stop()
