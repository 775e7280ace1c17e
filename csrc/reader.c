/*
 * reader.c: the frame reader, a pure state machine over bytes.
 *
 * Theory of operation
 * -------------------
 * A reader turns the byte stream of one connection direction into events
 * (docs/protocol.md#wire-format). It never does I/O: the connection code feeds it
 * whatever bytes arrived and reacts to the event it returns. Every call to
 * ch_reader_feed() reports in *consumed how many bytes it used; it stops right
 * after the byte that completed an event, so the caller can act on the event
 * (take the message, look at the frame) before feeding the rest.
 *
 * The reader moves through these states:
 *
 *   HANDSHAKE  collects the 18-byte handshake, in any number of pieces, and
 *              reports CH_RD_HANDSHAKE. Then HEADER.
 *   HEADER     collects the 27-byte frame header, in any number of pieces,
 *              and validates it in the order of docs/protocol.md#wire-format: first the
 *              size (header_len + data_len summed in 64 bits, so a data_len
 *              near 2^32 cannot wrap,
 *              docs/protocol.md#compatibility-with-libchirp-1x), then the control
 *              flags. A control frame is reported as CH_RD_NOOP or CH_RD_ACK
 *              (NOOP wins when both bits are set) and the reader stays in
 *              HEADER. A data frame is reported as CH_RD_DATA_HEADER; nothing
 *              is allocated yet. Then SLOT.
 *   SLOT       the caller has seen the data header and holds a receive slot.
 *              The next feed call, even with no bytes, allocates the message
 *              as one block (record, header bytes, data bytes), but at first
 *              with room for at most CH__RD_FIRST_ALLOC body bytes. Then BODY.
 *   BODY       copies header and data bytes into the block; they follow each
 *              other in the block exactly as on the wire, so one counter
 *              suffices. The block grows (realloc, doubling, never beyond the
 *              announced size) only when arriving bytes need the room, so the
 *              memory a frame takes follows the bytes that really arrived, not
 *              the size its header announces (docs/reliability.md). When the
 *              body is complete (at once for an empty
 *              message) the reader reports CH_RD_MESSAGE and goes back to
 *              HEADER. The finished message stays with the reader until
 *              ch_reader_take_message() hands it over; a message that is
 *              never taken is freed when the next one is allocated or when
 *              the reader is freed.
 *   ERROR      reached on any validation or allocation failure. The failing
 *              call counts the bytes of the rejected header as consumed.
 *              Errors are sticky: every later feed returns the same negative
 *              code and consumes nothing. ch_reader_error() holds a sentence
 *              saying why.
 *
 * Nothing here is thread-safe; a reader belongs to one connection, which is
 * used by the loop thread only (tests and fuzzers use it directly).
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "reader.h"

/* Body bytes allocated with the message before any of them arrived. */
#define CH__RD_FIRST_ALLOC (64 * 1024)

typedef enum {
    CH__RD_HANDSHAKE,
    CH__RD_HEADER,
    CH__RD_SLOT,
    CH__RD_BODY,
    CH__RD_ERROR
} ch__rd_state_t;

struct ch_reader_s {
    ch__rd_state_t state;
    uint32_t max_msg_size;
    int error;     /* negative code once in CH__RD_ERROR, else 0 */
    char err[160]; /* sentence for ch_reader_error(), "" if none */

    /* Bytes of the handshake or frame header collected so far. */
    uint8_t buf[CH_HEADER_SIZE];
    size_t have;

    /* The peer's handshake. */
    uint16_t hs_port;
    uint8_t hs_identity[CH_ID_SIZE];

    /* The last frame header. */
    uint8_t identity[CH_ID_SIZE];
    uint32_t serial;
    uint32_t data_len;
    uint16_t header_len;
    uint8_t type;

    /* The message being read (BODY) or completed and not yet taken. */
    ch_message_t *msg;
    uint64_t body_len;  /* header_len + data_len of msg */
    uint64_t body_have; /* body bytes copied so far */
    uint64_t body_cap;  /* body bytes the block has room for */
    int msg_done;       /* msg is complete and waits for take_message */
};

static uint16_t ch__rd_be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static uint32_t ch__rd_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Enter the sticky error state with code (a positive ch_error) and a reason. */
static int ch__rd_fail(ch_reader_t *r, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int ch__rd_fail(ch_reader_t *r, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->err, sizeof(r->err), fmt, ap);
    va_end(ap);
    r->state = CH__RD_ERROR;
    r->error = -code;
    return r->error;
}

