"""libchirp.mp: queues and pipes across processes (docs/mp.md).

* 4 producers and 4 consumers move 100,000 items through a queue, with spawn
  and with fork, in pull and in push mode: every item arrives exactly once and
  each consumer sees each producer's items in the order they were put;
* push mode: batches made by two threads of the host for one consumer reach
  it in the order they were made, even when the thread that made the earlier
  one sends last (the host thread is held at that point by a trace function);
* pull mode balances by demand (a consumer 10x slower takes about a tenth of
  a fast one's share); push mode hands items out ahead of demand (the slow
  consumer takes far more than in pull mode);
* a fast pull consumer that holds items leased ahead of its get()s gives
  back exactly those it had not handed out, SIGKILLed or closing, or when it
  held them past half of mp.TIMEOUT; one whose lease the host cannot read
  gets no items ahead; a pipe end's request ahead is given back at close;
* a consumer SIGKILLed in the middle of a run loses nothing: every item put
  (and confirmed with join_thread) is recorded by exactly one consumer in pull
  mode; in push mode nothing is lost (the killed consumer's batch in hand may
  be delivered again);
* a Pipe carries objects both ways between processes and bytes (spawn, fork
  and forkserver), reports EOFError after the other end closed; a queue travels through a pipe and a
  pipe end through a queue;
* a pipe's items are pushed to its reader in another process: a reader
  SIGKILLed or closing with pushed items it had not received loses none and
  duplicates none (they come again, in order, to the next holder of the
  end); a reader whose lease the host cannot open pulls instead; a remote
  reader gets EOFError (and poll() True) after the last item once the host's
  end closed;
* big items (put batches of 64 KiB and more, which the host forwards as they
  came when they leave it as one batch) reach two consumers intact, once,
  in order, in pull and in push mode;
* get(timeout) and put(timeout) (maxsize) honour their timeouts across
  processes; close() wakes a thread blocked in get();
* the settings mp.ADDRESS, mp.CONFIG and mp.TIMEOUT, set on the package,
  reach the handles and nodes made afterwards (the modules of libchirp.mp
  read them from the package).
"""

from __future__ import annotations

import contextlib
import linecache
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter

import mp_workers
import pytest
from conftest import SANITIZER

import libchirp
from libchirp import mp
from libchirp.mp import host, wire

pytestmark = [pytest.mark.multiprocess]

#: Tests whose children are made by fork() while the parent's threads move data
#: do not run under the sanitizers (docs/testing.md#fork-under-addresssanitizer):
#: ASan's runtime takes no lock around fork(), and TSan refuses threads in the
#: child of a multi-threaded fork.
FORK_REASONS = {
    "asan": "LLVM 14's ASan runtime takes no lock around fork(): a child forked while "
    "another thread held an ASan allocator lock blocks for ever at its first malloc",
    "tsan": "TSan does not support threads after a multi-threaded fork",
}
fork_unsafe_under_sanitizer = pytest.mark.skipif(
    SANITIZER in FORK_REASONS, reason=FORK_REASONS.get(SANITIZER, "")
)

N_ITEMS = 100_000


def collect(out, n, limit=90.0):
    results = []
    for _ in range(n):
        results.append(out.get(timeout=limit))
    return results


def run_fan(method: str, mode: str, n_items: int, producers: int = 4, consumers: int = 4):
    ctx = multiprocessing.get_context(method)
    q = mp.Queue(mode=mode)
    out = mp.Queue()
    per = n_items // producers
    batch = 256 if mode == "pull" else 1
    cons = [
        ctx.Process(target=mp_workers.consume, args=(q, out, "c%d" % i, batch))
        for i in range(consumers)
    ]
    prods = [ctx.Process(target=mp_workers.produce, args=(q, p, per)) for p in range(producers)]
    for p in cons + prods:
        p.start()
    try:
        for p in prods:
            p.join(90)
            assert p.exitcode == 0, "producer exit %s" % p.exitcode
        for _ in range(consumers):
            q.put(None)
        results = collect(out, consumers)
        for p in cons:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in cons + prods:
            if p.is_alive():
                p.kill()
    got = Counter()
    for name, items, order_ok in results:
        assert order_ok, "%s saw a producer's items out of order" % name
        got.update(items)
    expected = {(p, i) for p in range(producers) for i in range(per)}
    assert set(got) == expected, "missing %d, unexpected %d" % (
        len(expected - set(got)),
        len(set(got) - expected),
    )
    dups = [k for k, v in got.items() if v != 1]
    assert not dups, "%d items delivered more than once" % len(dups)
    return {name: len(items) for name, items, _ in results}


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "method,mode",
    [
        ("spawn", "pull"),
        pytest.param("fork", "pull", marks=fork_unsafe_under_sanitizer),
        ("spawn", "push"),
        pytest.param("fork", "push", marks=fork_unsafe_under_sanitizer),
    ],
)
def test_four_by_four_exactly_once(method, mode):
    shares = run_fan(method, mode, N_ITEMS)
    assert sum(shares.values()) == N_ITEMS


