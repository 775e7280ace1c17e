/*
 * node.c: one chirp node: its listeners, its garbage collector and the loop
 * thread's side of the application commands.
 *
 * Application threads only allocate (ch_node_new, the message record in
 * ch_node_send) and submit commands; everything else below runs on the loop
 * thread. Lifecycle: NEW -> RUNNING (start succeeded) -> STOPPING (stop
 * command: listeners, timers and connections are closing, every queued
 * message fails with SHUTDOWN) -> STOPPED once the last handle of the node
 * is closed; then the NODE_STOPPED event is posted and the application may
 * free the node. A failed start goes back to NEW after its handles closed.
 */
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fcntl.h>
#include <unistd.h>

#include "core.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

int ch__loop_submit(ch_loop_t *loop, const ch__cmd_t *cmd);
int ch__loop_submit_many(ch_loop_t *loop, const ch__cmd_t *cmds, size_t n, int lazy);
double ch__config_reuse(const ch_config_t *cfg);
int ch__config_slots(const ch_config_t *cfg);

uint64_t ch__node_now(ch_node_t *node) { return uv_now(&node->loop->uv); }

static char *ch__strdup(const char *s)
{
    if (!s)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

int ch_node_new(ch_loop_t *loop, const ch_config_t *cfg, uint64_t node_token, ch_node_t **out)
{
    *out = NULL;
    ch_node_t *node = calloc(1, sizeof(*node));
    if (!node)
        return -CH_ENOMEM;
    node->loop = loop;
    node->cfg = *cfg;
    node->cfg.cert_chain_pem = ch__strdup(cfg->cert_chain_pem);
    node->cfg.dh_params_pem = ch__strdup(cfg->dh_params_pem);
    node->token = node_token;
    node->state = CH__NODE_NEW;
    node->reserve_fd = -1;
    *out = node;
    return CH_SUCCESS;
}

void ch_node_free(ch_node_t *node)
{
    if (!node)
        return;
    free((char *)node->cfg.cert_chain_pem);
    free((char *)node->cfg.dh_params_pem);
    free(node->buckets);
    if (node->tls_ctx)
        SSL_CTX_free(node->tls_ctx);
    if (node->reserve_fd >= 0)
        close(node->reserve_fd);
    free(node);
}

void ch_node_identity(ch_node_t *node, uint8_t out[16]) { memcpy(out, node->identity, 16); }

uint16_t ch_node_port(ch_node_t *node) { return node->cfg.port; }

static int ch__submit(ch_node_t *node, int type, ch_message_t *m, uint64_t token)
{
    ch__cmd_t cmd = {type, node, m, token};
    return ch__loop_submit(node->loop, &cmd);
}

int ch_node_start(ch_node_t *node, uint64_t token)
{
    return ch__submit(node, CH__CMD_START, NULL, token);
}

int ch_node_stop(ch_node_t *node, uint64_t token)
{
    return ch__submit(node, CH__CMD_STOP, NULL, token);
}

int ch_node_send(ch_node_t *node, uint64_t token, const char *identity, int family,
                 const char *addr, uint16_t port, const char *header, uint16_t header_len,
                 const char *data, uint32_t data_len)
{
    if (family != 4 && family != 6)
        return -CH_VALUE_ERROR;
    ch_message_t *m = calloc(1, sizeof(*m));
    if (!m)
        return -CH_ENOMEM;
    memcpy(m->identity, identity, CH_ID_SIZE);
    m->family = family;
    memcpy(m->addr, addr, family == 4 ? 4 : 16);
    m->port = port;
    m->header = (const uint8_t *)header;
    m->header_len = header_len;
    m->data = (const uint8_t *)data;
    m->data_len = data_len;
    m->token = token;
    int rc = ch__submit(node, CH__CMD_SEND, m, token);
    if (rc != CH_SUCCESS)
        free(m);
    return rc;
}

_Static_assert(sizeof(ch_send_t) == CH_SEND_SIZE, "ch_send_t is packed by Python");
_Static_assert(offsetof(ch_send_t, family) == 16 && offsetof(ch_send_t, identity) == 17 &&
                   offsetof(ch_send_t, addr) == 33,
               "ch_send_t is packed by Python");

/* Commands of a batch: on the stack up to this many, else on the heap. */
#define CH__BATCH_STACK 64

int ch_node_send_batch(ch_node_t *node, const char *sends, int n, const char *payload,
                       size_t payload_len)
{
    if (n <= 0)
        return n == 0 ? CH_SUCCESS : -CH_VALUE_ERROR;
    /* Check everything first: a batch is submitted whole or not at all. */
    size_t need = 0;
    for (int i = 0; i < n; i++) {
        ch_send_t d;
        memcpy(&d, sends + (size_t)i * CH_SEND_SIZE, sizeof(d));
        if (d.family != 4 && d.family != 6)
            return -CH_VALUE_ERROR;
        need += (size_t)d.header_len + d.data_len;
        if (need > payload_len)
            return -CH_VALUE_ERROR;
    }
    ch__cmd_t stack[CH__BATCH_STACK];
    ch__cmd_t *cmds = n <= CH__BATCH_STACK ? stack : malloc((size_t)n * sizeof(*cmds));
    if (!cmds)
        return -CH_ENOMEM;
    const char *p = payload;
    int made = 0, rc = CH_SUCCESS;
    for (; made < n; made++) {
        ch_send_t d;
        memcpy(&d, sends + (size_t)made * CH_SEND_SIZE, sizeof(d));
        size_t len = (size_t)d.header_len + d.data_len;
        /* One block: the record, then header and data (freed with it). */
        ch_message_t *m = calloc(1, sizeof(*m) + len);
        if (!m) {
            rc = -CH_ENOMEM;
            break;
        }
        uint8_t *body = (uint8_t *)(m + 1);
        memcpy(body, p, len);
        p += len;
        memcpy(m->identity, d.identity, CH_ID_SIZE);
        m->family = d.family;
        memcpy(m->addr, d.addr, d.family == 4 ? 4 : 16);
        m->port = d.port;
        m->header = body;
        m->header_len = d.header_len;
        m->data = body + d.header_len;
        m->data_len = d.data_len;
        m->token = d.token;
        m->flags = CH_MSGF_INLINE;
        cmds[made] = (ch__cmd_t){CH__CMD_SEND, node, m, d.token};
    }
    if (rc == CH_SUCCESS)
        rc = ch__loop_submit_many(node->loop, cmds, (size_t)n, 0);
    if (rc != CH_SUCCESS)
        for (int i = 0; i < made; i++)
            free(cmds[i].msg);
    if (cmds != stack)
        free(cmds);
    return rc;
}

int ch_node_release(ch_node_t *node, ch_message_t *msg, uint64_t token)
{
    return ch__submit(node, CH__CMD_RELEASE, msg, token);
}

int ch_node_release_batch(ch_node_t *node, ch_message_t **msgs, int n, uint64_t token)
{
    if (n <= 0)
        return n == 0 ? CH_SUCCESS : -CH_VALUE_ERROR;
    ch__cmd_t stack[CH__BATCH_STACK];
    ch__cmd_t *cmds = n <= CH__BATCH_STACK ? stack : malloc((size_t)n * sizeof(*cmds));
    if (!cmds)
        return -CH_ENOMEM;
    /* Lazy unless an ACK is owed: then the peer waits for it. (The flags of a
     * received message are not written after the reader posted it.) */
    int lazy = 1;
    for (int i = 0; i < n; i++) {
        cmds[i] = (ch__cmd_t){CH__CMD_RELEASE, node, msgs[i], token};
        if (msgs[i]->flags & CH_MSGF_ACK_OWED)
            lazy = 0;
    }
    int rc = ch__loop_submit_many(node->loop, cmds, (size_t)n, lazy);
    if (cmds != stack)
        free(cmds);
    return rc;
}

int ch_node_stats(ch_node_t *node, uint64_t token)
{
    return ch__submit(node, CH__CMD_STATS, NULL, token);
}

void ch_stats_free(ch_stats_t *stats)
{
    if (stats) {
        free(stats->remotes);
        free(stats);
    }
}

static int ch__ptr_cmp(const void *a, const void *b)
{
    uintptr_t x = (uintptr_t)*(ch_remote_t *const *)a, y = (uintptr_t)*(ch_remote_t *const *)b;
    return x < y ? -1 : x > y;
}

/* order[] is sorted by address, so finding a remote is O(log remotes) and the
 * statistics of many connections are not O(remotes x connections). */
static ch_remote_stats_t *ch__stats_find(ch_stats_t *st, ch_remote_t **order, ch_remote_t *r)
{
    ch_remote_t **p = bsearch(&r, order, st->nremotes, sizeof(*order), ch__ptr_cmp);
    return p ? &st->remotes[p - order] : NULL;
}

void ch__node_do_stats(ch_node_t *node, uint64_t token)
{
    ch_event_t ev;
    ch__event_init(&ev, CH_EV_STATS, node, token, CH_SUCCESS);
    size_t n = node->nremotes;
    ch_stats_t *st = calloc(1, sizeof(*st));
    ch_remote_t **order = calloc(n ? n : 1, sizeof(*order));
    if (st && n)
        st->remotes = calloc(n, sizeof(*st->remotes));
    if (!st || !order || (n && !st->remotes)) {
        ch_stats_free(st);
        free(order);
        ev.status = CH_ENOMEM;
        snprintf(ev.text, sizeof(ev.text), "out of memory for statistics");
        ch__loop_post(node->loop, &ev);
        return;
    }
    st->connections = node->nconns;
    st->totals = node->totals;
    uint64_t now = node->state == CH__NODE_RUNNING ? ch__node_now(node) : 0;
    for (size_t b = 0; b < node->nbuckets; b++)
        for (ch_remote_t *r = node->buckets[b]; r && st->nremotes < n; r = r->hnext)
            order[st->nremotes++] = r;
    qsort(order, st->nremotes, sizeof(*order), ch__ptr_cmp);
    for (uint32_t i = 0; i < st->nremotes; i++) {
        ch_remote_t *r = order[i];
        ch_remote_stats_t *rs = &st->remotes[i];
        ch__format_addr(r->family, r->addr, rs->address, sizeof(rs->address));
        rs->port = r->port;
        rs->connections = (uint32_t)r->nconns;
        rs->send_queue = (uint32_t)r->data_q.len;
        rs->in_flight = (uint32_t)r->noutstanding;
        rs->idle = now > r->activity ? (double)(now - r->activity) / 1000.0 : 0.0;
        rs->counters = r->counters;
    }
    /* Slots are held per connection; add them to the connection's remote. */
    for (ch_conn_t *c = node->conns; c; c = c->next) {
        ch_remote_stats_t *rs = c->remote ? ch__stats_find(st, order, c->remote) : NULL;
        if (rs)
            rs->slots_in_use += (uint32_t)c->slots_used;
    }
    free(order);
    ev.stats = st;
    ch__loop_post(node->loop, &ev);
}

void ch_msg_info(const ch_message_t *m, ch_msg_info_t *out)
{
    memcpy(out->identity, m->identity, CH_ID_SIZE);
    out->serial = m->serial;
    out->type = m->type;
    out->header = m->header;
    out->header_len = m->header_len;
    out->data = m->data;
    out->data_len = m->data_len;
    ch__format_addr(m->family, m->addr, out->address, sizeof(out->address));
    out->port = m->port;
    memcpy(out->remote_identity, m->remote_identity, CH_ID_SIZE);
}

/* ---- completions ------------------------------------------------------ */

void ch__send_done(ch_node_t *node, ch_message_t *m, int status, const char *text)
{
    if (status == CH_SUCCESS) {
        CH__COUNT(node, m->remote, msgs_out, 1);
        CH__COUNT(node, m->remote, bytes_out, (uint64_t)m->header_len + m->data_len);
    } else {
        CH__COUNT(node, m->remote, send_failures, 1);
    }
    if (status == CH_SUCCESS && ch__loop_extend_send_done(node, m->token)) {
        free(m);
        return;
    }
    ch_event_t ev;
    ch__event_init(&ev, CH_EV_SEND_DONE, node, m->token, status);
    ev.count = 1;
    if (text)
        snprintf(ev.text, sizeof(ev.text), "%s", text);
    ch__loop_post(node->loop, &ev);
    free(m);
}

void ch__release_done(ch_node_t *node, ch_message_t *recv, int status)
{
    if (recv->token != 0 &&
        !(status == CH_SUCCESS && ch__loop_extend_release_done(node, recv->token))) {
        ch_event_t ev;
        ch__event_init(&ev, CH_EV_RELEASE_DONE, node, recv->token, status);
        memcpy(ev.identity, recv->identity, CH_ID_SIZE);
        ev.serial = recv->serial;
        ev.count = 1;
        ch__loop_post(node->loop, &ev);
    }
    ch_msg_free(recv);
}

static void ch__post_node_event(ch_node_t *node, int type, uint64_t token, int status,
                                const char *text)
{
    ch_event_t ev;
    ch__event_init(&ev, type, node, token, status);
    if (text)
        snprintf(ev.text, sizeof(ev.text), "%s", text);
    ch__loop_post(node->loop, &ev);
    ch__loop_flush(node->loop);
}

/* ---- handles ---------------------------------------------------------- */

/*
 * Freed connections and remotes leave holes in the loop thread's malloc arena
 * that glibc does not give back by itself (it only trims the top of a heap),
 * so a node that once held 10,000 connections would keep their pages. After
 * at least CH__TRIM_AFTER of them were freed, malloc_trim() returns the free
 * pages (about 10 ms for a heap that held 10,000 connections); this runs at
 * most once per garbage collection pass and once when the node stops.
 */
#define CH__TRIM_AFTER 256

void ch__node_trim(ch_node_t *node)
{
    if (node->nfreed < CH__TRIM_AFTER)
        return;
    node->nfreed = 0;
#ifdef __GLIBC__
    malloc_trim(0);
#endif
}

void ch__node_maybe_finish(ch_node_t *node)
{
    if (node->state != CH__NODE_STOPPING || node->handles > 0)
        return;
    node->state = CH__NODE_STOPPED;
    ch__node_trim(node);
    ch__loop_node_gone(node->loop, node);
    ch__post_node_event(node, CH_EV_NODE_STOPPED, node->stop_token, CH_SUCCESS, NULL);
}

void ch__node_handle_closed(ch_node_t *node)
{
    node->handles--;
    ch__node_maybe_finish(node);
}

static void ch__node_close_cb(uv_handle_t *h) { ch__node_handle_closed(h->data); }

/* ---- garbage collection ----------------------------------------------- */

/* Closing a connection costs tens of microseconds (mostly the kernel's
 * close), so one pass closes or deletes at most this many and the rest follow
 * 1 ms later: when 10,000 connections expire together, the loop still
 * serves the others between batches instead of pausing for half a second. */
#define CH__GC_BATCH 1000

static void ch__node_gc_cb(uv_timer_t *t);
static void ch__node_gc_more_cb(uv_timer_t *t);

static void ch__node_gc_arm(ch_node_t *node)
{
    /* Uniform in [R/2, R). */
    double r_ms = node->reuse * 1000.0;
    uint64_t lo = (uint64_t)(r_ms / 2);
    uint64_t span = (uint64_t)(r_ms / 2);
    uint64_t delay = lo + (span ? ch__loop_rand(node->loop) % span : 0);
    uv_timer_start(&node->gc_timer, ch__node_gc_cb, delay ? delay : 1, 0);
}

/* Close what is idle longer than R; returns 0 when done, 1 when the batch
 * limit stopped it. */
static int ch__node_gc_sweep(ch_node_t *node)
{
    uint64_t now = ch__node_now(node);
    uint64_t r_ms = (uint64_t)(node->reuse * 1000.0);
    int budget = CH__GC_BATCH;
    /* Connections idle longer than R (active and secondary), unless the
     * application still holds messages received on them. A connection stuck
     * in the middle of a frame is idle too (its slot is not held by anyone). */
    for (ch_conn_t *c = node->conns, *next; c; c = next) {
        next = c->next;
        if (c->flags & CH__CONNF_CLOSING)
            continue;
        if (c->state == CH__CONN_READY && now - c->activity > r_ms && c->held.len == 0) {
            if (budget-- == 0)
                return 1;
            ch__conn_close(c, CH_SHUTDOWN, "connection to %s idle for more than %.1f s, closed",
                           c->name, node->reuse);
        }
    }
    /* Remotes idle longer than R, not in back-off, without connections. */
    for (size_t b = 0; b < node->nbuckets; b++) {
        for (ch_remote_t *r = node->buckets[b], *next; r; r = next) {
            next = r->hnext;
            if (!r->blocked && r->nconns == 0 && now - r->activity > r_ms) {
                if (budget-- == 0)
                    return 1;
                ch__remote_delete(r, CH_SHUTDOWN, "remote removed by garbage collection");
            }
        }
    }
    return 0;
}

static void ch__node_gc_next(ch_node_t *node, int more)
{
    if (more)
        uv_timer_start(&node->gc_timer, ch__node_gc_more_cb, 1, 0);
    else
        ch__node_gc_arm(node);
}

static void ch__node_gc_more_cb(uv_timer_t *t)
{
    ch_node_t *node = t->data;
    ch__node_gc_next(node, ch__node_gc_sweep(node));
}

static void ch__node_gc_cb(uv_timer_t *t)
{
    ch_node_t *node = t->data;
    ch__node_trim(node); /* what the previous pass closed is freed by now */
    ch__node_gc_next(node, ch__node_gc_sweep(node));
}

/* ---- connection limits ------------------------------------------------ */

/*
 * MAX_CONNECTIONS counts all open connections of the node, incoming and
 * outgoing, including those still in their handshake; the per-address limit
 * counts those with the new connection's IP address. At a limit the node
 * closes the connection idle the longest (ch__node_evictable: nothing held,
 * written or awaited on it and no data frame for CH__EVICT_IDLE_MS; NOOPs do
 * not count, so a peer cannot hold a place with keep-alives alone) and keeps
 * the new one; with none idle the new connection is refused: accepted and
 * closed at once, before any byte is read or written. See
 * docs/reliability.md.
 *
 * File descriptors: libuv answers EMFILE on accept() with a spare descriptor
 * of its own (closes it, accepts and closes what waits, reopens it). Should
 * that fail, libuv calls back with EMFILE and tries again at once; the node
 * then gives up its own spare descriptor (reserve_fd) so that the next
 * accept() succeeds, refuses that connection and reopens the spare; without
 * a spare it closes the connection idle the longest. Each callback thus
 * frees a descriptor and the loop does not spin.
 */

static int ch__node_same_addr(const ch_conn_t *a, const ch_conn_t *b)
{
    return a->family == b->family && memcmp(a->addr, b->addr, a->family == 4 ? 4 : 16) == 0;
}

/* Closing c now loses nothing the node promised, and c carried no data for a
 * while. A frame that stalled halfway for that long may go (its sender had
 * no ACK for it); messages the application holds or frames being written
 * may not. */
static int ch__node_evictable(ch_conn_t *c, uint64_t now)
{
    if (c->flags & CH__CONNF_CLOSING || c->state == CH__CONN_CONNECTING)
        return 0;
    if (now - c->data_activity < CH__EVICT_IDLE_MS)
        return 0;
    if (c->held.len || c->writing.head)
        return 0;
    ch_remote_t *r = c->remote;
    if (r && r->conn == c && (r->data_q.len || r->ctrl_q.len || r->acks_queued))
        return 0;
    if (r && ch__remote_ack_deadline(r, c))
        return 0;
    return 1;
}

/* Close the idle connection (other than c; with same_addr: of c's address)
 * whose last data frame is the oldest. Returns 1 if one was closed. */
static int ch__node_evict(ch_node_t *node, ch_conn_t *c, int same_addr, const char *limit)
{
    uint64_t now = ch__node_now(node);
    ch_conn_t *best = NULL;
    for (ch_conn_t *o = node->conns; o; o = o->next) {
        if (o == c || (same_addr && !ch__node_same_addr(o, c)) || !ch__node_evictable(o, now))
            continue;
        if (!best || o->data_activity < best->data_activity)
            best = o;
    }
    if (!best)
        return 0;
    CH__COUNT(node, best->remote, conns_evicted, 1);
    ch__conn_close(best, CH_SHUTDOWN,
                   "connection to %s idle for %.1f s, closed to make room for a new one (%s)",
                   best->name, (double)(now - best->data_activity) / 1000.0, limit);
    return 1;
}

static void ch__node_refuse(ch_node_t *node, ch_conn_t *c, const char *why)
{
    node->totals.conns_refused++;
    uint64_t now = ch__node_now(node);
    if (!node->refuse_logged || now - node->refuse_logged >= 1000) {
        node->refuse_logged = now;
        ch__log(node, CH_LOG_WARNING,
                "refused a connection from %s: %s (%llu refused so far; statistics: "
                "connections_refused)",
                c->name, why, (unsigned long long)node->totals.conns_refused);
    }
    ch__conn_close(c, CH_SHUTDOWN, "connection from %s refused", c->name);
}

static void ch__node_reserve(ch_node_t *node)
{
    if (node->reserve_fd < 0)
        node->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
}

int ch__node_admit(ch_node_t *node, ch_conn_t *c)
{
    char why[128];
    if (node->refuse_next) {
        node->refuse_next = 0;
        ch__node_refuse(node, c, "no file descriptor left (EMFILE)");
        ch__node_reserve(node); /* the close above gave a descriptor back */
        return -1;
    }
    uint32_t per = node->cfg.max_connections_per_address;
    if (per) {
        uint32_t n = 0;
        for (ch_conn_t *o = node->conns; o; o = o->next)
            if (o != c && !(o->flags & CH__CONNF_CLOSING) && ch__node_same_addr(o, c))
                n++;
        if (n >= per && !ch__node_evict(node, c, 1, "MAX_CONNECTIONS_PER_ADDRESS")) {
            snprintf(why, sizeof(why),
                     "MAX_CONNECTIONS_PER_ADDRESS = %u reached and none of them idle", per);
            ch__node_refuse(node, c, why);
            return -1;
        }
    }
    if (node->nconns - 1 >= node->max_conns &&
        !ch__node_evict(node, c, 0, "MAX_CONNECTIONS")) {
        snprintf(why, sizeof(why), "MAX_CONNECTIONS = %u reached and none of them idle",
                 node->max_conns);
        ch__node_refuse(node, c, why);
        return -1;
    }
    return 0;
}

/* accept() failed with EMFILE/ENFILE after libuv's own remedy. */
static void ch__node_no_fd(ch_node_t *node, int status)
{
    if (node->reserve_fd >= 0) {
        close(node->reserve_fd);
        node->reserve_fd = -1;
        node->refuse_next = 1;
        return;
    }
    if (ch__node_evict(node, NULL, 0, "no file descriptor left"))
        return;
    uint64_t now = ch__node_now(node);
    if (!node->refuse_logged || now - node->refuse_logged >= 1000) {
        node->refuse_logged = now;
        ch__log(node, CH_LOG_ERROR, "accept failed: %s, and no connection is idle",
                uv_strerror(status));
    }
}

/* ---- commands (loop thread) ------------------------------------------- */

static void ch__node_accept_cb(uv_stream_t *server, int status)
{
    ch_node_t *node = server->data;
    if ((status == UV_EMFILE || status == UV_ENFILE) && node->state == CH__NODE_RUNNING) {
        ch__node_no_fd(node, status);
        return;
    }
    if (status < 0) {
        ch__log(node, CH_LOG_WARNING, "accept failed: %s", uv_strerror(status));
        return;
    }
    if (node->state != CH__NODE_RUNNING)
        return;
    ch__conn_accept(node, server);
}

/* Listen on sa, or on fd when it is >= 0 (a socket bound by ch__node_bind_free,
 * which libuv adopts and from then on closes). */
static int ch__node_listen(ch_node_t *node, uv_tcp_t *tcp, const struct sockaddr *sa,
                           unsigned flags, int fd, char *err, size_t errlen, const char *what)
{
    uv_tcp_init(&node->loop->uv, tcp);
    tcp->data = node;
    node->handles++;
    int rc = fd >= 0 ? uv_tcp_open(tcp, fd) : uv_tcp_bind(tcp, sa, flags);
    if (rc != 0 && fd >= 0)
        close(fd);
    if (rc == 0)
        rc = uv_tcp_nodelay(tcp, 1);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)tcp, node->cfg.backlog, ch__node_accept_cb);
    if (rc != 0) {
        snprintf(err, errlen, "cannot listen on %s port %u: %s", what, node->cfg.port,
                 uv_strerror(rc));
        return -CH_EADDRINUSE;
    }
    return CH_SUCCESS;
}