/* Copy up to want - r->have bytes into r->buf; returns the number copied. */
static size_t ch__rd_collect(ch_reader_t *r, size_t want, const uint8_t *buf, size_t len)
{
    size_t n = want - r->have;
    if (n > len)
        n = len;
    if (n > 0) {
        memcpy(r->buf + r->have, buf, n);
        r->have += n;
    }
    return n;
}

/* Decode and validate the complete frame header in r->buf. Returns the event
 * to report or a negative error. */
static int ch__rd_header(ch_reader_t *r)
{
    const uint8_t *p = r->buf;
    memcpy(r->identity, p, CH_ID_SIZE);
    r->serial = ch__rd_be32(p + 16);
    r->data_len = ch__rd_be32(p + 20);
    r->header_len = ch__rd_be16(p + 24);
    r->type = p[26];
    r->have = 0;

    uint64_t total = (uint64_t)r->header_len + (uint64_t)r->data_len;
    if (total > r->max_msg_size)
        return ch__rd_fail(r, CH_ENOMEM,
                           "frame of %" PRIu64 " bytes exceeds MAX_MSG_SIZE %" PRIu32, total,
                           r->max_msg_size);

    if (r->type & (CH_MSG_ACK | CH_MSG_NOOP)) {
        const char *name = (r->type & CH_MSG_NOOP) ? "NOOP" : "ACK";
        if (total != 0)
            return ch__rd_fail(r, CH_PROTOCOL_ERROR,
                               "%s frame (type 0x%02x) carries %" PRIu16 " header and %" PRIu32
                               " data bytes, but must be empty",
                               name, r->type, r->header_len, r->data_len);
        if (r->type & CH_MSG_REQ_ACK)
            return ch__rd_fail(r, CH_PROTOCOL_ERROR,
                               "%s frame (type 0x%02x) must not request an ACK", name, r->type);
        return (r->type & CH_MSG_NOOP) ? CH_RD_NOOP : CH_RD_ACK;
    }

    r->body_len = total;
    r->body_have = 0;
    r->state = CH__RD_SLOT;
    return CH_RD_DATA_HEADER;
}

/* Point header and data of m at its body (after a realloc moved the block). */
static void ch__rd_point(ch_message_t *m)
{
    uint8_t *body = (uint8_t *)(m + 1);
    m->header = body;
    m->data = body + m->header_len;
}

/* Allocate the message for the validated data header: one record followed by
 * room for the first min(header_len + data_len, CH__RD_FIRST_ALLOC) body
 * bytes; ch__rd_grow() makes room for more as they arrive. */
static int ch__rd_alloc(ch_reader_t *r)
{
    uint64_t cap = r->body_len < CH__RD_FIRST_ALLOC ? r->body_len : CH__RD_FIRST_ALLOC;
    ch_message_t *m = malloc(sizeof(ch_message_t) + (size_t)cap);
    if (!m)
        return ch__rd_fail(r, CH_ENOMEM, "cannot allocate a message of %" PRIu64 " bytes",
                           r->body_len);
    memset(m, 0, sizeof(*m));

    /* A finished message nobody took is replaced, not leaked. */
    if (r->msg)
        ch_msg_free(r->msg);
    r->msg = m;
    r->msg_done = 0;
    r->body_cap = cap;

    memcpy(m->identity, r->identity, CH_ID_SIZE);
    m->serial = r->serial;
    m->type = r->type;
    m->header_len = r->header_len;
    m->data_len = r->data_len;
    ch__rd_point(m);
    m->flags = CH_MSGF_INLINE;
    if (r->type & CH_MSG_REQ_ACK)
        m->flags |= CH_MSGF_ACK_OWED;
    r->state = CH__RD_BODY;
    return 0;
}

/* Make room for want body bytes (want <= body_len): double the room, or more
 * if want needs it, never beyond the announced body. */
