/*
 * core.h: internal structures of the loop, nodes, remotes and connections.
 *
 * Locking theory: libuv is not thread-safe, so exactly one thread at a time
 * may run the loop (uv_run and every callback it makes) and touch what is
 * declared here: the thread holding the loop's ownership token
 * (ch_loop_s.owned, taken and given up under ch_loop_s.lock; see loop.c).
 * Everything declared here is "owner only", except the part of ch_loop_s
 * guarded by its mutex:
 *   - cmds: commands from other threads (send, release, start, stop), carried
 *     out by the submitter itself when nobody owns the loop, else by the owner
 *     (woken by one uv_async_t if it sleeps in the I/O poll);
 *   - events: results handed to the owner's caller, filled from an
 *     owner-local buffer once per loop phase (prepare and check handles);
 *   - the ownership token and the state of the threads waiting for it.
 * The token changes hands under the mutex, which orders one owner's libuv
 * work before the next one's.
 *
 * Ownership: a node owns its remotes and connections; a connection is freed
 * when both of its handles (tcp, timer) are closed; a remote when its timer
 * handle is closed. Received messages are owned by the application until
 * released; a connection that closes only forgets them (msg->conn = NULL).
 */
#ifndef CH_CORE_H
#define CH_CORE_H

#include <uv.h>

#include "message.h"
#include "reader.h"
#include "tls.h"

typedef struct ch_conn_s ch_conn_t;
typedef struct ch_remote_s ch_remote_t;

/* ---- loop ------------------------------------------------------------- */

enum ch__cmd_type { CH__CMD_START = 1, CH__CMD_STOP, CH__CMD_SEND, CH__CMD_RELEASE, CH__CMD_STATS };

typedef struct ch__cmd_s {
    int type;
    ch_node_t *node;
    ch_message_t *msg;
    uint64_t token;
} ch__cmd_t;

typedef struct ch__vec_s {
    void *items;
    size_t len;
    size_t cap;
    size_t head; /* consumer position (events) */
} ch__vec_t;

struct ch_loop_s {
    uv_loop_t uv;
    uv_async_t wake;
    uv_prepare_t prepare;
    uv_check_t check;
    uv_timer_t drive_timer; /* bounds the owner's wait in the I/O poll */

    uv_mutex_t lock;     /* guards everything from here to "owner only" */
    uv_cond_t cond_bg;   /* the background thread waits here for the token */
    uv_cond_t cond_app;  /* application threads wait here (ch_loop_drive) */
    ch__vec_t cmds;      /* ch__cmd_t */
    ch__vec_t events;    /* ch_event_t, handed out by the owner */
    int stop_requested;
    int ended;
    int owned;        /* the ownership token is taken */
    int owner_bg;     /* ... by the background thread */
    uv_thread_t owner_thread; /* ... by this thread (valid while owned) */
    int sleeping;     /* the owner is (about to be) blocked in the I/O poll */
    int nudged;       /* a thread wanted the owner's attention while it was awake:
                         it must look again instead of blocking in the I/O poll */
    int app_waiting;  /* application threads waiting on cond_app */
    int bg_waiting;   /* the background thread waits on cond_bg: CH__BG_* */
    int urgent;       /* a pending event is not a completion (see ch__event_is_lazy) */
    int needs_run;    /* the last owner left work under way (a write, a connect) */
    int kicked;       /* ch_loop_kick(): the owner returns to its caller */
    uint64_t events_since; /* uv_hrtime() when the pending events began (ns) */
    uint64_t released_at;  /* uv_hrtime() when an application owner last left (ns) */
    uint64_t batch_seq;    /* times the token was given up: app waiters re-check */
    uint64_t bg_seen_seq;  /* batch_seq when the background thread last looked */
    /* Embedding (ch_loop_embed; docs/architecture.md#embedding-in-asyncio): an
     * event loop of another library watches uv_backend_fd() and drives with
     * CH_DRIVE_NOWAIT; the background thread only watches that it does. */
    int embedded;
    int embed_lapsed;      /* ... but it left work undone for a watch period: the
                              background thread drives as without embedding until
                              the next CH_DRIVE_NOWAIT drive */
    int owner_nowait;      /* the owner took the token with CH_DRIVE_NOWAIT */
    int watch_work;        /* the background thread's last watch found work pending */
    uint64_t watch_seq;    /* ... and batch_seq then */
    uint64_t watch_at;     /* uv_hrtime() of its next watch (ns) */
    uint64_t next_due;     /* when the loop needs a run for its timers, as the last
                              owner left it: ms on uv_now()'s clock, UINT64_MAX none */
    uint64_t embed_due;    /* next_due as the embedding loop last read it */
    uv_thread_t embed_thread; /* the thread of the last CH_DRIVE_NOWAIT drive ... */
    int embed_thread_set;     /* ... once there was one */