static int ch__node_bound_socket(const struct sockaddr *sa, socklen_t len, int v6only)
{
    int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (v6only)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, sa, len) != 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    return fd;
}

/* PORT = 0: let the system pick a free IPv4 port and bind IPv6 on the same
 * number; if that number is taken on IPv6, try another. On success the node's
 * port is the one picked (the handshake announces it, ch_node_port reports it). */
static int ch__node_bind_free(ch_node_t *node, struct sockaddr_in *a4, struct sockaddr_in6 *a6,
                              int *fd4, int *fd6, char *err, size_t errlen)
{
    int rc = 0;
    for (int attempt = 0; attempt < 64; attempt++) {
        a4->sin_port = 0;
        *fd4 = ch__node_bound_socket((struct sockaddr *)a4, sizeof(*a4), 0);
        if (*fd4 < 0) {
            rc = *fd4;
            break;
        }
        struct sockaddr_in got;
        socklen_t glen = sizeof(got);
        getsockname(*fd4, (struct sockaddr *)&got, &glen);
        a6->sin6_port = got.sin_port;
        *fd6 = ch__node_bound_socket((struct sockaddr *)a6, sizeof(*a6), 1);
        if (*fd6 >= 0) {
            node->cfg.port = ntohs(got.sin_port);
            a4->sin_port = got.sin_port;
            return CH_SUCCESS;
        }
        rc = *fd6;
        close(*fd4);
        if (rc != -EADDRINUSE)
            break;
    }
    *fd4 = *fd6 = -1;
    snprintf(err, errlen, "cannot find a free port (PORT = 0): %s", strerror(-rc));
    return -CH_EADDRINUSE;
}

