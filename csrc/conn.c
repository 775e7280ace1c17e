/*
 * conn.c: one TCP connection between two nodes. Loop thread only.
 *
 * States (docs/architecture.md): CONNECTING (outgoing, TCP connect issued) ->
 * TLS (when encryption applies, 1.2) -> HANDSHAKE (our 18 bytes written,
 * waiting for the peer's) -> READY -> CLOSED. Accepted connections start in
 * TLS or HANDSHAKE. One timer per connection carries, in turn, the
 * connect/handshake deadline of min(2T, 60) s (applied to accepted
 * connections too, fixing quirk 10.3) and then the per-message send
 * deadlines: T from the start of a frame's write, through its ACK in
 * synchronous mode (fixing quirk 10.5, since no other write resets it).
 *
 * Reading: bytes go through the pure frame reader (reader.c). A data frame
 * takes a receive slot right after its header was validated; when the
 * connection's MAX_SLOTS slots are all held, reading stops and the unread
 * bytes stay in rbuf until a release frees a slot (docs/flow-control.md#slots).
 *
 * Writing: a batch of frames at a time (header, header bytes, data bytes of
 * each, one write), chosen by the remote's scheduler (remote.c). A batch of
 * commands (sends, releases) is written at its end, one write per peer
 * (loop->corked); plaintext goes out with uv_try_write and completes at once
 * when the socket took it all, uv_write carries the rest.
 *
 * Closing runs the rules of 6.7 through ch__remote_conn_closed(); messages
 * the application still holds forget the connection and release at once.
 * The record is freed when both of its handles are closed.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

void ch__format_addr(int family, const uint8_t *addr, char *out, size_t len)
{
    if (family == 4)
        uv_inet_ntop(AF_INET, addr, out, len);
    else if (family == 6)
        uv_inet_ntop(AF_INET6, addr, out, len);
    else
        snprintf(out, len, "0.0.0.0");
}

static void ch__conn_set_name(ch_conn_t *c)
{
    char *a = c->addr_text;
    ch__format_addr(c->family, c->addr, a, sizeof(c->addr_text));
    if (c->family == 6)
        snprintf(c->name, sizeof(c->name), "[%s]:%u", a, c->port);
    else
        snprintf(c->name, sizeof(c->name), "%s:%u", a, c->port);
}

static uint64_t ch__conn_connect_ms(ch_node_t *node)
{
    double t = 2 * node->cfg.timeout;
    if (t > 60)
        t = 60;
    return (uint64_t)(t * 1000.0);
}

static ch_conn_t *ch__conn_new(ch_node_t *node)
{
    ch_conn_t *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->reader = ch_reader_new(node->cfg.max_msg_size);
    if (!c->reader) {
        free(c);
        return NULL;
    }
    c->node = node;
    uv_tcp_init(&node->loop->uv, &c->tcp);
    uv_timer_init(&node->loop->uv, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    c->connect_req.data = c;
    c->write_req.data = c;
    c->hs_req.data = c;
    c->handles = 2;
    node->handles += 2;
    c->activity = c->data_activity = ch__node_now(node);
    node->nconns++;
    c->next = node->conns;
    if (node->conns)
        node->conns->prev = c;
    node->conns = c;
    return c;
}

static void ch__conn_handle_closed(uv_handle_t *h)
{
    ch_conn_t *c = h->data;
    ch_node_t *node = c->node;
    if (--c->handles == 0) {
        if (c->prev)
            c->prev->next = c->next;
        else
            node->conns = c->next;
        if (c->next)
            c->next->prev = c->prev;
        ch_reader_free(c->reader);
        ch_tls_free(c->tls);
        free(c->cbuf);
        free(c->wbuf);
        free(c->rbuf);
        free(c);
        node->nfreed++;
    }
    ch__node_handle_closed(node);
}

void ch__conn_close(ch_conn_t *c, int reason, const char *fmt, ...)
{
    if (c->flags & CH__CONNF_CLOSING)
        return;
    c->flags |= CH__CONNF_CLOSING;
    char text[CH_EV_TEXT_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    int level = (reason == CH_SHUTDOWN || reason == CH_SUCCESS) ? CH_LOG_DEBUG
                : reason == CH_PROTOCOL_ERROR && c->state == CH__CONN_READY ? CH_LOG_INFO
                                                                            : CH_LOG_WARNING;
    ch__log(c->node, level, "%s", text);
    ch_remote_t *r = c->remote;
    c->node->nconns--;
    if ((c->flags & CH__CONNF_ACKWAIT) && r)
        r->nackwait--;
    c->flags &= ~CH__CONNF_ACKWAIT;
    if (reason == CH_TLS_ERROR)
        CH__COUNT(c->node, r, tls_errors, 1);
    else if (reason == CH_TIMEOUT)
        CH__COUNT(c->node, r, timeouts, 1);
    c->remote = NULL;
    if (r)
        ch__remote_conn_closed(r, c, reason, text);
    ch_message_t *m;
    while ((m = ch_msgq_pop(&c->held)))
        m->conn = NULL;
    c->state = CH__CONN_CLOSED;
    uv_read_stop((uv_stream_t *)&c->tcp);
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->tcp, ch__conn_handle_closed);
    uv_close((uv_handle_t *)&c->timer, ch__conn_handle_closed);
}

/* ---- timers ----------------------------------------------------------- */

