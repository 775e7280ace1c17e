"""Wire-level tests: raw TCP peers against a real node (docs/protocol.md).

Every test replays something docs/protocol.md states about the bytes on the wire; the raw peer
(tests/rawpeer.py) is written by hand from the protocol text, plain TCP on loopback.
"""

import time

import pytest
from conftest import require_ipv6

try:
    from . import rawpeer as rp
except ImportError:
    import rawpeer as rp

pytestmark = pytest.mark.timeout(60)

NODE_ID = bytes(range(16))  # 00 01 .. 0f (9.1)
MSG_ID = bytes(range(0x10, 0x20))  # 10 11 .. 1f (9.1)
SERVER_ID = bytes(range(0xB0, 0xC0))  # b0 .. bf (9.2)

VECTOR_9_1_FRAME = bytes.fromhex(
    "101112131415161718191a1b1c1d1e1f"  # identity
    "00000007"  # serial
    "00000005"  # data_len
    "0003"  # header_len
    "01"  # type REQ_ACK
    "686472"  # "hdr"
    "68656c6c6f"  # "hello"
)
VECTOR_9_1_CLIENT_HS = bytes.fromhex("0fa0a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")


# ------------------------------------------------------------------------------------------
# 9.1 inbound


def test_vector_self_check():
    """The hand-made packers reproduce the docs/protocol.md#wire-format bytes exactly."""
    assert rp.pack_handshake(4000, rp.CLIENT_ID) == VECTOR_9_1_CLIENT_HS
    assert rp.pack_frame(MSG_ID, 7, rp.REQ_ACK, b"hdr", b"hello") == VECTOR_9_1_FRAME
    assert len(VECTOR_9_1_FRAME) == 35


def test_inbound_vector_9_1(h):
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False, IDENTITY=NODE_ID, TIMEOUT=5.0)
    c = h.connect(port)

    # The node sends its handshake right after accept, before we sent anything.
    raw_hs = c.recv_exact(18, 5.0, "node handshake bytes (sent before the client's)")
    hs = rp.unpack_handshake(raw_hs)
    assert hs.port == port, "handshake port %d != node PORT %d" % (hs.port, port)
    assert hs.identity == NODE_ID, (
        "handshake identity %s != configured IDENTITY %s (quirk 10.1 must be fixed)"
        % (hs.identity.hex(), NODE_ID.hex())
    )
    assert node.identity() == NODE_ID, "node.identity() = %s" % node.identity().hex()

    c.send(VECTOR_9_1_CLIENT_HS)
    c.send(VECTOR_9_1_FRAME)
    msg = rp.get_msg(node, what="9.1 message")
    assert msg.identity == MSG_ID, msg.identity.hex()
    assert msg.serial == 7, msg.serial
    assert msg.header == b"hdr", msg.header
    assert msg.data == b"hello", msg.data
    assert msg.address == "127.0.0.1", msg.address
    assert msg.port == 4000, (
        "port %d: must be the handshake port, not the TCP source port" % msg.port
    )
    assert msg.remote_identity == rp.CLIENT_ID, msg.remote_identity.hex()
    assert msg.has_slot, "a delivered message with AUTO_RELEASE False must hold its slot"

    c.assert_silent(0.5, "before the slot was released (no ACK on receipt)")

    fut = msg.release_slot()
    ack = c.recv_frame(5.0)
    assert len(ack.raw) == 27 and ack.data_len == 0 and ack.header_len == 0, ack
    assert ack.identity == MSG_ID, "ACK identity %s" % ack.identity.hex()
    assert ack.type == rp.ACK, "ACK type 0x%02x" % ack.type
    assert ack.raw[20:] == bytes.fromhex("00000000000002"), ack.raw.hex()
    res = rp.future_result(fut, 5.0, "release_slot() future")
    assert tuple(res) == (MSG_ID, 7), "release future result %r, expected (identity, serial)" % (
        res,
    )
    assert not msg.has_slot
    c.assert_silent(0.3, "after the ACK")


# ------------------------------------------------------------------------------------------
# 9.2 outbound


@pytest.mark.parametrize("synchronous", [True, False], ids=["sync", "async"])
def test_outbound_vector_9_2(h, synchronous):
    server = h.server()
    node, port = h.node(SYNCHRONOUS=synchronous, TIMEOUT=5.0)
    msg = rp.make_msg(server.port, b"H", b"payload")
    fut = node.send(msg)
    conn = h.track(server.accept(5.0))

    hs = conn.recv_handshake(5.0)
    assert hs.port == port, "node handshake port %d != PORT %d" % (hs.port, port)
    assert hs.identity == node.identity(), "handshake identity != node.identity()"

    # Nothing may follow before the node has read our handshake (1.5 step 4).
    conn.assert_silent(0.3, "before the server handshake was sent")
    assert not fut.done(), "send completed before anything was written: %r" % fut
    conn.send_handshake(server.port, SERVER_ID)

    f = conn.recv_frame(5.0)
    assert f.type == (rp.REQ_ACK if synchronous else 0x00), "frame type 0x%02x" % f.type
    assert f.data_len == 7 and f.header_len == 1, (f.data_len, f.header_len)
    assert f.header == b"H" and f.data == b"payload", (f.header, f.data)
    assert f.identity == msg.identity, "frame identity %s != msg.identity %s" % (
        f.identity.hex(),
        msg.identity.hex(),
    )

    if synchronous:
        time.sleep(0.3)
        assert not fut.done(), "synchronous send completed without an ACK: %r" % fut
        conn.send(rp.pack_ack(f.identity, 12345))
    res = rp.future_result(fut, 5.0, "send future")
    assert res is msg, "send future resolved to %r, expected the message" % (res,)
    conn.assert_silent(0.3, "after the message completed")


