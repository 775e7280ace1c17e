/*
 * loop.c: the loop object and the two hand-offs between threads.
 *
 * Application threads submit commands (ch_node_start/stop/send/release) into
 * loop->cmds under loop->lock. They wake the loop thread (one uv_async_t, a
 * system call) only when it is asleep in the I/O poll (loop->sleeping): the
 * prepare handle drains the commands right before the loop thread would
 * block and only then marks it asleep, and the check handle marks it awake
 * after the poll returned. So while the loop thread is busy, sends cost no
 * system call and no wake-up at all. The loop thread drains at most
 * CH__CMD_BATCH commands at a time and wakes itself again when more are
 * left, so other work is never starved.
 *
 * The loop thread produces events (completions, received messages, log
 * lines) into a loop-local buffer without locking. A prepare handle (before
 * libuv blocks for I/O) and a check handle (after I/O callbacks) publish the
 * buffer to loop->events under one lock and signal a poller only if one is
 * waiting. The dispatcher takes events in batches with ch_loop_poll().
 *
 * Application threads that wait for a result (a queue get, a send future)
 * may poll too (ch_loop_poll_app): they are preferred over the dispatcher,
 * so a received message goes from the loop thread straight to the thread
 * that wants it. One batch is handled at a time (loop->busy, the "lease"):
 * nobody gets events while another thread handles a batch, which keeps the
 * events in order. When a batch ends, waiting application threads are woken
 * to re-check their condition (the batch may have been theirs), and the
 * dispatcher gets events again once no application thread waits.
 *
 * Embedding (ch_loop_embed, docs/architecture.md#embedding-in-asyncio): an
 * event loop of another library watches uv_backend_fd() and drives with
 * CH_DRIVE_NOWAIT (never waiting for the token, never blocking in the I/O
 * poll); the background thread then only watches (ch__loop_watch_locked)
 * and drives after the embedding loop left work undone for a whole watch
 * period, until the next NOWAIT drive. Notifications that would wake the
 * background thread wake the embedding loop instead (the uv_async_t makes
 * the backend fd readable), except on that loop's own thread.
 *
 * Stopping: ch_loop_stop() sets stop_requested; the loop thread closes its
 * own handles once no node is open, uv_run() returns, and ch_loop_run()
 * marks the loop ended so that ch_loop_poll() answers -1 when drained.
 */
#include <errno.h>
#include <limits.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

/* ch_loop_drive() answers "no token" with a negative code (csrc/error.h). */
_Static_assert(CH_DRIVE_AGAIN == -CH_BUSY, "CH_DRIVE_AGAIN is -CH_BUSY");

#define CH__CMD_BATCH 4096
#define CH__FLUSH_AT 256
/* A drained vector larger than this many items gives its memory back (a burst,
 * e.g. 10,000 connections' log lines, must not pin it for the loop's life). */
#define CH__VEC_KEEP 4096

static int ch__vec_push(ch__vec_t *v, const void *item, size_t size)
{
    if (v->len == v->cap) {
        size_t ncap = v->cap ? v->cap * 2 : 64;
        void *n = realloc(v->items, ncap * size);
        if (!n)
            return -CH_ENOMEM;
        v->items = n;
        v->cap = ncap;
    }
    memcpy((char *)v->items + v->len * size, item, size);
    v->len++;
    return CH_SUCCESS;
}

/* Room for n more items (all or nothing). */
static int ch__vec_reserve(ch__vec_t *v, size_t n, size_t size)
{
    if (n > SIZE_MAX / size - v->len)
        return -CH_ENOMEM;
    if (v->len + n <= v->cap)
        return CH_SUCCESS;
    size_t ncap = v->cap ? v->cap : 64;
    while (ncap < v->len + n)
        ncap *= 2;
    void *items = realloc(v->items, ncap * size);
    if (!items)
        return -CH_ENOMEM;
    v->items = items;
    v->cap = ncap;
    return CH_SUCCESS;
}

/* Free the items of an empty vector that grew past CH__VEC_KEEP. */
static void ch__vec_shrink(ch__vec_t *v)
{
    if (v->len == 0 && v->cap > CH__VEC_KEEP) {
        free(v->items);
        v->items = NULL;
        v->cap = 0;
        v->head = 0;
    }
}

/* Drop consumed items at the front so the vector does not grow forever. */
static void ch__vec_compact(ch__vec_t *v, size_t size)
{
    if (v->head == 0)
        return;
    memmove(v->items, (char *)v->items + v->head * size, (v->len - v->head) * size);
    v->len -= v->head;
    v->head = 0;
}

