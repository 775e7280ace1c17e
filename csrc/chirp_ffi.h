/*
 * chirp_ffi.h: the C core's public interface, declarations only.
 *
 * build_ffi.py hands this file verbatim to cffi's cdef(), so it must stay free of
 * preprocessor conditionals, includes and macros other than integer #defines.
 * Python sees only opaque pointers (ch_loop_t, ch_node_t, ch_message_t,
 * ch_reader_t) plus the plain structs declared here.
 *
 * Threads: every function is safe to call from any thread unless it says
 * otherwise. There is no loop thread of the core's own: whichever thread
 * holds the loop's ownership token runs libuv (ch_loop_drive, or a send
 * submitted while nobody owns the loop). Nothing in the core ever calls back
 * into Python.
 */

#define CH_VERSION_STAMP 10011

/* Error codes; values 0-19 are those of libchirp 1.x (docs/protocol.md#errors), later ones are
 * appended. Sign convention (csrc/error.h): a function returns 0 or a negative
 * -CH_<NAME>; a code carried as data (an event's status) is the positive CH_<NAME>. */
enum ch_error {
    CH_SUCCESS = 0,
    CH_VALUE_ERROR = 1,
    CH_UV_ERROR = 2,
    CH_PROTOCOL_ERROR = 3,
    CH_EADDRINUSE = 4,
    CH_FATAL = 5,
    CH_TLS_ERROR = 6,
    CH_NOT_INITIALIZED = 7,
    CH_IN_PRORESS = 8,
    CH_TIMEOUT = 9,
    CH_ENOMEM = 10,
    CH_SHUTDOWN = 11,
    CH_CANNOT_CONNECT = 12,
    CH_QUEUED = 13,
    CH_USED = 14,
    CH_MORE = 15,
    CH_BUSY = 16,
    CH_EMPTY = 17,
    CH_WRITE_ERROR = 18,
    CH_INIT_FAIL = 19,
    CH_SEND_QUEUE_FULL = 20 /* not in 1.x: MAX_SEND_QUEUE messages already wait for the peer */
};

const char *ch_strerror(int code);   /* human text, "Unknown error: n" style for others */
const char *ch_error_name(int code); /* "CH_TIMEOUT", or NULL for unknown codes */
int ch_version_stamp(void);          /* returns CH_VERSION_STAMP as compiled */

/* Configuration, filled by Python and copied by ch_node_new(). */
typedef struct ch_config_s {
    double reuse_time;
    double timeout;
    uint16_t port;
    uint8_t backlog;
    uint8_t max_slots;
    uint8_t synchronous;
    uint8_t disable_signals;
    uint32_t buffer_size;
    uint32_t max_msg_size;
    uint8_t bind_v6[16];
    uint8_t bind_v4[4];
    uint8_t identity[16];
    const char *cert_chain_pem; /* NULL when unset; copied */
    const char *dh_params_pem;  /* NULL when unset; copied */
    uint8_t disable_encryption;
    uint32_t max_send_queue;    /* 0 = unbounded (hardening issue) */
    uint32_t max_connections;   /* 0 = from the fd limit (docs/config.md) */
    uint32_t max_connections_per_address; /* 0 = only max_connections applies */
} ch_config_t;

/* Validate a config the way node start does (docs/config.md, fixed wording).
 * Returns CH_SUCCESS or -CH_VALUE_ERROR with a message naming field and limit
 * written into err (NUL terminated, at most errlen bytes). Pure, no I/O except
 * checking that PEM files exist. */
int ch_config_check(const ch_config_t *cfg, char *err, size_t errlen);

typedef struct ch_loop_s ch_loop_t;
typedef struct ch_node_s ch_node_t;
typedef struct ch_message_s ch_message_t;

/* Event types handed out by ch_loop_poll(). */
#define CH_EV_NODE_STARTED 1   /* node, token, status, text */
#define CH_EV_NODE_STOPPED 2   /* node, token; node may now be freed */
#define CH_EV_SEND_DONE 3      /* node, token (of the send), status, text; count: the
                                  sends token .. token+count-1 all completed so
                                  (consecutive successes are coalesced) */
#define CH_EV_RECV 4           /* node, msg (owned by the receiver until released) and its
                                  fields: identity, serial, header, data, port,
                                  remote_identity, text = peer address */
