"""Property tests for the C frame reader (csrc/reader.c) through the CFFI module.

The reader is driven the way a connection drives it: feed a piece, act on the
event, feed the rest. A small Python model of docs/protocol.md#wire-format says which
events any byte string must produce; the C reader has to agree with it for
arbitrary bytes, whether the stream is fed whole or cut into random pieces
(including empty ones). Frames built with ch_writer_header must round-trip.
"""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from libchirp._ffi import ffi, lib

HANDSHAKE = bytes.fromhex("0fa0a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
FRAME_9_1 = bytes.fromhex("101112131415161718191a1b1c1d1e1f000000070000000500030168647268656c6c6f")
HEADER = struct.Struct(">16sIIHB")  # identity, serial, data_len, header_len, type

REQ_ACK, ACK, NOOP = 0x01, 0x02, 0x04
VALID_EVENTS = {
    lib.CH_RD_HANDSHAKE,
    lib.CH_RD_ACK,
    lib.CH_RD_NOOP,
    lib.CH_RD_DATA_HEADER,
    lib.CH_RD_MESSAGE,
}
ERRORS = {-lib.CH_PROTOCOL_ERROR, -lib.CH_ENOMEM}

SETTINGS = settings(max_examples=300, deadline=None)


# --- driving the C reader ----------------------------------------------------


def split(data, sizes):
    """Cut data into pieces whose lengths cycle through sizes (None: one piece)."""
    if sizes is None:
        return [data]
    if not any(sizes):
        sizes = list(sizes) + [1]
    pieces, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        pieces.append(data[pos : pos + n])
        pos += n
        i += 1
    return pieces


def describe(r, rc):
    """The event rc as a comparable tuple; takes and frees a finished message."""
    if rc == lib.CH_RD_HANDSHAKE:
        port = ffi.new("uint16_t *")
        ident = ffi.new("uint8_t[16]")
        lib.ch_reader_handshake(r, port, ident)
        return ("handshake", port[0], bytes(ident))
    if rc in (lib.CH_RD_ACK, lib.CH_RD_NOOP, lib.CH_RD_DATA_HEADER):
        ident = ffi.new("uint8_t[16]")
        serial = ffi.new("uint32_t *")
        data_len = ffi.new("uint32_t *")
        header_len = ffi.new("uint16_t *")
        typ = ffi.new("uint8_t *")
        lib.ch_reader_frame(r, ident, serial, data_len, header_len, typ)
        name = {lib.CH_RD_ACK: "ack", lib.CH_RD_NOOP: "noop", lib.CH_RD_DATA_HEADER: "header"}[rc]
        return (name, bytes(ident), serial[0], data_len[0], header_len[0], typ[0])
    if rc == lib.CH_RD_MESSAGE:
        msg = lib.ch_reader_take_message(r)
        assert msg != ffi.NULL
        assert lib.ch_reader_take_message(r) == ffi.NULL
        info = ffi.new("ch_msg_info_t *")
        lib.ch_msg_info(msg, info)
        header = bytes(ffi.buffer(info.header, info.header_len))
        data = bytes(ffi.buffer(info.data, info.data_len))
        event = ("message", bytes(info.identity), info.serial, info.type, header, data)
        lib.ch_msg_free(msg)
        return event
    assert rc in ERRORS, rc
    return ("error", rc)


def run(data, sizes=None, max_msg_size=1 << 20):
    """Feed data in pieces to a fresh reader and return the list of events."""
    r = ffi.gc(lib.ch_reader_new(max_msg_size), lib.ch_reader_free)
    assert r != ffi.NULL
    consumed = ffi.new("size_t *")
    events = []
    for piece in split(data, sizes):
        buf = ffi.from_buffer("uint8_t[]", piece)
        off = 0
        while True:
            consumed[0] = 0xDEAD
            rc = lib.ch_reader_feed(r, buf + off, len(piece) - off, consumed)
            assert consumed[0] <= len(piece) - off
            off += consumed[0]
            if rc == lib.CH_RD_MORE:
                assert off == len(piece)
                break
            assert rc in VALID_EVENTS or rc in ERRORS, rc
            events.append(describe(r, rc))
            if rc < 0:
                text = ffi.string(lib.ch_reader_error(r))
                assert text
                # Sticky: same code, nothing consumed, same text.
                for _ in range(2):
                    assert lib.ch_reader_feed(r, buf, len(piece), consumed) == rc
                    assert consumed[0] == 0
                assert ffi.string(lib.ch_reader_error(r)) == text
                return events
    assert ffi.string(lib.ch_reader_error(r)) == b""
    return events


# --- the model ---------------------------------------------------------------


def model(data, max_msg_size=1 << 20):
    """The events docs/protocol.md#wire-format prescribe for data."""
    if len(data) < 18:
        return []
    events = [("handshake", struct.unpack(">H", data[:2])[0], data[2:18])]
    pos = 18
    while len(data) - pos >= 27:
        ident, serial, data_len, header_len, typ = HEADER.unpack_from(data, pos)
        pos += 27
        if header_len + data_len > max_msg_size:
            return events + [("error", -lib.CH_ENOMEM)]
        if typ & (ACK | NOOP):
            if header_len or data_len or typ & REQ_ACK:
                return events + [("error", -lib.CH_PROTOCOL_ERROR)]
            name = "noop" if typ & NOOP else "ack"
            events.append((name, ident, serial, 0, 0, typ))
            continue
        events.append(("header", ident, serial, data_len, header_len, typ))
        end = pos + header_len + data_len
        if end > len(data):
            return events
        body = data[pos:end]
        events.append(("message", ident, serial, typ, body[:header_len], body[header_len:]))
        pos = end
    return events


# --- strategies --------------------------------------------------------------

chunk_sizes = st.lists(st.integers(min_value=0, max_value=64), min_size=1, max_size=20)
# Limits stay small: a header the limit admits is allocated on the next feed,
# and random headers must not make the suite allocate gigabytes.
limits = st.one_of(st.just(1 << 16), st.sampled_from([0, 1, 8, 100]))


def encode(ident, serial, typ, header, data, data_len=None, header_len=None):
    """A frame built with ch_writer_header; lengths may lie about the body."""
    out = ffi.new("uint8_t[27]")
    lib.ch_writer_header(
        out,
        ident,
        serial,
        len(data) if data_len is None else data_len,
        len(header) if header_len is None else header_len,
        typ,
    )
    return bytes(out) + header + data


frames = st.builds(
    encode,
    st.binary(min_size=16, max_size=16),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 255),
    st.binary(max_size=40),
    st.binary(max_size=80),
)
honest_frames = st.builds(
    encode,
    st.binary(min_size=16, max_size=16),
    st.integers(0, 0xFFFFFFFF),
    st.sampled_from([0x00, 0x01, 0x08, 0x09, 0xF0, 0xF1]),
    st.binary(max_size=40),
    st.binary(max_size=80),
)
control_frames = st.builds(
    lambda ident, serial, typ: encode(ident, serial, typ, b"", b""),
    st.binary(min_size=16, max_size=16),
    st.integers(0, 0xFFFFFFFF),
    st.sampled_from([0x02, 0x04, 0x06, 0x0A, 0xF4, 0xFE]),
)
# Frames whose length fields need not match the bytes that follow.
lying_frames = st.builds(
    encode,
    st.binary(min_size=16, max_size=16),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 255),
    st.binary(max_size=20),
    st.binary(max_size=20),
    st.one_of(st.integers(0, 64), st.integers(0, 0xFFFFFFFF)),
    st.one_of(st.integers(0, 64), st.integers(0, 0xFFFF)),
)
streams = st.lists(
    st.one_of(frames, honest_frames, control_frames, lying_frames, st.binary(max_size=30)),
    max_size=8,
).map(b"".join)