static void ch__conn_timer_cb(uv_timer_t *t);

/* The connection's next deadline (ms, loop time; 0 = none): the connect /
 * handshake deadline until READY, then the earliest send deadline of the
 * frames being written and of the messages waiting for their ACK on it. */
static uint64_t ch__conn_deadline(ch_conn_t *c)
{
    if (c->state != CH__CONN_READY)
        return c->connect_deadline;
    uint64_t deadline = c->writing.head ? c->writing.head->deadline : 0;
    uint64_t d = c->remote ? ch__remote_ack_deadline(c->remote, c) : 0;
    if (d && (!deadline || d < deadline))
        deadline = d;
    return deadline;
}

void ch__conn_arm_timer(ch_conn_t *c)
{
    if (c->flags & CH__CONNF_CLOSING)
        return;
    uint64_t deadline = ch__conn_deadline(c);
    if (!deadline) {
        uv_timer_stop(&c->timer);
        return;
    }
    uint64_t now = ch__node_now(c->node);
    uv_timer_start(&c->timer, ch__conn_timer_cb, deadline > now ? deadline - now : 0, 0);
}

static void ch__conn_timer_cb(uv_timer_t *t)
{
    ch_conn_t *c = t->data;
    uint64_t deadline = ch__conn_deadline(c);
    if (!deadline || ch__node_now(c->node) < deadline) {
        ch__conn_arm_timer(c);
        return;
    }
    if (c->state != CH__CONN_READY)
        ch__conn_close(c, CH_TIMEOUT,
                       "connection to %s timed out after %.1f s before its handshake completed",
                       c->name, ch__conn_connect_ms(c->node) / 1000.0);
    else
        ch__conn_close(c, CH_TIMEOUT, "send to %s timed out after %.1f s (TIMEOUT)", c->name,
                       c->node->cfg.timeout);
}

/* ---- reading ---------------------------------------------------------- */

static int ch__conn_tls_flush(ch_conn_t *c, int frame_end);
static int ch__conn_tls_input(ch_conn_t *c, size_t n);

/* Buffers are allocated on first use, so idle connections stay small. */
static int ch__conn_buffers(ch_conn_t *c)
{
    if (!c->rbuf) {
        c->rbuf_cap = c->node->buffer_size;
        c->rbuf = malloc(c->rbuf_cap);
    }
    if (c->tls && !c->cbuf)
        c->cbuf = malloc(c->node->buffer_size);
    return c->rbuf && (!c->tls || c->cbuf) ? 0 : -1;
}

static void ch__conn_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    ch_conn_t *c = h->data;
    if (ch__conn_buffers(c) != 0) {
        buf->base = NULL;
        buf->len = 0;
        return;
    }
    /* TLS connections read ciphertext into cbuf; plaintext goes to rbuf. */
    buf->base = (char *)(c->tls ? c->cbuf : c->rbuf);
    buf->len = c->tls ? c->node->buffer_size : c->rbuf_cap;
}