# ------------------------------------------------------------------------------------------
# 9.3 table


def test_header_and_body_one_byte_at_a_time(h):
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False)
    c, _ = h.client(port)
    c.send_slowly(VECTOR_9_1_FRAME)
    msg = rp.get_msg(node)
    assert (msg.identity, msg.serial, msg.header, msg.data) == (MSG_ID, 7, b"hdr", b"hello")
    fut = msg.release_slot()
    ack = c.recv_frame()
    assert ack.type == rp.ACK and ack.identity == MSG_ID
    rp.future_result(fut, 5.0, "release future")


def test_unknown_type_bit_is_data_without_ack(h):
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False)
    c, _ = h.client(port)
    c.send_frame(MSG_ID, 9, 0x08, b"h", b"type 8")
    msg = rp.get_msg(node, what="type 0x08 frame (unknown bits are ignored)")
    assert msg.data == b"type 8" and msg.header == b"h"
    rp.future_result(msg.release_slot(), 5.0, "release of a message that needs no ACK")
    c.assert_silent(0.5, "after releasing a type 0x08 message (no ACK requested)")


BAD_CONTROL_FRAMES = {
    # docs/protocol.md#wire-format vector: NOOP with data_len 1 plus the byte
    "noop_with_data": bytes.fromhex("00" * 16 + "0000000200000001000004") + b"x",
    "noop_req_ack": rp.pack_header(rp.ZERO_ID, 3, 0, 0, 0x05),
    "ack_req_ack": rp.pack_header(MSG_ID, 3, 0, 0, 0x03),
    "ack_with_header": rp.pack_header(MSG_ID, 3, 0, 1, rp.ACK) + b"x",
    "ack_noop_with_data": rp.pack_header(rp.ZERO_ID, 3, 1, 0, 0x06) + b"x",
}


@pytest.mark.parametrize("name", sorted(BAD_CONTROL_FRAMES))
def test_invalid_control_frame_closes_connection(h, name):
    node, port = h.node(SYNCHRONOUS=True)
    c, _ = h.client(port)
    c.send(BAD_CONTROL_FRAMES[name])
    assert c.wait_closed(5.0), "node kept the connection open after an invalid %s frame" % name
    rp.assert_no_msg(node, 0.2, "from an invalid control frame")
    rp.assert_node_serves(h, node, port, "after closing a bad connection")


def test_ack_noop_without_payload_counts_as_noop(h):
    node, port = h.node(SYNCHRONOUS=True)
    c, _ = h.client(port)
    c.send(rp.pack_header(rp.ZERO_ID, 3, 0, 0, 0x06))
    c.assert_silent(0.5, "after an ACK|NOOP frame (a NOOP: no reply, stays open)")
    c.send_frame(MSG_ID, 4, 0x00, b"", b"after noop")
    assert rp.get_msg(node).data == b"after noop"


def test_over_max_msg_size_closes(h):
    node, port = h.node(SYNCHRONOUS=True)
    c, _ = h.client(port)
    c.send(rp.pack_header(MSG_ID, 1, rp.MAX_MSG_SIZE_DEFAULT, 1, rp.REQ_ACK))
    assert c.wait_closed(5.0), "data_len 100 MiB + header_len 1 exceeds MAX_MSG_SIZE: must close"
    rp.assert_node_serves(h, node, port, "after an oversize frame")


def test_exactly_max_msg_size_accepted(h):
    node, port = h.node(SYNCHRONOUS=True)
    c, _ = h.client(port)
    c.send(rp.pack_header(MSG_ID, 1, rp.MAX_MSG_SIZE_DEFAULT, 0, 0x00))
    c.send(b"partial data")
    c.assert_silent(1.0, "while waiting for the data of a frame of exactly MAX_MSG_SIZE")


@pytest.mark.parametrize("extra,closed", [(0, False), (1, True)], ids=["equal", "over"])
def test_configured_max_msg_size_boundary(h, extra, closed):
    node, port = h.node(SYNCHRONOUS=False, MAX_MSG_SIZE=1000)
    c, _ = h.client(port)
    header = b"h" * 10
    data = b"d" * (990 + extra)
    c.send_frame(MSG_ID, 1, 0x00, header, data)
    if closed:
        assert c.wait_closed(5.0), "header_len + data_len = 1001 > MAX_MSG_SIZE 1000 must close"
        rp.assert_no_msg(node, 0.2)
    else:
        m = rp.get_msg(node, what="message of exactly MAX_MSG_SIZE (1000) bytes")
        assert m.header == header and m.data == data


def test_ack_with_unknown_identity_ignored(h):
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False)
    c, _ = h.client(port)
    c.send(rp.pack_ack(bytes([0xEE]) * 16, 99))
    c.assert_silent(0.5, "after an ACK for an unknown identity")
    c.send(VECTOR_9_1_FRAME)
    msg = rp.get_msg(node, what="data frame after an unknown ACK")
    assert msg.identity == MSG_ID
    fut = msg.release_slot()
    assert c.recv_frame().identity == MSG_ID
    rp.future_result(fut, 5.0, "release future")


def test_empty_message(h):
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False)
    c, _ = h.client(port)
    c.send_frame(MSG_ID, 1, rp.REQ_ACK)
    msg = rp.get_msg(node, what="empty message (header_len = data_len = 0 is valid)")
    assert msg.header == b"" and msg.data == b""
    fut = msg.release_slot()
    assert c.recv_frame().type == rp.ACK
    rp.future_result(fut, 5.0, "release future")