# --- properties --------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=400), chunk_sizes, limits)
def test_any_bytes_after_handshake(tail, sizes, limit):
    data = HANDSHAKE + tail
    whole = run(data, None, limit)
    assert whole == model(data, limit)
    assert run(data, sizes, limit) == whole


@SETTINGS
@given(st.binary(max_size=100), chunk_sizes)
def test_any_bytes_from_the_start(data, sizes):
    whole = run(data)
    assert whole == model(data)
    assert run(data, sizes) == whole


@SETTINGS
@given(streams, chunk_sizes, limits)
def test_frame_streams_match_model(stream, sizes, limit):
    data = HANDSHAKE + stream
    whole = run(data, None, limit)
    assert whole == model(data, limit)
    assert run(data, sizes, limit) == whole
    assert run(data, [1], limit) == whole


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.binary(min_size=16, max_size=16),
            st.integers(0, 0xFFFFFFFF),
            st.sampled_from([0x00, 0x01, 0x02, 0x04, 0x06, 0x08, 0x09, 0x80, 0x81]),
            st.binary(max_size=300),
            st.binary(max_size=1000),
        ),
        max_size=10,
    ),
    chunk_sizes,
)
def test_encoded_frames_round_trip(specs, sizes):
    stream = HANDSHAKE
    expected = [("handshake", 4000, HANDSHAKE[2:])]
    for ident, serial, typ, header, data in specs:
        if typ & (ACK | NOOP):
            header = data = b""
            expected.append(("noop" if typ & NOOP else "ack", ident, serial, 0, 0, typ))
        else:
            expected.append(("header", ident, serial, len(data), len(header), typ))
            expected.append(("message", ident, serial, typ, header, data))
        stream += encode(ident, serial, typ, header, data)
    assert run(stream) == expected
    assert run(stream, sizes) == expected