static void ch__conn_got_handshake(ch_conn_t *c)
{
    ch_node_t *node = c->node;
    uint16_t port;
    ch_reader_handshake(c->reader, &port, c->remote_identity);
    c->port = port;
    ch__conn_set_name(c);
    ch_remote_t *r = c->remote;
    if (!r) {
        r = ch__remote_get(node, c->family, c->addr, port, 1);
        if (!r) {
            ch__conn_close(c, CH_ENOMEM, "out of memory for the remote of %s", c->name);
            return;
        }
        c->remote = r;
        r->nconns++;
    }
    /* The connection whose handshake completes last becomes active (6.5). */
    r->conn = c;
    CH__COUNT(node, r, connects, 1);
    if (c->flags & CH__CONNF_OUTGOING)
        ch__remote_send_caps(r, c); /* the connector announces first */
    c->state = CH__CONN_READY;
    c->activity = r->activity = ch__node_now(node);
    ch__log(node, CH_LOG_DEBUG, "connection to %s ready (%s)", c->name,
            (c->flags & CH__CONNF_OUTGOING) ? "outgoing" : "incoming");
    ch__conn_arm_timer(c);
    ch__remote_flush(r);
}

static void ch__conn_got_message(ch_conn_t *c)
{
    ch_message_t *m = ch_reader_take_message(c->reader);
    m->family = c->family;
    memcpy(m->addr, c->addr, 16);
    m->port = c->port;
    memcpy(m->remote_identity, c->remote_identity, CH_ID_SIZE);
    m->conn = c;
    CH__COUNT(c->node, c->remote, msgs_in, 1);
    CH__COUNT(c->node, c->remote, bytes_in, (uint64_t)m->header_len + m->data_len);
    ch_msgq_push(&c->held, m);
    ch_event_t ev;
    ch__event_init(&ev, CH_EV_RECV, c->node, 0, CH_SUCCESS);
    ev.msg = m;
    memcpy(ev.identity, m->identity, CH_ID_SIZE);
    ev.serial = m->serial;
    ev.header = m->header;
    ev.header_len = m->header_len;
    ev.data = m->data;
    ev.data_len = m->data_len;
    ev.port = m->port;
    memcpy(ev.remote_identity, m->remote_identity, CH_ID_SIZE);
    memcpy(ev.text, c->addr_text, sizeof(c->addr_text));
    ch__loop_post(c->node->loop, &ev);
}

/* Feed buffered bytes to the reader until they are used up, the connection
 * pauses for lack of a slot, or it closes. Returns 0 if reading may go on. */
static int ch__conn_process(ch_conn_t *c)
{
    ch_node_t *node = c->node;
    while (!(c->flags & CH__CONNF_CLOSING)) {
        ch_remote_t *r = c->remote;
        if (r) {
            /* ACK backlog: stop at CH__ACK_HIGH, go on below CH__ACK_LOW. */
            int waiting = (c->flags & CH__CONNF_ACKWAIT) != 0;
            if (r->acks_queued >= (waiting ? CH__ACK_LOW : CH__ACK_HIGH)) {
                if (!waiting) {
                    c->flags |= CH__CONNF_ACKWAIT;
                    r->nackwait++;
                }
                return 1;
            }
            if (waiting) {
                c->flags &= ~CH__CONNF_ACKWAIT;
                r->nackwait--;
            }
        }
        if (c->flags & CH__CONNF_PAUSED) {
            if (c->slots_used >= node->max_slots)
                return 1;
            c->flags &= ~CH__CONNF_PAUSED;
            c->slots_used++;
        }
        size_t used = 0;
        int rc = ch_reader_feed(c->reader, c->rbuf + c->rbuf_off, c->rbuf_len - c->rbuf_off,
                                &used);
        c->rbuf_off += used;
        uint64_t now = ch__node_now(node);
        switch (rc) {
        case CH_RD_MORE:
            c->rbuf_off = c->rbuf_len = 0;
            if (c->tls) {
                /* Pull the next plaintext the engine has buffered. */
                size_t got = 0;
                int trc = ch_tls_read(c->tls, c->rbuf, c->rbuf_cap, &got);
                if (trc == 0 && got) {
                    c->rbuf_len = got;
                    continue;
                }
                if (trc < 0) {
                    ch__conn_tls_flush(c, 0);
                    ch__conn_close(c, CH_TLS_ERROR, "TLS error on the connection with %s: %s",
                                   c->name, ch_tls_error(c->tls));
                    return 1;
                }
            }
            return 0;
        case CH_RD_HANDSHAKE:
            ch__conn_got_handshake(c);
            break;
        case CH_RD_ACK: {
            uint8_t id[16];
            uint32_t serial, dlen;
            uint16_t hlen;
            uint8_t type;
            ch_reader_frame(c->reader, id, &serial, &dlen, &hlen, &type);
            c->data_activity = now;
            if (c->remote)
                ch__remote_ack(c->remote, c, id);
            break;
        }
        case CH_RD_NOOP: {
            uint8_t id[16];
            uint32_t serial, dlen;
            uint16_t hlen;
            uint8_t type;
            ch_reader_frame(c->reader, id, &serial, &dlen, &hlen, &type);
            if ((type & CH_MSG_EXT) && memcmp(id, CH_EXT_MAGIC, 4) == 0 && c->remote) {
                c->peer_window = (id[4] & CH_EXT_F_PIPELINE) ? (id[5] ? id[5] : 1) : 1;
                c->peer_max_msg = ch__remote_caps_max_msg(id);
                if (!(c->flags & CH__CONNF_OUTGOING))
                    ch__remote_send_caps(c->remote, c);
                ch__remote_flush(c->remote);
            }
            c->activity = now;
            if (c->remote)
                c->remote->activity = now;
            break;
        }
        case CH_RD_DATA_HEADER:
            c->activity = c->data_activity = now;
            if (c->remote)
                c->remote->activity = now;
            if (c->slots_used >= node->max_slots) {
                c->flags |= CH__CONNF_PAUSED;
                return 1;
            }
            c->slots_used++;
            break;
        case CH_RD_MESSAGE:
            ch__conn_got_message(c);
            break;
        default:
            CH__COUNT(node, c->remote, protocol_errors, 1);
            ch__conn_close(c, -rc, "closing connection to %s: %s", c->name,
                           ch_reader_error(c->reader));
            return 1;
        }
    }
    return 1;
}

