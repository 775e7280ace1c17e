/*
 * remote.c: remotes (peers keyed by family, IP and port), their queues and
 * the writer scheduling of docs/protocol.md#wire-format. Loop thread only.
 *
 * A remote has a control queue (ACK, NOOP) and a data queue. Frames go out
 * on the remote's active connection, one at a time: control first, then
 * data; in synchronous mode a data frame is chosen only when no REQ_ACK
 * message is outstanding. The outstanding message remembers the connection
 * it was written on (msg->conn), so that closing some other connection of
 * the remote does not fail it (fixes reference quirk 10.6), and every
 * message that leaves a queue gets exactly one completion.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

static size_t ch__remote_hash(int family, const uint8_t *addr, uint16_t port)
{
    /* FNV-1a over the key. */
    uint64_t h = 1469598103934665603ULL;
    size_t n = family == 4 ? 4 : 16;
    h = (h ^ (uint64_t)family) * 1099511628211ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ addr[i]) * 1099511628211ULL;
    h = (h ^ (port & 0xff)) * 1099511628211ULL;
    h = (h ^ (port >> 8)) * 1099511628211ULL;
    return (size_t)h;
}

static int ch__remote_key_eq(const ch_remote_t *r, int family, const uint8_t *addr, uint16_t port)
{
    return r->family == family && r->port == port &&
           memcmp(r->addr, addr, family == 4 ? 4 : 16) == 0;
}

static void ch__remote_grow(ch_node_t *node)
{
    size_t n = node->nbuckets * 2;
    ch_remote_t **b = calloc(n, sizeof(*b));
    if (!b)
        return; /* keep the longer chains */
    for (size_t i = 0; i < node->nbuckets; i++) {
        for (ch_remote_t *r = node->buckets[i], *next; r; r = next) {
            next = r->hnext;
            size_t k = ch__remote_hash(r->family, r->addr, r->port) & (n - 1);
            r->hnext = b[k];
            b[k] = r;
        }
    }
    free(node->buckets);
    node->buckets = b;
    node->nbuckets = n;
}

static void ch__remote_timer_closed(uv_handle_t *h)
{
    ch_remote_t *r = h->data;
    ch_node_t *node = r->node;
    free(r);
    node->nfreed++;
    ch__node_handle_closed(node);
}

ch_remote_t *ch__remote_get(ch_node_t *node, int family, const uint8_t *addr, uint16_t port,
                            int create)
{
    size_t k = ch__remote_hash(family, addr, port) & (node->nbuckets - 1);
    for (ch_remote_t *r = node->buckets[k]; r; r = r->hnext)
        if (ch__remote_key_eq(r, family, addr, port))
            return r;
    if (!create)
        return NULL;
    ch_remote_t *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->node = node;
    r->family = family;
    memcpy(r->addr, addr, family == 4 ? 4 : 16);
    r->port = port;
    r->activity = ch__node_now(node);
    if (uv_random(NULL, NULL, &r->serial, sizeof(r->serial), 0, NULL) != 0)
        r->serial = (uint32_t)ch__loop_rand(node->loop);
    uv_timer_init(&node->loop->uv, &r->timer);
    r->timer.data = r;
    node->handles++;
    r->hnext = node->buckets[k];
    node->buckets[k] = r;
    node->nremotes++;
    if (node->nremotes > node->nbuckets)
        ch__remote_grow(node);
    return r;
}

/* Fail (or, for control frames, finish) one message that will not be sent. */
void ch__msg_fail(ch_node_t *node, ch_message_t *m, int status, const char *text)
{
    if (m->flags & CH_MSGF_CONTROL) {
        if (m->type & CH_MSG_ACK) {
            /* The release is done; the ACK is lost and the sender will time out. */
            ch__release_done(node, m->ack_of, status);
            ch__remote_ack_done(m->remote);
        }
        free(m);
        return;
    }
    ch__send_done(node, m, status, text);
}