#define CH_EV_RELEASE_DONE 5   /* node, token (of the release), status, count, id/serial
                                  of the (first) message;
                                  not posted for releases submitted with token 0 */
#define CH_EV_LOG 6            /* node, status = level (10 debug..40 error), text */
#define CH_EV_WAKE 7           /* ch_loop_wake() was called: token */
#define CH_EV_STATS 8          /* node, token, stats (free with ch_stats_free) */

#define CH_EV_TEXT_LEN 200

typedef struct ch_stats_s ch_stats_t;

typedef struct ch_event_s {
    int type;
    int status;
    ch_node_t *node;
    uint64_t node_token;  /* token given to ch_node_new */
    uint64_t token;
    ch_message_t *msg;
    ch_stats_t *stats;    /* STATS: the snapshot, owned by the receiver of the event */
    uint8_t identity[16]; /* RECV, RELEASE_DONE: identity of the message */
    uint32_t serial;      /* RECV, RELEASE_DONE: serial of the message */
    uint32_t count;       /* SEND_DONE: how many sends (consecutive tokens);
                             RELEASE_DONE: how many releases of this token */
    /* RECV only: the message's fields (valid until its release is submitted),
     * so that the receiver needs no further call per message. */
    const uint8_t *header;
    const uint8_t *data;
    uint32_t data_len;
    uint16_t header_len;
    uint16_t port;        /* peer's public port from its handshake */
    uint8_t remote_identity[16];
    char text[200];       /* NUL terminated; empty when there is nothing to say;
                             RECV: the peer's address, compressed text form */
} ch_event_t;

/* Loop: create, drive (any threads, see ch_loop_drive), stop (thread-safe), free. */
int ch_loop_new(ch_loop_t **out);
void ch_loop_stop(ch_loop_t *loop);   /* ask the loop to end once no node is open */
void ch_loop_free(ch_loop_t *loop);   /* only after a drive answered -CH_SHUTDOWN and no
                                         thread drives */
void ch_loop_wake(ch_loop_t *loop, uint64_t token); /* post a CH_EV_WAKE event */

/* Where a drive copies the header and data of the small messages it hands
 * out (NULL: nowhere). The caller owns buf (cap bytes); every drive sets len
 * to what it used, and points the header/data of each RECV event whose header
 * plus data (at most CH_ARENA_MSG_MAX bytes) still fitted at their copies in
 * buf, in order. Others keep pointing into the message itself. Python then
 * takes one bytes object per batch and slices it, instead of one foreign
 * buffer per field. */
#define CH_ARENA_MSG_MAX 4096
typedef struct ch_arena_s {
    char *buf;
    size_t cap;
    size_t len;
} ch_arena_t;

/* Driving the loop. libuv is not thread-safe: one thread at a time holds the
 * loop's ownership token, runs libuv and handles the events it produced, in
 * order; then it gives the token up.
 *
 * ch_loop_drive: wait up to timeout seconds (< 0: forever) for the token,
 * then run the loop (blocking in the I/O poll, the GIL released) until
 * events are pending, and copy at most max of them into out. Returns:
 *   n >= 0  the caller holds the token: it handles the n events (0: the
 *           timeout passed or ch_loop_kick() was called, e.g. to run its
 *           timers) and then calls ch_loop_release() (or drives again only
 *           after releasing);
 *   CH_DRIVE_AGAIN (-CH_BUSY)  without the token: the timeout passed while
 *           another thread held it, or a token holder gave it up after *seq
 *           was read (it may have brought what the caller waits for:
 *           re-check);
 *   -CH_SHUTDOWN  the loop has ended and every event was handed out.
 * (Sign convention of csrc/error.h: a negative result means "no token".)
 * *seq is in/out: read it with ch_loop_batch_seq() BEFORE checking the
 * condition the caller waits for the first time; every return updates it.
 *
 * flags: CH_DRIVE_MESSAGES, the caller waits for received messages: pending
 * events that only complete something (a successful SEND_DONE or
 * RELEASE_DONE) do not end its run; they come along with the next other
 * event, or after CH_LAZY_MS milliseconds. CH_DRIVE_BACKGROUND, the
 * background thread (one per loop): it runs the loop whenever no application
 * thread does, leaves it alone for CH_LAZY_MS after an application thread
 * gave it up without work under way (so that a thread that waits, answers
 * and waits again needs nobody's wake-up), and gives it up at once to an
 * application thread that wants it (waking itself from the I/O poll).
 * CH_DRIVE_NO_EVENTS (with BACKGROUND): never hand events out (ch_loop_run).
 * CH_DRIVE_NOWAIT: the drive of an embedding event loop (see ch_loop_embed):
 * it never waits. If another thread holds the token it answers CH_DRIVE_AGAIN
 * at once; otherwise it takes the token, runs one loop iteration without
 * blocking (UV_RUN_NOWAIT; not when events are pending already: I/O left
 * keeps the backend fd readable) and returns the pending events (0: none),
 * holding the token; timeout and *seq are not used. CH_DRIVE_HOLD: the
 * caller kept the token after a drive that returned 0 (it ran its timers
 * and still waits): run on without giving it up, so that a long wait in
 * slices wakes nobody at each slice's end (ignored if the caller does not
 * hold the token). */