@SETTINGS
@given(
    st.binary(min_size=16, max_size=16),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
)
def test_writer_matches_struct(ident, serial, data_len, header_len, typ, port):
    out = ffi.new("uint8_t[27]")
    lib.ch_writer_header(out, ident, serial, data_len, header_len, typ)
    assert bytes(out) == HEADER.pack(ident, serial, data_len, header_len, typ)
    hs = ffi.new("uint8_t[18]")
    lib.ch_writer_handshake(hs, port, ident)
    assert bytes(hs) == struct.pack(">H", port) + ident


# --- fixed vectors (docs/protocol.md#wire-format) ------------------------------------


def test_vector_9_1_whole_and_bytewise():
    ident = bytes(range(0x10, 0x20))
    expected = [
        ("handshake", 4000, bytes(range(0xA0, 0xB0))),
        ("header", ident, 7, 5, 3, 0x01),
        ("message", ident, 7, 0x01, b"hdr", b"hello"),
    ]
    assert run(HANDSHAKE + FRAME_9_1) == expected
    assert run(HANDSHAKE + FRAME_9_1, [1]) == expected
    assert run(HANDSHAKE + FRAME_9_1, [5, 13]) == expected


def test_size_check_uses_64_bit_sum():
    frame = encode(bytes(16), 1, 0, b"", b"", data_len=0xFFFFFFF0, header_len=0x20)
    assert run(HANDSHAKE + frame, None, 0xFFFFFFFF)[-1] == ("error", -lib.CH_ENOMEM)


def test_header_without_slot_allocates_nothing_yet():
    """After DATA_HEADER the caller may stop feeding and resume later."""
    r = ffi.gc(lib.ch_reader_new(1 << 20), lib.ch_reader_free)
    consumed = ffi.new("size_t *")
    data = HANDSHAKE + FRAME_9_1
    assert lib.ch_reader_feed(r, data, len(data), consumed) == lib.CH_RD_HANDSHAKE
    assert consumed[0] == 18
    assert lib.ch_reader_feed(r, data[18:], len(data) - 18, consumed) == lib.CH_RD_DATA_HEADER
    assert consumed[0] == 27
    assert lib.ch_reader_take_message(r) == ffi.NULL
    assert lib.ch_reader_feed(r, data[45:], len(data) - 45, consumed) == lib.CH_RD_MESSAGE
    assert consumed[0] == 8
    msg = lib.ch_reader_take_message(r)
    assert msg != ffi.NULL
    lib.ch_msg_free(msg)