@contextlib.contextmanager
def reaped(*procs):
    """Start the processes; on the way out kill those still alive."""
    for p in procs:
        p.start()
    try:
        yield procs
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@fork_unsafe_under_sanitizer
@pytest.mark.timeout(60)
def test_push_batches_reach_a_consumer_in_the_order_they_were_made():
    """Two threads of the host serve the same subscriber; the one that made the
    earlier batch sends last. The host thread is held (by a trace function, in
    the real code) right after it made a batch for a new subscriber and before
    it sent anything; meanwhile a put() of the hosting process makes the next
    batch for that subscriber and sends. The consumer must still get the
    items in the order they were put."""
    ctx = multiprocessing.get_context("fork")
    out = mp.Queue()
    out.qsize()  # this process's default host exists before tracing starts
    held, resume = threading.Event(), threading.Event()

    def local(frame, event, arg):
        if event == "line" and not held.is_set():
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            msgs = frame.f_locals.get("msgs") or []
            if line.startswith("self._flush(") and any(
                wire._HDR.unpack(m.header)[0] == wire._S for m in msgs
            ):
                held.set()
                resume.wait(20)
        return local

    def trace(frame, event, arg):
        if frame.f_code is host._Host._run.__code__:
            return local
        return None

    threading.settrace(trace)
    try:
        q = mp.Queue(mode="push", port=free_port())  # a host (and thread) of its own
    finally:
        threading.settrace(None)
    q.put_many(range(10))
    p = ctx.Process(target=mp_workers.take, args=(q, out, 11))
    p.start()
    try:
        # the consumer subscribes; the host thread makes [0..9] for it and is held
        assert held.wait(30), "the host thread did not serve the subscription"
        q.put(10)  # served and sent by this thread: [10] to the same subscriber
        time.sleep(0.2)
        resume.set()
        assert out.get(timeout=30) == list(range(11))
        p.join(30)
        assert p.exitcode == 0
    finally:
        resume.set()
        if p.is_alive():
            p.kill()


@fork_unsafe_under_sanitizer
@pytest.mark.timeout(60)
def test_batches_of_a_killed_consumer_go_back_in_order():
    """Three pushed batches in flight to a consumer that is SIGKILLed fail one
    by one; their items go back to the front of the queue in the order they
    were put, not one batch in front of the other."""
    ctx = multiprocessing.get_context("fork")
    q = mp.Queue(mode="push")
    out = mp.Queue()
    p = ctx.Process(target=mp_workers.take_one_and_wait, args=(q, out))
    p.start()
    try:
        q.put(0)
        assert out.get(timeout=30) == 0
        for i in (1, 2, 3):
            q.put(i)  # one batch each: the window of the subscriber has room
        time.sleep(0.3)
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        back = []
        while len(back) < 3:
            back.extend(q.get_many(10, timeout=10))
        assert back == [1, 2, 3]
    finally:
        if p.is_alive():
            p.kill()


def run_balance(mode: str, n_items: int, fast_delay: float = 0.002):
    ctx = multiprocessing.get_context("fork")
    q = mp.Queue(mode=mode)
    out = mp.Queue()
    delays = [fast_delay] * 3 + [fast_delay * 10]
    cons = [
        ctx.Process(target=mp_workers.consume, args=(q, out, "c%d" % i, 1, d))
        for i, d in enumerate(delays)
    ]
    for p in cons:
        p.start()
    # let every consumer connect (and subscribe in push mode) first
    for i in range(4):
        q.put((99, -1 - i))
    time.sleep(1.0)
    q.put_many([(0, i) for i in range(n_items)])
    for _ in cons:
        q.put(None)
    try:
        results = {name: len(items) for name, items, _ in collect(out, 4)}
        for p in cons:
            p.join(30)
    finally:
        for p in cons:
            if p.is_alive():
                p.kill()
    fast = [results["c0"], results["c1"], results["c2"]]
    return results["c3"], sum(fast) / 3.0