static void ch__conn_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    (void)buf;
    ch_conn_t *c = s->data;
    if (c->flags & CH__CONNF_CLOSING)
        return;
    if (nread == 0)
        return;
    if (nread < 0) {
        if (nread == UV_EOF)
            ch__conn_close(c, CH_PROTOCOL_ERROR, "connection closed by %s", c->name);
        else if (nread == UV_ENOBUFS)
            ch__conn_close(c, CH_ENOMEM, "out of memory reading from %s", c->name);
        else
            ch__conn_close(c, CH_PROTOCOL_ERROR, "read from %s failed: %s", c->name,
                           uv_strerror((int)nread));
        return;
    }
    if (c->slots_used > (int)c->held.len) {
        /* More bytes of a data frame: activity (6.4), so that the garbage
         * collector spares a long message still arriving. */
        c->activity = c->data_activity = ch__node_now(c->node);
        if (c->remote)
            c->remote->activity = c->activity;
    }
    if (c->tls) {
        if (ch__conn_tls_input(c, (size_t)nread) != 0)
            return;
        c->rbuf_off = c->rbuf_len = 0;
    } else {
        c->rbuf_off = 0;
        c->rbuf_len = (size_t)nread;
    }
    int stopped = ch__conn_process(c);
    if (c->tls && !(c->flags & CH__CONNF_CLOSING))
        ch__conn_tls_flush(c, 0);
    if (stopped && !(c->flags & CH__CONNF_CLOSING) &&
        (c->flags & (CH__CONNF_PAUSED | CH__CONNF_ACKWAIT))) {
        uv_read_stop(s);
        c->flags &= ~CH__CONNF_READING;
    }
}

/* Go on with the buffered bytes of a stopped connection and read again if
 * they were all used. */
static void ch__conn_resume(ch_conn_t *c)
{
    int stopped = ch__conn_process(c);
    if (c->tls && !(c->flags & CH__CONNF_CLOSING))
        ch__conn_tls_flush(c, 0);
    if (!stopped && !(c->flags & CH__CONNF_READING)) {
        c->flags |= CH__CONNF_READING;
        uv_read_start((uv_stream_t *)&c->tcp, ch__conn_alloc_cb, ch__conn_read_cb);
    }
}

void ch__conn_slot_freed(ch_conn_t *c)
{
    if (c->flags & (CH__CONNF_CLOSING | CH__CONNF_ACKWAIT))
        return;
    if (!(c->flags & CH__CONNF_PAUSED) || c->slots_used >= c->node->max_slots)
        return;
    ch__conn_resume(c);
}