/* A failed start answers only once its listeners are closed, so that the
 * application may free the node right after the answer. */
static void ch__node_fail_start_cb(uv_handle_t *h)
{
    ch_node_t *node = h->data;
    if (--node->handles == 0) {
        node->state = CH__NODE_NEW;
        ch__post_node_event(node, CH_EV_NODE_STARTED, node->stop_token, node->start_rc,
                            node->start_err);
    }
}

void ch__node_do_start(ch_node_t *node, uint64_t token)
{
    char err[CH_EV_TEXT_LEN];
    int rc = ch_config_check(&node->cfg, err, sizeof(err));
    if (rc != CH_SUCCESS) {
        ch__post_node_event(node, CH_EV_NODE_STARTED, token, -rc, err);
        return;
    }
    if (node->state != CH__NODE_NEW) {
        ch__post_node_event(node, CH_EV_NODE_STARTED, token, CH_IN_PRORESS,
                            "node was already started");
        return;
    }
    static const uint8_t zero[16];
    if (memcmp(node->cfg.identity, zero, 16) == 0) {
        if (uv_random(NULL, NULL, node->identity, 16, 0, NULL) != 0) {
            ch__post_node_event(node, CH_EV_NODE_STARTED, token, CH_FATAL,
                                "no entropy for the node identity");
            return;
        }
    } else {
        memcpy(node->identity, node->cfg.identity, 16);
    }
    node->reuse = ch__config_reuse(&node->cfg);
    node->max_slots = ch__config_slots(&node->cfg);
    node->max_conns = ch__config_max_conns(&node->cfg);
    node->buffer_size = node->cfg.buffer_size ? node->cfg.buffer_size : 65536;
    node->nbuckets = 64;
    node->buckets = calloc(node->nbuckets, sizeof(*node->buckets));
    if (!node->buckets) {
        ch__post_node_event(node, CH_EV_NODE_STARTED, token, CH_ENOMEM, "out of memory");
        return;
    }

    if (!node->cfg.disable_encryption && !node->tls_ctx) {
        rc = ch_tls_ctx_new(node->cfg.cert_chain_pem, node->cfg.dh_params_pem, &node->tls_ctx, err,
                            sizeof(err));
        if (rc != 0) {
            free(node->buckets);
            node->buckets = NULL;
            node->nbuckets = 0;
            ch__post_node_event(node, CH_EV_NODE_STARTED, token, -rc, err);
            return;
        }
    }

    struct sockaddr_in a4;
    struct sockaddr_in6 a6;
    memset(&a4, 0, sizeof(a4));
    memset(&a6, 0, sizeof(a6));
    a4.sin_family = AF_INET;
    a4.sin_port = htons(node->cfg.port);
    memcpy(&a4.sin_addr, node->cfg.bind_v4, 4);
    a6.sin6_family = AF_INET6;
    a6.sin6_port = htons(node->cfg.port);
    memcpy(&a6.sin6_addr, node->cfg.bind_v6, 16);

    int fd4 = -1, fd6 = -1;
    rc = node->cfg.port == 0 ? ch__node_bind_free(node, &a4, &a6, &fd4, &fd6, err, sizeof(err))
                             : CH_SUCCESS;
    if (rc != CH_SUCCESS) {
        free(node->buckets);
        node->buckets = NULL;
        node->nbuckets = 0;
        ch__post_node_event(node, CH_EV_NODE_STARTED, token, -rc, err);
        return;
    }
    rc = ch__node_listen(node, &node->listen4, (struct sockaddr *)&a4, 0, fd4, err, sizeof(err),
                         "IPv4");
    if (rc == CH_SUCCESS)
        rc = ch__node_listen(node, &node->listen6, (struct sockaddr *)&a6, UV_TCP_IPV6ONLY, fd6,
                             err, sizeof(err), "IPv6");
    else if (fd6 >= 0)
        close(fd6);
    if (rc != CH_SUCCESS) {
        /* Close what was opened, then answer (ch__node_fail_start_cb). */
        node->start_rc = -rc; /* an event status: positive */
        snprintf(node->start_err, sizeof(node->start_err), "%s", err);
        node->stop_token = token;
        int opened = node->handles;
        uv_close((uv_handle_t *)&node->listen4, ch__node_fail_start_cb);
        if (opened == 2)
            uv_close((uv_handle_t *)&node->listen6, ch__node_fail_start_cb);
        free(node->buckets);
        node->buckets = NULL;
        node->nbuckets = 0;
        return;
    }
    uv_timer_init(&node->loop->uv, &node->gc_timer);
    node->gc_timer.data = node;
    node->handles++;
    node->state = CH__NODE_RUNNING;
    ch__node_reserve(node);
    node->next = node->loop->nodes;
    node->loop->nodes = node;
    ch__node_gc_arm(node);
    ch__post_node_event(node, CH_EV_NODE_STARTED, token, CH_SUCCESS, NULL);
}

