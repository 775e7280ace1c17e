"""Load: a node with 10,000 concurrent connections and the RSS of idle
connections (at most 64 KiB each).

The connections come from a child process (tests/loadclient.py) that speaks
the handshake with raw sockets on 127.0.0.1 (plaintext,
docs/tls.md#when-a-connection-is-encrypted, docs/protocol.md#wire-format); each one
announces a handshake port of its own, so the node files them under 10,000 remotes,
as with 10,000 peers. They send a NOOP every second while
the loaded node is measured and then go idle for the garbage collector. The node under
test lives in this process, next to a normal peer node that makes roundtrips
to it. RSS is this process's VmRSS. Figures are printed (pytest -s shows them).
"""

import gc
import importlib.util
import os
import queue
import resource
import statistics
import time

import pytest
from conftest import SANITIZER, wait_for

import libchirp.queue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "chirp_bench_memory", os.path.join(ROOT, "benchmarks", "memory.py")
)
memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory)

N = 10_000
MiB = 1 << 20
#: Effective R = max(REUSE_TIME, 3 * TIMEOUT) = 3 s; an accepted connection must
#: finish its handshake within 2 * TIMEOUT = 2 s.
NODE_CONFIG = dict(REUSE_TIME=3.0, TIMEOUT=1.0, BACKLOG=127)
R = 3.0
#: One roundtrip while 10,000 connections are open or being collected (measured:
#: median 0.3 ms, max 10 ms; up to 0.1 s during the trim after collection).
ROUNDTRIP_LIMIT = 2.0
#: RSS after garbage collection may exceed the baseline by this much. Measured
#: (2 cores): 10,000 idle connections take 61-66 MiB; one collection pass after
#: they are gone 6-8 MiB stay (the loop's event buffers, which grew for the
#: 20,000 connect/close log events and are not shrunk, and Python's arenas).
#: Without malloc_trim after the collection 64 MiB stayed. 16 MiB is twice the
#: measured rest and a quarter of what the connections took.
RSS_SLACK = 16 * MiB


@pytest.fixture
def nofile():
    """Enough file descriptors for this process (root may raise the hard limit)."""
    old = memory.raise_nofile(N + 1024)
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, old)


def roundtrip(node, peer, port):
    """peer asks, node answers; returns the seconds from the first send to the reply.

    A request written just as the node's garbage collector closes the peer's idle
    connection fails at the peer (docs/protocol.md#errors); that attempt is repeated.
    """
    start = time.monotonic()
    deadline = start + ROUNDTRIP_LIMIT * 5
    failures = []
    while len(failures) < 3:
        token = os.urandom(8)
        msg = libchirp.queue.Message()
        msg.address = "127.0.0.1"
        msg.port = port
        msg.data = b"ping" + token
        fut = peer.request(msg)
        got = None
        while got is None:
            assert time.monotonic() < deadline, "no request within %.0f s (%r)" % (
                deadline - start,
                failures,
            )
            try:
                got = node.get(timeout=0.05)
            except queue.Empty:
                if fut.done() and fut.exception() is not None:
                    break
                continue
            if got.data != b"ping" + token:
                got = None  # a failed attempt's request that arrived after all
        if got is None:
            failures.append(fut.exception())
            continue
        got.data = b"pong" + token
        sent = node.send(got)
        reply = fut.result(max(0.1, deadline - time.monotonic()))
        elapsed = time.monotonic() - start
        assert reply.data == b"pong" + token
        sent.result(ROUNDTRIP_LIMIT * 5)
        return elapsed
    raise AssertionError("three requests failed: %r" % failures)


def counts(node):
    """(connections, remotes) of node; the statistics themselves are not kept (with
    10,000 remotes they take 15 MiB of Python objects, which would count as RSS)."""
    st = node.statistics()
    return st["connections"], len(st["remotes"])