uint64_t ch__loop_rand(ch_loop_t *loop)
{
    /* xorshift64*, seeded from the OS at ch_loop_new; used for jitter only. */
    uint64_t x = loop->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    loop->rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* A completion nobody needs at once: a successful SEND_DONE or RELEASE_DONE. */
static int ch__event_is_lazy(const ch_event_t *ev)
{
    return (ev->type == CH_EV_SEND_DONE || ev->type == CH_EV_RELEASE_DONE) &&
           ev->status == CH_SUCCESS;
}

/* Events are pending (lock held). */
static int ch__loop_pending(const ch_loop_t *loop) { return loop->events.len != loop->events.head; }

/* Note that pending events began now, if there were none (lock held). */
static void ch__loop_events_begin(ch_loop_t *loop)
{
    if (!ch__loop_pending(loop))
        loop->events_since = uv_hrtime();
}

/* An embedding event loop drives the loop (ch_loop_embed) and has not
 * lapsed: it, not the background thread, is the owner of last resort (lock
 * held). */
static int ch__loop_embedding(const ch_loop_t *loop)
{
    return loop->embedded && !loop->embed_lapsed;
}

/* Wake the embedding event loop: the backend fd becomes readable (lock held,
 * embedding, so the handles are open: ch_loop_stop ends embedding). Not on
 * the embedding loop's own thread: it is awake, and looks at
 * ch_loop_backend_timeout() after what it submitted (see ch_loop_embed). */
static void ch__loop_wake_embedder_locked(ch_loop_t *loop)
{
    if (loop->embed_thread_set) {
        uv_thread_t self = uv_thread_self();
        if (uv_thread_equal(&self, &loop->embed_thread))
            return;
    }
    uv_async_send(&loop->wake);
}

/* Something needs the loop or its events now (an urgent event, a command, a
 * stop, a kick): wake the owner if it sleeps in the I/O poll, or, without an
 * owner, the thread that will take the loop (lock held). */
static void ch__loop_notify_locked(ch_loop_t *loop)
{
    if (loop->owned) {
        if (loop->sleeping) {
            loop->sleeping = 0;
            uv_async_send(&loop->wake);
        } else {
            loop->nudged = 1; /* awake: the prepare handle sees it before blocking */
        }
    } else if (loop->app_waiting) {
        uv_cond_signal(&loop->cond_app);
    } else if (ch__loop_embedding(loop)) {
        ch__loop_wake_embedder_locked(loop);
    } else if (loop->bg_waiting) {
        uv_cond_signal(&loop->cond_bg);
    }
}

/* Owner only: a loop run is needed to finish what is under way (a write not
 * yet complete or its callback, a connect, a due timer, closing handles). */
static int ch__loop_needs_run(ch_loop_t *loop)
{
    return loop->uv.active_reqs.count > 0 || uv_backend_timeout(&loop->uv) == 0;
}

/* Owner only: when the loop needs a run for its timers (or at once: pending
 * callbacks, closing handles), in ms on uv_now()'s clock; UINT64_MAX never. */
static uint64_t ch__loop_due(ch_loop_t *loop)
{
    int t = uv_backend_timeout(&loop->uv);
    return t < 0 ? UINT64_MAX : uv_now(&loop->uv) + (uint64_t)t;
}

/* uv_hrtime() in ms, the clock of uv_now() (ns since the same origin). */
static uint64_t ch__now_ms(void) { return uv_hrtime() / 1000000u; }

/* Give the ownership token up (lock held). Application waiters re-check (a
 * batch ended); the background thread is woken only if it waits for the
 * owner to leave or the loop needs a run now, so that a thread that gives
 * the loop up and takes it back (a ping-pong) costs it no wake-up. */
static void ch__loop_release_locked(ch_loop_t *loop, int needs_run, uint64_t due)
{
    int was_bg = loop->owner_bg;
    int was_nowait = loop->owner_nowait;
    loop->owned = 0;
    loop->owner_bg = 0;
    loop->owner_nowait = 0;
    loop->sleeping = 0;
    loop->nudged = 0; /* the next owner looks at everything anyway */
    loop->batch_seq++;
    loop->needs_run = needs_run;
    loop->next_due = due;
    if (!was_bg)
        loop->released_at = uv_hrtime();
    int work = loop->kicked || loop->cmds.len != loop->cmds.head;
    int now = needs_run || loop->stop_requested || work ||
              (ch__loop_pending(loop) && loop->urgent);
    if (loop->app_waiting) {
        uv_cond_broadcast(&loop->cond_app);
    } else if (ch__loop_embedding(loop)) {
        /* The embedding loop re-reads ch_loop_backend_timeout() after its own
         * releases; after anybody else's it looks again if something was left
         * for it (events, commands, a kick, a timer earlier than its own). */
        if (!was_nowait && !loop->ended &&
            (work || ch__loop_pending(loop) || due < loop->embed_due))
            ch__loop_wake_embedder_locked(loop);
    } else if (loop->bg_waiting == CH__BG_UNTIMED || (loop->bg_waiting && now)) {
        uv_cond_signal(&loop->cond_bg);
    }
}

void ch__loop_flush(ch_loop_t *loop)
{
    if (loop->local_events.len == 0)
        return;
    int urgent = 0;
    const ch_event_t *fresh = loop->local_events.items;
    for (size_t i = 0; i < loop->local_events.len && !urgent; i++)
        urgent = !ch__event_is_lazy(&fresh[i]);
    uv_mutex_lock(&loop->lock);
    ch__loop_events_begin(loop);
    ch__vec_compact(&loop->events, sizeof(ch_event_t));
    size_t need = loop->events.len + loop->local_events.len;
    if (need > loop->events.cap) {
        size_t ncap = loop->events.cap ? loop->events.cap : 256;
        while (ncap < need)
            ncap *= 2;
        void *n = realloc(loop->events.items, ncap * sizeof(ch_event_t));
        if (!n)
            abort(); /* cannot report anything any more */
        loop->events.items = n;
        loop->events.cap = ncap;
    }
    memcpy((ch_event_t *)loop->events.items + loop->events.len, loop->local_events.items,
           loop->local_events.len * sizeof(ch_event_t));
    loop->events.len += loop->local_events.len;
    loop->local_events.len = 0;
    ch__vec_shrink(&loop->local_events);
    loop->urgent |= urgent;
    /* The caller owns the loop: it hands the events out itself (see
     * ch_loop_drive), or wakes somebody when it gives the loop up. */
    uv_mutex_unlock(&loop->lock);
}

void ch__loop_post(ch_loop_t *loop, const ch_event_t *ev)
{
    if (ch__vec_push(&loop->local_events, ev, sizeof(*ev)) != CH_SUCCESS)
        abort();
    if (loop->local_events.len >= CH__FLUSH_AT)
        ch__loop_flush(loop);
}

/* Count one more completion in the last unpublished event if that is a
 * successful one of this type for node whose next token is `next`; 1 if so. */
static int ch__loop_extend_done(ch_node_t *node, int type, uint64_t next)
{
    ch__vec_t *v = &node->loop->local_events;
    if (v->len == 0)
        return 0;
    ch_event_t *last = (ch_event_t *)v->items + v->len - 1;
    if (last->type != type || last->node != node || last->status != CH_SUCCESS ||
        last->count == UINT32_MAX)
        return 0;
    uint64_t expected = type == CH_EV_SEND_DONE ? last->token + last->count : last->token;
    if (next != expected)
        return 0;
    last->count++;
    return 1;
}

int ch__loop_extend_send_done(ch_node_t *node, uint64_t token)
{
    return ch__loop_extend_done(node, CH_EV_SEND_DONE, token);
}

int ch__loop_extend_release_done(ch_node_t *node, uint64_t token)
{
    return ch__loop_extend_done(node, CH_EV_RELEASE_DONE, token);
}

void ch__event_init(ch_event_t *ev, int type, ch_node_t *node, uint64_t token, int status)
{
    memset(ev, 0, sizeof(*ev));
    ev->type = type;
    ev->status = status;
    ev->node = node;
    ev->node_token = node ? node->token : 0;
    ev->token = token;
}

void ch__log(ch_node_t *node, int level, const char *fmt, ...)
{
    if (!node)
        return; /* every log line belongs to a node: it names the loop to post on */
    ch_event_t ev;
    ch__event_init(&ev, CH_EV_LOG, node, 0, level);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ev.text, sizeof(ev.text), fmt, ap);
    va_end(ap);
    ch__loop_post(node->loop, &ev);
}