static void ch__remote_queue_noop_if_idle(ch_remote_t *r)
{
    ch_node_t *node = r->node;
    if (!r->conn || r->noop_queued)
        return;
    uint64_t idle = ch__node_now(node) - r->activity;
    if ((double)idle <= 0.75 * node->reuse * 1000.0)
        return;
    ch_message_t *noop = calloc(1, sizeof(*noop));
    if (!noop)
        return;
    noop->type = CH_MSG_NOOP;
    noop->flags = CH_MSGF_CONTROL;
    r->noop_queued = 1;
    ch_msgq_push(&r->ctrl_q, noop);
}

static void ch__remote_kick(ch_remote_t *r)
{
    if (r->conn) {
        ch__remote_flush(r);
    } else if (!r->blocked && (r->data_q.len || r->ctrl_q.len)) {
        ch__conn_connect(r);
    }
}

void ch__remote_enqueue(ch_remote_t *r, ch_message_t *m)
{
    ch__remote_queue_noop_if_idle(r);
    m->remote = r;
    ch_msgq_push(&r->data_q, m);
    ch__remote_kick(r);
}

void ch__remote_enqueue_ack(ch_remote_t *r, ch_message_t *ack)
{
    ch__remote_queue_noop_if_idle(r);
    ack->remote = r;
    r->acks_queued++;
    ch_msgq_push(&r->ctrl_q, ack);
    ch__remote_kick(r);
}

void ch__remote_ack_done(ch_remote_t *r)
{
    if (r)
        r->acks_queued--;
}

/* Bytes of header and data of m (what the peer compares with its MAX_MSG_SIZE). */
static uint64_t ch__remote_msg_size(const ch_message_t *m)
{
    return (uint64_t)m->header_len + m->data_len;
}

/* True if m exceeds the MAX_MSG_SIZE the peer of c announced. */
static int ch__remote_too_large(const ch_conn_t *c, const ch_message_t *m)
{
    return c->peer_max_msg && ch__remote_msg_size(m) > c->peer_max_msg;
}

/* Fail a data message the peer announced it would refuse, before it leaves: the
 * peer would close the connection (and every message in flight on it). */
static void ch__remote_refuse(ch_remote_t *r, ch_conn_t *c, ch_message_t *m)
{
    char text[CH_EV_TEXT_LEN];
    snprintf(text, sizeof(text),
             "message of %llu bytes (header + data) exceeds MAX_MSG_SIZE = %u bytes of %s; "
             "it was not sent",
             (unsigned long long)ch__remote_msg_size(m), c->peer_max_msg, c->name);
    ch__send_done(r->node, m, CH_VALUE_ERROR, text);
}

/* A data message failed because the connection closed: towards a peer that did not
 * announce its MAX_MSG_SIZE (libchirp 1.x), a closed connection may be the peer
 * refusing a message over that limit, so the text says so. */
static void ch__remote_fail_closed(ch_node_t *node, ch_conn_t *c, ch_message_t *m, int reason,
                                   const char *text)
{
    if (reason != CH_PROTOCOL_ERROR || c->peer_max_msg || (m->flags & CH_MSGF_CONTROL)) {
        ch__msg_fail(node, m, reason, text);
        return;
    }
    char hint[CH_EV_TEXT_LEN];
    snprintf(hint, sizeof(hint),
             "%s: the peer closed the connection; the message (%llu bytes) may exceed its "
             "MAX_MSG_SIZE",
             text, (unsigned long long)ch__remote_msg_size(m));
    ch__msg_fail(node, m, reason, hint);
}

void ch__remote_flush(ch_remote_t *r)
{
    if (!ch__loop_defer_flush(r->node->loop, r)) /* else at the end of the batch of commands */
        ch__remote_flush_now(r);
}