def test_three_req_ack_released_back_to_back(h):
    """9.3 / 10.4: every REQ_ACK gets its own ACK, serials consecutive, all releases complete."""
    node, port = h.node(SYNCHRONOUS=False, AUTO_RELEASE=False)
    c, _ = h.client(port)
    ids = [bytes([0x40 + i]) * 16 for i in range(3)]
    c.send(b"".join(rp.pack_frame(ids[i], 100 + i, rp.REQ_ACK, b"", b"m%d" % i) for i in range(3)))
    msgs = [rp.get_msg(node, what="message %d of 3" % i) for i in range(3)]
    assert [m.identity for m in msgs] == ids, "delivery order must follow arrival order"
    futs = [m.release_slot() for m in msgs]
    acks = [c.recv_frame(5.0) for _ in range(3)]
    assert all(a.type == rp.ACK for a in acks), [a.type for a in acks]
    assert sorted(a.identity for a in acks) == sorted(ids), "one ACK per message: %s" % [
        a.identity.hex() for a in acks
    ]
    for a, b in zip(acks, acks[1:]):
        assert rp.serial_diff(a.serial, b.serial) == 1, "ACK serials not consecutive: %s" % [
            a.serial for a in acks
        ]
    for i, f in enumerate(futs):
        res = rp.future_result(f, 5.0, "release future %d" % i)
        assert tuple(res) == (ids[i], 100 + i), res
    c.assert_silent(0.3, "after the three ACKs")


def test_three_req_ack_released_one_at_a_time_sync(h):
    """Synchronous receiver: one slot, the next frame is read only after the release."""
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False)
    c, _ = h.client(port)
    ids = [bytes([0x50 + i]) * 16 for i in range(3)]
    c.send(b"".join(rp.pack_frame(ids[i], 200 + i, rp.REQ_ACK, b"", b"m%d" % i) for i in range(3)))
    acks = []
    for i in range(3):
        m = rp.get_msg(node, what="message %d of 3" % i)
        assert m.identity == ids[i]
        if i < 2:
            rp.assert_no_msg(node, 0.3, "while the only slot is held (synchronous: 1 slot)")
        fut = m.release_slot()
        a = c.recv_frame(5.0)
        assert a.type == rp.ACK and a.identity == ids[i], (a.type, a.identity.hex())
        rp.future_result(fut, 5.0, "release %d" % i)
        acks.append(a)
    for a, b in zip(acks, acks[1:]):
        assert rp.serial_diff(a.serial, b.serial) == 1, [a.serial for a in acks]


def test_noop_before_message_after_idleness(h):
    """6.4: a message queued for a remote idle > 0.75 R is preceded by a NOOP."""
    # R = max(REUSE_TIME, 3 T) = 4 s: NOOP window is idle time in (3 s, 4 s).
    node, port = h.node(SYNCHRONOUS=False, TIMEOUT=1.0, REUSE_TIME=4.0)
    c, _ = h.client(port, hs_port=rp.free_port())
    c.send_frame(MSG_ID, 1, 0x00, b"", b"hi")
    m = rp.get_msg(node)
    m.data = b"reply 1"
    rp.future_result(node.send(m), 5.0, "immediate reply")
    f1, noops = c.recv_frame_skip_noops(5.0)
    assert not noops, "NOOP sent although the remote was not idle"
    assert f1.data == b"reply 1"
    time.sleep(3.4)
    m2 = rp.make_msg(m.port, b"", b"reply 2")
    rp.future_result(node.send(m2), 5.0, "reply after idleness")
    first = c.recv_frame(5.0)
    assert first.type == rp.NOOP, "expected a NOOP before the message after 3.4 s idle (R = 4 s)"
    assert first.identity == rp.ZERO_ID and first.data_len == 0 and first.header_len == 0, first
    second = c.recv_frame(5.0)
    assert second.data == b"reply 2", second
    assert (
        rp.serial_diff(f1.serial, first.serial) == 1
        and rp.serial_diff(first.serial, second.serial) == 1
    ), "NOOP must use the same serial counter: %d, %d, %d" % (
        f1.serial,
        first.serial,
        second.serial,
    )


# ------------------------------------------------------------------------------------------
# Serials and remotes


@pytest.mark.parametrize("synchronous", [True, False], ids=["sync", "async"])
def test_outbound_serials_consecutive(h, synchronous):
    server = h.server()
    node, port = h.node(SYNCHRONOUS=synchronous, TIMEOUT=5.0)
    msgs = [rp.make_msg(server.port, b"", b"n%d" % i) for i in range(5)]
    futs = [node.send(m) for m in msgs]
    conn = h.track(server.accept(5.0))
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    frames = []
    for i in range(5):
        f = conn.recv_frame(5.0)
        frames.append(f)
        assert f.data == b"n%d" % i, "FIFO order: frame %d carried %r" % (i, f.data)
        assert f.identity == msgs[i].identity
        if synchronous:
            conn.send(rp.pack_ack(f.identity))
    for i, fut in enumerate(futs):
        rp.future_result(fut, 5.0, "send %d" % i)
    for a, b in zip(frames, frames[1:]):
        assert rp.serial_diff(a.serial, b.serial) == 1, "serials: %s" % [f.serial for f in frames]


def test_serials_near_wrap_are_reported_raw(h):
    """Serials are opaque u32s: 0xFFFFFFFF and 0 are delivered unchanged."""
    node, port = h.node(SYNCHRONOUS=False)
    c, _ = h.client(port)
    c.send_frame(bytes([1]) * 16, 0xFFFFFFFF, 0x00, b"", b"a")
    c.send_frame(bytes([2]) * 16, 0, 0x00, b"", b"b")
    assert rp.get_msg(node).serial == 0xFFFFFFFF
    assert rp.get_msg(node).serial == 0