static void ch__loop_run_cmds(ch_loop_t *loop);

/* Before blocking for I/O: take what was submitted meanwhile, publish the
 * events, and only then go to sleep (submitters wake the owner from now on). */
static void ch__loop_prepare_cb(uv_prepare_t *h)
{
    ch_loop_t *loop = h->loop->data;
    ch__loop_run_cmds(loop);
    /* Events made since the poll (write callbacks, messages a release let
     * the reader take from its buffer) go to the owner's caller now: the
     * poll must not block, and uv_run returns after this iteration. */
    int stop = loop->local_events.len != 0;
    ch__loop_flush(loop);
    uv_mutex_lock(&loop->lock);
    int more = loop->cmds.len != loop->cmds.head;
    if (loop->nudged) {
        /* Notified after ch_loop_drive last looked and before this (an event,
         * a kick, a thread that wants the loop): the owner must look again
         * instead of blocking, as nobody will wake it. */
        loop->nudged = 0;
        stop = 1;
    }
    loop->sleeping = !more && !stop;
    uv_mutex_unlock(&loop->lock);
    if (stop)
        uv_stop(&loop->uv);
    if (more)
        uv_async_send(&loop->wake); /* do not block: poll returns at once */
}

static void ch__loop_check_cb(uv_check_t *h)
{
    ch_loop_t *loop = h->loop->data;
    uv_mutex_lock(&loop->lock);
    loop->sleeping = 0;
    uv_mutex_unlock(&loop->lock);
    ch__loop_flush(loop);
}

/* Implemented in node.c: the owner's side of each command. */
void ch__node_do_start(ch_node_t *node, uint64_t token);
void ch__node_do_stop(ch_node_t *node, uint64_t token);
void ch__node_do_send(ch_node_t *node, ch_message_t *m);
void ch__node_do_release(ch_node_t *node, ch_message_t *m, uint64_t token);
void ch__node_do_stats(ch_node_t *node, uint64_t token);

static void ch__loop_close_handles(ch_loop_t *loop)
{
    if (loop->closing)
        return;
    loop->closing = 1;
    uv_close((uv_handle_t *)&loop->wake, NULL);
    uv_close((uv_handle_t *)&loop->prepare, NULL);
    uv_close((uv_handle_t *)&loop->check, NULL);
    uv_close((uv_handle_t *)&loop->drive_timer, NULL);
}

static void ch__loop_wake_cb(uv_async_t *h) { ch__loop_run_cmds(h->data); }

int ch__loop_defer_flush(ch_loop_t *loop, ch_remote_t *r)
{
    if (!loop->corked)
        return 0;
    if (!r->dirty) {
        if (ch__vec_push(&loop->dirty, &r, sizeof(r)) != CH_SUCCESS)
            return 0; /* no memory for the list: write now */
        r->dirty = 1;
    }
    return 1;
}

void ch__loop_forget_remote(ch_loop_t *loop, ch_remote_t *r)
{
    ch_remote_t **rs = loop->dirty.items;
    for (size_t i = 0; i < loop->dirty.len; i++)
        if (rs[i] == r)
            rs[i] = NULL;
    r->dirty = 0;
}

/* The end of a batch of commands: write what it queued, one write per remote. */
static void ch__loop_uncork(ch_loop_t *loop)
{
    loop->corked = 0;
    for (size_t i = 0; i < loop->dirty.len; i++) {
        ch_remote_t *r = ((ch_remote_t **)loop->dirty.items)[i];
        if (r) {
            r->dirty = 0;
            ch__remote_flush(r);
        }
    }
    loop->dirty.len = 0;
    ch__vec_shrink(&loop->dirty);
}

