/*
 * test_writer.c: unit tests for the handshake and header encoder
 * (csrc/writer.c).
 *
 * The writer's output is compared byte for byte with the vectors of
 * docs/protocol.md#wire-format. A round trip then encodes pseudo-random
 * frames, feeds them to a reader (whole and one byte at a time) and checks
 * that every field and body byte comes back unchanged.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "reader.h"
#include "unit.h"
#include "writer.h"

/* Parse a hex string, ignoring spaces; returns the number of bytes. */
static size_t unhex(const char *s, uint8_t *out)
{
    size_t n = 0;
    int hi = -1;
    for (; *s; s++) {
        int v;
        if (*s >= '0' && *s <= '9')
            v = *s - '0';
        else if (*s >= 'a' && *s <= 'f')
            v = *s - 'a' + 10;
        else
            continue;
        if (hi < 0) {
            hi = v;
        } else {
            out[n++] = (uint8_t)(hi << 4 | v);
            hi = -1;
        }
    }
    return n;
}

static void check_handshake(const char *hex, uint16_t port, const uint8_t id[16])
{
    uint8_t want[32], got[18];
    CHECK_EQ(unhex(hex, want), 18);
    memset(got, 0xee, sizeof(got));
    ch_writer_handshake(got, port, id);
    CHECK_MEM(got, want, 18);
}

static void check_header(const char *hex, const uint8_t id[16], uint32_t serial,
                         uint32_t data_len, uint16_t header_len, uint8_t type)
{
    uint8_t want[32], got[28];
    CHECK_EQ(unhex(hex, want), 27);
    memset(got, 0xee, sizeof(got));
    ch_writer_header(got, id, serial, data_len, header_len, type);
    CHECK_MEM(got, want, 27);
    CHECK_EQ(got[27], 0xee); /* nothing written past the 27 bytes */
}

static void test_handshake_vectors(void)
{
    uint8_t id[16];
    /* 9.1 client handshake. */
    for (int i = 0; i < 16; i++)
        id[i] = (uint8_t)(0xa0 + i);
    check_handshake("0fa0 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf", 4000, id);
    /* 9.1 node handshake. */
    memset(id, 0, 16);
    check_handshake("0c81 00000000000000000000000000000000", 3201, id);
    /* 9.2 node handshake. */
    id[0] = 0x30;
    check_handshake("0c83 30000000000000000000000000000000", 3203, id);
    /* 9.2 server handshake. */
    for (int i = 0; i < 16; i++)
        id[i] = (uint8_t)(0xb0 + i);
    check_handshake("0c82 b0b1b2b3b4b5b6b7b8b9babbbcbdbebf", 3202, id);
    /* Extremes of the port. */
    check_handshake("ffff b0b1b2b3b4b5b6b7b8b9babbbcbdbebf", 65535, id);
    check_handshake("0000 b0b1b2b3b4b5b6b7b8b9babbbcbdbebf", 0, id);
}

static void test_header_vectors(void)
{
    uint8_t id[16];
    /* 9.1 client data frame. */
    for (int i = 0; i < 16; i++)
        id[i] = (uint8_t)(0x10 + i);
    check_header("101112131415161718191a1b1c1d1e1f 00000007 00000005 0003 01", id, 7, 5, 3,
                 0x01);
    /* 9.1 node ACK. */
    check_header("101112131415161718191a1b1c1d1e1f 2952d9a5 00000000 0000 02", id, 0x2952d9a5,
                 0, 0, 0x02);
    /* 9.2 node data frame. */
    uint8_t id2[16];
    unhex("5617c3343cf4fe61c0e2fa24acfd6e0f", id2);
    check_header("5617c3343cf4fe61c0e2fa24acfd6e0f 3e97d2da 00000007 0001 01", id2, 0x3e97d2da,
                 7, 1, 0x01);
    /* 9.3 NOOP. */
    memset(id, 0, 16);
    check_header("00000000000000000000000000000000 1f7e3fb5 00000000 0000 04", id, 0x1f7e3fb5,
                 0, 0, 0x04);
    /* Byte order of every field at its extremes. */
    check_header("00000000000000000000000000000000 01020304 a1b2c3d4 e5f6 ff", id, 0x01020304,
                 0xa1b2c3d4, 0xe5f6, 0xff);
    check_header("00000000000000000000000000000000 ffffffff ffffffff ffff 00", id, 0xffffffffu,
                 0xffffffffu, 0xffff, 0x00);
}