void ch__conn_ack_drained(ch_remote_t *r)
{
    if (r->nackwait == 0 || r->acks_queued >= CH__ACK_LOW)
        return;
    ch_conn_t *a = r->conn;
    if (a && (a->flags & CH__CONNF_ACKWAIT) && !(a->flags & CH__CONNF_CLOSING))
        ch__conn_resume(a);
    /* Other connections of the remote (rare: reconnects, simultaneous
     * connects) are found in the node's list. */
    for (ch_conn_t *c = r->nackwait > 0 ? r->node->conns : NULL, *next; c; c = next) {
        next = c->next;
        if (c->remote == r && (c->flags & CH__CONNF_ACKWAIT) && !(c->flags & CH__CONNF_CLOSING))
            ch__conn_resume(c);
    }
}

/* ---- TLS -------------------------------------------------------------- */

/* Ciphertext chunk on its way to the socket. */
typedef struct ch__tls_chunk_s {
    uv_write_t req;
    ch_conn_t *conn;
    int frame_end; /* the last chunk of the frame being written */
    uint8_t data[];
} ch__tls_chunk_t;

static void ch__conn_frame_written(ch_conn_t *c, int status);

static void ch__conn_tls_chunk_cb(uv_write_t *req, int status)
{
    ch__tls_chunk_t *k = (ch__tls_chunk_t *)req;
    ch_conn_t *c = k->conn;
    int frame_end = k->frame_end;
    free(k);
    if (c->flags & CH__CONNF_CLOSING)
        return;
    if (frame_end)
        ch__conn_frame_written(c, status);
    else if (status < 0)
        ch__conn_close(c, CH_PROTOCOL_ERROR, "write to %s failed: %s", c->name,
                       uv_strerror(status));
}

/* Send whatever ciphertext the engine has produced. frame_end marks the
 * chunk whose completion completes the frame being written. */
static int ch__conn_tls_flush(ch_conn_t *c, int frame_end)
{
    size_t n = ch_tls_pending_out(c->tls);
    if (n == 0) {
        if (frame_end)
            ch__conn_frame_written(c, 0);
        return 0;
    }
    ch__tls_chunk_t *k = malloc(sizeof(*k) + n);
    if (!k) {
        ch__conn_close(c, CH_ENOMEM, "out of memory writing to %s", c->name);
        return -1;
    }
    k->conn = c;
    k->frame_end = frame_end;
    size_t got = ch_tls_take_out(c->tls, k->data, n);
    uv_buf_t b = uv_buf_init((char *)k->data, (unsigned)got);
    int rc = uv_write(&k->req, (uv_stream_t *)&c->tcp, &b, 1, ch__conn_tls_chunk_cb);
    if (rc != 0) {
        free(k);
        ch__conn_close(c, CH_PROTOCOL_ERROR, "write to %s failed: %s", c->name, uv_strerror(rc));
        return -1;
    }
    return 0;
}

/* Encrypt plaintext segments; small frames are coalesced into one record. */
static int ch__conn_tls_write(ch_conn_t *c, const uv_buf_t *bufs, unsigned n)
{
    size_t total = 0;
    for (unsigned i = 0; i < n; i++)
        total += bufs[i].len;
    uv_buf_t one;
    if (total <= 16384 && n > 1) {
        if (!c->wbuf && !(c->wbuf = malloc(16384))) {
            ch__conn_close(c, CH_ENOMEM, "out of memory writing to %s", c->name);
            return -1;
        }
        size_t off = 0;
        for (unsigned i = 0; i < n; i++) {
            memcpy(c->wbuf + off, bufs[i].base, bufs[i].len);
            off += bufs[i].len;
        }
        one = uv_buf_init((char *)c->wbuf, (unsigned)total);
        bufs = &one;
        n = 1;
    }
    for (unsigned i = 0; i < n; i++) {
        const uint8_t *p = (const uint8_t *)bufs[i].base;
        size_t left = bufs[i].len;
        while (left) {
            size_t taken = 0;
            int rc = ch_tls_write(c->tls, p, left < 16384 ? left : 16384, &taken);
            if (rc != 0) {
                ch__conn_tls_flush(c, 0);
                ch__conn_close(c, CH_TLS_ERROR, "TLS write to %s failed: %s", c->name,
                               rc == CH_MORE ? "engine needs input" : ch_tls_error(c->tls));
                return -1;
            }
            p += taken;
            left -= taken;
            if (ch_tls_pending_out(c->tls) >= CH_TLS_OUT_HIGH && ch__conn_tls_flush(c, 0) != 0)
                return -1;
        }
    }
    return ch__conn_tls_flush(c, 1);
}