def test_reply_goes_over_the_same_connection(h):
    """3.5 / 6.1: sending a received message back reuses the incoming connection; the ACK and
    the reply share the remote's serial counter."""
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False)
    p = rp.free_port()  # nothing listens on P: a new connection attempt would fail
    c, _ = h.client(port, hs_port=p)
    c.send(VECTOR_9_1_FRAME)
    msg = rp.get_msg(node)
    assert msg.port == p
    rp.future_result(msg.release_slot(), 5.0, "release")
    ack = c.recv_frame()
    assert ack.type == rp.ACK

    msg.data = b"reply"
    fut = node.send(msg)
    try:
        f = c.recv_frame(5.0)
    except AssertionError as e:
        rp.wait_future(fut, 5.0, "reply send")
        raise AssertionError(
            "reply did not arrive on the incoming connection (%s); send outcome: %r"
            % (e, fut.exception())
        ) from None
    assert f.identity == MSG_ID, "a reply keeps the identity of the received message"
    assert f.type == rp.REQ_ACK and f.header == b"hdr" and f.data == b"reply"
    assert rp.serial_diff(ack.serial, f.serial) == 1, (
        "ACK and data frames to one remote share one counter: %d then %d" % (ack.serial, f.serial)
    )
    c.send(rp.pack_ack(MSG_ID))
    assert rp.future_result(fut, 5.0, "reply send") is msg


def test_two_remotes_same_ip_different_handshake_port(h):
    """The remote key includes the handshake port: two clients with different handshake ports
    are two remotes, and replies go to the right one."""
    node, port = h.node(SYNCHRONOUS=False)
    p1, p2 = rp.free_port(), rp.free_port()
    c1, _ = h.client(port, hs_port=p1, name="client 1")
    c2, _ = h.client(port, hs_port=p2, name="client 2")
    c1.send_frame(bytes([1]) * 16, 1, 0x00, b"", b"from 1")
    m1 = rp.get_msg(node)
    c2.send_frame(bytes([2]) * 16, 1, 0x00, b"", b"from 2")
    m2 = rp.get_msg(node)
    assert (m1.port, m2.port) == (p1, p2)
    m2.data = b"to 2"
    m1.data = b"to 1"
    f2 = node.send(m2)
    f1 = node.send(m1)
    assert c2.recv_frame().data == b"to 2"
    assert c1.recv_frame().data == b"to 1"
    rp.future_result(f1, 5.0, "send to remote 1")
    rp.future_result(f2, 5.0, "send to remote 2")


# ------------------------------------------------------------------------------------------
# 1.2 plaintext on loopback, even with encryption enabled


def _write_cert_material(tmp_path):
    """Generate CA + leaf + key in one PEM and a PKCS#3 DH file (RFC 7919 ffdhe2048)."""
    crypto = pytest.importorskip("cryptography")
    del crypto
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("chirp test CA"))
        .issuer_name(name("chirp test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name("chirp test node"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    pem = (
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        + leaf.public_bytes(serialization.Encoding.PEM)
        + ca.public_bytes(serialization.Encoding.PEM)
    )
    cert = tmp_path / "cert.pem"
    cert.write_bytes(pem)
    dh = tmp_path / "dh.pem"
    dh.write_text(FFDHE2048_PEM)
    return str(cert), str(dh)


FFDHE2048_PEM = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_loopback_is_plaintext_with_encryption_enabled(h, tmp_path, host):
    if ":" in host:
        require_ipv6()
    cert, dh = _write_cert_material(tmp_path)
    node, port = h.node(
        SYNCHRONOUS=True,
        AUTO_RELEASE=False,
        DISABLE_ENCRYPTION=False,
        CERT_CHAIN_PEM=cert,
        DH_PARAMS_PEM=dh,
    )
    # inbound: the first bytes are the plain 18-byte handshake, not a TLS record
    c = h.connect(port, host)
    hs = c.recv_handshake(5.0)
    assert hs.port == port and hs.identity == node.identity(), "not a plain handshake: %r" % (hs,)
    c.send_handshake(4000)
    c.send(VECTOR_9_1_FRAME)
    m = rp.get_msg(node, what="plaintext message over %s" % host)
    assert m.address == host, m.address
    fut = m.release_slot()
    assert c.recv_frame().type == rp.ACK
    rp.future_result(fut, 5.0, "release")

    # outbound: the node dials host in plaintext
    server = h.server(host)
    fut = node.send(rp.make_msg(server.port, b"H", b"x", address=host))
    conn = h.track(server.accept(5.0))
    first = conn.recv_exact(18, 5.0, "plain handshake bytes")
    hs = rp.unpack_handshake(first)
    assert hs.port == port and hs.identity == node.identity(), (
        "expected a plain chirp handshake on %s, got %s (TLS record?)" % (host, first.hex())
    )
    conn.send_handshake(server.port, SERVER_ID)
    f = conn.recv_frame()
    assert f.data == b"x"
    conn.send(rp.pack_ack(f.identity))
    rp.future_result(fut, 5.0, "plaintext send over %s" % host)


# ------------------------------------------------------------------------------------------
# More framing and flow control


def test_random_chunking_of_a_frame_stream(h):
    """Frames split at arbitrary points, several per segment: all delivered in order."""
    import random

    rnd = random.Random(1234)
    node, port = h.node(SYNCHRONOUS=False)
    c, _ = h.client(port)
    frames = []
    for i in range(30):
        header = bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 40)))
        data = bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 3000)))
        frames.append((bytes([i]) * 16, i, header, data))
    stream = b"".join(rp.pack_frame(ident, s, 0x00, hd, d) for ident, s, hd, d in frames)
    pos = 0
    while pos < len(stream):
        n = rnd.choice([1, 2, 5, 17, 27, 100, 1000, 4096])
        c.send(stream[pos : pos + n])
        pos += n
        if rnd.random() < 0.05:
            time.sleep(0.01)
    for ident, s, hd, d in frames:
        m = rp.get_msg(node, what="frame with serial %d" % s)
        assert (m.identity, m.serial, m.header, m.data) == (ident, s, hd, d), (
            "frame %d delivered wrong or out of order" % s
        )