void ch__node_do_stop(ch_node_t *node, uint64_t token)
{
    if (node->state != CH__NODE_RUNNING) {
        /* Never started (or failed): nothing is open. */
        ch__post_node_event(node, CH_EV_NODE_STOPPED, token, CH_SUCCESS, NULL);
        return;
    }
    node->state = CH__NODE_STOPPING;
    node->stop_token = token;
    if (node->reserve_fd >= 0) {
        close(node->reserve_fd);
        node->reserve_fd = -1;
    }
    uv_close((uv_handle_t *)&node->listen4, ch__node_close_cb);
    uv_close((uv_handle_t *)&node->listen6, ch__node_close_cb);
    uv_close((uv_handle_t *)&node->gc_timer, ch__node_close_cb);
    /* Connections first (their in-flight messages fail), then the remotes
     * (their queues fail); with no connection left under a remote its delete
     * does not scan the connection list. */
    for (ch_conn_t *c = node->conns, *next; c; c = next) {
        next = c->next;
        ch__conn_close(c, CH_SHUTDOWN, "node stopped");
    }
    for (size_t b = 0; b < node->nbuckets; b++) {
        while (node->buckets[b])
            ch__remote_delete(node->buckets[b], CH_SHUTDOWN, "node stopped");
    }
    ch__node_maybe_finish(node);
}