static void ch__conn_send_handshake(ch_conn_t *c);

/* Ciphertext arrived: feed the engine and drive its handshake. Returns 0 when
 * plaintext processing may follow. */
static int ch__conn_tls_input(ch_conn_t *c, size_t n)
{
    int rc = ch_tls_feed(c->tls, c->cbuf, n);
    if (rc == 0 && c->state == CH__CONN_TLS) {
        rc = ch_tls_handshake(c->tls);
        if (rc == 0) {
            ch__log(c->node, CH_LOG_DEBUG, "TLS with %s established (%s, %s)", c->name,
                    ch_tls_version(c->tls), ch_tls_cipher(c->tls));
            ch__conn_send_handshake(c);
            if (c->flags & CH__CONNF_CLOSING)
                return -1;
        }
    }
    if (rc < 0) {
        ch__conn_tls_flush(c, 0); /* the alert tells the peer why */
        ch__conn_close(c, CH_TLS_ERROR, "TLS handshake with %s failed: %s", c->name,
                       ch_tls_error(c->tls));
        return -1;
    }
    if (ch__conn_tls_flush(c, 0) != 0)
        return -1;
    return c->state == CH__CONN_TLS ? -1 : 0;
}

/* ---- writing ---------------------------------------------------------- */

/* The frames of the write in progress have reached the socket (or failed). */
static void ch__conn_frame_written(ch_conn_t *c, int status)
{
    if (!c->writing.head || (c->flags & CH__CONNF_CLOSING))
        return; /* the close already completed the messages */
    if (status < 0) {
        ch__conn_close(c, CH_PROTOCOL_ERROR, "write to %s failed: %s", c->name,
                       uv_strerror(status));
        return;
    }
    ch_node_t *node = c->node;
    ch_remote_t *r = c->remote;
    uint64_t now = ch__node_now(node);
    c->activity = now;
    if (r)
        r->activity = now;
    ch_message_t *m;
    while ((m = ch_msgq_pop(&c->writing))) {
        m->flags &= ~CH_MSGF_WRITING;
        if (m->flags & CH_MSGF_CONTROL) {
            if (m->type & CH_MSG_ACK) {
                ch__release_done(node, m->ack_of, CH_SUCCESS);
                ch__remote_ack_done(m->remote);
            }
            free(m);
        } else if (m->flags & CH_MSGF_RELEASED) {
            m->conn = NULL; /* its ACK arrived before this callback */
            ch__send_done(node, m, CH_SUCCESS, NULL);
        } else if (!(m->type & CH_MSG_REQ_ACK)) {
            m->conn = NULL;
            ch__send_done(node, m, CH_SUCCESS, NULL);
        } /* else: stays outstanding until its ACK */
    }
    ch__conn_arm_timer(c);
    if (r) {
        ch__remote_flush(r);
        ch__conn_ack_drained(r);
    }
}

static void ch__conn_write_cb(uv_write_t *req, int status)
{
    ch__conn_frame_written(req->data, status);
}

/* Plaintext: the socket takes what it can at once (uv_try_write), uv_write
 * the rest. A write that went out whole completes here, without waiting for
 * a callback from the next loop iteration (and without that iteration's
 * poll). The frames its completion lets out (ch__remote_flush) use uv_write,
 * so completions never recurse. Errors are left to uv_write, whose callback
 * reports them as before. Returns uv_write's code. */
static int ch__conn_write_plain(ch_conn_t *c, uv_buf_t *bufs, unsigned n)
{
    if (!(c->flags & CH__CONNF_SYNCDONE)) {
        size_t total = 0;
        for (unsigned i = 0; i < n; i++)
            total += bufs[i].len;
        int w = uv_try_write((uv_stream_t *)&c->tcp, bufs, n);
        if (w >= 0 && (size_t)w == total) {
            c->flags |= CH__CONNF_SYNCDONE;
            ch__conn_frame_written(c, 0);
            c->flags &= ~CH__CONNF_SYNCDONE;
            return 0;
        }
        if (w > 0) {
            size_t left = (size_t)w;
            while (left >= bufs[0].len) {
                left -= bufs[0].len;
                bufs++;
                n--;
            }
            bufs[0].base += left;
            bufs[0].len -= left;
        }
    }
    return uv_write(&c->write_req, (uv_stream_t *)&c->tcp, bufs, n, ch__conn_write_cb);
}