static int ch__rd_grow(ch_reader_t *r, uint64_t want)
{
    if (want <= r->body_cap)
        return 0;
    uint64_t cap = r->body_cap * 2;
    if (cap < want)
        cap = want;
    if (cap > r->body_len)
        cap = r->body_len;
    if (cap > SIZE_MAX - sizeof(ch_message_t))
        return ch__rd_fail(r, CH_ENOMEM, "cannot allocate a message of %" PRIu64 " bytes",
                           r->body_len);
    ch_message_t *m = realloc(r->msg, sizeof(ch_message_t) + (size_t)cap);
    if (!m)
        return ch__rd_fail(r, CH_ENOMEM,
                           "cannot grow a message of %" PRIu64 " bytes to %" PRIu64 " bytes",
                           r->body_len, cap);
    r->msg = m;
    r->body_cap = cap;
    ch__rd_point(m);
    return 0;
}

ch_reader_t *ch_reader_new(uint32_t max_msg_size)
{
    ch_reader_t *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->state = CH__RD_HANDSHAKE;
    r->max_msg_size = max_msg_size;
    return r;
}

void ch_reader_free(ch_reader_t *r)
{
    if (!r)
        return;
    ch_msg_free(r->msg);
    free(r);
}

int ch_reader_feed(ch_reader_t *r, const uint8_t *buf, size_t len, size_t *consumed)
{
    size_t used = 0;
    int rc = CH_RD_MORE;

    if (r->state == CH__RD_ERROR) {
        *consumed = 0;
        return r->error;
    }
    if (!buf)
        len = 0;

    switch (r->state) {
    case CH__RD_HANDSHAKE:
        used = ch__rd_collect(r, CH_HANDSHAKE_SIZE, buf, len);
        if (r->have == CH_HANDSHAKE_SIZE) {
            r->hs_port = ch__rd_be16(r->buf);
            memcpy(r->hs_identity, r->buf + 2, CH_ID_SIZE);
            r->have = 0;
            r->state = CH__RD_HEADER;
            rc = CH_RD_HANDSHAKE;
        }
        break;

    case CH__RD_HEADER:
        used = ch__rd_collect(r, CH_HEADER_SIZE, buf, len);
        if (r->have == CH_HEADER_SIZE)
            rc = ch__rd_header(r);
        break;

    case CH__RD_SLOT:
        rc = ch__rd_alloc(r);
        if (rc < 0)
            break;
        /* Copy whatever body bytes came with this call. */
        /* fall through */
    case CH__RD_BODY: {
        uint64_t need = r->body_len - r->body_have;
        size_t n = need < len ? (size_t)need : len;
        if (n > 0 && (rc = ch__rd_grow(r, r->body_have + n)) < 0)
            break;
        if (n > 0) {
            memcpy((uint8_t *)(r->msg + 1) + r->body_have, buf, n);
            r->body_have += n;
        }
        used = n;
        if (r->body_have == r->body_len) {
            r->msg_done = 1;
            r->state = CH__RD_HEADER;
            rc = CH_RD_MESSAGE;
        } else {
            rc = CH_RD_MORE;
        }
        break;
    }

    case CH__RD_ERROR:
        break;
    }

    /* On the call that fails, used counts the bytes that went into the bad
     * header; later calls consume nothing (sticky error above). */
    *consumed = used;
    return rc;
}

ch_message_t *ch_reader_take_message(ch_reader_t *r)
{
    if (!r->msg_done)
        return NULL;
    ch_message_t *m = r->msg;
    r->msg = NULL;
    r->msg_done = 0;
    return m;
}

const char *ch_reader_error(const ch_reader_t *r) { return r ? r->err : ""; }

void ch_reader_handshake(const ch_reader_t *r, uint16_t *port, uint8_t identity[16])
{
    if (port)
        *port = r->hs_port;
    if (identity)
        memcpy(identity, r->hs_identity, CH_ID_SIZE);
}

void ch_reader_frame(const ch_reader_t *r, uint8_t identity[16], uint32_t *serial,
                     uint32_t *data_len, uint16_t *header_len, uint8_t *type)
{
    if (identity)
        memcpy(identity, r->identity, CH_ID_SIZE);
    if (serial)
        *serial = r->serial;
    if (data_len)
        *data_len = r->data_len;
    if (header_len)
        *header_len = r->header_len;
    if (type)
        *type = r->type;
}

/* Messages are single malloc blocks: a received one carries its bytes inline
 * (CH_MSGF_INLINE), any other one only borrows header and data from its owner,
 * so in both cases freeing the record is all there is to do. */
void ch_msg_free(ch_message_t *msg) { free(msg); }
