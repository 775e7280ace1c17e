/*
 * test_embed.c: a loop embedded in an event loop of another library
 * (ch_loop_embed; docs/architecture.md#embedding-in-asyncio), without
 * Python. This thread plays the embedding event loop: it polls
 * ch_loop_backend_fd() with the timeout ch_loop_backend_timeout() gives and
 * drives with CH_DRIVE_NOWAIT. A background thread drives with
 * CH_DRIVE_BACKGROUND as the Python one does, counting the events it gets.
 *
 * Checked: two nodes start and exchange messages, and the background thread
 * gets no event while this thread attends to the loop; a wake-up from another
 * thread makes the backend fd readable; ch_loop_backend_timeout() answers 0
 * with events pending; a NOWAIT drive answers CH_DRIVE_AGAIN at once while
 * another thread holds the token; when this thread stops attending with work
 * pending, the background thread drives (the embedding lapsed), and the next
 * NOWAIT drives take the loop back; ch_loop_stop() ends the embedding and
 * the loop ends cleanly.
 */
#include <poll.h>
#include <uv.h>

#include "chirp.h"
#include "unit.h"

static ch_loop_t *loop;
static uv_mutex_t mu;
static int bg_events; /* events handed to the background thread (under mu) */
static int bg_done;

static ch_event_t backlog[1024];
static int nbacklog;
static char arena_buf[8192];
static ch_arena_t arena = {arena_buf, sizeof(arena_buf), 0};

static int bg_count(void)
{
    uv_mutex_lock(&mu);
    int n = bg_events;
    uv_mutex_unlock(&mu);
    return n;
}

/* The background thread, as LoopCore._background drives an embedded loop. */
static void background(void *arg)
{
    (void)arg;
    ch_event_t evs[64];
    uint64_t seq = 0;
    for (;;) {
        int n = ch_loop_drive(loop, evs, 64, 0.1, &seq, CH_DRIVE_BACKGROUND, NULL);
        if (n == CH_DRIVE_AGAIN)
            continue;
        if (n < 0)
            break;
        for (int i = 0; i < n; i++)
            if (evs[i].type == CH_EV_RECV)
                ch_node_release(evs[i].node, evs[i].msg, 0);
        uv_mutex_lock(&mu);
        bg_events += n;
        uv_mutex_unlock(&mu);
        ch_loop_release(loop);
    }
    uv_mutex_lock(&mu);
    bg_done = 1;
    uv_mutex_unlock(&mu);
}

/* One turn of the embedding loop: wait (at most max_ms) for the backend fd or
 * the core's next timer, then one NOWAIT drive. Received messages are
 * released at once (token 0); other events go to the backlog. Returns the
 * drive's answer. */
static int embed_turn(int max_ms)
{
    int t = ch_loop_backend_timeout(loop);
    if (t < 0 || t > max_ms)
        t = max_ms;
    struct pollfd p = {.fd = ch_loop_backend_fd(loop), .events = POLLIN};
    poll(&p, 1, t);
    ch_event_t evs[64];
    uint64_t seq = 0;
    int n = ch_loop_drive(loop, evs, 64, 0, &seq, CH_DRIVE_NOWAIT, &arena);
    if (n < 0)
        return n;
    for (int i = 0; i < n; i++) {
        if (evs[i].type == CH_EV_RECV)
            ch_node_release(evs[i].node, evs[i].msg, 0);
        else if (nbacklog < 1024)
            backlog[nbacklog++] = evs[i];
    }
    ch_loop_release(loop);
    return n;
}

/* Drive as the embedding loop until an event of type (and token) arrives. */
static int wait_event(int type, uint64_t token, ch_event_t *out)
{
    uint64_t deadline = uv_hrtime() + (uint64_t)(unit_seconds(20) * 1e9);
    for (;;) {
        for (int i = 0; i < nbacklog; i++) {
            if (backlog[i].type == type && (!token || backlog[i].token == token)) {
                *out = backlog[i];
                memmove(&backlog[i], &backlog[i + 1], (size_t)(nbacklog - i - 1) * sizeof(*out));
                nbacklog--;
                return 0;
            }
        }
        if (uv_hrtime() > deadline)
            return -2;
        if (embed_turn(50) == -CH_SHUTDOWN)
            return -1;
    }
}

