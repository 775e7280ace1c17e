/*
 * test_reader.c: unit tests for the frame reader (csrc/reader.c).
 *
 * The vectors come from docs/protocol.md#wire-format. Every stream is fed through
 * one driver, drive(), which splits the input into chunks of a given size (0
 * means the whole buffer at once) and feeds each chunk until the reader has
 * consumed it, the way a connection would: after CH_RD_DATA_HEADER it calls
 * feed again at once (a slot is always available here), after CH_RD_MESSAGE
 * it takes and records the message. The recorded event lists of whole and
 * chunked feeding must be identical.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "reader.h"
#include "unit.h"
#include "writer.h"

#define MAX_EVENTS 64
#define MAX_BODY 64

typedef struct {
    int rc;
    uint16_t port;          /* HANDSHAKE */
    uint8_t identity[16];   /* HANDSHAKE: peer identity; frames: frame identity */
    uint32_t serial;
    uint32_t data_len;
    uint16_t header_len;
    uint8_t type;
    uint32_t flags;         /* MESSAGE */
    uint8_t body[MAX_BODY]; /* MESSAGE: header bytes then data bytes */
} event_t;

typedef struct {
    event_t ev[MAX_EVENTS];
    int n;
} events_t;

static const uint8_t HS_CLIENT[18] = {0x0f, 0xa0, 0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6,
                                      0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf};

static const uint8_t FRAME_DATA[35] = {
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b,
    0x1c, 0x1d, 0x1e, 0x1f, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x05,
    0x00, 0x03, 0x01, 'h',  'd',  'r',  'h',  'e',  'l',  'l',  'o'};

static const uint8_t FRAME_ACK[27] = {0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18,
                                      0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x29, 0x52,
                                      0xd9, 0xa5, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02};

static const uint8_t FRAME_NOOP[27] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                       0, 0, 0x1f, 0x7e, 0x3f, 0xb5, 0, 0, 0, 0, 0, 0, 0x04};

static const uint8_t MSG_ID[16] = {0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17,
                                   0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f};

/* Record the event rc the reader just reported. */
static void record(ch_reader_t *r, int rc, events_t *out)
{
    if (!CHECK(out->n < MAX_EVENTS))
        return;
    event_t *e = &out->ev[out->n++];
    memset(e, 0, sizeof(*e));
    e->rc = rc;
    if (rc == CH_RD_HANDSHAKE) {
        ch_reader_handshake(r, &e->port, e->identity);
    } else if (rc == CH_RD_ACK || rc == CH_RD_NOOP || rc == CH_RD_DATA_HEADER) {
        ch_reader_frame(r, e->identity, &e->serial, &e->data_len, &e->header_len, &e->type);
    } else if (rc == CH_RD_MESSAGE) {
        ch_message_t *m = ch_reader_take_message(r);
        if (!CHECK(m != NULL))
            return;
        CHECK(ch_reader_take_message(r) == NULL);
        memcpy(e->identity, m->identity, 16);
        e->serial = m->serial;
        e->data_len = m->data_len;
        e->header_len = m->header_len;
        e->type = m->type;
        e->flags = m->flags;
        CHECK(m->header != NULL && m->data != NULL);
        CHECK(m->header == (const uint8_t *)(m + 1));
        CHECK(m->data == m->header + m->header_len);
        CHECK(m->next == NULL && m->conn == NULL && m->remote == NULL && m->token == 0);
        size_t total = (size_t)m->header_len + m->data_len;
        if (total <= MAX_BODY)
            memcpy(e->body, m->header, total);
        ch_msg_free(m);
    }
}

/* Feed buf in chunks of chunk bytes (0: all at once). Stops at the first
 * error. Returns the last return code. */
static int drive(ch_reader_t *r, const uint8_t *buf, size_t len, size_t chunk, events_t *out)
{
    size_t off = 0;
    int rc = CH_RD_MORE;
    if (chunk == 0)
        chunk = len ? len : 1;
    do {
        size_t end = off + chunk < len ? off + chunk : len;
        for (;;) {
            size_t consumed = 12345;
            rc = ch_reader_feed(r, buf + off, end - off, &consumed);
            CHECK(consumed <= end - off);
            off += consumed;
            if (rc == CH_RD_MORE) {
                CHECK(off == end);
                break;
            }
            record(r, rc, out);
            if (rc < 0)
                return rc;
        }
    } while (off < len);
    return rc;
}