/* Write a batch of frames (taken over from *batch): at once, or with one uv_write. */
void ch__conn_write(ch_conn_t *c, ch_msgq_t *batch)
{
    ch_node_t *node = c->node;
    uv_buf_t bufs[3 * CH__WRITE_FRAMES];
    unsigned n = 0;
    uint64_t now = ch__node_now(node);
    uint64_t deadline = now + (uint64_t)(node->cfg.timeout * 1000.0);
    c->writing = *batch;
    memset(batch, 0, sizeof(*batch));
    for (ch_message_t *m = c->writing.head; m; m = m->next) {
        m->conn = c;
        if (!(m->flags & CH_MSGF_CONTROL) || (m->type & CH_MSG_ACK))
            c->data_activity = now;
        m->flags |= CH_MSGF_WRITING;
        m->deadline = deadline;
        ch_writer_header(m->hdr, m->identity, m->serial, m->data_len, m->header_len, m->type);
        bufs[n++] = uv_buf_init((char *)m->hdr, CH_HEADER_SIZE);
        if (m->header_len)
            bufs[n++] = uv_buf_init((char *)m->header, m->header_len);
        if (m->data_len)
            bufs[n++] = uv_buf_init((char *)m->data, m->data_len);
    }
    if (c->tls) {
        if (ch__conn_tls_write(c, bufs, n) == 0)
            ch__conn_arm_timer(c);
        return;
    }
    int rc = ch__conn_write_plain(c, bufs, n);
    if (rc != 0) {
        ch__conn_close(c, CH_PROTOCOL_ERROR, "write to %s failed: %s", c->name, uv_strerror(rc));
        return;
    }
    ch__conn_arm_timer(c);
}

/* ---- set-up ----------------------------------------------------------- */

static void ch__conn_hs_write_cb(uv_write_t *req, int status)
{
    ch_conn_t *c = req->data;
    if (status < 0 && !(c->flags & CH__CONNF_CLOSING))
        ch__conn_close(c, CH_WRITE_ERROR, "write of the handshake to %s failed: %s", c->name,
                       uv_strerror(status));
}

