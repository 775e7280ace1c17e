"""One test (or a few) per known libchirp 1.x defect, showing we do better.

The list is in docs/protocol.md#compatibility-with-libchirp-1x.

Raw peers (tests/rawpeer.py) talk plain TCP on 127.0.0.1 to real nodes. Timing assertions are
upper bounds with generous slack; the machine running them is shared and noisy.
"""

import concurrent.futures
import queue
import threading
import time

import pytest

try:
    from . import rawpeer as rp
except ImportError:
    import rawpeer as rp

pytestmark = pytest.mark.timeout(60)

MSG_ID = bytes(range(0x10, 0x20))
SERVER_ID = bytes(range(0xB0, 0xC0))

SHUTDOWN = 11
PROTOCOL_ERROR = 3
TIMEOUT = 9
CANNOT_CONNECT = 12


def ecode(exc):
    return getattr(exc, "ecode", None)


# ------------------------------------------------------------------------------------------
# 10.1 identity used whole


@pytest.mark.parametrize(
    "identity",
    [bytes(range(1, 17)), b"\x00" + b"\xff" * 15],
    ids=["01..10", "leading-zero"],
)
def test_10_1_identity_used_whole(h, identity):
    node, port = h.node(IDENTITY=identity)
    assert node.identity() == identity, "node.identity() %s != configured %s" % (
        node.identity().hex(),
        identity.hex(),
    )
    c = h.connect(port)
    hs = c.recv_handshake()
    assert hs.identity == identity, "inbound handshake identity %s (reference truncates)" % (
        hs.identity.hex()
    )

    server = h.server()
    fut = node.send(rp.make_msg(server.port, b"", b"x"))
    conn = h.track(server.accept())
    hs = conn.recv_handshake()
    assert hs.identity == identity, "outbound handshake identity %s" % hs.identity.hex()
    conn.send_handshake(server.port, SERVER_ID)
    f = conn.recv_frame()
    conn.send(rp.pack_ack(f.identity))
    rp.future_result(fut, 5.0, "send")


def test_10_1_default_identity_is_random_and_nonzero(h):
    a, _ = h.node()
    b, _ = h.node()
    assert len(a.identity()) == 16
    assert a.identity() != bytes(16), "all-zero IDENTITY must be replaced by a random one"
    assert a.identity() != b.identity(), "two nodes drew the same random identity"


# ------------------------------------------------------------------------------------------
# 10.2 fragmented handshake is buffered


@pytest.mark.parametrize("mode", ["5+13", "bytewise", "with-frame"])
def test_10_2_fragmented_handshake_accepted(h, mode):
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False)
    c = h.connect(port)
    c.recv_handshake()
    hs = rp.pack_handshake(4000, rp.CLIENT_ID)
    frame = rp.pack_frame(MSG_ID, 7, rp.REQ_ACK, b"hdr", b"hello")
    if mode == "5+13":
        c.send(hs[:5])
        time.sleep(0.3)
        c.send(hs[5:])
        c.send(frame)
    elif mode == "bytewise":
        c.send_slowly(hs, pause=0.02)
        c.send(frame)
    else:  # handshake and first frame in one write (2.2: a sender MAY do this)
        c.send(hs + frame)
    msg = rp.get_msg(node, what="message after a %s handshake" % mode)
    assert (msg.identity, msg.port, msg.remote_identity) == (MSG_ID, 4000, rp.CLIENT_ID)
    fut = msg.release_slot()
    ack = c.recv_frame()
    assert ack.type == rp.ACK and ack.identity == MSG_ID
    rp.future_result(fut, 5.0, "release")


# ------------------------------------------------------------------------------------------
# 10.3 accepted connections without a handshake time out


@pytest.mark.parametrize("sent", [b"", b"\x0f\xa0\xa0\xa1\xa2"], ids=["nothing", "5-bytes"])
def test_10_3_no_handshake_closed_after_connect_timeout(h, sent):
    node, port = h.node(TIMEOUT=0.5)  # connect timeout min(2T, 60) = 1 s
    c = h.connect(port)
    c.recv_handshake()
    start = time.monotonic()
    if sent:
        c.send(sent)
    assert c.wait_closed(5.0), (
        "accepted connection without a complete handshake still open after 5 s "
        "(expected closed after the connect timeout of 1 s)"
    )
    elapsed = time.monotonic() - start
    assert elapsed >= 0.5, "closed after %.2f s, before the 1 s connect timeout" % elapsed
    rp.assert_node_serves(h, node, port, "after a handshake timeout")