static int same_events(const events_t *a, const events_t *b)
{
    return a->n == b->n && memcmp(a->ev, b->ev, sizeof(event_t) * (size_t)a->n) == 0;
}

/* Feed buf whole and in every chunk size from 1 to len; all must agree with
 * the whole-buffer result, which is stored in out. */
static void drive_all_chunkings(uint32_t max, const uint8_t *buf, size_t len, events_t *out)
{
    ch_reader_t *r = ch_reader_new(max);
    memset(out, 0, sizeof(*out));
    drive(r, buf, len, 0, out);
    ch_reader_free(r);
    for (size_t chunk = 1; chunk <= len; chunk++) {
        events_t ev;
        memset(&ev, 0, sizeof(ev));
        r = ch_reader_new(max);
        drive(r, buf, len, chunk, &ev);
        ch_reader_free(r);
        if (!CHECK(same_events(out, &ev))) {
            fprintf(stderr, "    chunk size %zu differs\n", chunk);
            return;
        }
    }
}

/* Handshake followed by one frame (header plus body). */
static size_t with_hs(uint8_t *out, const uint8_t *frame, size_t len)
{
    memcpy(out, HS_CLIENT, 18);
    memcpy(out + 18, frame, len);
    return 18 + len;
}

static void frame(uint8_t out[27], uint32_t serial, uint32_t data_len, uint16_t header_len,
                  uint8_t type)
{
    ch_writer_header(out, MSG_ID, serial, data_len, header_len, type);
}

static void check_handshake_event(const event_t *e)
{
    CHECK_EQ(e->rc, CH_RD_HANDSHAKE);
    CHECK_EQ(e->port, 4000);
    CHECK_MEM(e->identity, HS_CLIENT + 2, 16);
}

static void test_handshake_vector(void)
{
    events_t ev;
    drive_all_chunkings(1024, HS_CLIENT, sizeof(HS_CLIENT), &ev);
    CHECK_EQ(ev.n, 1);
    check_handshake_event(&ev.ev[0]);

    /* Byte by byte explicitly: 17 times MORE, then HANDSHAKE. */
    ch_reader_t *r = ch_reader_new(1024);
    size_t c;
    for (int i = 0; i < 17; i++) {
        CHECK_EQ(ch_reader_feed(r, HS_CLIENT + i, 1, &c), CH_RD_MORE);
        CHECK_EQ(c, 1);
    }
    CHECK_EQ(ch_reader_feed(r, HS_CLIENT + 17, 1, &c), CH_RD_HANDSHAKE);
    CHECK_EQ(c, 1);
    uint16_t port = 0;
    uint8_t id[16];
    ch_reader_handshake(r, &port, id);
    CHECK_EQ(port, 4000);
    CHECK_MEM(id, HS_CLIENT + 2, 16);
    ch_reader_free(r);
}

/* docs/protocol.md#wire-format: the handshake split 5 + 13 is accepted here. */
static void test_handshake_fragmented(void)
{
    ch_reader_t *r = ch_reader_new(1024);
    size_t c;
    CHECK_EQ(ch_reader_feed(r, HS_CLIENT, 5, &c), CH_RD_MORE);
    CHECK_EQ(c, 5);
    CHECK_EQ(ch_reader_feed(r, HS_CLIENT + 5, 13, &c), CH_RD_HANDSHAKE);
    CHECK_EQ(c, 13);
    uint16_t port;
    uint8_t id[16];
    ch_reader_handshake(r, &port, id);
    CHECK_EQ(port, 4000);
    CHECK_MEM(id, HS_CLIENT + 2, 16);
    CHECK(strcmp(ch_reader_error(r), "") == 0);
    ch_reader_free(r);
}