def test_large_messages_both_directions(h):
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False, TIMEOUT=10.0)
    c, _ = h.client(port)
    big_header = bytes(range(256)) * 200  # 51200 bytes, < 65536
    big_data = bytes(range(251)) * 8000  # ~2 MB
    c.send(rp.pack_frame(MSG_ID, 1, rp.REQ_ACK, big_header, big_data))
    m = rp.get_msg(node, 10.0, "2 MB message")
    assert m.header == big_header and m.data == big_data, "large message corrupted"
    fut = m.release_slot()
    assert c.recv_frame(10.0).type == rp.ACK
    rp.future_result(fut, 5.0, "release")

    server = h.server()
    out = rp.make_msg(server.port, big_header, big_data)
    fut = node.send(out)
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    f = conn.recv_frame(10.0)
    assert f.header_len == len(big_header) and f.data_len == len(big_data)
    assert f.header == big_header and f.data == big_data, "outbound large message corrupted"
    conn.send(rp.pack_ack(f.identity))
    rp.future_result(fut, 5.0, "large send")


def test_handshake_port_zero_and_zero_identity_accepted(h):
    """2.2: port and identity of a handshake are not validated."""
    node, port = h.node(SYNCHRONOUS=False)
    c, _ = h.client(port, hs_port=0, identity=bytes(16))
    c.send_frame(MSG_ID, 1, 0x00, b"", b"zero")
    m = rp.get_msg(node, what="message after a handshake with port 0 / zero identity")
    assert m.port == 0 and m.remote_identity == bytes(16)


def test_async_receiver_slots_flow_control(h):
    """5: with MAX_SLOTS 2 the third frame is delivered only after a release."""
    node, port = h.node(SYNCHRONOUS=False, AUTO_RELEASE=False, MAX_SLOTS=2)
    c, _ = h.client(port)
    c.send(b"".join(rp.pack_frame(bytes([i]) * 16, i, 0x00, b"", b"%d" % i) for i in range(3)))
    m0 = rp.get_msg(node)
    m1 = rp.get_msg(node)
    rp.assert_no_msg(node, 0.5, "while both slots of the connection are held")
    rp.future_result(m0.release_slot(), 5.0, "release 0")
    m2 = rp.get_msg(node, what="third message after a slot was released")
    assert [m0.data, m1.data, m2.data] == [b"0", b"1", b"2"]
    for m in (m1, m2):
        rp.future_result(m.release_slot(), 5.0, "release")


def test_sync_sender_waits_for_ack_before_next_frame(h):
    """4.1: synchronous mode has one data frame in flight per remote."""
    server = h.server()
    node, port = h.node(SYNCHRONOUS=True, TIMEOUT=5.0)
    futs = [node.send(rp.make_msg(server.port, b"", b"%d" % i)) for i in range(3)]
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    for i in range(3):
        f = conn.recv_frame()
        assert f.data == b"%d" % i
        conn.assert_silent(0.3, "while data frame %d waits for its ACK" % i)
        assert not futs[i].done()
        conn.send(rp.pack_ack(f.identity))
        rp.future_result(futs[i], 5.0, "send %d" % i)


def test_ack_written_while_own_message_waits(h):
    """4.1 / 6.3: control frames go out while a synchronous data frame waits for its ACK."""
    server = h.server()
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False, TIMEOUT=5.0)
    fut = node.send(rp.make_msg(server.port, b"", b"mine"))
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    mine = conn.recv_frame()
    conn.send(rp.pack_frame(MSG_ID, 5, rp.REQ_ACK, b"", b"theirs"))
    theirs = rp.get_msg(node)
    assert theirs.port == server.port, "handshake port decides the remote"
    rel = theirs.release_slot()
    ack = conn.recv_frame()
    assert ack.type == rp.ACK and ack.identity == MSG_ID
    assert rp.serial_diff(mine.serial, ack.serial) == 1, "one serial counter per remote"
    rp.future_result(rel, 5.0, "release while our own message waits")
    assert not fut.done()
    conn.send(rp.pack_ack(mine.identity))
    rp.future_result(fut, 5.0, "send")


def test_release_after_peer_closed_completes(h):
    """4.2: connection gone: no ACK, the release completes at once."""
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False)
    c, _ = h.client(port)
    c.send(VECTOR_9_1_FRAME)
    m = rp.get_msg(node)
    c.close()
    time.sleep(0.3)
    res = rp.future_result(m.release_slot(), 5.0, "release after the peer closed")
    assert res is None or tuple(res)[0] == MSG_ID, res
    rp.assert_node_serves(h, node, port, "after a release on a closed connection")


def test_duplicate_and_late_acks_ignored(h):
    server = h.server()
    node, port = h.node(SYNCHRONOUS=True, TIMEOUT=5.0)
    fut1 = node.send(rp.make_msg(server.port, b"", b"1"))
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    f1 = conn.recv_frame()
    conn.send(rp.pack_ack(f1.identity) + rp.pack_ack(f1.identity))  # duplicate
    rp.future_result(fut1, 5.0, "send 1")
    fut2 = node.send(rp.make_msg(server.port, b"", b"2"))
    f2 = conn.recv_frame()
    conn.send(rp.pack_ack(f1.identity))  # stale ACK: must not complete message 2
    time.sleep(0.3)
    assert not fut2.done(), "an ACK for another identity completed the send"
    conn.send(rp.pack_ack(f2.identity))
    rp.future_result(fut2, 5.0, "send 2")


