"""Pipelined acknowledgements: the capability NOOP extension (docs/protocol.md).

A libchirp 1.x receiver keeps one ACK buffer per connection, so a sender must
not have two REQ_ACK frames unacknowledged towards it (docs/protocol.md#wire-format).
Our nodes announce that they acknowledge every REQ_ACK frame independently
with a NOOP frame that also carries the EXT bit and capability bytes in its
identity; 1.x takes it for a plain NOOP. Only a peer that announced this gets
several REQ_ACK frames in flight. These tests show both sides of that: a
pipelining pair, and pairs where one side does not announce.
"""

import time

import pytest
import rawpeer as rp

pytestmark = pytest.mark.timeout(60)

SERVER_ID = bytes(range(0xB0, 0xC0))


def test_connector_announces_and_pipelines_when_answered(h):
    """Our node dials; the peer answers the announcement; several REQ_ACK frames are then
    written before any ACK, and ACKs in any order complete the right sends."""
    server = h.server()
    node, port = h.node(SYNCHRONOUS=True, TIMEOUT=5.0)
    futs = [node.send(rp.make_msg(server.port, b"", b"m%d" % i)) for i in range(8)]
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    first = conn.recv_frame(skip_caps=False)
    assert rp.is_caps(first), "the connector's first frame must be its capability NOOP: %r" % (
        first,
    )
    assert first.identity[4] & 0x01 and first.identity[5] >= 2, first.identity.hex()
    assert first.data_len == 0 and first.header_len == 0
    conn.send(rp.pack_caps(1, window=32))
    frames = [conn.recv_frame(timeout=5.0) for _ in range(8)]
    assert [f.data for f in frames] == [b"m%d" % i for i in range(8)]
    assert all(f.type == rp.REQ_ACK for f in frames)
    assert not any(f.done() for f in futs), "no send may complete before its ACK"
    for f in reversed(frames):  # out of order on purpose
        conn.send(rp.pack_ack(f.identity))
    for i, fut in enumerate(futs):
        assert rp.future_result(fut, 5.0, "send %d" % i) is not None


def test_connector_keeps_one_in_flight_without_answer(h):
    """A peer that does not answer the announcement (a libchirp 1.x node) never has more
    than one unacknowledged REQ_ACK frame."""
    server = h.server()
    node, port = h.node(SYNCHRONOUS=True, TIMEOUT=5.0)
    futs = [node.send(rp.make_msg(server.port, b"", b"m%d" % i)) for i in range(3)]
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    for i in range(3):
        f = conn.recv_frame(timeout=5.0)
        assert f.data == b"m%d" % i
        conn.assert_silent(0.3, "while REQ_ACK frame %d is unacknowledged" % i)
        conn.send(rp.pack_ack(f.identity))
        rp.future_result(futs[i], 5.0, "send %d" % i)
    assert len(conn.caps) == 1, "the announcement is sent once per connection"


def test_acceptor_answers_only_an_announcement(h):
    """A 1.x connector (no announcement) never sees our capability NOOP; one that announces
    gets our answer."""
    node, port = h.node(SYNCHRONOUS=True)
    plain, _ = h.client(port, hs_port=4001)
    plain.send_frame(rp.CLIENT_ID, 1, 0x00, b"", b"x")
    rp.get_msg(node)  # AUTO_RELEASE: nothing is owed for type 0x00
    plain.assert_silent(0.5, "towards a connector that did not announce")

    announcer, _ = h.client(port, hs_port=4002)
    announcer.send(rp.pack_caps(7))
    answer = announcer.recv_frame(timeout=5.0, skip_caps=False)
    assert rp.is_caps(answer), answer


def test_pair_of_our_nodes_pipelines_with_slots(h):
    """Two of our nodes: with MAX_SLOTS=8 in synchronous mode the receiver holds eight
    acknowledged-mode messages at once; every send completes when its message is released."""
    receiver, rport = h.node(SYNCHRONOUS=True, MAX_SLOTS=8, AUTO_RELEASE=False)
    sender, _ = h.node(SYNCHRONOUS=True)
    futs = [sender.send(rp.make_msg(rport, b"", b"%d" % i)) for i in range(8)]
    held = [rp.get_msg(receiver, 5.0, "message %d" % i) for i in range(8)]
    assert sorted(int(m.data) for m in held) == list(range(8))
    time.sleep(0.2)
    assert not any(f.done() for f in futs), "sends completed before their release"
    for m in held:
        m.release_slot().result(5.0)
    for i, fut in enumerate(futs):
        rp.future_result(fut, 5.0, "send %d" % i)