void ch__node_do_send(ch_node_t *node, ch_message_t *m)
{
    if (node->state != CH__NODE_RUNNING) {
        ch__send_done(node, m, CH_SHUTDOWN, "node is not running");
        return;
    }
    m->type = node->cfg.synchronous ? CH_MSG_REQ_ACK : 0;
    ch_remote_t *r = ch__remote_get(node, m->family, m->addr, m->port, 1);
    if (!r) {
        ch__send_done(node, m, CH_ENOMEM, "out of memory");
        return;
    }
    if (node->cfg.max_send_queue && r->data_q.len >= node->cfg.max_send_queue && r->dirty)
        ch__remote_flush_now(r); /* what the batch queued so far counts as written first */
    if (node->cfg.max_send_queue && r->data_q.len >= node->cfg.max_send_queue) {
        /* Policy: fail this send at once; never block, never drop a queued one. */
        char addr[INET6_ADDRSTRLEN], text[CH_EV_TEXT_LEN];
        ch__format_addr(r->family, r->addr, addr, sizeof(addr));
        snprintf(text, sizeof(text),
                 "send queue to %s%s%s:%u is full: MAX_SEND_QUEUE = %u messages wait to be "
                 "written; this one was not queued",
                 r->family == 6 ? "[" : "", addr, r->family == 6 ? "]" : "", r->port,
                 node->cfg.max_send_queue);
        m->remote = r; /* counted as a send failure of that remote */
        ch__send_done(node, m, CH_SEND_QUEUE_FULL, text);
        return;
    }
    ch__remote_enqueue(r, m);
}