def test_outbound_connect_timeout_when_peer_never_handshakes(h):
    """2.3: the connect timer min(2T, 60) covers the peer's chirp handshake."""
    server = h.server()
    node, port = h.node(SYNCHRONOUS=True, TIMEOUT=0.5)
    start = time.monotonic()
    fut = node.send(rp.make_msg(server.port, b"", b"x"))
    conn = h.track(server.accept())
    conn.recv_handshake()
    exc = rp.future_error(fut, 10.0, "send to a peer that never sends its handshake")
    elapsed = time.monotonic() - start
    assert isinstance(exc, TimeoutError) and getattr(exc, "ecode", None) == 9, repr(exc)
    assert elapsed < 6.0, "connect timeout of 1 s took %.1f s" % elapsed
    assert conn.wait_closed(5.0), "timed-out connection not closed"


def test_after_failure_queued_messages_go_out_on_new_connection(h):
    """6.7 / 6.8: the failed message is not retried, the next one goes out after reconnect,
    and the remote's serial counter continues."""
    server = h.server()
    node, port = h.node(SYNCHRONOUS=True, TIMEOUT=5.0)
    fut1 = node.send(rp.make_msg(server.port, b"", b"first"))
    fut2 = node.send(rp.make_msg(server.port, b"", b"second"))
    conn1 = h.track(server.accept())
    conn1.recv_handshake()
    conn1.send_handshake(server.port, SERVER_ID)
    f1 = conn1.recv_frame()
    assert f1.data == b"first"
    conn1.close()
    exc = rp.future_error(fut1, 5.0, "send whose connection the peer closed")
    assert isinstance(exc, ConnectionError) and getattr(exc, "ecode", None) == 3, repr(exc)
    conn2 = h.track(server.accept(5.0))
    conn2.recv_handshake()
    conn2.send_handshake(server.port, SERVER_ID)
    f2 = conn2.recv_frame()
    assert f2.data == b"second", "the failed message must not be retried: %r" % f2.data
    # Every frame takes the next serial, including the capability NOOP that
    # opens the new connection (skipped by the raw peer like a 1.x node would).
    skipped = len(conn2.caps)
    assert rp.serial_diff(f1.serial, f2.serial) == 1 + skipped, (f1.serial, f2.serial, skipped)
    conn2.send(rp.pack_ack(f2.identity))
    rp.future_result(fut2, 5.0, "second send")


def test_gc_closes_idle_connection(h):
    """6.4: an idle connection is closed between R and about 2R after last use."""
    node, port = h.node(SYNCHRONOUS=False, TIMEOUT=0.2, REUSE_TIME=1.0)  # R = 1 s
    c, _ = h.client(port)
    c.send_frame(MSG_ID, 1, 0x00, b"", b"x")
    rp.get_msg(node)
    start = time.monotonic()
    assert c.wait_closed(8.0), "idle connection not garbage-collected within 8 s (R = 1 s)"
    elapsed = time.monotonic() - start
    assert elapsed >= 0.7, "closed after %.2f s, before R = 1 s of idleness" % elapsed
    rp.assert_node_serves(h, node, port, "after GC")


def test_ack_on_other_connection_and_serial_across_connections(h):
    """4.3: ACKs are matched per remote (may arrive on another connection); 3.4: one serial
    counter per remote across its connections."""
    node, port = h.node(SYNCHRONOUS=True, TIMEOUT=5.0)
    p = rp.free_port()
    a, _ = h.client(port, hs_port=p, name="client A")
    a.send_frame(bytes([0xA1]) * 16, 1, 0x00, b"", b"from A")
    assert rp.get_msg(node).data == b"from A"
    fut1 = node.send(rp.make_msg(p, b"", b"on A"))
    fa = a.recv_frame()
    a.send(rp.pack_ack(fa.identity))
    rp.future_result(fut1, 5.0, "send on A")

    b, _ = h.client(port, hs_port=p, name="client B")
    b.send_frame(bytes([0xB1]) * 16, 1, 0x00, b"", b"from B")
    assert rp.get_msg(node).data == b"from B"
    fut2 = node.send(rp.make_msg(p, b"", b"on B"))
    fb = b.recv_frame()
    assert rp.serial_diff(fa.serial, fb.serial) == 1, (
        "serial must continue across connections of one remote: %d then %d" % (fa.serial, fb.serial)
    )
    a.send(rp.pack_ack(fb.identity))  # ACK comes back on the other connection
    rp.future_result(fut2, 5.0, "send on B acknowledged via A")


def test_header_longer_than_u16_rejected():
    m = rp.make_msg(4000)
    with pytest.raises((ValueError, OverflowError, AssertionError, TypeError)):
        m.header = b"x" * 65536


# ------------------------------------------------------------------------------------------
# Robustness


def test_garbage_after_handshake_never_kills_node(h):
    """Any bytes give messages or a closed connection, never a crash (3.3)."""
    import random

    rnd = random.Random(99)
    node, port = h.node(SYNCHRONOUS=False, MAX_MSG_SIZE=100000)
    for i in range(40):
        c, _ = h.client(port, name="garbage client %d" % i)
        junk = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 300)))
        try:
            c.send(junk)
        except OSError:
            pass
        c.read_for(0.02)
        c.abort()
    rp.Harness.drain(node)
    rp.assert_node_serves(h, node, port, "after 40 connections of garbage")


def test_connect_and_close_in_every_phase(h):
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False)
    frame = VECTOR_9_1_FRAME
    hs = VECTOR_9_1_CLIENT_HS
    for cut in [0, 5, 18, 18 + 10, 18 + 27, 18 + 30]:
        for how in ("close", "abort"):
            c = h.connect(port)
            c.recv_handshake()
            if cut:
                c.send((hs + frame)[:cut])
            getattr(c, how)()
    time.sleep(0.3)
    rp.Harness.drain(node)
    rp.assert_node_serves(h, node, port, "after peers closing in every phase")