static void test_data_vector(void)
{
    uint8_t buf[64];
    size_t len = with_hs(buf, FRAME_DATA, sizeof(FRAME_DATA));
    events_t ev;
    drive_all_chunkings(1024, buf, len, &ev);
    if (!CHECK(ev.n == 3))
        return;
    check_handshake_event(&ev.ev[0]);

    event_t *h = &ev.ev[1];
    CHECK_EQ(h->rc, CH_RD_DATA_HEADER);
    CHECK_MEM(h->identity, MSG_ID, 16);
    CHECK_EQ(h->serial, 7);
    CHECK_EQ(h->data_len, 5);
    CHECK_EQ(h->header_len, 3);
    CHECK_EQ(h->type, 0x01);

    event_t *m = &ev.ev[2];
    CHECK_EQ(m->rc, CH_RD_MESSAGE);
    CHECK_MEM(m->identity, MSG_ID, 16);
    CHECK_EQ(m->serial, 7);
    CHECK_EQ(m->data_len, 5);
    CHECK_EQ(m->header_len, 3);
    CHECK_EQ(m->type, 0x01);
    CHECK_EQ(m->flags, CH_MSGF_INLINE | CH_MSGF_ACK_OWED);
    CHECK_MEM(m->body, "hdrhello", 8);
}

/* The reader stops right after the byte that completes an event, and does
 * not allocate before the call after CH_RD_DATA_HEADER. */
static void test_stops_after_event(void)
{
    uint8_t buf[64];
    size_t len = with_hs(buf, FRAME_DATA, sizeof(FRAME_DATA));
    ch_reader_t *r = ch_reader_new(1024);
    size_t c;
    CHECK_EQ(ch_reader_feed(r, buf, len, &c), CH_RD_HANDSHAKE);
    CHECK_EQ(c, 18);
    CHECK_EQ(ch_reader_feed(r, buf + 18, len - 18, &c), CH_RD_DATA_HEADER);
    CHECK_EQ(c, 27);
    CHECK(ch_reader_take_message(r) == NULL);
    /* A slot is now held; a zero-length feed allocates and waits for the body. */
    CHECK_EQ(ch_reader_feed(r, NULL, 0, &c), CH_RD_MORE);
    CHECK_EQ(c, 0);
    CHECK(ch_reader_take_message(r) == NULL);
    CHECK_EQ(ch_reader_feed(r, buf + 45, 4, &c), CH_RD_MORE);
    CHECK_EQ(c, 4);
    CHECK_EQ(ch_reader_feed(r, buf + 49, 4, &c), CH_RD_MESSAGE);
    CHECK_EQ(c, 4);
    ch_message_t *m = ch_reader_take_message(r);
    if (CHECK(m != NULL)) {
        CHECK_MEM(m->header, "hdr", 3);
        CHECK_MEM(m->data, "hello", 5);
        ch_msg_free(m);
    }
    CHECK(ch_reader_take_message(r) == NULL);
    CHECK_EQ(ch_reader_feed(r, NULL, 0, &c), CH_RD_MORE);
    CHECK_EQ(c, 0);
    ch_reader_free(r);
}

static void test_ack_vector(void)
{
    uint8_t buf[64];
    size_t len = with_hs(buf, FRAME_ACK, sizeof(FRAME_ACK));
    events_t ev;
    drive_all_chunkings(1024, buf, len, &ev);
    if (!CHECK(ev.n == 2))
        return;
    event_t *e = &ev.ev[1];
    CHECK_EQ(e->rc, CH_RD_ACK);
    CHECK_MEM(e->identity, MSG_ID, 16);
    CHECK_EQ(e->serial, 0x2952d9a5);
    CHECK_EQ(e->data_len, 0);
    CHECK_EQ(e->header_len, 0);
    CHECK_EQ(e->type, 0x02);
}

static void test_noop_vector(void)
{
    uint8_t buf[64];
    static const uint8_t zero[16];
    size_t len = with_hs(buf, FRAME_NOOP, sizeof(FRAME_NOOP));
    events_t ev;
    drive_all_chunkings(1024, buf, len, &ev);
    if (!CHECK(ev.n == 2))
        return;
    event_t *e = &ev.ev[1];
    CHECK_EQ(e->rc, CH_RD_NOOP);
    CHECK_MEM(e->identity, zero, 16);
    CHECK_EQ(e->serial, 0x1f7e3fb5);
    CHECK_EQ(e->type, 0x04);
}