static void ch__loop_run_cmds(ch_loop_t *loop)
{
    ch__cmd_t batch[256];
    size_t done = 0;
    int stop;
    for (;;) {
        size_t n = 0;
        uv_mutex_lock(&loop->lock);
        size_t avail = loop->cmds.len - loop->cmds.head;
        n = avail < 256 ? avail : 256;
        if (n) /* items is NULL before the first command (memcpy from NULL is UB) */
            memcpy(batch, (ch__cmd_t *)loop->cmds.items + loop->cmds.head, n * sizeof(ch__cmd_t));
        loop->cmds.head += n;
        if (loop->cmds.head == loop->cmds.len)
            loop->cmds.head = loop->cmds.len = 0;
        stop = loop->stop_requested;
        loop->sleeping = 0;
        uv_mutex_unlock(&loop->lock);
        loop->corked = 1; /* the batch's frames to one peer leave in one write */
        for (size_t i = 0; i < n; i++) {
            ch__cmd_t *c = &batch[i];
            switch (c->type) {
            case CH__CMD_START:
                ch__node_do_start(c->node, c->token);
                break;
            case CH__CMD_STOP:
                /* What the batch sent before the stop is written first, as
                 * without the batching: the stop fails only what waits. */
                ch__loop_uncork(loop);
                loop->corked = 1;
                ch__node_do_stop(c->node, c->token);
                break;
            case CH__CMD_SEND:
                ch__node_do_send(c->node, c->msg);
                break;
            case CH__CMD_RELEASE:
                ch__node_do_release(c->node, c->msg, c->token);
                break;
            case CH__CMD_STATS:
                ch__node_do_stats(c->node, c->token);
                break;
            }
        }
        ch__loop_uncork(loop);
        done += n;
        if (n < 256)
            break;
        if (done >= CH__CMD_BATCH) {
            uv_async_send(&loop->wake); /* more later; let I/O run first */
            break;
        }
    }
    if (stop && loop->nodes == NULL)
        ch__loop_close_handles(loop);
}

void ch__loop_node_gone(ch_loop_t *loop, ch_node_t *node)
{
    ch_node_t **pp = &loop->nodes;
    while (*pp && *pp != node)
        pp = &(*pp)->next;
    if (*pp)
        *pp = node->next;
    node->next = NULL;
    uv_mutex_lock(&loop->lock);
    int stop = loop->stop_requested;
    uv_mutex_unlock(&loop->lock);
    if (stop && loop->nodes == NULL)
        ch__loop_close_handles(loop);
}

static void ch__loop_noop_cb(uv_timer_t *t) { (void)t; }

/* glibc hands freed memory at the top of the heap back to the system as soon
 * as more than M_TRIM_THRESHOLD (128 KiB at first) is free there, and serves
 * blocks from M_MMAP_THRESHOLD (128 KiB at first) on with mmap; both adapt
 * to a program only slowly. Large messages allocate and free a block per
 * message (the reader's, then Python's bytes), so every message faulted its
 * pages in again: 64 KiB roundtrips ran at half speed, 1 MiB ones at a third
 * (docs/benchmarks.md). Once per process, the first loop raises both, unless
 * the environment sets glibc's own (MALLOC_TRIM_THRESHOLD_,
 * MALLOC_MMAP_THRESHOLD_, GLIBC_TUNABLES) or LIBCHIRP_MALLOC_TUNING=0. The
 * cost: up to CH__TRIM_THRESHOLD bytes of freed heap are kept for reuse. */
#define CH__MMAP_THRESHOLD (4 * 1024 * 1024)
#define CH__TRIM_THRESHOLD (16 * 1024 * 1024)
static uv_once_t ch__malloc_once = UV_ONCE_INIT;

static void ch__malloc_tune(void)
{
#if defined(__GLIBC__)
    const char *opt = getenv("LIBCHIRP_MALLOC_TUNING");
    if (opt && strcmp(opt, "0") == 0)
        return;
    if (getenv("MALLOC_TRIM_THRESHOLD_") || getenv("MALLOC_MMAP_THRESHOLD_") ||
        getenv("GLIBC_TUNABLES"))
        return;
    mallopt(M_MMAP_THRESHOLD, CH__MMAP_THRESHOLD);
    mallopt(M_TRIM_THRESHOLD, CH__TRIM_THRESHOLD);
#endif
}

int ch_loop_new(ch_loop_t **out)
{
    *out = NULL;
    uv_once(&ch__malloc_once, ch__malloc_tune);
    ch_loop_t *loop = calloc(1, sizeof(*loop));
    if (!loop)
        return -CH_ENOMEM;
    if (uv_loop_init(&loop->uv) != 0) {
        free(loop);
        return -CH_UV_ERROR;
    }
    loop->uv.data = loop;
    if (uv_mutex_init(&loop->lock) != 0) {
        uv_loop_close(&loop->uv);
        free(loop);
        return -CH_INIT_FAIL;
    }
    if (uv_cond_init(&loop->cond_bg) != 0 || uv_cond_init(&loop->cond_app) != 0) {
        uv_mutex_destroy(&loop->lock);
        uv_loop_close(&loop->uv);
        free(loop);
        return -CH_INIT_FAIL;
    }
    uv_async_init(&loop->uv, &loop->wake, ch__loop_wake_cb);
    loop->wake.data = loop;
    uv_prepare_init(&loop->uv, &loop->prepare);
    uv_prepare_start(&loop->prepare, ch__loop_prepare_cb);
    uv_unref((uv_handle_t *)&loop->prepare);
    uv_check_init(&loop->uv, &loop->check);
    uv_check_start(&loop->check, ch__loop_check_cb);
    uv_unref((uv_handle_t *)&loop->check);
    uv_timer_init(&loop->uv, &loop->drive_timer);
    loop->drive_timer.data = loop;
    uv_unref((uv_handle_t *)&loop->drive_timer);
    loop->next_due = UINT64_MAX;
    loop->embed_due = UINT64_MAX;
    if (uv_random(NULL, NULL, &loop->rng, sizeof(loop->rng), 0, NULL) != 0 || loop->rng == 0)
        loop->rng = (uint64_t)uv_hrtime() | 1;
    *out = loop;
    return CH_SUCCESS;
}