def test_many_clients_concurrently(h):
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False)
    clients = [h.client(port, hs_port=5000 + i, name="client %d" % i)[0] for i in range(10)]
    for i, c in enumerate(clients):
        c.send_frame(bytes([i]) * 16, i, rp.REQ_ACK, b"", b"c%d" % i)
    got = {}
    for _ in range(10):
        m = rp.get_msg(node)
        got[m.port - 5000] = m
    assert sorted(got) == list(range(10))
    futs = {i: m.release_slot() for i, m in got.items()}
    for i, c in enumerate(clients):
        a = c.recv_frame()
        assert a.type == rp.ACK and a.identity == bytes([i]) * 16, "ACK went to the wrong client"
        rp.future_result(futs[i], 5.0, "release %d" % i)


def test_async_burst_to_raw_server(h):
    server = h.server()
    node, port = h.node(SYNCHRONOUS=False, TIMEOUT=5.0)
    msgs = [rp.make_msg(server.port, b"h", b"%05d" % i) for i in range(300)]
    futs = [node.send(m) for m in msgs]
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    prev = None
    for i in range(300):
        f = conn.recv_frame()
        assert f.type == 0x00 and f.data == b"%05d" % i, "frame %d: %r" % (i, f.data)
        if prev is not None:
            assert rp.serial_diff(prev, f.serial) == 1
        prev = f.serial
    for i, fut in enumerate(futs):
        rp.future_result(fut, 5.0, "async send %d" % i)


def test_noops_keep_connection_alive(h):
    """6.4: received NOOPs refresh the activity time, so GC does not close the connection."""
    node, port = h.node(SYNCHRONOUS=False, TIMEOUT=0.2, REUSE_TIME=1.0)  # R = 1 s
    c, _ = h.client(port)
    end = time.monotonic() + 3.5
    serial = 1
    while time.monotonic() < end:
        c.send(rp.pack_noop(serial))
        serial += 1
        data, closed = c.read_for(0.25)
        assert not closed, "connection closed by GC although the peer sent NOOPs every 0.25 s"
        assert not data, "node answered a NOOP: %s" % data.hex()
    c.send_frame(MSG_ID, serial, 0x00, b"", b"alive")
    assert rp.get_msg(node).data == b"alive"


def test_gc_closes_idle_secondary_connection(h):
    """6.5: a secondary connection idle for R is closed while the active one stays open."""
    node, port = h.node(SYNCHRONOUS=False, TIMEOUT=0.2, REUSE_TIME=1.0)  # R = 1 s
    p = rp.free_port()
    a, _ = h.client(port, hs_port=p, name="client A")
    a.send_frame(bytes([0xA1]) * 16, 1, 0x00, b"", b"from A")
    assert rp.get_msg(node).data == b"from A"
    b, _ = h.client(port, hs_port=p, name="client B")
    b.send_frame(bytes([0xB1]) * 16, 1, 0x00, b"", b"from B")
    assert rp.get_msg(node).data == b"from B"
    start = time.monotonic()
    a_closed = False
    serial = 2
    while time.monotonic() - start < 6.0:
        b.send(rp.pack_noop(serial))  # keeps the remote and B busy
        serial += 1
        _, closed = b.read_for(0.05)
        assert not closed, "active connection B closed although it is in use"
        _, a_closed = a.read_for(0.2)
        if a_closed:
            break
    assert a_closed, "idle secondary connection A not closed by GC within 6 s (R = 1 s)"
    b.send_frame(bytes([0xB2]) * 16, serial, 0x00, b"", b"B still works")
    assert rp.get_msg(node).data == b"B still works"


def test_full_slot_stalls_reading_of_following_frames(h):
    """5: no free slot: the reader stops, frames behind the blocked one (an ACK here) wait."""
    server = h.server()
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False, TIMEOUT=5.0)
    fut = node.send(rp.make_msg(server.port, b"", b"mine"))
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    mine = conn.recv_frame()
    conn.send(rp.pack_frame(MSG_ID, 1, 0x00, b"", b"holds the slot"))
    held = rp.get_msg(node)
    # a second data frame needs the (only) slot and blocks; the ACK queues behind it
    conn.send(rp.pack_frame(bytes([0x42]) * 16, 2, 0x00, b"", b"blocked"))
    conn.send(rp.pack_ack(mine.identity))
    rp.assert_no_msg(node, 0.5, "while the only slot is held")
    assert not fut.done(), "ACK behind a frame waiting for a slot was processed (5: reader stops)"
    rp.future_result(held.release_slot(), 5.0, "release")
    blocked = rp.get_msg(node, what="blocked frame after the release")
    assert blocked.data == b"blocked"
    rp.future_result(fut, 5.0, "send whose ACK was read after the release")
    rp.future_result(blocked.release_slot(), 5.0, "release 2")


def test_send_to_self(h):
    """The node dials its own port: outgoing and incoming connection share one remote key."""
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False, TIMEOUT=5.0)
    msg = rp.make_msg(port, b"me", b"myself")
    fut = node.send(msg)
    got = rp.get_msg(node, what="message sent to self")
    assert got.identity == msg.identity and got.data == b"myself" and got.port == port
    assert got.remote_identity == node.identity()
    rp.future_result(got.release_slot(), 5.0, "release of the self message")
    rp.future_result(fut, 5.0, "send to self")


