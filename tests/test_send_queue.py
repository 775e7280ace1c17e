"""Bounded send queue (Config.MAX_SEND_QUEUE, docs/config.md#bounded-send-queue).

Policy (docs/config.md#bounded-send-queue): when MAX_SEND_QUEUE messages
already wait to be written to a peer, the next send to it fails at once with
ChirpSendQueueFull (a MemoryError naming the limit); queued messages are never
dropped and all still complete; once the queue has room, sends succeed again.
Other peers are not affected.

The stalled peers are raw servers (tests/rawpeer.py) the node connects to: one
that reads but holds back its ACKs (synchronous mode; it announces no
pipelining, so one message is in flight), one that does not read at all, so the
socket buffers fill (asynchronous mode).
"""

import concurrent.futures
import time

import pytest
import rawpeer as rp
from conftest import wait_for

import libchirp
from libchirp.errors import ChirpMemoryError, ChirpSendQueueFull, chirp_error_to_exception

pytestmark = pytest.mark.timeout(60)


def remote_stats(node, port):
    return node.statistics()["remotes"].get("127.0.0.1:%d" % port)


def queued(node, port):
    r = remote_stats(node, port)
    return (r["send_queue"], r["in_flight"]) if r else (0, 0)


def assert_queue_full(exc, limit, port):
    assert isinstance(exc, ChirpSendQueueFull), repr(exc)
    assert isinstance(exc, ChirpMemoryError) and isinstance(exc, MemoryError)
    assert isinstance(exc, libchirp.ChirpError)
    assert exc.ecode == 20  # SEND_QUEUE_FULL, its own code
    text = str(exc)
    assert "MAX_SEND_QUEUE = %d" % limit in text, text
    assert "127.0.0.1:%d" % port in text, text
    assert "not queued" in text, text


def fails_at_once(fut, limit, port, what):
    start = time.monotonic()
    exc = rp.future_error(fut, 2.0, what)
    assert time.monotonic() - start < 2.0
    assert_queue_full(exc, limit, port)


def test_sync_full_queue_fails_next_send_at_once_drops_nothing_and_recovers(h):
    N = 4
    node, _ = h.node(SYNCHRONOUS=True, MAX_SEND_QUEUE=N, TIMEOUT=20.0)
    other, other_port = h.node()
    srv = h.server(name="stalled peer")

    def msg(i):
        return rp.make_msg(srv.port, data=b"m%03d" % i)

    futs = [node.send(msg(0))]
    peer = h.track(srv.accept())
    peer.send_handshake(srv.port, bytes([0x5A]) * 16)
    peer.recv_handshake()
    first = peer.recv_frame()
    assert first.data == b"m000" and first.type & rp.REQ_ACK
    # m000 is in flight (no ACK yet, window 1): the next N wait in the queue.
    futs += [node.send(msg(i)) for i in range(1, N + 1)]
    wait_for(lambda: queued(node, srv.port) == (N, 1), 10, "%d queued, 1 in flight" % N)

    over = node.send(msg(N + 1))
    fails_at_once(over, N, srv.port, "send %d beyond MAX_SEND_QUEUE" % (N + 2))
    req = node.request(msg(N + 2))
    fails_at_once(req, N, srv.port, "request beyond MAX_SEND_QUEUE")
    assert not any(f.done() for f in futs), "a queued send completed or failed early"
    assert queued(node, srv.port) == (N, 1)

    # Only this peer's queue is full: another peer is served at once.
    m = rp.make_msg(other_port, data=b"elsewhere")
    sent = node.send(m)
    got = rp.get_msg(other, what="message to the other peer")
    assert got.data == b"elsewhere"
    rp.future_result(sent, 5, "send to another peer")

    # The peer catches up: every queued message arrives, in order, and completes.
    peer.send(rp.pack_ack(first.identity))
    for i in range(1, N + 1):
        f = peer.recv_frame()
        assert f.data == b"m%03d" % i, "expected m%03d, got %r (dropped or reordered)" % (
            i,
            f.data,
        )
        peer.send(rp.pack_ack(f.identity))
    for i, f in enumerate(futs):
        rp.future_result(f, 5, "queued send m%03d" % i)
    wait_for(lambda: queued(node, srv.port) == (0, 0), 5, "the queue drained")

    # Room again: new sends are accepted and delivered; the refused ones never were.
    again = [node.send(msg(100 + i)) for i in range(N + 1)]
    for i in range(N + 1):
        f = peer.recv_frame()
        assert f.data == b"m%03d" % (100 + i), f.data
        peer.send(rp.pack_ack(f.identity))
    for f in again:
        rp.future_result(f, 5, "send after the queue drained")
    peer.assert_silent(0.3, "after the last ACK (the refused messages must never be sent)")
    counters = remote_stats(node, srv.port)["counters"]
    assert counters["send_failures"] == 2, counters  # the refused two, counted for this peer
    assert counters["messages_out"] == 2 * (N + 1), counters
    assert node.statistics()["totals"]["send_failures"] == 2