void ch__remote_flush_now(ch_remote_t *r)
{
    ch_conn_t *c = r->conn;
    if (!c || c->state != CH__CONN_READY || c->writing.head || (c->flags & CH__CONNF_CLOSING))
        return;
    /* Gather frames into one write: control frames first, then data frames;
     * a REQ_ACK frame only while none is outstanding (docs/protocol.md#wire-format). */
    ch_msgq_t batch = {0};
    size_t bytes = 0;
    while (batch.len < CH__WRITE_FRAMES && bytes < CH__WRITE_BYTES) {
        ch_message_t *m;
        if (r->ctrl_q.head) {
            m = ch_msgq_pop(&r->ctrl_q);
            if ((m->type & CH_MSG_NOOP) && !(m->type & CH_MSG_EXT))
                r->noop_queued = 0;
        } else if (r->data_q.head) {
            if (ch__remote_too_large(c, r->data_q.head)) {
                ch__remote_refuse(r, c, ch_msgq_pop(&r->data_q));
                continue;
            }
            int window = c->peer_window > 0 ? c->peer_window : 1;
            if ((r->data_q.head->type & CH_MSG_REQ_ACK) && r->noutstanding >= window)
                break;
            m = ch_msgq_pop(&r->data_q);
            if (m->type & CH_MSG_REQ_ACK) {
                m->onext = r->outstanding;
                r->outstanding = m;
                r->noutstanding++;
            }
        } else {
            break;
        }
        m->serial = ++r->serial;
        bytes += CH_HEADER_SIZE + (size_t)m->header_len + m->data_len;
        ch_msgq_push(&batch, m);
    }
    if (batch.head)
        ch__conn_write(c, &batch);
}

/* Remove m from the list of unacknowledged messages. */
static void ch__remote_unlink(ch_remote_t *r, ch_message_t *m)
{
    for (ch_message_t **pp = &r->outstanding; *pp; pp = &(*pp)->onext) {
        if (*pp == m) {
            *pp = m->onext;
            m->onext = NULL;
            r->noutstanding--;
            return;
        }
    }
}

uint64_t ch__remote_ack_deadline(ch_remote_t *r, ch_conn_t *c)
{
    uint64_t d = 0;
    for (ch_message_t *m = r->outstanding; m; m = m->onext)
        if (m->conn == c && (!d || m->deadline < d))
            d = m->deadline;
    return d;
}

/* Queue our capability NOOP for connection c (the extension in chirp.h). It
 * must travel on c itself, so it is sent only while c is the active one. */
void ch__remote_send_caps(ch_remote_t *r, ch_conn_t *c)
{
    if (c->caps_sent || r->conn != c)
        return;
    ch_message_t *caps = calloc(1, sizeof(*caps));
    if (!caps)
        return; /* without it the peer just keeps one REQ_ACK in flight */
    c->caps_sent = 1;
    memcpy(caps->identity, CH_EXT_MAGIC, 4);
    caps->identity[4] = CH_EXT_F_PIPELINE;
    caps->identity[5] = CH_EXT_WINDOW;
    uint32_t max = r->node->cfg.max_msg_size;
    caps->identity[6] = (uint8_t)(max >> 24);
    caps->identity[7] = (uint8_t)(max >> 16);
    caps->identity[8] = (uint8_t)(max >> 8);
    caps->identity[9] = (uint8_t)max;
    caps->type = CH_MSG_NOOP | CH_MSG_EXT;
    caps->flags = CH_MSGF_CONTROL;
    /* First in line: ahead of anything already queued. */
    caps->next = r->ctrl_q.head;
    r->ctrl_q.head = caps;
    if (!r->ctrl_q.tail)
        r->ctrl_q.tail = caps;
    r->ctrl_q.len++;
    ch__remote_flush(r);
}

uint32_t ch__remote_caps_max_msg(const uint8_t identity[16])
{
    return ((uint32_t)identity[6] << 24) | ((uint32_t)identity[7] << 16) |
           ((uint32_t)identity[8] << 8) | identity[9];
}

void ch__remote_ack(ch_remote_t *r, ch_conn_t *c, const uint8_t identity[16])
{
    (void)c;
    ch_message_t *m = r->outstanding;
    while (m && memcmp(m->identity, identity, CH_ID_SIZE) != 0)
        m = m->onext;
    if (!m)
        return; /* unknown ACKs are ignored (docs/protocol.md#wire-format) */
    ch__remote_unlink(r, m);
    ch_conn_t *wc = m->conn;
    if (wc && (m->flags & CH_MSGF_WRITING)) {
        /* The ACK overtook our write completion: finish in the write callback. */
        m->flags |= CH_MSGF_RELEASED;
        return;
    }
    m->conn = NULL;
    ch__send_done(r->node, m, CH_SUCCESS, NULL);
    if (wc)
        ch__conn_arm_timer(wc);
    ch__remote_flush(r);
}