def test_10_3_completed_handshake_not_closed_by_connect_timer(h):
    node, port = h.node(TIMEOUT=0.5, REUSE_TIME=30.0)
    c, _ = h.client(port)
    c.assert_silent(2.0, "after a complete handshake (the connect timer must be stopped)")


# ------------------------------------------------------------------------------------------
# 10.4 every REQ_ACK acknowledged independently (see also test_wire)


def test_10_4_many_releases_from_threads(h):
    n = 10
    node, port = h.node(SYNCHRONOUS=False, AUTO_RELEASE=False, MAX_SLOTS=16)
    c, _ = h.client(port)
    ids = [bytes([0x60 + i]) * 16 for i in range(n)]
    c.send(b"".join(rp.pack_frame(ids[i], i, rp.REQ_ACK, b"", b"%d" % i) for i in range(n)))
    msgs = [rp.get_msg(node, what="message %d" % i) for i in range(n)]
    futs = [None] * n
    barrier = threading.Barrier(n)

    def release(i):
        barrier.wait(5)
        futs[i] = msgs[i].release_slot()

    threads = [threading.Thread(target=release, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    acks = [c.recv_frame(5.0) for _ in range(n)]
    assert sorted(a.identity for a in acks) == sorted(ids), "each REQ_ACK needs its own ACK"
    assert all(a.type == rp.ACK for a in acks)
    serials = [a.serial for a in acks]
    for a, b in zip(serials, serials[1:]):
        assert rp.serial_diff(a, b) == 1, "ACK serials not consecutive: %s" % serials
    for i, f in enumerate(futs):
        assert f is not None, "release_slot() %d did not return" % i
        rp.future_result(f, 5.0, "release future %d" % i)


# ------------------------------------------------------------------------------------------
# 10.5 per-message send deadline, not cancelled by other traffic


@pytest.mark.parametrize("traffic", ["noops", "noops+acks"])
def test_10_5_send_deadline_survives_other_traffic(h, traffic):
    node, port = h.node(SYNCHRONOUS=True, TIMEOUT=0.5, REUSE_TIME=30.0)
    server = h.server()
    fut = node.send(rp.make_msg(server.port, b"", b"never acked"))
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    f = conn.recv_frame()
    assert f.type == rp.REQ_ACK
    start = time.monotonic()
    serial = 1
    sent_data = False
    deadline = start + 10.0
    while not fut.done() and time.monotonic() < deadline:
        try:
            conn.send(rp.pack_noop(serial))
            serial += 1
            if traffic == "noops+acks" and not sent_data and time.monotonic() - start > 0.15:
                # The node writes an ACK for this while its own message waits for one.
                conn.send(rp.pack_frame(bytes([0x99]) * 16, serial, rp.REQ_ACK, b"", b"ping"))
                serial += 1
                sent_data = True
        except OSError:
            break  # node closed the connection: fine, the future decides
        if sent_data:
            try:
                node.get(timeout=0.0)  # AUTO_RELEASE: get() releases, the ACK is written
            except queue.Empty:
                pass
        time.sleep(0.1)
    exc = rp.future_error(fut, 5.0, "synchronous send that is never acknowledged")
    elapsed = time.monotonic() - start
    assert isinstance(exc, TimeoutError) and ecode(exc) == TIMEOUT, (
        "expected TimeoutError, got %r" % (exc,)
    )
    assert elapsed < 5.0, "send failed only after %.1f s; the deadline is T = 0.5 s" % elapsed


# ------------------------------------------------------------------------------------------
# 10.6 closing a secondary connection does not hurt the active one


def _two_connections_same_remote(h, node, port, p):
    a, _ = h.client(port, hs_port=p, name="client A")
    a.send_frame(bytes([0xA1]) * 16, 1, 0x00, b"", b"from A")
    assert rp.get_msg(node, what="message on A").data == b"from A"  # A's handshake processed
    b, _ = h.client(port, hs_port=p, name="client B")
    b.send_frame(bytes([0xB1]) * 16, 1, 0x00, b"", b"from B")
    mb = rp.get_msg(node, what="message on B")  # B's handshake processed last: B is active
    assert mb.data == b"from B" and mb.port == p
    return a, b


@pytest.mark.parametrize("how", ["close", "reset"])
def test_10_6_secondary_close_keeps_outstanding_message(h, how):
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=True, TIMEOUT=5.0)
    p = rp.free_port()  # nothing listens on P
    a, b = _two_connections_same_remote(h, node, port, p)
    msg = rp.make_msg(p, b"", b"to remote P")
    fut = node.send(msg)
    f = b.recv_frame(5.0)
    assert f.identity == msg.identity and f.type == rp.REQ_ACK, "message not written on B"
    a.assert_silent(0.2, "(A is secondary: nothing is written there)")
    if how == "reset":
        a.abort()
    else:
        a.close()
    time.sleep(0.5)  # let the node see A's EOF/RST
    assert not fut.done(), "closing secondary A completed the message on B: %r" % (
        fut.exception() if fut.done() else None,
    )
    b.send(rp.pack_ack(f.identity))
    rp.future_result(fut, 5.0, "send whose secondary connection closed")
    # B still works afterwards
    fut2 = node.send(rp.make_msg(p, b"", b"second"))
    f2 = b.recv_frame(5.0)
    assert f2.data == b"second"
    b.send(rp.pack_ack(f2.identity))
    rp.future_result(fut2, 5.0, "second send on B")


def test_10_6_secondary_close_keeps_owed_ack(h):
    node, port = h.node(SYNCHRONOUS=False, AUTO_RELEASE=True, TIMEOUT=5.0)
    p = rp.free_port()
    a, b = _two_connections_same_remote(h, node, port, p)
    # An owed ACK on B, released only after A closed.
    b.send_frame(MSG_ID, 2, rp.REQ_ACK, b"", b"needs ack")
    a.close()
    time.sleep(0.3)
    rp.get_msg(node, what="REQ_ACK message on B")  # AUTO_RELEASE: get() releases it
    ack = b.recv_frame(5.0)
    assert ack.type == rp.ACK and ack.identity == MSG_ID, "ACK for B's message lost after A closed"


# ------------------------------------------------------------------------------------------
# 10.7 size check in 64 bits


@pytest.mark.parametrize(
    "data_len,header_len",
    [(0xFFFFFFF0, 0x20), (0xFFFFFFFF, 0xFFFF), (0xFFFFFFFF, 1), (0xFFFFFFFF, 0)],
)
def test_10_7_size_overflow_closes(h, data_len, header_len):
    node, port = h.node(SYNCHRONOUS=True)
    c, _ = h.client(port)
    c.send(rp.pack_header(MSG_ID, 1, data_len, header_len, rp.REQ_ACK) + b"x" * 64)
    assert c.wait_closed(5.0), "data_len 0x%x + header_len 0x%x must exceed MAX_MSG_SIZE" % (
        data_len,
        header_len,
    )
    rp.assert_no_msg(node, 0.2)
    rp.assert_node_serves(h, node, port, "after a size-overflow frame")


# ------------------------------------------------------------------------------------------
# 10.9 every future completes


def test_10_9_refused_port_fails_every_send(h):
    node, port = h.node(SYNCHRONOUS=True, TIMEOUT=2.0)
    p = rp.free_port()
    futs = [node.send(rp.make_msg(p, b"", b"%d" % i)) for i in range(4)]
    for i, f in enumerate(futs):
        exc = rp.future_error(f, 15.0, "send %d to a refused port" % i)
        assert isinstance(exc, ConnectionError), "send %d: expected ConnectionError, got %r" % (
            i,
            exc,
        )
        assert ecode(exc) == CANNOT_CONNECT, "send %d: ecode %r" % (i, ecode(exc))


@pytest.mark.parametrize("stall", ["no-handshake", "no-ack"])
def test_10_9_stop_fails_queued_and_in_flight_sends(h, stall):
    node, port = h.node(SYNCHRONOUS=True, TIMEOUT=30.0)
    server = h.server()
    futs = [node.send(rp.make_msg(server.port, b"", b"%d" % i)) for i in range(4)]
    conn = h.track(server.accept())
    conn.recv_handshake()
    if stall == "no-ack":
        conn.send_handshake(server.port, SERVER_ID)
        conn.recv_frame()  # first message in flight, never acknowledged
    else:
        time.sleep(0.3)
    assert not any(f.done() for f in futs), "a send completed while the peer stalls"
    box = rp.run_bounded(node.stop, 10.0, "node.stop() with stalled sends")
    assert "error" not in box, "node.stop() raised %r" % (box.get("error"),)
    for i, f in enumerate(futs):
        exc = rp.future_error(f, 5.0, "send %d after stop()" % i)
        assert isinstance(exc, ConnectionError) and ecode(exc) == SHUTDOWN, (
            "send %d: expected SHUTDOWN as a ConnectionError subclass, got %r (ecode %r)"
            % (i, exc, ecode(exc))
        )
    assert conn.wait_closed(5.0), "node.stop() left the connection open"
    box = rp.run_bounded(node.stop, 5.0, "second node.stop()")
    assert "error" not in box, "second stop() is not idempotent: %r" % (box.get("error"),)


def test_10_9_send_after_stop_fails(h):
    node, port = h.node()
    rp.run_bounded(node.stop, 10.0, "node.stop()")
    try:
        fut = node.send(rp.make_msg(rp.free_port(), b"", b"late"))
    except Exception as e:  # noqa: BLE001
        raise AssertionError(
            "send() after stop() raised %r instead of returning a failed Future" % e
        ) from None
    exc = rp.future_error(fut, 5.0, "send after stop()")
    assert isinstance(exc, ConnectionError), "expected a ConnectionError (SHUTDOWN), got %r" % exc


# ------------------------------------------------------------------------------------------
# 10.10 exception classes


def test_10_10_peer_close_is_protocol_error(h):
    node, port = h.node(SYNCHRONOUS=True, TIMEOUT=5.0)
    server = h.server()
    fut = node.send(rp.make_msg(server.port, b"", b"x"))
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    conn.recv_frame()
    conn.close()
    exc = rp.future_error(fut, 5.0, "send whose peer closed before the ACK")
    assert isinstance(exc, RuntimeError) and isinstance(exc, ConnectionError), (
        "PROTOCOL_ERROR must subclass RuntimeError and ConnectionError: %r" % exc
    )
    assert ecode(exc) == PROTOCOL_ERROR, "ecode %r" % ecode(exc)


# ------------------------------------------------------------------------------------------
# 10.14 binding surface


def test_10_14_port_range():
    import libchirp
    import libchirp.queue

    m = libchirp.queue.Message()
    m.port = 65535
    assert m.port == 65535
    for bad in (65536, -1):
        with pytest.raises(ValueError):
            m.port = bad
    c = libchirp.Config()
    with pytest.raises((ValueError, OverflowError)):
        c.PORT = 65536


def test_10_5_write_to_stalled_reader_times_out(h):
    """4.4: a frame the peer never reads fails with TIMEOUT T after its write started."""
    node, port = h.node(SYNCHRONOUS=False, TIMEOUT=0.5, REUSE_TIME=30.0)
    server = h.server()
    fut = node.send(rp.make_msg(server.port, b"", b"z" * (64 * 1024 * 1024)))
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    # never read: the socket buffers fill, the write stalls
    exc = rp.future_error(fut, 15.0, "64 MiB write to a peer that never reads")
    assert isinstance(exc, TimeoutError) and ecode(exc) == TIMEOUT, repr(exc)


def test_10_9_sends_racing_stop_all_complete(h):
    """Sends issued from other threads while stop() runs: every future completes."""
    node, port = h.node(SYNCHRONOUS=True, TIMEOUT=5.0)
    server = h.server()
    futs = []
    lock = threading.Lock()
    stop_flag = threading.Event()
    refused = []

    def spam():
        while not stop_flag.is_set():
            try:
                f = node.send(rp.make_msg(server.port, b"", b"s"))
            except Exception as e:  # noqa: BLE001
                refused.append(e)
                continue
            with lock:
                futs.append(f)
            time.sleep(0.001)

    threads = [threading.Thread(target=spam, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    time.sleep(0.2)
    box = rp.run_bounded(node.stop, 10.0, "node.stop() while other threads send")
    time.sleep(0.2)
    stop_flag.set()
    for t in threads:
        t.join(5)
    assert "error" not in box, "stop() raised %r" % (box.get("error"),)
    assert not refused, "send() raised instead of returning a failed Future: %r" % refused[:3]
    with lock:
        pending = list(futs)
    assert pending, "no sends were issued"
    done, not_done = concurrent.futures.wait(pending, timeout=10.0)
    assert not not_done, "%d of %d futures never completed after stop()" % (
        len(not_done),
        len(pending),
    )
    for f in pending:
        exc = f.exception()
        assert exc is None or isinstance(exc, ConnectionError), repr(exc)


def test_10_9_release_after_stop_completes(h):
    """A message still held when stop() gives up: a later release_slot() must not hang."""
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False, TIMEOUT=0.5)
    c, _ = h.client(port)
    c.send(rp.pack_frame(MSG_ID, 1, rp.REQ_ACK, b"", b"held"))
    m = rp.get_msg(node)
    box = rp.run_bounded(node.stop, 15.0, "node.stop() with an unreleased message")
    err = box.get("error")
    assert isinstance(err, RuntimeError), (
        "stop() with a held slot: expected RuntimeError, got %r" % (err,)
    )
    fut = m.release_slot()
    rp.wait_future(fut, 5.0, "release_slot() after stop()")