void ch_loop_stop(ch_loop_t *loop)
{
    uv_mutex_lock(&loop->lock);
    loop->stop_requested = 1;
    loop->embedded = 0; /* the background thread ends the loop */
    if (!loop->ended)
        ch__loop_notify_locked(loop);
    uv_mutex_unlock(&loop->lock);
}

void ch_loop_free(ch_loop_t *loop)
{
    if (!loop)
        return;
    uv_loop_close(&loop->uv);
    uv_mutex_destroy(&loop->lock);
    uv_cond_destroy(&loop->cond_bg);
    uv_cond_destroy(&loop->cond_app);
    free(loop->cmds.items);
    free(loop->events.items);
    free(loop->local_events.items);
    free(loop->dirty.items);
    free(loop);
}

/* The owner: run the commands queued, one loop iteration without blocking
 * (the callbacks of writes not done at once, I/O that is ready), then give
 * the loop up. */
static void ch__loop_run_direct(ch_loop_t *loop)
{
    /* The loop's clock stood still since its last run: deadlines of what the
     * commands start (a send's TIMEOUT) count from now. */
    uv_update_time(&loop->uv);
    ch__loop_run_cmds(loop);
    /* One iteration without blocking: for what the commands left under way
     * (writes the socket did not take at once, a connect), and for what has
     * arrived meanwhile. Skipping it when nothing was left under way saves a
     * ping-pong one poll per send, but a stream's sender then learns of its
     * ACKs only when it blocks: shape 5 of make bench fell from about 170k to
     * 90k msg/s. */
    if (uv_run(&loop->uv, UV_RUN_NOWAIT) == 0 && loop->closing)
        loop->closed = 1;
    ch__loop_flush(loop);
    int needs_run = ch__loop_needs_run(loop);
    uint64_t due = ch__loop_due(loop);
    uv_mutex_lock(&loop->lock);
    if (loop->closed && !loop->ended) {
        loop->ended = 1;
        uv_cond_broadcast(&loop->cond_bg);
        uv_cond_broadcast(&loop->cond_app);
    }
    ch__loop_release_locked(loop, needs_run, due);
    uv_mutex_unlock(&loop->lock);
}

/* Append n commands, all or none, under one lock; fails once the loop has
 * ended. Without an owner the submitting thread takes the loop and carries
 * them out itself (a send is written at once, no thread is woken); with an
 * owner asleep in the I/O poll it wakes the owner (one uv_async_send), and an
 * owner awake runs them before it sleeps or gives the loop up. Lazy commands
 * (nobody needs them at once) found no owner are left for the next one. */
int ch__loop_submit_many(ch_loop_t *loop, const ch__cmd_t *cmds, size_t n, int lazy)
{
    uv_mutex_lock(&loop->lock);
    if (loop->ended) {
        uv_mutex_unlock(&loop->lock);
        return -CH_SHUTDOWN;
    }
    int rc = ch__vec_reserve(&loop->cmds, n, sizeof(*cmds));
    if (rc == CH_SUCCESS) {
        memcpy((ch__cmd_t *)loop->cmds.items + loop->cmds.len, cmds, n * sizeof(*cmds));
        loop->cmds.len += n;
    }
    int direct = 0;
    if (rc == CH_SUCCESS && n > 0) {
        if (!loop->owned && !lazy) {
            direct = 1;
            loop->owned = 1;
            loop->owner_bg = 0;
            loop->owner_thread = uv_thread_self();
        } else if (loop->owned || ch__loop_embedding(loop)) {
            /* An owner carries them out; or, embedded, the embedding loop is
             * the next owner (lazy commands wait for no background thread). */
            ch__loop_notify_locked(loop);
        }
    }
    uv_mutex_unlock(&loop->lock);
    if (direct)
        ch__loop_run_direct(loop);
    return rc;
}

/* Append a command; fails once the loop has ended. */
int ch__loop_submit(ch_loop_t *loop, const ch__cmd_t *cmd)
{
    return ch__loop_submit_many(loop, cmd, 1, 0);
}

void ch_loop_wake(ch_loop_t *loop, uint64_t token)
{
    ch_event_t ev;
    ch__event_init(&ev, CH_EV_WAKE, NULL, token, 0);
    uv_mutex_lock(&loop->lock);
    ch__loop_events_begin(loop);
    ch__vec_compact(&loop->events, sizeof(ev));
    if (ch__vec_push(&loop->events, &ev, sizeof(ev)) == CH_SUCCESS) {
        loop->urgent = 1;
        ch__loop_notify_locked(loop);
    }
    uv_mutex_unlock(&loop->lock);
}

void ch_loop_kick(ch_loop_t *loop)
{
    uv_mutex_lock(&loop->lock);
    loop->kicked = 1;
    ch__loop_notify_locked(loop);
    uv_mutex_unlock(&loop->lock);
}

uint64_t ch_loop_batch_seq(ch_loop_t *loop)
{
    uv_mutex_lock(&loop->lock);
    uint64_t seq = loop->batch_seq;
    uv_mutex_unlock(&loop->lock);
    return seq;
}

/* Wait on cond until woken or deadline (0 = none); 1 if the deadline passed. */
static int ch__loop_wait(uv_cond_t *cond, uv_mutex_t *lock, uint64_t deadline)
{
    if (!deadline) {
        uv_cond_wait(cond, lock);
        return 0;
    }
    uint64_t now = uv_hrtime();
    if (now >= deadline)
        return 1;
    uv_cond_timedwait(cond, lock, deadline - now);
    return 0;
}

static uint64_t ch__deadline(double timeout)
{
    return timeout >= 0 ? uv_hrtime() + (uint64_t)(timeout * 1e9) + 1 : 0;
}