/* docs/tls.md#when-a-connection-is-encrypted: plaintext only for exactly 127.0.0.1 and ::1. */
static int ch__conn_needs_tls(ch_conn_t *c)
{
    static const uint8_t v4_lo[4] = {127, 0, 0, 1};
    static const uint8_t v6_lo[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
    if (c->node->cfg.disable_encryption)
        return 0;
    if (c->family == 4)
        return memcmp(c->addr, v4_lo, 4) != 0;
    return memcmp(c->addr, v6_lo, 16) != 0;
}

/* Our 18 bytes, in one write (plain) or one record (TLS): docs/protocol.md#wire-format. */
static void ch__conn_send_handshake(ch_conn_t *c)
{
    ch_node_t *node = c->node;
    ch_writer_handshake(c->hs_out, node->cfg.port, node->identity);
    c->state = CH__CONN_HANDSHAKE;
    if (c->tls) {
        size_t taken = 0;
        int rc = ch_tls_write(c->tls, c->hs_out, CH_HANDSHAKE_SIZE, &taken);
        if (rc != 0 || taken != CH_HANDSHAKE_SIZE) {
            ch__conn_close(c, CH_WRITE_ERROR, "write of the handshake to %s failed: %s",
                           c->name, ch_tls_error(c->tls));
            return;
        }
        ch__conn_tls_flush(c, 0);
        return;
    }
    uv_buf_t b = uv_buf_init((char *)c->hs_out, CH_HANDSHAKE_SIZE);
    int rc = uv_write(&c->hs_req, (uv_stream_t *)&c->tcp, &b, 1, ch__conn_hs_write_cb);
    if (rc != 0)
        ch__conn_close(c, CH_WRITE_ERROR, "write of the handshake to %s failed: %s", c->name,
                       uv_strerror(rc));
}

static void ch__conn_start(ch_conn_t *c)
{
    ch_node_t *node = c->node;
    uv_tcp_nodelay(&c->tcp, 1);
    uv_tcp_keepalive(&c->tcp, 1, 60);
    if (ch__conn_needs_tls(c)) {
        int rc = node->tls_ctx ? ch_tls_new(node->tls_ctx, !(c->flags & CH__CONNF_OUTGOING),
                                            &c->tls)
                               : -CH_TLS_ERROR;
        if (rc != 0) {
            ch__conn_close(c, CH_TLS_ERROR, "cannot set up TLS with %s", c->name);
            return;
        }
        c->state = CH__CONN_TLS;
        if (c->flags & CH__CONNF_OUTGOING) {
            /* The connector starts the TLS handshake. */
            rc = ch_tls_handshake(c->tls);
            if (rc < 0) {
                ch__conn_close(c, CH_TLS_ERROR, "TLS handshake with %s failed: %s", c->name,
                               ch_tls_error(c->tls));
                return;
            }
            if (ch__conn_tls_flush(c, 0) != 0)
                return;
        }
    } else {
        ch__conn_send_handshake(c);
    }
    if (c->flags & CH__CONNF_CLOSING)
        return;
    c->flags |= CH__CONNF_READING;
    int rc = uv_read_start((uv_stream_t *)&c->tcp, ch__conn_alloc_cb, ch__conn_read_cb);
    if (rc != 0)
        ch__conn_close(c, CH_UV_ERROR, "cannot read from %s: %s", c->name, uv_strerror(rc));
}

int ch__conn_accept(ch_node_t *node, uv_stream_t *server)
{
    ch_conn_t *c = ch__conn_new(node);
    if (!c) {
        ch__log(node, CH_LOG_ERROR, "out of memory accepting a connection");
        return -CH_ENOMEM;
    }
    c->state = CH__CONN_HANDSHAKE;
    c->connect_deadline = ch__node_now(node) + ch__conn_connect_ms(node);
    int rc = uv_accept(server, (uv_stream_t *)&c->tcp);
    struct sockaddr_storage ss;
    int len = sizeof(ss);
    if (rc == 0)
        rc = uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len);
    if (rc != 0) {
        snprintf(c->name, sizeof(c->name), "(unknown peer)");
        ch__conn_close(c, CH_FATAL, "cannot accept a connection: %s", uv_strerror(rc));
        return -CH_FATAL;
    }
    if (ss.ss_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        c->family = 4;
        memcpy(c->addr, &a->sin_addr, 4);
        c->port = ntohs(a->sin_port);
    } else {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        c->family = 6;
        memcpy(c->addr, &a->sin6_addr, 16);
        c->port = ntohs(a->sin6_port);
    }
    ch__conn_set_name(c);
    if (ch__node_admit(node, c) != 0)
        return CH_SUCCESS; /* refused at a connection limit, closing */
    ch__conn_arm_timer(c);
    ch__conn_start(c);
    return CH_SUCCESS;
}

static void ch__conn_connect_cb(uv_connect_t *req, int status)
{
    ch_conn_t *c = req->data;
    if (c->flags & CH__CONNF_CLOSING)
        return;
    if (status < 0) {
        ch__conn_close(c, CH_CANNOT_CONNECT, "cannot connect to %s: %s", c->name,
                       uv_strerror(status));
        return;
    }
    ch__conn_start(c);
}

int ch__conn_connect(ch_remote_t *r)
{
    ch_node_t *node = r->node;
    ch_conn_t *c = ch__conn_new(node);
    if (!c) {
        ch_message_t *m = ch_msgq_pop(&r->data_q);
        if (m)
            ch__msg_fail(node, m, CH_ENOMEM, "out of memory for a connection");
        return -CH_ENOMEM;
    }
    c->flags |= CH__CONNF_OUTGOING;
    c->state = CH__CONN_CONNECTING;
    c->family = r->family;
    memcpy(c->addr, r->addr, 16);
    c->port = r->port;
    c->remote = r;
    r->conn = c;
    r->nconns++;
    ch__conn_set_name(c);
    c->connect_deadline = ch__node_now(node) + ch__conn_connect_ms(node);
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    if (r->family == 4) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(r->port);
        memcpy(&a->sin_addr, r->addr, 4);
    } else {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(r->port);
        memcpy(&a->sin6_addr, r->addr, 16);
    }
    ch__conn_arm_timer(c);
    int rc = uv_tcp_connect(&c->connect_req, &c->tcp, (struct sockaddr *)&ss, ch__conn_connect_cb);
    if (rc != 0) {
        ch__conn_close(c, CH_CANNOT_CONNECT, "cannot connect to %s: %s", c->name, uv_strerror(rc));
        return -CH_CANNOT_CONNECT;
    }
    return CH_SUCCESS;
}