void ch__node_do_release(ch_node_t *node, ch_message_t *m, uint64_t token)
{
    m->token = token;
    ch_conn_t *c = m->conn;
    if (!c) {
        ch__release_done(node, m, CH_SUCCESS);
        return;
    }
    ch_msgq_remove(&c->held, m);
    m->conn = NULL;
    c->slots_used--;
    int owed = (m->flags & CH_MSGF_ACK_OWED) && !(c->flags & CH__CONNF_CLOSING) && c->remote;
    if (owed) {
        ch_message_t *ack = calloc(1, sizeof(*ack));
        if (!ack) {
            ch__release_done(node, m, CH_ENOMEM);
        } else {
            /* Until its ACK is written only the record is needed (token,
             * identity, serial): give the body back. */
            if ((m->flags & CH_MSGF_INLINE) && (m->header_len || m->data_len)) {
                ch_message_t *small = realloc(m, sizeof(*m));
                if (small)
                    m = small;
                m->header = m->data = NULL;
            }
            memcpy(ack->identity, m->identity, CH_ID_SIZE);
            ack->type = CH_MSG_ACK;
            ack->flags = CH_MSGF_CONTROL;
            ack->ack_of = m;
            ch__remote_enqueue_ack(c->remote, ack);
        }
    } else {
        ch__release_done(node, m, CH_SUCCESS);
    }
    ch__conn_slot_freed(c);
}