static ch_node_t *start_node(uint16_t *port, int sync, uint64_t tok)
{
    for (int attempt = 0; attempt < 50; attempt++) {
        ch_config_t cfg;
        memset(&cfg, 0, sizeof(cfg));
        cfg.reuse_time = 30;
        cfg.timeout = unit_seconds(5);
        cfg.port = (uint16_t)(35000 + uv_hrtime() % 20000);
        cfg.backlog = 100;
        cfg.synchronous = (uint8_t)sync;
        cfg.max_msg_size = 1 << 20;
        cfg.disable_encryption = 1;
        ch_node_t *node;
        ch_event_t ev;
        if (ch_node_new(loop, &cfg, tok, &node) != CH_SUCCESS)
            return NULL;
        ch_node_start(node, tok);
        if (wait_event(CH_EV_NODE_STARTED, tok, &ev) != 0)
            return NULL;
        if (ev.status == CH_SUCCESS) {
            *port = cfg.port;
            return node;
        }
        ch_node_free(node);
    }
    return NULL;
}

/* n messages a -> b (port pb); every SEND_DONE must succeed. */
static void exchange(ch_node_t *a, uint16_t pb, uint64_t first, int n)
{
    static const uint8_t lo[4] = {127, 0, 0, 1};
    uint8_t id[16] = {7};
    for (int i = 0; i < n; i++) {
        id[1] = (uint8_t)i;
        id[2] = (uint8_t)first;
        CHECK_EQ(ch_node_send(a, first + (uint64_t)i, (const char *)id, 4, (const char *)lo, pb,
                              "h", 1, "data", 4),
                 CH_SUCCESS);
    }
    for (int i = 0; i < n; i++) {
        ch_event_t ev;
        if (!CHECK(wait_event(CH_EV_SEND_DONE, first + (uint64_t)i, &ev) == 0))
            return;
        CHECK_EQ(ev.status, CH_SUCCESS);
        if (ev.count > 1)
            i += (int)ev.count - 1;
    }
}

typedef struct {
    uv_thread_t thread;
    int holding; /* under mu */
    int n;
} holder_t;

/* Another thread takes the token (an application drive) and keeps it a while. */
static void hold_token(void *arg)
{
    holder_t *h = arg;
    ch_event_t evs[8];
    uint64_t seq = ch_loop_batch_seq(loop);
    h->n = ch_loop_drive(loop, evs, 8, 0.05, &seq, 0, NULL);
    if (h->n < 0)
        return;
    uv_mutex_lock(&mu);
    h->holding = 1;
    uv_mutex_unlock(&mu);
    uv_sleep(300);
    for (int i = 0; i < h->n; i++)
        if (evs[i].type == CH_EV_RECV)
            ch_node_release(evs[i].node, evs[i].msg, 0);
    uv_mutex_lock(&mu);
    h->holding = 2;
    uv_mutex_unlock(&mu);
    ch_loop_release(loop);
}

static void wake_from_thread(void *arg)
{
    (void)arg;
    ch_loop_wake(loop, 99);
}