#define CH_DRIVE_MESSAGES 1
#define CH_DRIVE_BACKGROUND 2
#define CH_DRIVE_NO_EVENTS 4
#define CH_DRIVE_NOWAIT 8
#define CH_DRIVE_HOLD 16
#define CH_DRIVE_AGAIN -16 /* -CH_BUSY (cffi reads plain numbers only) */
#define CH_LAZY_MS 1
int ch_loop_drive(ch_loop_t *loop, ch_event_t *out, int max, double timeout, uint64_t *seq,
                  int flags, ch_arena_t *arena);
/* Give the token up: commands submitted meanwhile (sends made while handling
 * the batch) are carried out first, gathered. */
void ch_loop_release(ch_loop_t *loop);
/* ch_loop_release() if the calling thread holds the token (1), else nothing
 * (0): for a caller unwinding from an exception (a KeyboardInterrupt raised
 * between a drive returning and its release) that cannot know whether its
 * drive took the token. */
int ch_loop_release_if_owner(ch_loop_t *loop);
uint64_t ch_loop_batch_seq(ch_loop_t *loop);
/* Make the token holder's drive return 0 (e.g. to re-read its timers). */
void ch_loop_kick(ch_loop_t *loop);

/* Embedding the loop in an event loop of another library (asyncio, uvloop;
 * docs/architecture.md#embedding-in-asyncio). That event loop watches
 * ch_loop_backend_fd() for readability and arms a timer for
 * ch_loop_backend_timeout(); when either fires, its thread drives with
 * CH_DRIVE_NOWAIT, handles the events and calls ch_loop_release(), the
 * ownership rule unchanged.
 *
 * ch_loop_embed(loop, 1): from now on the background thread (the drives
 * with CH_DRIVE_BACKGROUND) does not run the loop: it gives the token up and
 * waits, without blocking in the I/O poll, looking every CH_EMBED_WATCH_MS
 * milliseconds whether work (events, commands, a kick, a due timer, a
 * readable backend fd) was left undone by everybody for a whole watch
 * period; only then does it drive as without embedding (the embedding loop
 * is blocked, stopped or closed), until the next CH_DRIVE_NOWAIT drive, which
 * takes the token back. Notifications that find nobody owning the loop (a
 * command left for the next owner, ch_loop_wake, ch_loop_kick) and owners
 * other than the embedding loop that give the token up leaving events,
 * commands or an earlier timer behind wake the embedding loop by making the
 * backend fd readable (the loop's uv_async_t), except on the thread of the
 * last CH_DRIVE_NOWAIT drive: that thread is awake, and after submitting
 * something itself it reads ch_loop_backend_timeout() (0: drive soon).
 * Off (0): as before. ch_loop_stop() ends embedding. Any thread. */
#define CH_EMBED_WATCH_MS 100
void ch_loop_embed(ch_loop_t *loop, int on);
/* The libuv loop's backend file descriptor (uv_backend_fd): readable when a
 * CH_DRIVE_NOWAIT drive has I/O to do. Constant for the loop's life; it is
 * closed by ch_loop_free(), so the embedding loop stops watching it first. */