    /* owner only */
    ch__vec_t local_events; /* ch_event_t, not yet published */
    ch_node_t *nodes;       /* open nodes */
    int closing;
    int closed; /* the handles are closed and uv_run found nothing alive */
    uint64_t rng;
    int corked;       /* running a batch of commands: writes wait for its end */
    ch__vec_t dirty;  /* ch_remote_t *: remotes with frames to write at the end */
};

#define CH__BG_TIMED 1
#define CH__BG_UNTIMED 2
/* How long the background thread leaves the loop alone after an application
 * thread gave it up without work under way: a thread that waits, answers and
 * waits again takes it back meanwhile without waking anybody. */
#define CH__GRACE_NS (CH_LAZY_MS * 1000000ull)
/* While application threads pass the token among themselves (it changed
 * hands since the background thread last looked), the background thread
 * looks again after this long instead of being woken by every release: a
 * ping-pong costs it about 250 wake-ups a second, not one per message. An
 * application thread that stops taking the loop leaves it undriven for at
 * most this plus CH__GRACE_NS. */
#define CH__PINGPONG_NS (4 * 1000000ull)
/* The background thread of an embedded loop looks this often whether the
 * embedding event loop attends to it. */
#define CH__WATCH_NS (CH_EMBED_WATCH_MS * 1000000ull)

void ch__loop_post(ch_loop_t *loop, const ch_event_t *ev);
/* Count one more successful send in the last unpublished event if that is a
 * successful SEND_DONE of node for the tokens just before token; 1 if so. */
int ch__loop_extend_send_done(ch_node_t *node, uint64_t token);
/* The same for a successful RELEASE_DONE of the same token (quiet releases). */
int ch__loop_extend_release_done(ch_node_t *node, uint64_t token);
/* Zero ev and fill the fields every event of a node carries. */
void ch__event_init(ch_event_t *ev, int type, ch_node_t *node, uint64_t token, int status);
void ch__loop_flush(ch_loop_t *loop);
void ch__loop_node_gone(ch_loop_t *loop, ch_node_t *node);
/* Owner, while a batch of commands runs: remember r to be flushed at the end
 * of the batch (1), so that its sends leave in one write; 0: flush now. */