/* Control bit combinations: NOOP wins over ACK, unknown bits are ignored. */
static void test_control_types(void)
{
    static const struct {
        uint8_t type;
        int rc;
    } cases[] = {
        {0x02, CH_RD_ACK},  {0x04, CH_RD_NOOP},         {0x06, CH_RD_NOOP},
        {0x0a, CH_RD_ACK},  {0xf4, CH_RD_NOOP},         {0xfe, CH_RD_NOOP},
        {0x03, -CH_PROTOCOL_ERROR}, {0x05, -CH_PROTOCOL_ERROR}, {0x07, -CH_PROTOCOL_ERROR},
        {0xff, -CH_PROTOCOL_ERROR},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint8_t f[27], buf[64];
        frame(f, 1, 0, 0, cases[i].type);
        size_t len = with_hs(buf, f, 27);
        events_t ev;
        drive_all_chunkings(1024, buf, len, &ev);
        if (!CHECK(ev.n == 2))
            continue;
        CHECK_EQ(ev.ev[1].rc, cases[i].rc);
        if (cases[i].rc > 0)
            CHECK_EQ(ev.ev[1].type, cases[i].type);
    }
}

/* docs/protocol.md#wire-format: type 0x08 is a data message, no ACK owed. */
static void test_unknown_bit_is_data(void)
{
    uint8_t f[27], buf[64];
    frame(f, 9, 2, 1, 0x08);
    size_t len = with_hs(buf, f, 27);
    memcpy(buf + len, "Hxy", 3);
    len += 3;
    events_t ev;
    drive_all_chunkings(1024, buf, len, &ev);
    if (!CHECK(ev.n == 3))
        return;
    CHECK_EQ(ev.ev[1].rc, CH_RD_DATA_HEADER);
    CHECK_EQ(ev.ev[2].rc, CH_RD_MESSAGE);
    CHECK_EQ(ev.ev[2].type, 0x08);
    CHECK_EQ(ev.ev[2].flags, CH_MSGF_INLINE);
    CHECK_MEM(ev.ev[2].body, "Hxy", 3);

    /* 0x09 = unknown bit plus REQ_ACK: data with an ACK owed. */
    frame(f, 9, 0, 0, 0x09);
    len = with_hs(buf, f, 27);
    drive_all_chunkings(1024, buf, len, &ev);
    if (CHECK(ev.n == 3))
        CHECK_EQ(ev.ev[2].flags, CH_MSGF_INLINE | CH_MSGF_ACK_OWED);
}

/* docs/protocol.md#wire-format: NOOP 00*16 00000002 00000001 0000 04 + 1 data byte. */
static void test_noop_with_payload(void)
{
    static const uint8_t noop[28] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                     0, 0, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 4, 0x55};
    uint8_t buf[64];
    size_t len = with_hs(buf, noop, sizeof(noop));
    events_t ev;
    drive_all_chunkings(1024, buf, len, &ev);
    if (!CHECK(ev.n == 2))
        return;
    CHECK_EQ(ev.ev[1].rc, -CH_PROTOCOL_ERROR);

    ch_reader_t *r = ch_reader_new(1024);
    events_t ev2 = {0};
    drive(r, buf, len, 0, &ev2);
    printf("   error text: %s\n", ch_reader_error(r));
    CHECK(strstr(ch_reader_error(r), "NOOP") != NULL);
    ch_reader_free(r);

    /* An ACK with a header byte is rejected as well. */
    uint8_t f[27];
    frame(f, 1, 0, 1, 0x02);
    len = with_hs(buf, f, 27);
    drive_all_chunkings(1024, buf, len, &ev);
    if (CHECK(ev.n == 2))
        CHECK_EQ(ev.ev[1].rc, -CH_PROTOCOL_ERROR);
}