int ch_loop_backend_fd(ch_loop_t *loop);
/* Milliseconds until the loop needs a drive without I/O: 0 when events,
 * commands or a kick are pending or a libuv timer is due, -1 when only I/O
 * can bring work, else the time to the next libuv timer as the last owner
 * left the loop. The embedding loop reads it after each ch_loop_release()
 * and arms its timer (an owner that moves the next timer earlier wakes it). */
int ch_loop_backend_timeout(ch_loop_t *loop);

/* For C programs with one consumer of events: ch_loop_drive (flags 0) with
 * the token given up at once (n events, 0 on timeout, -CH_SHUTDOWN once
 * ended) ... */
int ch_loop_poll(ch_loop_t *loop, ch_event_t *out, int max, double timeout, ch_arena_t *arena);
/* ... and a background thread that runs the loop whenever no poller does and
 * hands no events out; returns CH_SUCCESS once the loop has ended. */
int ch_loop_run(ch_loop_t *loop);

/* Node. ch_node_new copies cfg and does no I/O. ch_node_start/stop are carried
 * out on the loop thread and answered with NODE_STARTED / NODE_STOPPED events.
 * After ch_node_stop() nothing else may be submitted for the node; after the
 * NODE_STOPPED event the caller frees it with ch_node_free(). Received
 * messages not released before ch_node_stop() (including RECV events that
 * still arrive until NODE_STOPPED) are detached from their connections by the
 * stop; the caller frees them with ch_msg_free() after NODE_STOPPED. */
int ch_node_new(ch_loop_t *loop, const ch_config_t *cfg, uint64_t node_token, ch_node_t **out);
int ch_node_start(ch_node_t *node, uint64_t token);
int ch_node_stop(ch_node_t *node, uint64_t token);
void ch_node_free(ch_node_t *node);
void ch_node_identity(ch_node_t *node, uint8_t out[16]); /* valid after a successful start */
uint16_t ch_node_port(ch_node_t *node);                  /* bound port */

/* Send. header/data are NOT copied: the caller keeps them alive and unchanged
 * until the SEND_DONE event for token. identity holds 16 bytes; family is 4 or
 * 6, addr holds 4 or 16 bytes. The buffers are declared char so that Python
 * can pass bytes objects as they are. Answered with one SEND_DONE event
 * carrying the status. */
int ch_node_send(ch_node_t *node, uint64_t token, const char *identity, int family,
                 const char *addr, uint16_t port, const char *header, uint16_t header_len,
                 const char *data, uint32_t data_len);

/* One message of ch_node_send_batch(), CH_SEND_SIZE bytes as Python's struct
 * module packs it with the format "=QIHHB16s16s7x" (no padding before addr;
 * addr holds 4 bytes for family 4, padded with zeros). */
#define CH_SEND_SIZE 56
typedef struct ch_send_s {
    uint64_t token;
    uint32_t data_len;
    uint16_t header_len;
    uint16_t port;
    uint8_t family;
    uint8_t identity[16];
    uint8_t addr[16];
} ch_send_t;

/* Send n messages with one call: sends holds n packed ch_send_t records,
 * payload the header then the data of each message, in order. Unlike
 * ch_node_send the core copies header and data (each message becomes one
 * block), so the caller's buffers may go at once. The batch is handed to the
 * loop thread under one lock and with at most one wake-up, all or nothing:
 * CH_SUCCESS, or -CH_VALUE_ERROR (a family other than 4/6, payload shorter
 * than the lengths), -CH_ENOMEM or -CH_SHUTDOWN with nothing submitted. Every
 * message gets its SEND_DONE as with ch_node_send. */
int ch_node_send_batch(ch_node_t *node, const char *sends, int n, const char *payload,
                       size_t payload_len);

/* Release the slot of a received message (sends the owed ACK). Answered with
 * one RELEASE_DONE event for token, or with none when token is 0; either way
 * the message is freed by the core and must not be used after this call. */
int ch_node_release(ch_node_t *node, ch_message_t *msg, uint64_t token);

/* ch_node_release for n messages with the same token, under one lock, all or
 * nothing (CH_SUCCESS, -CH_ENOMEM, -CH_SHUTDOWN). Successful RELEASE_DONE
 * events of one token that follow each other are coalesced: count tells how
 * many releases one event stands for. A batch that owes no ACK (messages sent
 * asynchronously) only frees slots: when nobody owns the loop it is left for
 * the next owner (a ping-pong's answer or its wait, at the latest the
 * background thread after CH_LAZY_MS) instead of running the loop for it. */