@fork_unsafe_under_sanitizer
@pytest.mark.timeout(120)
def test_pull_balances_push_does_not():
    slow_pull, fast_pull = run_balance("pull", 600)
    ratio_pull = slow_pull / fast_pull
    # the slow consumer works at a tenth of the speed: about a tenth of the share
    assert ratio_pull < 0.25, (slow_pull, fast_pull)
    slow_push, fast_push = run_balance("push", 600)
    ratio_push = slow_push / fast_push
    # push: each consumer gets an even share of what is queued, whatever its speed
    # (measured 0.56 to 1.7 on a loaded machine: how the items reach the host, in
    # one put batch or several, decides how the windows fill; pull stays below 0.25)
    assert ratio_push > 0.45, (slow_push, fast_push, ratio_pull)


@fork_unsafe_under_sanitizer
@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["kill", "close", "no-lease"])
def test_pull_credit_items_held_come_back_exactly_once(tmp_path, how):
    """A fast pull consumer holds items it was given ahead of its get()s (its
    credit, leased). SIGKILLed, or closing its handle, it gives back exactly
    the items it had not handed out: every item is got once. Its lease file is
    gone from /dev/shm. A consumer whose lease file the host cannot open
    (no_lease: another directory) gets one item per get(), none ahead."""
    ctx = multiprocessing.get_context("fork")
    q = mp.Queue()
    out = mp.Queue()
    n, first = 2000, 100
    q.put_many(range(n))
    lease_dir = str(tmp_path) if how == "no-lease" else ""
    p = ctx.Process(
        target=mp_workers.take_and_hold, args=(q, out, first, how == "close", lease_dir)
    )
    with reaped(p):
        got, held, paths = out.get(timeout=30)
        assert got == list(range(first))
        if how == "no-lease":
            assert held == 0
        else:
            assert held > 0, "no items were leased ahead of demand"
            assert paths and not any(os.path.exists(path) for path in paths)
        if how != "close":
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)
        rest = []
        while len(rest) < n - first:
            rest.extend(q.get_many(n, timeout=10))
        if how == "close":
            assert rest == list(range(first, n))  # given back to the front, in order
        else:
            assert sorted(rest) == list(range(first, n)), "lost or duplicated items"
        with pytest.raises(mp.Empty):
            q.get(timeout=0.5)


@fork_unsafe_under_sanitizer
@pytest.mark.timeout(60)
def test_items_held_past_half_the_timeout_go_back(monkeypatch):
    """A consumer that held items ahead (its credit) for more than half of
    mp.TIMEOUT gives them back instead of handing them out (the host would put
    them back after TIMEOUT); they come again, in order, exactly once."""
    ctx = multiprocessing.get_context("fork")
    q = mp.Queue()
    out = mp.Queue()
    n, first = 1000, 100
    q.put_many(range(n))
    monkeypatch.setattr(mp, "TIMEOUT", 2.0)  # for the child's node and batches
    p = ctx.Process(target=mp_workers.take_slowly_after_a_while, args=(q, out, n, first, 1.2))
    with reaped(p):
        monkeypatch.undo()
        got, returned = out.get(timeout=30)
        assert got == list(range(n))
        assert returned and returned[0] > 0, returned
        p.join(10)
        assert p.exitcode == 0


@fork_unsafe_under_sanitizer
@pytest.mark.timeout(60)
def test_pipe_request_ahead_is_given_back_at_close(monkeypatch):
    """A pipe end that received and answered has asked for the next item
    ahead; what that request brings after it closed goes to another holder of
    the same end (a copy in a third process), once."""
    from libchirp.mp import client

    ctx = multiprocessing.get_context("fork")
    # the request ahead waits long enough for the second send on a busy machine
    monkeypatch.setattr(client, "AHEAD_WAIT", 5.0)
    a, b = mp.Pipe()
    out = mp.Queue()
    with reaped(ctx.Process(target=mp_workers.echo_once_then_close, args=(b, out, 1.0))) as (p,):
        a.send("one")
        assert a.recv() == "one"  # the reply follows b's request ahead
        a.send("two")  # handed to b's request ahead, b closes without taking it
        assert out.get(timeout=30) == ("closed", 1)
        p.join(10)
    with reaped(ctx.Process(target=mp_workers.receive, args=(b, out, 1))) as (p,):
        assert out.get(timeout=30) == ["two"]
        p.join(10)