def test_one_batch_of_sends_counts_as_written_one_by_one(h):
    """send_many() hands its messages to the core in one batch, which writes them
    at the batch's end (one write per peer); the limit still counts as if each
    had gone out as soon as it could: N + 1 sends to an idle peer that takes one
    unacknowledged message put one on the wire and N in the queue, none refused."""
    N = 4
    node, _ = h.node(SYNCHRONOUS=True, MAX_SEND_QUEUE=N, TIMEOUT=20.0)
    srv = h.server(name="peer with window 1")

    def msg(i):
        return rp.make_msg(srv.port, data=b"b%03d" % i)

    first = node.send(msg(0))
    peer = h.track(srv.accept())
    peer.send_handshake(srv.port, bytes([0x5C]) * 16)
    peer.recv_handshake()
    f = peer.recv_frame()
    peer.send(rp.pack_ack(f.identity))
    rp.future_result(first, 5, "first send")
    futs = node.send_many([msg(i) for i in range(1, N + 2)])
    for i in range(1, N + 2):
        f = peer.recv_frame()
        assert f.data == b"b%03d" % i, f.data
        peer.send(rp.pack_ack(f.identity))
    for i, fut in enumerate(futs, 1):
        rp.future_result(fut, 5, "send b%03d of the batch" % i)


def test_async_non_reading_peer_fills_queue_then_everything_queued_is_delivered(h):
    N = 3
    size = 1 << 20
    node, _ = h.node(SYNCHRONOUS=False, MAX_SEND_QUEUE=N, TIMEOUT=30.0)
    srv = h.server(name="non-reading peer")

    def msg(i):
        return rp.make_msg(srv.port, header=b"%04d" % i, data=bytes([i % 251]) * size)

    accepted = {0: node.send(msg(0))}
    peer = h.track(srv.accept())
    peer.send_handshake(srv.port, bytes([0x5B]) * 16)
    peer.recv_handshake()
    # The peer reads nothing more: the socket buffers fill, then the queue.
    refused = None
    for i in range(1, 200):
        fut = node.send(msg(i))
        done, _ = concurrent.futures.wait([fut], timeout=0.1)
        if done and fut.exception() is not None:
            refused = i
            assert_queue_full(fut.exception(), N, srv.port)
            break
        accepted[i] = fut
    assert refused is not None, "200 MiB were taken without the queue filling up"
    assert queued(node, srv.port)[0] == N
    pending = [i for i, f in accepted.items() if not f.done()]
    assert len(pending) >= N, pending
    assert not any(f.exception() for f in accepted.values() if f.done())

    # The peer reads again: every accepted message arrives, in order; the refused one never.
    seen = []
    while len(seen) < len(accepted):
        f = peer.recv_frame(timeout=20)
        seen.append(int(f.header))
        assert f.data == bytes([seen[-1] % 251]) * size
    assert seen == sorted(accepted), seen
    for i, f in accepted.items():
        rp.future_result(f, 10, "accepted send %d" % i)
    wait_for(lambda: queued(node, srv.port) == (0, 0), 5, "the queue drained")
    fut = node.send(msg(refused + 1000))
    f = peer.recv_frame(timeout=10)
    assert int(f.header) == refused + 1000
    rp.future_result(fut, 10, "send after the queue drained")
    peer.assert_silent(0.3, "after the last message")


def test_queue_full_error_mapping():
    exc = chirp_error_to_exception(
        20,
        b"send queue to 127.0.0.1:3000 is full: MAX_SEND_QUEUE = 4 messages wait to be"
        b" written; this one was not queued",
    )
    assert_queue_full(exc, 4, 3000)
    assert type(chirp_error_to_exception(10, "out of memory")) is ChirpMemoryError
    assert (
        type(chirp_error_to_exception(10, "MAX_SEND_QUEUE")) is ChirpMemoryError
    )  # code, not text
    assert type(chirp_error_to_exception(10)) is ChirpMemoryError
    assert libchirp.ChirpSendQueueFull is ChirpSendQueueFull
