/*
 * fuzz_reader.c: libFuzzer entry point over the frame reader (ch_reader_*).
 *
 * Theory of operation
 * -------------------
 * The fuzz input is one byte stream as a peer would send it after TLS: the
 * first 18 bytes are the chirp handshake, the rest are frames (27-byte header,
 * header bytes, data bytes). MAX_MSG_SIZE is 1 MiB, so a frame that announces
 * more is refused before the reader allocates anything.
 *
 * An independent model of docs/protocol.md#wire-format (model() below, written from
 * the specification and not from reader.c) first computes the events the
 * stream must produce and where in the stream each one must be reported. The
 * stream is then fed to a fresh reader three times:
 *
 *   1. whole, in one buffer;
 *   2. one byte at a time (the first BYTEWISE_PREFIX bytes, then the rest);
 *   3. in chunks whose sizes come from a small PRNG seeded with the first
 *      input byte (which is also the high byte of the handshake's port, a
 *      field the reader never interprets), with zero-length feeds mixed in
 *      and, now and then, a completed message left untaken (the reader must
 *      free it itself).
 *
 * Each feed is driven the way a connection drives it: after
 * CH_RD_DATA_HEADER the caller "has a slot" and feeds the rest at once, after
 * CH_RD_MESSAGE it takes and frees the message. Every pass must report
 * exactly the model's events, at the model's stream offsets, with the fields
 * and bytes the stream holds. Further invariants: return codes come only from
 * the documented set; `consumed` never exceeds `len`, and CH_RD_MORE means
 * everything was consumed; a negative result is sticky (same code, nothing
 * consumed, same error text, for more bytes and for a zero-length feed); the
 * error text is empty until an error and non-empty after it. Any violation
 * calls abort(), which libFuzzer reports as a crash. Leaks of taken or
 * untaken messages are found by LeakSanitizer (libFuzzer's -detect_leaks).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "reader.h"

#define FUZZ_MAX_MSG (1u << 20)

/* Byte-by-byte feeding costs one call per byte: the second pass feeds only
 * this many bytes singly and the rest at once (the third pass cuts long
 * inputs into pieces of every size). */
#define BYTEWISE_PREFIX 512

/* One expected event: its return code, the stream offset right after the
 * byte that completes it, and the offset of its frame header (frames only). */
typedef struct {
    int rc;
    size_t pos;
    size_t hdr;
} expect_t;

typedef struct {
    const uint8_t *d;
    size_t n;
    const expect_t *exp;
    size_t nexp;
} stream_t;

/* Report an invariant violation and crash so libFuzzer keeps the input. */
#define REQUIRE(cond)                                                                      \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "fuzz_reader: invariant failed at %s:%d: %s\n", __FILE__,       \
                    __LINE__, #cond);                                                      \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

/* The specification's view of the stream (docs/protocol.md#wire-format): the
 * handshake, then frames until the stream ends or a frame is refused. */
static size_t model(const uint8_t *d, size_t n, expect_t *out)
{
    size_t k = 0, pos = CH_HANDSHAKE_SIZE;
    if (n < CH_HANDSHAKE_SIZE)
        return 0;
    out[k++] = (expect_t){CH_RD_HANDSHAKE, pos, 0};
    while (n - pos >= CH_HEADER_SIZE) {
        const uint8_t *h = d + pos;
        size_t hdr = pos, end = pos + CH_HEADER_SIZE;
        uint64_t total = (uint64_t)be32(h + 20) + be16(h + 24);
        uint8_t type = h[26];
        if (total > FUZZ_MAX_MSG) {
            out[k++] = (expect_t){-CH_ENOMEM, end, hdr};
            return k;
        }
        if (type & (CH_MSG_ACK | CH_MSG_NOOP)) {
            if (total != 0 || (type & CH_MSG_REQ_ACK)) {
                out[k++] = (expect_t){-CH_PROTOCOL_ERROR, end, hdr};
                return k;
            }
            out[k++] = (expect_t){(type & CH_MSG_NOOP) ? CH_RD_NOOP : CH_RD_ACK, end, hdr};
            pos = end;
            continue;
        }
        out[k++] = (expect_t){CH_RD_DATA_HEADER, end, hdr};
        if (n - end < total)
            return k;
        pos = end + (size_t)total;
        out[k++] = (expect_t){CH_RD_MESSAGE, pos, hdr};
    }
    return k;
}