/* docs/protocol.md#wire-format: type 0x05 (NOOP + REQ_ACK) with zero lengths. */
static void test_noop_req_ack(void)
{
    uint8_t f[27], buf[64];
    frame(f, 1, 0, 0, 0x05);
    size_t len = with_hs(buf, f, 27);
    ch_reader_t *r = ch_reader_new(1024);
    events_t ev = {0};
    CHECK_EQ(drive(r, buf, len, 0, &ev), -CH_PROTOCOL_ERROR);
    printf("   error text: %s\n", ch_reader_error(r));
    CHECK(strlen(ch_reader_error(r)) > 0);
    ch_reader_free(r);
}

static void test_size_limit(void)
{
    const uint32_t max = 104857600;
    uint8_t f[27], buf[64];
    events_t ev;

    /* Over by one: rejected before anything is allocated. */
    frame(f, 1, 104857600, 1, 0x01);
    size_t len = with_hs(buf, f, 27);
    drive_all_chunkings(max, buf, len, &ev);
    if (CHECK(ev.n == 2))
        CHECK_EQ(ev.ev[1].rc, -CH_ENOMEM);
    ch_reader_t *r = ch_reader_new(max);
    events_t ev2 = {0};
    CHECK_EQ(drive(r, buf, len, 0, &ev2), -CH_ENOMEM);
    printf("   error text: %s\n", ch_reader_error(r));
    CHECK(strcmp(ch_reader_error(r), "frame of 104857601 bytes exceeds MAX_MSG_SIZE 104857600") ==
          0);
    ch_reader_free(r);

    /* Exactly MAX_MSG_SIZE: accepted, waits for the body. The partly read
     * message is freed with the reader. */
    frame(f, 1, 104857600, 0, 0x00);
    len = with_hs(buf, f, 27);
    memset(buf + len, 0xab, 10);
    r = ch_reader_new(max);
    size_t c;
    CHECK_EQ(ch_reader_feed(r, buf, len + 10, &c), CH_RD_HANDSHAKE);
    CHECK_EQ(ch_reader_feed(r, buf + 18, len + 10 - 18, &c), CH_RD_DATA_HEADER);
    CHECK_EQ(c, 27);
    CHECK_EQ(ch_reader_feed(r, buf + len, 10, &c), CH_RD_MORE);
    CHECK_EQ(c, 10);
    CHECK(ch_reader_take_message(r) == NULL);
    ch_reader_free(r);

    /* Small limits: equal accepted, one over rejected. */
    len = with_hs(buf, FRAME_DATA, sizeof(FRAME_DATA));
    drive_all_chunkings(8, buf, len, &ev);
    if (CHECK(ev.n == 3))
        CHECK_EQ(ev.ev[2].rc, CH_RD_MESSAGE);
    drive_all_chunkings(7, buf, len, &ev);
    if (CHECK(ev.n == 2))
        CHECK_EQ(ev.ev[1].rc, -CH_ENOMEM);

    /* MAX_MSG_SIZE 0 still admits empty messages and control frames. */
    frame(f, 1, 0, 0, 0x01);
    len = with_hs(buf, f, 27);
    drive_all_chunkings(0, buf, len, &ev);
    if (CHECK(ev.n == 3))
        CHECK_EQ(ev.ev[2].rc, CH_RD_MESSAGE);
}

/* docs/protocol.md#compatibility-with-libchirp-1x: a 32-bit sum of
 * 0xFFFFFFF0 + 0x20 wraps to 0x10 and would pass; the 64-bit sum must reject it, even with the largest limit. */
static void test_size_overflow(void)
{
    uint8_t f[27], buf[64];
    frame(f, 1, 0xFFFFFFF0u, 0x20, 0x00);
    size_t len = with_hs(buf, f, 27);
    const uint32_t limits[] = {104857600, 0xFFFFFFFFu, 0x20};
    for (size_t i = 0; i < 3; i++) {
        ch_reader_t *r = ch_reader_new(limits[i]);
        events_t ev = {0};
        CHECK_EQ(drive(r, buf, len, 0, &ev), -CH_ENOMEM);
        CHECK(strstr(ch_reader_error(r), "4294967312") != NULL);
        ch_reader_free(r);
    }

    /* The largest frame the limit 0xFFFFFFFF could take is 0xFFFF + 0xFFFFFFFF:
     * still rejected, as the sum is computed in 64 bits. */
    frame(f, 1, 0xFFFFFFFFu, 0xFFFF, 0x00);
    len = with_hs(buf, f, 27);
    ch_reader_t *r = ch_reader_new(0xFFFFFFFFu);
    events_t ev = {0};
    CHECK_EQ(drive(r, buf, len, 0, &ev), -CH_ENOMEM);
    ch_reader_free(r);
}