/* Copy up to max pending events to out (lock held). */
static int ch__loop_take(ch_loop_t *loop, ch_event_t *out, int max)
{
    size_t avail = loop->events.len - loop->events.head;
    size_t n = avail < (size_t)max ? avail : (size_t)max;
    memcpy(out, (ch_event_t *)loop->events.items + loop->events.head, n * sizeof(ch_event_t));
    loop->events.head += n;
    if (loop->events.head == loop->events.len) {
        loop->events.head = loop->events.len = 0;
        loop->urgent = 0;
        ch__vec_shrink(&loop->events);
    } else {
        loop->events_since = uv_hrtime();
    }
    return (int)n;
}

/* Copy the payloads of small RECV events into arena (see ch_arena_t). The
 * messages belong to the caller now; the lock is not needed. */
static void ch__loop_fill_arena(ch_event_t *out, int n, ch_arena_t *arena)
{
    if (!arena)
        return; /* arena->len was set to 0 when the drive began */
    for (int i = 0; i < n; i++) {
        ch_event_t *ev = &out[i];
        size_t hl = ev->header_len, dl = ev->data_len, len = hl + dl;
        if (ev->type != CH_EV_RECV || len == 0 || len > CH_ARENA_MSG_MAX ||
            arena->cap - arena->len < len)
            continue;
        char *p = arena->buf + arena->len;
        if (hl)
            memcpy(p, ev->header, hl);
        if (dl)
            memcpy(p + hl, ev->data, dl);
        ev->header = (const uint8_t *)p;
        ev->data = (const uint8_t *)p + hl;
        arena->len += len;
    }
}

/* An application thread leaves ch_loop_drive without the token: the
 * background thread, which let it go first, looks again (lock held). */
static void ch__loop_app_leaves_locked(ch_loop_t *loop)
{
    if (!loop->owned && loop->bg_waiting && !ch__loop_embedding(loop))
        uv_cond_signal(&loop->cond_bg);
}

/* The background thread may take the loop now (lock held, no owner). */
static int ch__loop_bg_may_take(ch_loop_t *loop, uint64_t now, int timed_out)
{
    if (loop->app_waiting)
        return 0; /* application threads first: they wait for something */
    if (ch__loop_embedding(loop))
        return 0; /* the embedding loop drives (see ch__loop_watch_locked) */
    return timed_out || loop->kicked || loop->stop_requested || loop->needs_run ||
           loop->cmds.len != loop->cmds.head || (ch__loop_pending(loop) && loop->urgent) ||
           now - loop->released_at >= CH__GRACE_NS;
}

/* The background thread of an embedded loop, every CH__WATCH_NS (lock
 * held): 1 if work was pending at this watch and at the one before, and
 * nobody gave the token up in between (so nobody drove the loop for a whole
 * watch period): the embedding loop does not attend to it (blocked, stopped
 * or closed). Work: events, commands, a kick, a libuv timer due, or I/O (the
 * backend fd is readable). A loop that is owned now is attended to. */
static int ch__loop_watch_locked(ch_loop_t *loop, uint64_t now)
{
    int work = 0;
    if (!loop->owned) {
        work = ch__loop_pending(loop) || loop->cmds.len != loop->cmds.head || loop->kicked ||
               loop->next_due <= now / 1000000u;
        if (!work) {
            struct pollfd p = {.fd = uv_backend_fd(&loop->uv), .events = POLLIN};
            work = poll(&p, 1, 0) > 0;
        }
    }
    int lapsed = work && loop->watch_work && loop->watch_seq == loop->batch_seq;
    loop->watch_work = work;
    loop->watch_seq = loop->batch_seq;
    loop->watch_at = now + CH__WATCH_NS;
    return lapsed;
}

/* Owner: one loop iteration, blocking for I/O at most wait_ns (< 0: no
 * bound), then publish what it produced. */
static void ch__loop_run_once(ch_loop_t *loop, int64_t wait_ns)
{
    int alive;
    if (wait_ns == 0) {
        alive = uv_run(&loop->uv, UV_RUN_NOWAIT);
    } else {
        if (wait_ns > 0) {
            uv_update_time(&loop->uv); /* the timer counts from now, not the last run */
            uv_timer_start(&loop->drive_timer, ch__loop_noop_cb,
                           (uint64_t)((wait_ns + 999999) / 1000000), 0);
        }
        alive = uv_run(&loop->uv, UV_RUN_ONCE);
        if (wait_ns > 0)
            uv_timer_stop(&loop->drive_timer);
    }
    if (!alive && loop->closing)
        loop->closed = 1;
    ch__loop_flush(loop);
}

/* CH_DRIVE_NOWAIT: the embedding event loop's drive (see ch_loop_embed). */
static int ch__loop_drive_nowait(ch_loop_t *loop, ch_event_t *out, int max, uint64_t *seq,
                                 ch_arena_t *arena)
{
    uv_mutex_lock(&loop->lock);
    *seq = loop->batch_seq;
    if (loop->ended && !ch__loop_pending(loop)) {
        uv_mutex_unlock(&loop->lock);
        return -CH_SHUTDOWN;
    }
    if (loop->owned) {
        if (loop->owner_bg && loop->embed_lapsed) {
            /* The embedding loop is back: the background thread, which drove
             * while it lapsed, gives the token up (woken from the I/O poll). */
            loop->embed_lapsed = 0;
            ch__loop_notify_locked(loop);
        }
        uv_mutex_unlock(&loop->lock);
        return CH_DRIVE_AGAIN;
    }
    loop->embed_lapsed = 0;
    loop->owned = 1;
    loop->owner_bg = 0;
    loop->owner_thread = uv_thread_self();
    loop->owner_nowait = 1;
    loop->kicked = 0; /* the caller looks at its timers after every drive */
    loop->embed_thread = uv_thread_self();
    loop->embed_thread_set = 1;
    /* Events pending (left by a send of this thread, say): hand them out
     * without the I/O poll; pending I/O keeps the backend fd readable, so the
     * embedding loop comes back for it. */
    if (!loop->ended && !ch__loop_pending(loop)) {
        uv_mutex_unlock(&loop->lock);
        ch__loop_run_once(loop, 0);
        uv_mutex_lock(&loop->lock);
        if (loop->closed && !loop->ended) {
            loop->ended = 1;
            uv_cond_broadcast(&loop->cond_bg);
            uv_cond_broadcast(&loop->cond_app);
        }
    }
    int n = ch__loop_pending(loop) ? ch__loop_take(loop, out, max) : 0;
    uv_mutex_unlock(&loop->lock);
    ch__loop_fill_arena(out, n, arena);
    return n; /* the owner */
}