@fork_unsafe_under_sanitizer
@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["kill", "close", "no-lease"])
def test_pipe_items_pushed_to_a_reader_come_back_exactly_once(tmp_path, how):
    """The host pushes a pipe's items to its reader in another process as they
    are sent (under the subscription's lease). A reader SIGKILLed, or closing
    its end, with items pushed to it and not received: those items come again
    (to the next holder of the end), in order, exactly once; the ones it
    received do not. A reader whose lease the host cannot open (another
    directory: as between machines) is not pushed to; it asks per recv()."""
    ctx = multiprocessing.get_context("fork")
    a, b = mp.Pipe()
    out = mp.Queue()
    n, first = 200, 10
    for i in range(n):
        a.send(i)
    lease_dir = str(tmp_path) if how == "no-lease" else ""
    args = (b, out, first, how == "close", lease_dir)
    p = ctx.Process(target=mp_workers.recv_and_hold, args=args)
    with reaped(p):
        got, held, piped = out.get(timeout=30)
        assert got == list(range(first))
        if how == "no-lease":
            assert not piped and held == 0
        else:
            assert piped and held > 0, "no items were pushed ahead of recv()"
        if how != "close":
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)
        a.send(n)  # sent after the reader is gone: queued behind the ones that came back
        # b is hosted here: this process reads its box directly
        rest = [b.recv() for _ in range(n + 1 - first)]
        assert rest == list(range(first, n + 1)), "lost, duplicated or reordered items"
        assert not b.poll(0.2)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("consumers", [1, 2])
@pytest.mark.parametrize("mode", ["pull", "push"])
def test_big_items_forwarded_by_the_host_arrive_intact_in_order(monkeypatch, mode, consumers):
    """Put batches of 64 KiB and more go on from the host as they came when a
    consumer's batch is exactly their items (no copy, host._Host._pack_out:
    with one consumer most batches), and are packed anew when split (two
    consumers): every item arrives once, intact, each consumer seeing them in
    the order they were put."""
    packed = []
    monkeypatch.setattr(host, "_pack", lambda batch: packed.append(1) or wire._pack(batch))
    sent = []
    pack_out = host._Host._pack_out
    monkeypatch.setattr(host._Host, "_pack_out", lambda h, b: sent.append(1) or pack_out(h, b))
    ctx = multiprocessing.get_context("spawn")
    q = mp.Queue(mode=mode)
    out = mp.Queue()
    n = 400
    cons = [ctx.Process(target=mp_workers.consume_big, args=(q, out)) for _ in range(consumers)]
    prod = ctx.Process(target=mp_workers.produce_big, args=(q, n, 70000, consumers))
    with reaped(*cons, prod):
        results = [out.get(timeout=60) for _ in cons]
        prod.join(30)
        assert prod.exitcode == 0
    seen = [i for got, _ in results for i in got]
    assert all(intact for _, intact in results)
    assert sorted(seen) == list(range(n))
    assert all(got == sorted(got) for got, _ in results)
    if consumers == 1:
        assert len(packed) < len(sent), "no batch was forwarded as it came"


@pytest.mark.timeout(60)
def test_pipe_reader_elsewhere_sees_eof_after_the_items():
    """A reader in another process receives what was sent, then EOFError once
    the host's end closed (pushed after the last item); poll() then says True."""
    ctx = multiprocessing.get_context("spawn")
    a, b = mp.Pipe()
    out = mp.Queue()
    with reaped(ctx.Process(target=mp_workers.drain, args=(b, out))) as (p,):
        for i in range(5):
            a.send(i)
        time.sleep(0.2)  # the reader is subscribed and waits
        a.send_bytes(b"\x80\x04K\x05.")  # the pickle of 5
        a.close()
        assert out.get(timeout=30) == (list(range(6)), True)
        p.join(10)
        assert p.exitcode == 0