static void test_empty_message(void)
{
    uint8_t f[27], buf[64];
    frame(f, 0xdeadbeef, 0, 0, 0x01);
    size_t len = with_hs(buf, f, 27);
    events_t ev;
    drive_all_chunkings(1024, buf, len, &ev);
    if (!CHECK(ev.n == 3))
        return;
    CHECK_EQ(ev.ev[1].rc, CH_RD_DATA_HEADER);
    CHECK_EQ(ev.ev[2].rc, CH_RD_MESSAGE);
    CHECK_EQ(ev.ev[2].serial, 0xdeadbeef);
    CHECK_EQ(ev.ev[2].header_len, 0);
    CHECK_EQ(ev.ev[2].data_len, 0);
    CHECK_EQ(ev.ev[2].flags, CH_MSGF_INLINE | CH_MSGF_ACK_OWED);

    /* The empty body completes on the call after DATA_HEADER, consuming nothing. */
    ch_reader_t *r = ch_reader_new(1024);
    size_t c;
    CHECK_EQ(ch_reader_feed(r, buf, len, &c), CH_RD_HANDSHAKE);
    CHECK_EQ(ch_reader_feed(r, buf + 18, 27, &c), CH_RD_DATA_HEADER);
    CHECK_EQ(ch_reader_feed(r, buf + 45, 0, &c), CH_RD_MESSAGE);
    CHECK_EQ(c, 0);
    ch_message_t *m = ch_reader_take_message(r);
    if (CHECK(m != NULL)) {
        CHECK_EQ(m->header_len, 0);
        CHECK_EQ(m->data_len, 0);
        ch_msg_free(m);
    }
    ch_reader_free(r);
}

/* Several frames of every kind back to back in one buffer. */
static void test_many_frames(void)
{
    uint8_t buf[512];
    size_t len = 0;
    memcpy(buf, HS_CLIENT, 18);
    len = 18;
    memcpy(buf + len, FRAME_DATA, sizeof(FRAME_DATA));
    len += sizeof(FRAME_DATA);
    memcpy(buf + len, FRAME_ACK, 27);
    len += 27;
    frame(buf + len, 100, 0, 0, 0x00); /* empty async message */
    len += 27;
    memcpy(buf + len, FRAME_NOOP, 27);
    len += 27;
    frame(buf + len, 101, 4, 2, 0x00);
    len += 27;
    memcpy(buf + len, "ABdata", 6);
    len += 6;
    memcpy(buf + len, FRAME_DATA, sizeof(FRAME_DATA));
    len += sizeof(FRAME_DATA);
    frame(buf + len, 102, 0, 0, 0x02);
    len += 27;

    static const int want[] = {
        CH_RD_HANDSHAKE,   CH_RD_DATA_HEADER, CH_RD_MESSAGE,     CH_RD_ACK,
        CH_RD_DATA_HEADER, CH_RD_MESSAGE,     CH_RD_NOOP,        CH_RD_DATA_HEADER,
        CH_RD_MESSAGE,     CH_RD_DATA_HEADER, CH_RD_MESSAGE,     CH_RD_ACK,
    };
    events_t ev;
    drive_all_chunkings(1024, buf, len, &ev);
    if (!CHECK(ev.n == (int)(sizeof(want) / sizeof(want[0]))))
        return;
    for (int i = 0; i < ev.n; i++)
        CHECK_EQ(ev.ev[i].rc, want[i]);
    CHECK_MEM(ev.ev[2].body, "hdrhello", 8);
    CHECK_EQ(ev.ev[5].serial, 100);
    CHECK_EQ(ev.ev[5].flags, CH_MSGF_INLINE);
    CHECK_EQ(ev.ev[8].serial, 101);
    CHECK_MEM(ev.ev[8].body, "ABdata", 6);
    CHECK_EQ(ev.ev[8].header_len, 2);
    CHECK_EQ(ev.ev[8].data_len, 4);
    CHECK_MEM(ev.ev[10].body, "hdrhello", 8);
    CHECK_EQ(ev.ev[11].serial, 102);
}