static void test_embedded(void)
{
    uint16_t pa, pb;
    ch_node_t *a = start_node(&pa, 1, 1);
    ch_node_t *b = start_node(&pb, 1, 2);
    if (!CHECK(a && b))
        return;
    ch_event_t ev;

    /* Attended: the background thread gets nothing. */
    exchange(a, pb, 100, 30);
    exchange(b, pa, 200, 30);
    CHECK_EQ(bg_count(), 0);

    /* A wake-up from another thread: the backend fd turns readable. */
    uv_thread_t w;
    uv_thread_create(&w, wake_from_thread, NULL);
    uv_thread_join(&w);
    struct pollfd p = {.fd = ch_loop_backend_fd(loop), .events = POLLIN};
    CHECK_EQ(poll(&p, 1, (int)(unit_seconds(5) * 1000)), 1);
    CHECK_EQ(ch_loop_backend_timeout(loop), 0); /* the WAKE event is pending */
    CHECK_EQ(wait_event(CH_EV_WAKE, 99, &ev), 0);
    /* This thread's own wake-up: pending, read from the timeout (no fd needed). */
    ch_loop_wake(loop, 98);
    CHECK_EQ(ch_loop_backend_timeout(loop), 0);
    CHECK_EQ(wait_event(CH_EV_WAKE, 98, &ev), 0);
    CHECK(ch_loop_backend_timeout(loop) != 0);

    /* Contention: another thread holds the token; NOWAIT answers at once. */
    holder_t h = {.holding = 0};
    uv_thread_create(&h.thread, hold_token, &h);
    int holding = 0;
    uint64_t deadline = uv_hrtime() + (uint64_t)(unit_seconds(5) * 1e9);
    while (!holding && uv_hrtime() < deadline) {
        uv_sleep(5);
        uv_mutex_lock(&mu);
        holding = h.holding == 1;
        uv_mutex_unlock(&mu);
    }
    if (CHECK(holding)) {
        ch_event_t evs[4];
        uint64_t seq = 0;
        uint64_t t0 = uv_hrtime();
        CHECK_EQ(ch_loop_drive(loop, evs, 4, 0, &seq, CH_DRIVE_NOWAIT, NULL), CH_DRIVE_AGAIN);
        CHECK(uv_hrtime() - t0 < 100000000ull); /* did not wait for the holder */
    }
    uv_thread_join(&h.thread);

    /* A lapse: work pending and nobody attends; the background thread drives
     * (it gets the RECV at b and then the SEND_DONE at a). */
    static const uint8_t lo[4] = {127, 0, 0, 1};
    uint8_t id[16] = {9};
    int before = bg_count();
    CHECK_EQ(ch_node_send(a, 300, (const char *)id, 4, (const char *)lo, pb, "x", 1, NULL, 0),
             CH_SUCCESS);
    deadline = uv_hrtime() + (uint64_t)(unit_seconds(10) * 1e9);
    while (bg_count() == before && uv_hrtime() < deadline)
        uv_sleep(20);
    CHECK(bg_count() > before);
    uv_sleep(50);
    /* Attending again takes the loop back: the background thread stands aside. */
    for (int i = 0; i < 20; i++)
        embed_turn(10);
    before = bg_count();
    exchange(a, pb, 400, 30);
    CHECK_EQ(bg_count(), before);

    /* Stop the nodes (attended), then the loop: the background thread ends it. */
    ch_node_stop(a, 11);
    CHECK_EQ(wait_event(CH_EV_NODE_STOPPED, 0, &ev), 0);
    ch_node_free(ev.node);
    ch_node_stop(b, 12);
    CHECK_EQ(wait_event(CH_EV_NODE_STOPPED, 0, &ev), 0);
    ch_node_free(ev.node);
}

int main(void)
{
    uv_mutex_init(&mu);
    CHECK_EQ(ch_loop_new(&loop), CH_SUCCESS);
    ch_loop_embed(loop, 1);
    CHECK(ch_loop_backend_fd(loop) >= 0);
    uv_thread_t bg;
    uv_thread_create(&bg, background, NULL);
    UNIT_RUN(test_embedded);
    ch_loop_stop(loop);
    uv_thread_join(&bg);
    CHECK(bg_done);
    /* Ended and drained: a NOWAIT drive answers so too. */
    ch_event_t evs[4];
    uint64_t seq = 0;
    int n;
    while ((n = ch_loop_drive(loop, evs, 4, 0, &seq, CH_DRIVE_NOWAIT, NULL)) >= 0)
        ch_loop_release(loop);
    CHECK_EQ(n, -CH_SHUTDOWN);
    CHECK_EQ(ch_loop_backend_timeout(loop), -1);
    ch_loop_free(loop);
    uv_mutex_destroy(&mu);
    return unit_summary();
}