static void ch__remote_unblock_cb(uv_timer_t *t)
{
    ch_remote_t *r = t->data;
    r->blocked = 0;
    if (r->node->state == CH__NODE_RUNNING)
        ch__remote_kick(r);
}

/*
 * A connection filed under this remote closed (docs/protocol.md#errors, with the
 * in-flight state scoped to the connection that carried it).
 */
void ch__remote_conn_closed(ch_remote_t *r, ch_conn_t *c, int reason, const char *text)
{
    ch_node_t *node = r->node;
    int failed = 0;
    for (ch_message_t *m = r->outstanding, *next; m; m = next) {
        next = m->onext;
        if (m->conn != c)
            continue;
        ch__remote_unlink(r, m);
        if (!(m->flags & CH_MSGF_WRITING)) { /* else: failed with the write below */
            m->conn = NULL;
            ch__remote_fail_closed(node, c, m, reason, text);
        }
        failed = 1;
    }
    ch_message_t *w;
    while ((w = ch_msgq_pop(&c->writing))) {
        w->conn = NULL;
        w->flags &= ~CH_MSGF_WRITING;
        if (!(w->flags & CH_MSGF_CONTROL))
            failed = 1;
        if (w->flags & CH_MSGF_RELEASED) /* acknowledged before its write completed */
            ch__send_done(node, w, CH_SUCCESS, NULL);
        else
            ch__remote_fail_closed(node, c, w, reason, text);
    }
    r->nconns--;
    if (r->conn != c)
        return; /* a secondary connection: the active one is not affected */
    r->conn = NULL;
    if (!failed) {
        /* Guarantee progress when connecting keeps failing: fail one message. */
        ch_message_t *m = ch_msgq_pop(&r->ctrl_q);
        if (m) {
            if (m->type & CH_MSG_NOOP)
                r->noop_queued = 0;
        } else {
            m = ch_msgq_pop(&r->data_q);
        }
        if (m)
            ch__msg_fail(node, m, reason, text);
    }
    /* Pending control frames belonged to the closed connection. */
    ch_message_t *m;
    while ((m = ch_msgq_pop(&r->ctrl_q)))
        ch__msg_fail(node, m, reason, text);
    r->noop_queued = 0;
    if (node->state != CH__NODE_RUNNING || r->deleted)
        return;
    ch__conn_ack_drained(r); /* other connections may wait for those ACKs */
    r->blocked = 1;
    uv_timer_start(&r->timer, ch__remote_unblock_cb, 50 + ch__loop_rand(node->loop) % 500, 0);
}

void ch__remote_delete(ch_remote_t *r, int reason, const char *text)
{
    ch_node_t *node = r->node;
    r->deleted = 1;
    if (r->dirty)
        ch__loop_forget_remote(node->loop, r);
    size_t k = ch__remote_hash(r->family, r->addr, r->port) & (node->nbuckets - 1);
    for (ch_remote_t **pp = &node->buckets[k]; *pp; pp = &(*pp)->hnext) {
        if (*pp == r) {
            *pp = r->hnext;
            break;
        }
    }
    node->nremotes--;
    /* Close every connection filed under it (their in-flight messages fail).
     * Only a remote that still has some needs the scan over all connections:
     * garbage collection deletes remotes without connections, and node stop
     * closes the connections first, so neither is O(remotes x connections). */
    for (ch_conn_t *c = r->nconns > 0 ? node->conns : NULL, *next; c; c = next) {
        next = c->next;
        if (c->remote == r)
            ch__conn_close(c, reason, "%s", text);
    }
    ch_message_t *m;
    while ((m = ch_msgq_pop(&r->ctrl_q)))
        ch__msg_fail(node, m, reason, text);
    while ((m = ch_msgq_pop(&r->data_q)))
        ch__msg_fail(node, m, reason, text);
    while ((m = r->outstanding)) { /* written on a connection that is gone already */
        ch__remote_unlink(r, m);
        m->conn = NULL;
        ch__msg_fail(node, m, reason, text);
    }
    uv_timer_stop(&r->timer);
    uv_close((uv_handle_t *)&r->timer, ch__remote_timer_closed);
}