int ch_loop_drive(ch_loop_t *loop, ch_event_t *out, int max, double timeout, uint64_t *seq,
                  int flags, ch_arena_t *arena)
{
    if (arena)
        arena->len = 0;
    if (flags & CH_DRIVE_NOWAIT)
        return ch__loop_drive_nowait(loop, out, max, seq, arena);
    int bg = (flags & CH_DRIVE_BACKGROUND) != 0;
    int takes = (flags & CH_DRIVE_NO_EVENTS) == 0;
    int any = (flags & CH_DRIVE_MESSAGES) == 0;
    uint64_t deadline = ch__deadline(timeout);
    int timed_out = 0;
    uv_mutex_lock(&loop->lock);
    if ((flags & CH_DRIVE_HOLD) && !bg && loop->owned && !loop->owner_bg &&
        !loop->owner_nowait) {
        uv_thread_t self = uv_thread_self();
        if (uv_thread_equal(&self, &loop->owner_thread))
            goto run; /* still the owner: *seq stays as it is */
    }
take:
    /* 1. The ownership token. */
    for (;;) {
        uint64_t now = uv_hrtime();
        if (loop->ended && !(takes && ch__loop_pending(loop))) {
            *seq = loop->batch_seq;
            uv_mutex_unlock(&loop->lock);
            return -CH_SHUTDOWN;
        }
        if (!bg && loop->batch_seq != *seq) {
            *seq = loop->batch_seq; /* a batch ended: the caller re-checks */
            ch__loop_app_leaves_locked(loop);
            uv_mutex_unlock(&loop->lock);
            return CH_DRIVE_AGAIN;
        }
        if (deadline && now >= deadline)
            timed_out = 1;
        if (!loop->owned && (!bg || ch__loop_bg_may_take(loop, now, timed_out)))
            break;
        if (!bg && timed_out) {
            ch__loop_app_leaves_locked(loop);
            uv_mutex_unlock(&loop->lock);
            return CH_DRIVE_AGAIN;
        }
        if (bg && ch__loop_embedding(loop)) {
            /* Embedded: watch that the embedding loop attends to the loop,
             * never blocking in the I/O poll; drive only once it lapsed. */
            if (now >= loop->watch_at && ch__loop_watch_locked(loop, now)) {
                loop->embed_lapsed = 1;
                continue;
            }
            if (timed_out) {
                uv_mutex_unlock(&loop->lock);
                return CH_DRIVE_AGAIN;
            }
            uint64_t until = loop->watch_at;
            if (deadline && deadline < until)
                until = deadline;
            loop->bg_waiting = CH__BG_TIMED;
            ch__loop_wait(&loop->cond_bg, &loop->lock, until);
            loop->bg_waiting = 0;
        } else if (bg) {
            /* Without an owner: until the grace after the last application
             * owner left (or the caller's deadline). With one: until it
             * leaves (it runs the timers meanwhile). */
            uint64_t until = 0;
            if (!loop->owned) {
                /* An application waiter may leave without taking the loop. */
                until = loop->app_waiting ? now + CH__GRACE_NS : loop->released_at + CH__GRACE_NS;
                if (deadline && !timed_out && deadline < until)
                    until = deadline;
            } else if (loop->batch_seq != loop->bg_seen_seq) {
                /* Application threads pass the token around: look again
                 * later, unwoken by their releases (see CH__PINGPONG_NS). */
                until = now + CH__PINGPONG_NS;
            }
            loop->bg_seen_seq = loop->batch_seq;
            loop->bg_waiting = until ? CH__BG_TIMED : CH__BG_UNTIMED;
            ch__loop_wait(&loop->cond_bg, &loop->lock, until);
            loop->bg_waiting = 0;
        } else {
            /* The background thread asleep in the I/O poll gives the loop up;
             * awake, it sees the nudge before it would block. */
            if (loop->owner_bg && loop->sleeping) {
                loop->sleeping = 0;
                uv_async_send(&loop->wake);
            } else if (loop->owner_bg) {
                loop->nudged = 1;
            }
            loop->app_waiting++;
            ch__loop_wait(&loop->cond_app, &loop->lock, deadline);
            loop->app_waiting--;
        }
    }
    loop->owned = 1;
    loop->owner_bg = bg;
    loop->owner_thread = uv_thread_self();
    *seq = loop->batch_seq;
run:
    /* 2. Run the loop until there are events for the caller. */
    for (;;) {
        if (bg && ch__loop_embedding(loop)) {
            /* The embedding loop drives (again): give the token up, handing
             * nothing out (events are the embedding loop's to handle). */
            uv_mutex_unlock(&loop->lock);
            int needs_run = ch__loop_needs_run(loop);
            uint64_t due = ch__loop_due(loop);
            uv_mutex_lock(&loop->lock);
            ch__loop_release_locked(loop, needs_run, due);
            goto take;
        }
        uint64_t now = uv_hrtime();
        int pending = takes && ch__loop_pending(loop);
        uint64_t lazy_due = loop->events_since + CH_LAZY_MS * 1000000ull;
        if (pending && (any || loop->urgent || now >= lazy_due || loop->ended)) {
            int n = ch__loop_take(loop, out, max);
            uv_mutex_unlock(&loop->lock);
            ch__loop_fill_arena(out, n, arena);
            return n; /* still the owner */
        }
        if (loop->ended) {
            ch__loop_release_locked(loop, 0, UINT64_MAX);
            uv_mutex_unlock(&loop->lock);
            return -CH_SHUTDOWN;
        }
        if (loop->kicked || (deadline && now >= deadline)) {
            loop->kicked = 0;
            uv_mutex_unlock(&loop->lock);
            return 0; /* still the owner: the caller runs its timers */
        }
        if (bg && loop->app_waiting) {
            /* An application thread wants the loop: give it up. */
            uv_mutex_unlock(&loop->lock);
            int needs_run = ch__loop_needs_run(loop);
            uint64_t due = ch__loop_due(loop);
            uv_mutex_lock(&loop->lock);
            ch__loop_release_locked(loop, needs_run, due);
            goto take;
        }
        int64_t wait_ns = deadline ? (int64_t)(deadline - now) : -1;
        if (pending && (wait_ns < 0 || (int64_t)(lazy_due - now) < wait_ns))
            wait_ns = (int64_t)(lazy_due - now);
        loop->nudged = 0; /* looked at everything above, under this lock hold */
        uv_mutex_unlock(&loop->lock);
        ch__loop_run_once(loop, wait_ns);
        uv_mutex_lock(&loop->lock);
        if (loop->closed && !loop->ended) {
            loop->ended = 1;
            uv_cond_broadcast(&loop->cond_bg);
            uv_cond_broadcast(&loop->cond_app);
        }
    }
}