/* xorshift32: chunk sizes and choices of the third pass. */
static uint32_t rng_next(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

typedef struct {
    const stream_t *s;
    ch_reader_t *r;
    size_t pos;      /* bytes consumed so far */
    size_t next;     /* index of the next expected event */
    int failed;      /* the negative code once the reader failed, else 0 */
    int untaken;     /* a completed message was left in the reader */
    uint32_t rng;    /* 0: take every message */
} pass_t;

static void check_frame_fields(const pass_t *p, const uint8_t *h)
{
    uint8_t id[16];
    uint32_t serial = 1, dl = 1;
    uint16_t hl = 1;
    uint8_t type = 0;
    ch_reader_frame(p->r, id, &serial, &dl, &hl, &type);
    REQUIRE(memcmp(id, h, 16) == 0);
    REQUIRE(serial == be32(h + 16));
    REQUIRE(dl == be32(h + 20));
    REQUIRE(hl == be16(h + 24));
    REQUIRE(type == h[26]);
    /* NULL out-pointers are allowed. */
    ch_reader_frame(p->r, NULL, NULL, NULL, NULL, NULL);
}

static void check_message(pass_t *p, const uint8_t *h)
{
    if (p->rng != 0 && rng_next(&p->rng) % 4 == 0) {
        p->untaken = 1; /* the reader frees it with the next message or itself */
        return;
    }
    ch_message_t *m = ch_reader_take_message(p->r);
    REQUIRE(m != NULL);
    REQUIRE(ch_reader_take_message(p->r) == NULL);
    p->untaken = 0;
    uint32_t dl = be32(h + 20);
    uint16_t hl = be16(h + 24);
    uint8_t type = h[26];
    REQUIRE(memcmp(m->identity, h, 16) == 0);
    REQUIRE(m->serial == be32(h + 16));
    REQUIRE(m->data_len == dl);
    REQUIRE(m->header_len == hl);
    REQUIRE(m->type == type);
    REQUIRE(m->flags & CH_MSGF_INLINE);
    REQUIRE(!(m->flags & CH_MSGF_CONTROL));
    REQUIRE(!!(m->flags & CH_MSGF_ACK_OWED) == !!(type & CH_MSG_REQ_ACK));
    const uint8_t *body = h + CH_HEADER_SIZE;
    if (hl > 0)
        REQUIRE(m->header != NULL && memcmp(m->header, body, hl) == 0);
    if (dl > 0)
        REQUIRE(m->data != NULL && memcmp(m->data, body + hl, dl) == 0);
    ch_msg_free(m);
}

/* Check one event the reader just reported against the model. */
static void on_event(pass_t *p, int rc)
{
    const stream_t *s = p->s;
    REQUIRE(p->next < s->nexp);
    const expect_t *e = &s->exp[p->next++];
    const uint8_t *h = s->d + e->hdr;
    REQUIRE(rc == e->rc);
    if (rc < 0) {
        /* Refused once its header is known; exactly where is the reader's
         * choice, but never before the header started or after it ended. */
        REQUIRE(p->pos > e->hdr && p->pos <= e->pos);
        return;
    }
    REQUIRE(p->pos == e->pos);
    switch (rc) {
    case CH_RD_HANDSHAKE: {
        uint16_t port = 0;
        uint8_t id[16];
        ch_reader_handshake(p->r, &port, id);
        REQUIRE(port == be16(s->d));
        REQUIRE(memcmp(id, s->d + 2, 16) == 0);
        ch_reader_handshake(p->r, NULL, NULL);
        break;
    }
    case CH_RD_ACK:
    case CH_RD_NOOP:
    case CH_RD_DATA_HEADER:
        check_frame_fields(p, h);
        break;
    case CH_RD_MESSAGE:
        check_frame_fields(p, h);
        check_message(p, h);
        break;
    default:
        REQUIRE(!"unknown event");
    }
}

/* The reader has failed: everything after must repeat the failure. */
static void check_sticky(pass_t *p)
{
    const stream_t *s = p->s;
    char text[256];
    const char *t = ch_reader_error(p->r);
    REQUIRE(t != NULL && t[0] != '\0');
    snprintf(text, sizeof(text), "%s", t);
    for (int i = 0; i < 2; i++) {
        size_t c = 12345;
        REQUIRE(ch_reader_feed(p->r, s->d + p->pos, s->n - p->pos, &c) == p->failed);
        REQUIRE(c == 0);
        c = 12345;
        REQUIRE(ch_reader_feed(p->r, NULL, 0, &c) == p->failed);
        REQUIRE(c == 0);
    }
    REQUIRE(strncmp(text, ch_reader_error(p->r), sizeof(text) - 1) == 0);
    ch_message_t *m = ch_reader_take_message(p->r);
    if (m != NULL) {
        REQUIRE(p->untaken); /* only a message the caller left behind */
        ch_msg_free(m);
    }
}

/* Feed [pos, end) until it is consumed or the reader fails. */
static void feed_chunk(pass_t *p, size_t end)
{
    const stream_t *s = p->s;
    for (;;) {
        size_t len = end - p->pos, c = 12345;
        /* A zero-length feed passes NULL now and then: allowed by the API. */
        const uint8_t *buf = len == 0 && (p->pos & 1) ? NULL : s->d + p->pos;
        int rc = ch_reader_feed(p->r, buf, len, &c);
        REQUIRE(c <= len);
        REQUIRE((rc >= CH_RD_MORE && rc <= CH_RD_MESSAGE) || rc == -CH_PROTOCOL_ERROR ||
                rc == -CH_ENOMEM);
        p->pos += c;
        if (rc == CH_RD_MORE) {
            REQUIRE(c == len);
            return;
        }
        on_event(p, rc);
        if (rc < 0) {
            p->failed = rc;
            return;
        }
    }
}

/* One pass over the stream. mode 0: whole; mode 1: byte by byte; mode 2:
 * PRNG chunks (and untaken messages) from seed. */
static void run_pass(const stream_t *s, uint32_t seed, int mode)
{
    pass_t p = {.s = s, .rng = mode == 2 ? (seed ? seed : 1) : 0};
    p.r = ch_reader_new(FUZZ_MAX_MSG);
    REQUIRE(p.r != NULL);
    REQUIRE(strcmp(ch_reader_error(p.r), "") == 0);

    static const uint32_t limits[16] = {1,  2,  3,  4,   7,   13,   26,   27,
                                        28, 44, 45, 64, 128, 512, 4096, 65536};
    uint32_t limit = limits[(s->n ? s->d[0] : 0) >> 4];
    while (!p.failed) {
        size_t end;
        if (mode == 0)
            end = s->n;
        else if (mode == 1)
            end = p.pos < s->n && p.pos < BYTEWISE_PREFIX ? p.pos + 1 : s->n;
        else {
            uint32_t x = rng_next(&p.rng);
            size_t step = x % 8 == 0 ? 0 : 1 + (x >> 8) % limit;
            end = step < s->n - p.pos ? p.pos + step : s->n;
        }
        feed_chunk(&p, end);
        if (p.pos == s->n && !p.failed) {
            /* All consumed: a final empty feed may still complete an empty
             * message right behind its DATA_HEADER; then nothing is left. */
            feed_chunk(&p, s->n);
            break;
        }
    }
    if (p.failed) {
        REQUIRE(p.next == s->nexp); /* the failure is the model's last event */
        check_sticky(&p);
    } else {
        REQUIRE(p.pos == s->n);
        REQUIRE(p.next == s->nexp);
        REQUIRE(strcmp(ch_reader_error(p.r), "") == 0);
    }
    ch_reader_free(p.r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* At most: the handshake, then two events per 27 bytes. */
    size_t cap = 2 + 2 * (size / CH_HEADER_SIZE);
    expect_t *exp = malloc(cap * sizeof(*exp));
    REQUIRE(exp != NULL);
    stream_t s = {.d = data, .n = size, .exp = exp};
    s.nexp = model(data, size, exp);
    REQUIRE(s.nexp <= cap);

    uint32_t seed = 0x9e3779b9u ^ (uint32_t)size * 0x01000193u ^ (size ? data[0] : 0);
    run_pass(&s, seed, 0);
    run_pass(&s, seed, 1);
    run_pass(&s, seed, 2);
    free(exp);
    return 0;
}