/* Errors are sticky: same code, nothing consumed, text unchanged. */
static void test_sticky_error(void)
{
    uint8_t f[27], buf[128];
    frame(f, 1, 0, 0, 0x07);
    size_t len = with_hs(buf, f, 27);
    memcpy(buf + len, FRAME_ACK, 27);
    len += 27;

    ch_reader_t *r = ch_reader_new(1024);
    size_t c;
    CHECK_EQ(ch_reader_feed(r, buf, len, &c), CH_RD_HANDSHAKE);
    CHECK_EQ(c, 18);
    CHECK_EQ(ch_reader_feed(r, buf + 18, len - 18, &c), -CH_PROTOCOL_ERROR);
    CHECK_EQ(c, 27);
    char text[200];
    snprintf(text, sizeof(text), "%s", ch_reader_error(r));
    CHECK(strlen(text) > 0);
    for (int i = 0; i < 3; i++) {
        c = 99;
        CHECK_EQ(ch_reader_feed(r, buf + 45, 27, &c), -CH_PROTOCOL_ERROR);
        CHECK_EQ(c, 0);
        c = 99;
        CHECK_EQ(ch_reader_feed(r, NULL, 0, &c), -CH_PROTOCOL_ERROR);
        CHECK_EQ(c, 0);
    }
    CHECK(strcmp(text, ch_reader_error(r)) == 0);
    CHECK(ch_reader_take_message(r) == NULL);
    ch_reader_free(r);

    /* The ENOMEM size error is sticky too. */
    frame(f, 1, 2000, 0, 0x00);
    len = with_hs(buf, f, 27);
    r = ch_reader_new(1024);
    events_t ev = {0};
    CHECK_EQ(drive(r, buf, len, 1, &ev), -CH_ENOMEM);
    CHECK_EQ(ch_reader_feed(r, FRAME_ACK, 27, &c), -CH_ENOMEM);
    CHECK_EQ(c, 0);
    ch_reader_free(r);
}

/* A fresh reader reports no error and zeroed fields; NULL out-pointers are
 * allowed; freeing NULL is harmless. */
static void test_fresh_reader(void)
{
    ch_reader_t *r = ch_reader_new(10);
    if (!CHECK(r != NULL))
        return;
    CHECK(strcmp(ch_reader_error(r), "") == 0);
    CHECK(ch_reader_take_message(r) == NULL);
    uint32_t serial = 1;
    uint8_t type = 1;
    ch_reader_frame(r, NULL, &serial, NULL, NULL, &type);
    CHECK_EQ(serial, 0);
    CHECK_EQ(type, 0);
    ch_reader_handshake(r, NULL, NULL);
    size_t c = 99;
    CHECK_EQ(ch_reader_feed(r, NULL, 0, &c), CH_RD_MORE);
    CHECK_EQ(c, 0);
    ch_reader_free(r);
    ch_reader_free(NULL);
    ch_msg_free(NULL);
}

/* A completed message the caller never takes is freed when the next message
 * is allocated (no leak; checked under valgrind and ASan). */
static void test_untaken_message(void)
{
    uint8_t buf[128];
    size_t len = with_hs(buf, FRAME_DATA, sizeof(FRAME_DATA));
    memcpy(buf + len, FRAME_DATA, sizeof(FRAME_DATA));
    len += sizeof(FRAME_DATA);
    ch_reader_t *r = ch_reader_new(1024);
    size_t off = 0, c;
    int messages = 0;
    for (;;) {
        int rc = ch_reader_feed(r, buf + off, len - off, &c);
        off += c;
        if (rc == CH_RD_MESSAGE)
            messages++;
        if (rc == CH_RD_MORE || rc < 0)
            break;
    }
    CHECK_EQ(messages, 2);
    CHECK_EQ(off, len);
    ch_message_t *m = ch_reader_take_message(r);
    if (CHECK(m != NULL))
        ch_msg_free(m);
    ch_reader_free(r);

    /* Freed with the reader when never taken. */
    r = ch_reader_new(1024);
    off = 0;
    for (;;) {
        int rc = ch_reader_feed(r, buf + off, 18 + sizeof(FRAME_DATA) - off, &c);
        off += c;
        if (rc == CH_RD_MORE || rc < 0)
            break;
    }
    ch_reader_free(r);
}