int ch__loop_defer_flush(ch_loop_t *loop, ch_remote_t *r);
/* r is deleted: take it off that list. */
void ch__loop_forget_remote(ch_loop_t *loop, ch_remote_t *r);
uint64_t ch__loop_rand(ch_loop_t *loop);
void ch__log(ch_node_t *node, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define CH_LOG_DEBUG 10
#define CH_LOG_INFO 20
#define CH_LOG_WARNING 30
#define CH_LOG_ERROR 40

/* ---- node ------------------------------------------------------------- */

/* Upper bound of Config.MAX_CONNECTIONS (and the effective limit when the fd
 * limit is unlimited). */
#define CH__MAX_CONNECTIONS 1000000u
/* A connection without a data frame (in or out, or an ACK) for this long is
 * idle: it may be closed to make room at a connection limit. NOOPs do not
 * count as data. */
#define CH__EVICT_IDLE_MS 1000
uint32_t ch__config_max_conns(const ch_config_t *cfg);

enum ch__node_state {
    CH__NODE_NEW = 0,
    CH__NODE_RUNNING,
    CH__NODE_STOPPING,
    CH__NODE_STOPPED
};

struct ch_node_s {
    ch_loop_t *loop;
    ch_config_t cfg; /* private copy, strings duplicated */
    uint64_t token;
    int state;
    uint64_t stop_token;
    int start_rc;
    char start_err[CH_EV_TEXT_LEN];

    uint8_t identity[CH_ID_SIZE];
    double reuse; /* effective R, seconds */
    int max_slots;
    uint32_t buffer_size;

    SSL_CTX *tls_ctx; /* NULL when encryption is disabled */

    uv_tcp_t listen4;
    uv_tcp_t listen6;
    uv_timer_t gc_timer;
    int handles; /* open uv handles owned by the node, its conns and remotes */

    /* remotes: chained hash table */
    ch_remote_t **buckets;
    size_t nbuckets;
    size_t nremotes;

    ch_conn_t *conns; /* all connections, doubly linked */
    uint32_t nconns;
    uint32_t nfreed; /* connections and remotes freed since the last ch__node_trim */
    uint32_t max_conns; /* effective MAX_CONNECTIONS */
    int reserve_fd;     /* spare descriptor given up when accept() meets EMFILE */
    int refuse_next;    /* the reserve was given up: refuse the next connection */
    uint64_t refuse_logged; /* ms, loop time of the last refusal warning */
    ch_counters_t totals;
    ch_node_t *next;  /* loop's list */
};

void ch__node_handle_closed(ch_node_t *node);
/* Give freed heap memory back to the system once many connections went away. */
void ch__node_trim(ch_node_t *node);
void ch__node_maybe_finish(ch_node_t *node);
/* A new incoming connection c (address known, not started): 0 to go on, or
 * -1 when it was refused (and is closing) at a connection limit. */
int ch__node_admit(ch_node_t *node, ch_conn_t *c);
uint64_t ch__node_now(ch_node_t *node);
void ch__send_done(ch_node_t *node, ch_message_t *m, int status, const char *text);
void ch__release_done(ch_node_t *node, ch_message_t *recv, int status);

/* ---- remote ----------------------------------------------------------- */

struct ch_remote_s {
    ch_node_t *node;
    int family;
    uint8_t addr[16];
    uint16_t port;

    ch_conn_t *conn; /* active connection, may be NULL */
    int nconns;      /* connections filed under this remote */
    ch_msgq_t data_q;
    ch_msgq_t ctrl_q;
    ch_message_t *outstanding; /* REQ_ACK messages waiting for their ACK, via ->onext */
    int noutstanding;
    uint32_t serial;
    uint64_t activity; /* ms */
    int noop_queued;
    int acks_queued; /* ACK frames queued or being written (ctrl_q, writing) */
    int nackwait;    /* its connections that stopped reading for that backlog */
    int blocked; /* reconnect back-off running */
    int deleted;
    int dirty;   /* in loop->dirty: to be flushed when the command batch ends */
    uv_timer_t timer; /* reconnect back-off */
    ch_counters_t counters;
    ch_remote_t *hnext;
};

ch_remote_t *ch__remote_get(ch_node_t *node, int family, const uint8_t *addr, uint16_t port,
                            int create);
void ch__remote_enqueue(ch_remote_t *r, ch_message_t *m);
void ch__remote_enqueue_ack(ch_remote_t *r, ch_message_t *ack);
/* An ACK of r left its queue for good (written or failed). */
void ch__remote_ack_done(ch_remote_t *r);
void ch__remote_flush(ch_remote_t *r);
/* ch__remote_flush() even while a batch of commands runs (loop->corked). */
void ch__remote_flush_now(ch_remote_t *r);
void ch__remote_conn_closed(ch_remote_t *r, ch_conn_t *c, int reason, const char *text);
void ch__remote_ack(ch_remote_t *r, ch_conn_t *c, const uint8_t identity[16]);
void ch__remote_send_caps(ch_remote_t *r, ch_conn_t *c);
uint32_t ch__remote_caps_max_msg(const uint8_t identity[16]);
/* Earliest deadline of the messages waiting for an ACK on c (0 if none). */
uint64_t ch__remote_ack_deadline(ch_remote_t *r, ch_conn_t *c);
void ch__remote_delete(ch_remote_t *r, int reason, const char *text);
void ch__msg_fail(ch_node_t *node, ch_message_t *m, int status, const char *text);

/* Count into the remote (if any) and the node's totals. */
#define CH__COUNT(node, remote, field, n)          \
    do {                                            \
        (node)->totals.field += (n);                \
        if (remote)                                 \
            (remote)->counters.field += (n);        \
    } while (0)

/* ---- connection ------------------------------------------------------- */

enum ch__conn_state {
    CH__CONN_CONNECTING = 1,
    CH__CONN_TLS,
    CH__CONN_HANDSHAKE,
    CH__CONN_READY,
    CH__CONN_CLOSED
};

#define CH__CONNF_OUTGOING 0x01
#define CH__CONNF_PAUSED 0x02   /* reading stopped: no free slot */
#define CH__CONNF_CLOSING 0x04
#define CH__CONNF_READING 0x08
#define CH__CONNF_ACKWAIT 0x10  /* reading stopped: too many ACKs wait to be written */
#define CH__CONNF_SYNCDONE 0x20 /* completing a write that finished at once (no second one) */

/*
 * What a peer can make a connection hold (docs/reliability.md): MAX_SLOTS
 * received messages, and ACKs owed to its remote that are not yet written to
 * the socket. Reading stops while CH__ACK_HIGH or more ACKs of the remote are
 * queued or being written, and resumes only once fewer than CH__ACK_LOW are
 * left: a peer that never reads its ACKs cannot make the node read on (and
 * queue ACKs) without bound. A queued ACK keeps only the message's record,
 * not its body.
 */
#define CH__ACK_HIGH 64
#define CH__ACK_LOW 16

struct ch_conn_s {
    ch_node_t *node;
    ch_remote_t *remote; /* NULL for incoming connections before their handshake */
    int state;
    int flags;
    uv_tcp_t tcp;
    uv_timer_t timer; /* connect/handshake deadline, then send deadlines */
    uv_connect_t connect_req;
    uv_write_t write_req;
    uv_write_t hs_req;
    int handles;

    int family;
    uint8_t addr[16];
    uint16_t port; /* dialed port, then the peer's handshake port */
    uint8_t remote_identity[CH_ID_SIZE];
    char name[64]; /* "127.0.0.1:2998" for messages */
    char addr_text[46]; /* "127.0.0.1": the address of received messages */

    ch_reader_t *reader;
    ch_tls_t *tls;   /* NULL for plaintext connections */
    uint8_t *cbuf;   /* TLS: ciphertext read buffer */
    uint8_t *wbuf;   /* TLS: scratch to coalesce a small frame into one record */
    uint8_t *rbuf;   /* plaintext bytes for the reader */
    size_t rbuf_cap;
    size_t rbuf_off; /* unconsumed bytes rbuf[rbuf_off, rbuf_len) while paused */
    size_t rbuf_len;

    int peer_window; /* REQ_ACK frames the peer accepts unacknowledged (0 = 1) */
    uint32_t peer_max_msg; /* MAX_MSG_SIZE the peer announced (0 = not announced) */
    int caps_sent;
    int slots_used;
    ch_msgq_t held;         /* received messages not yet released */
    ch_msgq_t writing;      /* frames of the write in progress (one uv_write) */
    uint64_t connect_deadline;
    uint64_t activity;
    uint64_t data_activity; /* last data frame or ACK, in or out (not NOOPs) */
    uint8_t hs_out[CH_HANDSHAKE_SIZE];

    ch_conn_t *prev, *next;
};

int ch__conn_accept(ch_node_t *node, uv_stream_t *server);
int ch__conn_connect(ch_remote_t *r);
void ch__conn_close(ch_conn_t *c, int reason, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void ch__conn_write(ch_conn_t *c, ch_msgq_t *batch);

/* Limits of one write: frames and payload bytes gathered into one uv_write. */
#define CH__WRITE_FRAMES 64
#define CH__WRITE_BYTES (256 * 1024)
void ch__conn_arm_timer(ch_conn_t *c);
void ch__conn_slot_freed(ch_conn_t *c);
/* ACKs of r were written or dropped: resume connections waiting for that. */
void ch__conn_ack_drained(ch_remote_t *r);
void ch__format_addr(int family, const uint8_t *addr, char *out, size_t len);

#endif