int ch_node_release_batch(ch_node_t *node, ch_message_t **msgs, int n, uint64_t token);

/* Statistics: counters of one remote, and of the node as a whole. Counters of
 * a remote start when the remote record is created (first send or first
 * connection) and end with it (garbage collection); the node's totals keep
 * counting. Errors are connection closes by reason. */
typedef struct ch_counters_s {
    uint64_t msgs_in;
    uint64_t bytes_in;    /* header + data bytes of received messages */
    uint64_t msgs_out;    /* data messages sent successfully */
    uint64_t bytes_out;
    uint64_t send_failures;
    uint64_t timeouts;
    uint64_t protocol_errors;
    uint64_t tls_errors;
    uint64_t connects;    /* connections opened (outgoing) or accepted */
    uint64_t conns_refused; /* accepted connections closed at once: a connection
                               limit was reached or no file descriptor was left */
    uint64_t conns_evicted; /* idle connections closed to make room for a new one */
} ch_counters_t;

typedef struct ch_remote_stats_s {
    char address[46];
    uint16_t port;
    uint32_t connections;  /* open connections filed under the remote */
    uint32_t slots_in_use; /* received messages not yet released */
    uint32_t send_queue;   /* data messages waiting to be written */
    uint32_t in_flight;    /* written, waiting for their ACK */
    double idle;           /* seconds since the last activity */
    ch_counters_t counters;
} ch_remote_stats_t;

struct ch_stats_s {
    uint32_t connections; /* all open connections, incl. those before their handshake */
    uint32_t nremotes;
    ch_counters_t totals;
    ch_remote_stats_t *remotes; /* nremotes entries */
};

/* Ask for a snapshot; answered with one CH_EV_STATS event for token. */
int ch_node_stats(ch_node_t *node, uint64_t token);
void ch_stats_free(ch_stats_t *stats);

/* Read a received message (any thread, until its release was submitted). */
typedef struct ch_msg_info_s {
    uint8_t identity[16];
    uint32_t serial;
    uint8_t type;
    const uint8_t *header;
    uint16_t header_len;
    const uint8_t *data;
    uint32_t data_len;
    char address[46];   /* text form, compressed */
    uint16_t port;      /* peer's public port from its handshake */
    uint8_t remote_identity[16];
} ch_msg_info_t;

void ch_msg_info(const ch_message_t *msg, ch_msg_info_t *out);

/* The frame reader, exposed for tests and fuzzing. A reader starts by
 * expecting the 18-byte handshake, then frames. */
typedef struct ch_reader_s ch_reader_t;

#define CH_RD_MORE 0        /* everything consumed; feed more bytes */
#define CH_RD_HANDSHAKE 1   /* handshake complete: see ch_reader_handshake */
#define CH_RD_ACK 2         /* ACK frame: see ch_reader_frame */
#define CH_RD_NOOP 3        /* NOOP frame */
#define CH_RD_DATA_HEADER 4 /* data frame header validated; next feed needs a slot */
#define CH_RD_MESSAGE 5     /* data message complete: ch_reader_take_message */
/* Negative returns are -ch_error codes (-CH_PROTOCOL_ERROR, -CH_ENOMEM); sticky. */

ch_reader_t *ch_reader_new(uint32_t max_msg_size);
void ch_reader_free(ch_reader_t *r);
int ch_reader_feed(ch_reader_t *r, const uint8_t *buf, size_t len, size_t *consumed);
ch_message_t *ch_reader_take_message(ch_reader_t *r);
const char *ch_reader_error(const ch_reader_t *r);
void ch_reader_handshake(const ch_reader_t *r, uint16_t *port, uint8_t identity[16]);
void ch_reader_frame(const ch_reader_t *r, uint8_t identity[16], uint32_t *serial,
                     uint32_t *data_len, uint16_t *header_len, uint8_t *type);
void ch_msg_free(ch_message_t *msg);

/* The frame writer, exposed for tests. */
void ch_writer_handshake(uint8_t out[18], uint16_t port, const uint8_t identity[16]);
void ch_writer_header(uint8_t out[27], const uint8_t identity[16], uint32_t serial,
                      uint32_t data_len, uint16_t header_len, uint8_t type);