/* xorshift32: deterministic pseudo-random numbers for the round trip. */
static uint32_t rng_state = 2463534242u;

static uint32_t rnd(void)
{
    uint32_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return rng_state = x;
}

/* Encode one frame with random fields and a small random body, feed
 * handshake plus frame to a reader with the given chunk size (0: whole) and
 * check what comes out. */
static void round_trip_one(size_t chunk)
{
    uint8_t id[16], peer[16], buf[18 + 27 + 600];
    for (int i = 0; i < 16; i++) {
        id[i] = (uint8_t)rnd();
        peer[i] = (uint8_t)rnd();
    }
    uint16_t port = (uint16_t)rnd();
    uint32_t serial = rnd();
    uint8_t type = (uint8_t)rnd();
    uint16_t header_len = (uint16_t)(rnd() % 300);
    uint32_t data_len = rnd() % 300;
    int control = (type & (CH_MSG_ACK | CH_MSG_NOOP)) != 0;
    if (control) {
        type &= (uint8_t)~CH_MSG_REQ_ACK;
        header_len = 0;
        data_len = 0;
    }
    ch_writer_handshake(buf, port, peer);
    ch_writer_header(buf + 18, id, serial, data_len, header_len, type);
    size_t len = 18 + 27;
    for (uint32_t i = 0; i < header_len + data_len; i++)
        buf[len++] = (uint8_t)rnd();

    ch_reader_t *r = ch_reader_new(600);
    size_t off = 0;
    int handshakes = 0, events = 0;
    ch_message_t *msg = NULL;
    if (chunk == 0)
        chunk = len;
    while (off < len || events == 0) {
        size_t end = off + chunk < len ? off + chunk : len;
        size_t c;
        int rc = ch_reader_feed(r, buf + off, end - off, &c);
        off += c;
        if (rc < 0) {
            CHECK(0 && "unexpected reader error");
            break;
        }
        if (rc == CH_RD_HANDSHAKE) {
            uint16_t p;
            uint8_t pid[16];
            ch_reader_handshake(r, &p, pid);
            CHECK_EQ(p, port);
            CHECK_MEM(pid, peer, 16);
            handshakes++;
        } else if (rc == CH_RD_ACK || rc == CH_RD_NOOP || rc == CH_RD_DATA_HEADER) {
            uint8_t fid[16], ft;
            uint32_t fs, fd;
            uint16_t fh;
            ch_reader_frame(r, fid, &fs, &fd, &fh, &ft);
            CHECK_MEM(fid, id, 16);
            CHECK_EQ(fs, serial);
            CHECK_EQ(fd, data_len);
            CHECK_EQ(fh, header_len);
            CHECK_EQ(ft, type);
            CHECK_EQ(rc, !control                 ? CH_RD_DATA_HEADER
                         : (type & CH_MSG_NOOP) ? CH_RD_NOOP
                                                : CH_RD_ACK);
            if (control)
                events++;
        } else if (rc == CH_RD_MESSAGE) {
            msg = ch_reader_take_message(r);
            events++;
        } else if (off == len) {
            break; /* CH_RD_MORE with everything consumed */
        }
    }
    CHECK_EQ(handshakes, 1);
    CHECK_EQ(events, 1);
    CHECK_EQ(off, len);
    if (!control && CHECK(msg != NULL)) {
        CHECK_MEM(msg->identity, id, 16);
        CHECK_EQ(msg->serial, serial);
        CHECK_EQ(msg->type, type);
        CHECK_EQ(msg->header_len, header_len);
        CHECK_EQ(msg->data_len, data_len);
        CHECK_MEM(msg->header, buf + 45, header_len);
        CHECK_MEM(msg->data, buf + 45 + header_len, data_len);
        CHECK_EQ(msg->flags,
                 CH_MSGF_INLINE | ((type & CH_MSG_REQ_ACK) ? CH_MSGF_ACK_OWED : 0));
    }
    ch_msg_free(msg);
    ch_reader_free(r);
}

static void test_round_trip(void)
{
    int before = unit_failed;
    for (int i = 0; i < 500 && unit_failed == before; i++) {
        round_trip_one(0);
        round_trip_one(1);
        round_trip_one(1 + rnd() % 40);
    }
}

int main(void)
{
    UNIT_RUN(test_handshake_vectors);
    UNIT_RUN(test_header_vectors);
    UNIT_RUN(test_round_trip);
    return unit_summary();
}