void ch_loop_release(ch_loop_t *loop)
{
    uv_mutex_lock(&loop->lock);
    int cmds = loop->cmds.len != loop->cmds.head && !loop->ended;
    uv_mutex_unlock(&loop->lock);
    if (cmds) {
        ch__loop_run_direct(loop); /* what the batch's handling submitted, written now */
        return;
    }
    int needs_run = !loop->ended && ch__loop_needs_run(loop);
    uint64_t due = loop->ended ? UINT64_MAX : ch__loop_due(loop);
    uv_mutex_lock(&loop->lock);
    ch__loop_release_locked(loop, needs_run, due);
    uv_mutex_unlock(&loop->lock);
}

int ch_loop_release_if_owner(ch_loop_t *loop)
{
    uv_thread_t self = uv_thread_self();
    uv_mutex_lock(&loop->lock);
    int mine = loop->owned && uv_thread_equal(&self, &loop->owner_thread);
    uv_mutex_unlock(&loop->lock);
    if (mine)
        ch_loop_release(loop);
    return mine;
}

void ch_loop_embed(ch_loop_t *loop, int on)
{
    uv_mutex_lock(&loop->lock);
    on = on && !loop->stop_requested && !loop->ended;
    loop->embedded = on;
    loop->embed_lapsed = 0;
    loop->watch_work = 0;
    loop->watch_seq = loop->batch_seq;
    loop->watch_at = uv_hrtime() + CH__WATCH_NS;
    loop->embed_due = UINT64_MAX;
    if (on) {
        loop->embed_thread_set = 0; /* (as yet unknown) */
        if (!loop->owned)
            ch__loop_wake_embedder_locked(loop); /* it looks at once */
        else if (loop->owner_bg)
            ch__loop_notify_locked(loop); /* the background thread gives the token up */
    } else if (loop->bg_waiting) {
        uv_cond_signal(&loop->cond_bg);
    }
    uv_mutex_unlock(&loop->lock);
}

int ch_loop_backend_fd(ch_loop_t *loop) { return uv_backend_fd(&loop->uv); }

int ch_loop_backend_timeout(ch_loop_t *loop)
{
    int ms;
    uv_mutex_lock(&loop->lock);
    if (loop->ended) {
        ms = -1;
    } else if (ch__loop_pending(loop) || loop->cmds.len != loop->cmds.head || loop->kicked) {
        ms = 0;
    } else if (loop->next_due == UINT64_MAX) {
        ms = -1;
    } else {
        uint64_t now = ch__now_ms();
        uint64_t left = loop->next_due > now ? loop->next_due - now : 0;
        ms = left > INT_MAX ? INT_MAX : (int)left;
    }
    loop->embed_due = loop->next_due;
    uv_mutex_unlock(&loop->lock);
    return ms;
}

int ch_loop_poll(ch_loop_t *loop, ch_event_t *out, int max, double timeout, ch_arena_t *arena)
{
    uint64_t seq = ch_loop_batch_seq(loop);
    uint64_t deadline = ch__deadline(timeout);
    for (;;) {
        double left = -1;
        if (deadline) {
            uint64_t now = uv_hrtime();
            left = now >= deadline ? 0 : (double)(deadline - now) / 1e9;
        }
        int n = ch_loop_drive(loop, out, max, left, &seq, 0, arena);
        if (n >= 0) {
            ch_loop_release(loop);
            if (n > 0 || (deadline && uv_hrtime() >= deadline))
                return n;
        } else if (n == -CH_SHUTDOWN) {
            return -CH_SHUTDOWN;
        } else if (deadline && uv_hrtime() >= deadline) {
            return 0;
        }
    }
}

int ch_loop_run(ch_loop_t *loop)
{
    uint64_t seq = 0;
    while (ch_loop_drive(loop, NULL, 0, -1, &seq, CH_DRIVE_BACKGROUND | CH_DRIVE_NO_EVENTS, NULL) >=
           0)
        ch_loop_release(loop);
    return CH_SUCCESS;
}