def test_port_in_use_fails_start(h):
    """1.1: if either the IPv4 or the IPv6 bind fails, start-up fails with EADDRINUSE."""
    import socket

    port = rp.free_port()
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        blocker.bind(("0.0.0.0", port))
        blocker.listen(1)
        with pytest.raises(OSError) as ei:
            h.node(PORT=port)
        assert getattr(ei.value, "ecode", None) == 4, repr(ei.value)
    finally:
        blocker.close()
    if not rp.ipv6_available():
        return
    port = rp.free_port()
    blocker = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        blocker.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        blocker.bind(("::", port))
        blocker.listen(1)
        with pytest.raises(OSError) as ei:
            h.node(PORT=port)
        assert getattr(ei.value, "ecode", None) == 4, repr(ei.value)
    finally:
        blocker.close()


def test_noop_before_ack_after_idleness(h):
    """6.4: the NOOP probe also precedes an ACK queued for a remote idle > 0.75 R."""
    node, port = h.node(SYNCHRONOUS=True, AUTO_RELEASE=False, TIMEOUT=1.0, REUSE_TIME=4.0)
    c, _ = h.client(port)
    c.send(VECTOR_9_1_FRAME)
    m = rp.get_msg(node)
    time.sleep(3.4)  # idle 3.4 s > 0.75 R = 3 s, < R = 4 s
    fut = m.release_slot()
    first = c.recv_frame()
    assert first.type == rp.NOOP, "expected a NOOP before the ACK, got type 0x%02x" % first.type
    second = c.recv_frame()
    assert second.type == rp.ACK and second.identity == MSG_ID
    assert rp.serial_diff(first.serial, second.serial) == 1
    rp.future_result(fut, 5.0, "release")


def test_remote_identity_is_per_connection(h):
    """2.2 step 5: remote_identity belongs to the connection, not to the remote."""
    node, port = h.node(SYNCHRONOUS=False)
    p = rp.free_port()
    id_a, id_b = bytes([0xAA]) * 16, bytes([0xBB]) * 16
    a, _ = h.client(port, hs_port=p, identity=id_a, name="client A")
    a.send_frame(bytes([1]) * 16, 1, 0x00, b"", b"A1")
    assert rp.get_msg(node).remote_identity == id_a
    b, _ = h.client(port, hs_port=p, identity=id_b, name="client B")
    b.send_frame(bytes([2]) * 16, 1, 0x00, b"", b"B1")
    assert rp.get_msg(node).remote_identity == id_b
    a.send_frame(bytes([3]) * 16, 2, 0x00, b"", b"A2")
    m = rp.get_msg(node)
    assert m.data == b"A2" and m.remote_identity == id_a, (
        "message on A reported remote_identity %s" % m.remote_identity.hex()
    )


def test_ack_from_another_remote_is_ignored(h):
    """4.3: ACKs are matched against the outstanding message of the remote they come from."""
    server = h.server()
    node, port = h.node(SYNCHRONOUS=True, TIMEOUT=5.0)
    fut = node.send(rp.make_msg(server.port, b"", b"x"))
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    f = conn.recv_frame()
    other, _ = h.client(port, hs_port=rp.free_port(), name="other remote")
    other.send(rp.pack_ack(f.identity))
    time.sleep(0.5)
    assert not fut.done(), "an ACK from a different remote completed the send"
    conn.send(rp.pack_ack(f.identity))
    rp.future_result(fut, 5.0, "send")


def test_queue_time_not_counted_in_send_timeout(h):
    """4.4: the send timer starts when the write starts; waiting in the queue is free."""
    server = h.server()
    node, port = h.node(SYNCHRONOUS=True, TIMEOUT=1.0)
    futs = [node.send(rp.make_msg(server.port, b"", b"%d" % i)) for i in range(4)]
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    for i in range(4):
        f = conn.recv_frame()
        assert f.data == b"%d" % i
        time.sleep(0.5)  # each message waits 0.5 s < T for its ACK; all four take 2 s > T
        conn.send(rp.pack_ack(f.identity))
        rp.future_result(futs[i], 5.0, "send %d (queued longer than T)" % i)


def test_request_answered_by_raw_peer(h):
    """8.3: a request is answered by a data frame carrying the request's identity."""
    server = h.server()
    node, port = h.node(SYNCHRONOUS=True, TIMEOUT=5.0)
    req = rp.make_msg(server.port, b"q", b"question")
    cf = node.request(req)
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    f = conn.recv_frame()
    assert f.identity == req.identity and f.data == b"question"
    conn.send(rp.pack_ack(f.identity))
    assert cf.send_result(timeout=5.0) is req
    conn.send(rp.pack_frame(f.identity, 77, rp.REQ_ACK, b"a", b"answer"))
    reply = rp.wait_future(cf, 5.0, "request future").result()
    assert reply.data == b"answer" and reply.identity == req.identity and reply.serial == 77
    ack = conn.recv_frame()  # auto_release=True: the reply's slot is released, ACK owed
    assert ack.type == rp.ACK and ack.identity == req.identity
    rp.assert_no_msg(node, 0.3, "(the reply resolves the request and is not queued)")


def test_request_times_out_then_late_reply_is_dropped(h):
    server = h.server()
    node, port = h.node(SYNCHRONOUS=False, TIMEOUT=0.5)
    req = rp.make_msg(server.port, b"", b"question")
    cf = node.request(req)
    conn = h.track(server.accept())
    conn.recv_handshake()
    conn.send_handshake(server.port, SERVER_ID)
    f = conn.recv_frame()
    exc = rp.future_error(cf, 5.0, "unanswered request")
    assert isinstance(exc, TimeoutError), repr(exc)
    # A change from libchirp 1.x (which delivered it as an ordinary message): dropped and
    # counted.
    conn.send(rp.pack_frame(f.identity, 1, 0x01, b"", b"late"))
    ack = conn.recv_frame()  # released at once, so the REQ_ACK is still acknowledged
    assert ack.type == rp.ACK and ack.identity == req.identity
    rp.assert_no_msg(node, 0.3, "(a late reply is dropped, not delivered)")
    assert node.late_replies == 1