/* A large body fed in uneven chunks: the block grows as bytes arrive (it starts
 * with room for 64 KiB whatever the header announces) and the message is
 * byte for byte what was sent, header and data pointing into the final block. */
static void test_large_body_grows(void)
{
    const uint32_t data_len = 700000;
    const uint16_t header_len = 300;
    size_t body = (size_t)header_len + data_len;
    size_t len = 18 + 27 + body;
    uint8_t *buf = malloc(len);
    if (!CHECK(buf != NULL))
        return;
    memcpy(buf, HS_CLIENT, 18);
    frame(buf + 18, 7, data_len, header_len, 0x01);
    for (size_t i = 0; i < body; i++)
        buf[45 + i] = (uint8_t)(i * 7 + (i >> 9));
    static const size_t chunks[] = {0, 1, 1000, 65536, 65537, 100000};
    for (size_t k = 0; k < sizeof(chunks) / sizeof(chunks[0]); k++) {
        ch_reader_t *r = ch_reader_new(1 << 20);
        size_t off = 0, step = chunks[k] ? chunks[k] : len;
        ch_message_t *m = NULL;
        int guard = 0;
        while (off < len || !m) {
            size_t n = len - off < step ? len - off : step;
            size_t c = 0;
            int rc = ch_reader_feed(r, buf + off, n, &c);
            off += c;
            if (rc == CH_RD_MESSAGE)
                m = ch_reader_take_message(r);
            else if (rc < 0 || ++guard > 2000000)
                break;
        }
        if (CHECK(m != NULL)) {
            CHECK_EQ(m->header_len, header_len);
            CHECK_EQ(m->data_len, data_len);
            CHECK(m->header == (const uint8_t *)(m + 1));
            CHECK(m->data == m->header + header_len);
            CHECK_MEM(m->header, buf + 45, header_len);
            CHECK_MEM(m->data, buf + 45 + header_len, data_len);
            ch_msg_free(m);
        }
        ch_reader_free(r);
    }
    /* A body that stalls halfway is freed with the reader. */
    ch_reader_t *r = ch_reader_new(1 << 20);
    size_t c, off = 0;
    CHECK_EQ(ch_reader_feed(r, buf, len, &c), CH_RD_HANDSHAKE);
    off += c;
    CHECK_EQ(ch_reader_feed(r, buf + off, len - off, &c), CH_RD_DATA_HEADER);
    off += c;
    CHECK_EQ(ch_reader_feed(r, buf + off, 200000, &c), CH_RD_MORE);
    CHECK_EQ(c, 200000);
    ch_reader_free(r);
    free(buf);
}

int main(void)
{
    UNIT_RUN(test_handshake_vector);
    UNIT_RUN(test_handshake_fragmented);
    UNIT_RUN(test_data_vector);
    UNIT_RUN(test_stops_after_event);
    UNIT_RUN(test_ack_vector);
    UNIT_RUN(test_noop_vector);
    UNIT_RUN(test_control_types);
    UNIT_RUN(test_unknown_bit_is_data);
    UNIT_RUN(test_noop_with_payload);
    UNIT_RUN(test_noop_req_ack);
    UNIT_RUN(test_size_limit);
    UNIT_RUN(test_size_overflow);
    UNIT_RUN(test_empty_message);
    UNIT_RUN(test_many_frames);
    UNIT_RUN(test_sticky_error);
    UNIT_RUN(test_fresh_reader);
    UNIT_RUN(test_untaken_message);
    UNIT_RUN(test_large_body_grows);
    return unit_summary();
}
