#!/usr/bin/env python3
"""Write the seed corpus of the frame reader fuzzer (tests/fuzz/fuzz_reader.c).

Each seed is one byte stream as a peer sends it: the 18-byte handshake
(port, identity) followed by frames (docs/protocol.md#wire-format). The set covers every
frame type the protocol knows, the edge cases of the receiver rules (3.3) and
a few refused frames, so the fuzzer starts from inputs that reach deep into
the reader. The files are deterministic; re-running this script rewrites
tests/fuzz/seeds/reader/ unchanged.

Usage: python3 tests/fuzz/gen_seeds.py [OUTDIR]
"""

import os
import struct
import sys

MSG_ID = bytes(range(0x10, 0x20))
MAX_MSG = 1 << 20  # the fuzzer's MAX_MSG_SIZE


def handshake(port=4000, identity=bytes(range(0xA0, 0xB0))):
    return struct.pack(">H", port) + identity


def frame(type_, serial=7, header=b"", data=b"", identity=MSG_ID, data_len=None, header_len=None):
    dl = len(data) if data_len is None else data_len
    hl = len(header) if header_len is None else header_len
    return identity + struct.pack(">IIHB", serial, dl, hl, type_) + header + data


def seeds():
    hs = handshake()
    yield "handshake_only", hs
    yield "handshake_partial", hs[:5]
    yield "handshake_port0_zero_id", handshake(0, bytes(16))
    yield "data_sync", hs + frame(0x01, header=b"hdr", data=b"hello")
    yield "data_async", hs + frame(0x00, serial=100, header=b"AB", data=b"data")
    yield "data_empty", hs + frame(0x01, serial=0xDEADBEEF)
    yield "data_header_only", hs + frame(0x00, header=b"only a header")
    yield "data_unknown_bit", hs + frame(0x08, serial=9, header=b"H", data=b"xy")
    yield "data_unknown_bit_req_ack", hs + frame(0x09, serial=9)
    yield "ack", hs + frame(0x02, serial=0x2952D9A5)
    yield "ack_unknown_bits", hs + frame(0x0A, serial=1)
    yield "noop", hs + frame(0x04, serial=0x1F7E3FB5, identity=bytes(16))
    yield "noop_and_ack", hs + frame(0x06, serial=2)
    yield "noop_high_bits", hs + frame(0xF4, serial=3)
    yield "data_partial_body", hs + frame(0x01, header=b"hdr", data=b"hello")[:-3]
    yield "data_partial_header", hs + frame(0x01)[:20]
    yield "data_at_limit", hs + frame(0x00, data=b"\xab" * 10, data_len=MAX_MSG)
    body = bytes((i * 7) & 0xFF for i in range(2000))
    yield "data_2000", hs + frame(0x01, serial=5, header=b"h" * 100, data=body)
    # Refused frames (the stream must end in a sticky error).
    yield "err_over_limit", hs + frame(0x01, data_len=MAX_MSG + 1)
    yield "err_sum_wraps", hs + frame(0x00, data_len=0xFFFFFFF0, header_len=0x20)
    yield "err_noop_payload", hs + frame(0x04, data=b"\x55")
    yield "err_ack_header", hs + frame(0x02, header=b"x")
    yield "err_noop_req_ack", hs + frame(0x05)
    yield "err_all_bits", hs + frame(0xFF) + frame(0x02)
    # A conversation with every kind of frame back to back.
    mixed = (
        hs
        + frame(0x01, header=b"hdr", data=b"hello")
        + frame(0x02, serial=0x2952D9A5)
        + frame(0x00, serial=100)
        + frame(0x04, identity=bytes(16))
        + frame(0x00, serial=101, header=b"AB", data=b"data")
        + frame(0x01, header=b"hdr", data=b"hello")
        + frame(0x02, serial=102)
        + frame(0x08, serial=103, data=b"z")
    )
    yield "mixed", mixed
    yield "mixed_then_error", mixed + frame(0x07)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "seeds", "reader")
    os.makedirs(out, exist_ok=True)
    n = 0
    for name, data in seeds():
        # The first byte (high byte of the port) also seeds the fuzzer's chunk
        # sizes; vary it so the seeds start with different chunkings.
        if data:
            data = bytes([(n * 0x10 + 0x0F) & 0xFF]) + data[1:]
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        n += 1
    print(f"{n} reader seeds in {out}")


if __name__ == "__main__":
    main()