def test_lease_counter_of_a_reused_slot_means_completed():
    """The host reads a failed batch's counter: the items handed out, or all
    of them when the slot already belongs to a later batch (generation)."""
    from libchirp.mp import lease

    lf = lease.LeaseFile.create()
    if lf is None:
        pytest.skip("no %s" % lease.LEASE_DIR)
    try:
        leases = lease.HostLeases()
        slot = lf.take(7)
        held = leases.lease(lf.data(slot), 7)
        assert held is not None
        assert leases.handed_out(held, 5) == 0
        lf.count(slot, 7, 3)
        assert leases.handed_out(held, 5) == 3
        lf.give(slot)
        assert lf.take(8) == slot  # reused by the batch answering request 8
        assert leases.handed_out(held, 5) == 5
        assert leases.lease(b"\0\0\0\0../../etc/passwd", 9) is None
        assert leases.lease(lease._SLOT.pack(lease.LEASE_SLOTS) + lf.name.encode(), 9) is None
    finally:
        lf.unlink()


def read_records(path):
    seen = []
    if not os.path.exists(path):
        return seen
    with open(path, "rb") as f:
        for line in f:
            if line.strip() == b"END":
                continue
            p, i = line.split()
            seen.append((int(p), int(i)))
    return seen


@fork_unsafe_under_sanitizer
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["pull", "push"])
def test_consumer_killed_loses_nothing(tmp_path, mode):
    ctx = multiprocessing.get_context("fork")
    q = mp.Queue(mode=mode)
    n = 3000
    paths = [str(tmp_path / ("c%d" % i)) for i in range(4)]
    # consumer 0 is the victim; all are a little slow so that the run lasts
    cons = [
        ctx.Process(target=mp_workers.record, args=(q, paths[i], 0.002 if i else 0.004))
        for i in range(4)
    ]
    prods = [ctx.Process(target=mp_workers.produce, args=(q, p, n // 2)) for p in range(2)]
    for p in cons + prods:
        p.start()
    try:
        deadline = time.monotonic() + 30
        while len(read_records(paths[0])) < 100:
            assert time.monotonic() < deadline, "victim did not start"
            time.sleep(0.01)
        os.kill(cons[0].pid, signal.SIGKILL)
        cons[0].join(10)
        for p in prods:
            p.join(60)
            assert p.exitcode == 0, "a producer failed: its puts were not all confirmed"
        for _ in range(3):
            q.put(None)
        for p in cons[1:]:
            p.join(60)
            assert p.exitcode == 0
    finally:
        for p in cons + prods:
            if p.is_alive():
                p.kill()
    records = [read_records(path) for path in paths]
    got = Counter(x for r in records for x in r)
    expected = {(p, i) for p in range(2) for i in range(n // 2)}
    assert set(got) == expected, "lost %d items" % len(expected - set(got))
    dups = {k for k, v in got.items() if v > 1}
    if mode == "pull":
        assert not dups, "%d items delivered twice" % len(dups)
    else:
        # only items the victim had handed out from its last batch come again
        assert dups <= set(records[0]), dups
        assert len(dups) <= mp.PUSH_BATCH * mp.PUSH_WINDOW


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "method", ["spawn", pytest.param("fork", marks=fork_unsafe_under_sanitizer), "forkserver"]
)
def test_pipe_ping_pong(method):
    ctx = multiprocessing.get_context(method)
    a, b = mp.Pipe()
    n = 200
    p = ctx.Process(target=mp_workers.echo, args=(b, n))
    p.start()
    try:
        for i in range(n):
            a.send({"i": i, "data": [i] * 3})
            assert a.recv() == {"echo": {"i": i, "data": [i] * 3}}
        for i in range(n):
            assert a.recv() == {"ask": i}
            a.send({"answer": i})
        assert not a.poll(0.1)
        a.send_bytes(b"0123456789", 2, 5)
        assert a.poll(10)
        assert a.recv_bytes() == b"65432"
        with pytest.raises(EOFError):
            a.recv()  # the child closed its end
        p.join(30)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
    a.close()
    with pytest.raises(OSError):
        a.recv()


@pytest.mark.timeout(90)
def test_queue_through_pipe_and_pipe_through_queue():
    ctx = multiprocessing.get_context("spawn")
    a, b = mp.Pipe()
    q = mp.Queue()
    p = ctx.Process(target=mp_workers.use_queue_from_pipe, args=(b, 50))
    p.start()
    try:
        a.send(q)
        assert [q.get(timeout=30) for _ in range(50)] == list(range(50))
        end = q.get(timeout=30)
        assert isinstance(end, mp.Connection)
        assert end.recv() == "through a pipe sent through a queue"
        end.send("thanks")
        p.join(30)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()


@fork_unsafe_under_sanitizer
@pytest.mark.timeout(60)
def test_get_timeout_and_put_full_across_processes():
    ctx = multiprocessing.get_context("fork")
    q = mp.Queue()
    out = mp.Queue()
    p = ctx.Process(target=mp_workers.get_with_timeout, args=(q, out, 0.5))
    p.start()
    kind, waited = out.get(timeout=30)
    p.join(10)
    assert kind == "empty"
    assert 0.45 <= waited < 3.0, waited

    full = mp.Queue(maxsize=10)
    p = ctx.Process(target=mp_workers.put_full, args=(full, out, 100, 0.5))
    p.start()
    k, waited = out.get(timeout=30)
    p.join(30)
    assert k is not None and 10 <= k <= 30, k
    assert 0.45 <= waited < 3.0, waited
    assert full.full()
    assert full.qsize() >= 10
    assert full.get(timeout=5) == 0


@pytest.mark.timeout(30)
def test_local_interface():
    q = mp.SimpleQueue()
    assert q.empty()
    q.put({"a": 1})
    assert q.qsize() == 1
    assert q.get() == {"a": 1}
    t = time.monotonic()
    with pytest.raises(mp.Empty):
        q.get(timeout=0.2)
    assert time.monotonic() - t >= 0.19
    with pytest.raises(mp.Empty):
        q.get_nowait()
    b = mp.Queue(maxsize=2)
    b.put_nowait(1)
    b.put(2)
    assert b.full()
    with pytest.raises(mp.Full):
        b.put_nowait(3)
    t = time.monotonic()
    with pytest.raises(mp.Full):
        b.put(3, timeout=0.2)
    assert time.monotonic() - t >= 0.19
    assert b.get_many(10) == [1, 2]
    with pytest.raises(ValueError):
        mp.Queue(mode="sideways")


@pytest.mark.timeout(30)
def test_module_settings_apply_to_what_is_made_afterwards(monkeypatch):
    """mp.ADDRESS, mp.CONFIG and mp.TIMEOUT, set on the package, reach the
    handles and the nodes (host and client) made after they were set."""
    config = libchirp.Config()
    config.BIND_V4, config.BIND_V6 = "127.0.0.1", "::1"
    monkeypatch.setattr(mp, "CONFIG", config)
    monkeypatch.setattr(mp, "TIMEOUT", 77.0)
    monkeypatch.setattr(mp, "ADDRESS", "192.0.2.1")  # advertised only, never dialled here
    a, b = mp.Pipe()
    assert repr(a).startswith("<libchirp.mp.Connection 192.0.2.1:")
    a.send("local")
    assert b.recv() == "local"
    port = free_port()
    q = mp.Queue(name="settings", port=port)
    assert q.address == ("192.0.2.1", port)
    remote = mp.attach("127.0.0.1", port, "settings")
    remote.put("through the client node")
    assert q.get(timeout=10) == "through the client node"
    for node in (q._host_obj.node, remote._ep(remote._qid).rt.node):
        assert node.config.TIMEOUT == 77.0
        assert (node.config.BIND_V4, node.config.BIND_V6) == ("127.0.0.1", "::1")
    remote.close()
    for end in (a, b):
        end.close()


@pytest.mark.timeout(30)
def test_close_wakes_blocked_get():
    q = mp.Queue()
    errors = []

    def wait():
        try:
            q.get(timeout=20)
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.2)
    q.close()
    t.join(5)
    assert not t.is_alive()
    assert isinstance(errors[0], ValueError)
    with pytest.raises(ValueError):
        q.put(1)


@pytest.mark.timeout(90)
def test_example_two_hosts_on_one_host():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    example = os.path.join(root, "examples", "mp_two_hosts.py")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    res = subprocess.run(
        [sys.executable, example, "demo", "--port", str(free), "--tasks", "500"],
        capture_output=True,
        text=True,
        timeout=80,
        cwd=root,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "RESULT OK tasks=500" in res.stdout, res.stdout