@pytest.mark.slow  # 10,000 connections: make test runs it, make check leaves it out
@pytest.mark.timeout(90)
def test_10k_connections_responsive_and_memory_released_after_gc(nofile, make_node):
    node = make_node(**NODE_CONFIG)
    peer = make_node(TIMEOUT=10.0)
    port = make_node.port(node)
    for _ in range(5):
        roundtrip(node, peer, port)
    node.statistics()
    gc.collect()
    time.sleep(0.3)
    base = memory.rss_bytes()

    # Keep-alive NOOPs until the measurements under load are done, so that a
    # slow connect phase on a busy machine does not let the collector start early.
    client = memory.LoadClient(port, N, timeout=60, keepalive=1.0)
    try:
        wait_for(lambda: counts(node)[0] >= N, 30, "%d connections" % N)
        conns, remotes = counts(node)
        assert conns >= N and remotes >= N, (conns, remotes)
        loaded = [roundtrip(node, peer, port) for _ in range(20)]
        assert max(loaded) < ROUNDTRIP_LIMIT, "roundtrips with %d connections: %r" % (N, loaded)
        peak = memory.rss_bytes()
        per_conn = (peak - base) / N
        if not SANITIZER:  # under ASan, RSS measures its allocator (redzones, quarantine)
            assert per_conn <= memory.TARGET_BYTES, "%.0f bytes RSS per connection" % per_conn

        # The garbage collector closes the idle ones; the peer keeps its own busy.
        client.idle()
        ready_at = time.monotonic()  # from here on the N connections are idle
        during_gc = []
        deadline = ready_at + 4 * R + 20
        while True:
            during_gc.append(roundtrip(node, peer, port))
            conns, remotes = counts(node)
            if conns <= 2:
                break
            assert time.monotonic() < deadline, (
                "garbage collection left %d connections %.0f s after they went idle"
                % (conns, time.monotonic() - ready_at)
            )
            time.sleep(0.5)
        gc_seconds = time.monotonic() - ready_at
        assert max(during_gc) < ROUNDTRIP_LIMIT, "roundtrips during collection: %r" % during_gc
        client.expect("closed", 20)  # the client saw the node close every one of them
        wait_for(lambda: counts(node)[1] <= 2, 4 * R + 10, "remotes collected")
    finally:
        client.close()

    # The freed memory goes back at the next collection pass (malloc_trim); passes
    # come every R/2 to R, so one R after the remotes are gone it has happened.
    gc.collect()
    until = time.monotonic() + R + 0.5
    while time.monotonic() < until:
        roundtrip(node, peer, port)
        time.sleep(0.25)
    after = memory.rss_bytes()
    print(
        "\n10k: connect %.2f s; roundtrip loaded median %.2f ms max %.2f ms; during GC max"
        " %.2f ms; RSS base %.1f peak %.1f (+%.1f, %.0f B/conn) after GC %.1f MiB (+%.1f);"
        " connections collected %.1f s after going idle (R = %.0f s)"
        % (
            client.connect_seconds,
            statistics.median(loaded) * 1e3,
            max(loaded) * 1e3,
            max(during_gc) * 1e3,
            base / MiB,
            peak / MiB,
            (peak - base) / MiB,
            per_conn,
            after / MiB,
            (after - base) / MiB,
            gc_seconds,
            R,
        )
    )
    # ASan keeps freed memory (quarantine, its own allocator): not our figure.
    assert SANITIZER or after <= base + RSS_SLACK, (
        "RSS after garbage collection %.1f MiB, baseline %.1f MiB, peak %.1f MiB (bound: +%d MiB)"
        % (after / MiB, base / MiB, peak / MiB, RSS_SLACK // MiB)
    )
    assert roundtrip(node, peer, port) < ROUNDTRIP_LIMIT


@pytest.mark.timeout(60)
def test_stop_with_10k_connections_closes_them_promptly(nofile, make_node, bounded):
    """Stopping a node closes every connection; not O(remotes x connections)
    (1.3 s at 10,000 before, growing fourfold per doubling)."""
    node = make_node(REUSE_TIME=600.0, BACKLOG=127)
    client = memory.LoadClient(make_node.port(node), N, timeout=60)
    try:
        wait_for(lambda: counts(node)[0] >= N, 30, "%d connections" % N)
        start = time.monotonic()
        bounded(node.stop, 20, "node.stop() with %d connections" % N)
        took = time.monotonic() - start
        client.expect("closed", 20)
        print("\nstop with %d connections: %.2f s" % (N, took))
        assert took < 10, took
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_rss_per_idle_connection_1000():
    """A node holding 1,000 idle connections, RSS per connection <= 64 KiB."""
    r = memory.measure(1000)
    print("\n" + memory.describe(r))
    assert r["connections"] == 1000
    assert r["per_conn_bytes"] > 0, memory.describe(r)
    if not SANITIZER:  # under ASan, RSS measures its allocator
        assert r["per_conn_bytes"] <= memory.TARGET_BYTES, memory.describe(r)
