/*
 * test_poll.c: the hand-out of events to several pollers (loop.c).
 *
 * Events are made with ch_loop_wake() (no node needed). Checked: a batch is
 * handed to one poller at a time (the lease) and the next only after
 * ch_loop_poll_done(); an application poller is preferred over the
 * dispatcher; a stale batch sequence makes ch_loop_poll_app() return at once;
 * ch_loop_kick() makes the dispatcher's poll return 0; both polls answer -1
 * once the loop has ended and every event was handed out.
 */
#include <uv.h>

#include "chirp.h"
#include "unit.h"

static ch_loop_t *loop;

typedef struct poller_s {
    uv_thread_t thread;
    int app;       /* ch_loop_poll_app instead of ch_loop_poll */
    double timeout;
    int n;         /* what the poll returned */
    uint64_t token;
    uint64_t seq;
} poller_t;

static void poll_once(void *arg)
{
    poller_t *p = arg;
    ch_event_t evs[8];
    if (p->app) {
        p->seq = ch_loop_batch_seq(loop);
        p->n = ch_loop_poll_app(loop, evs, 8, p->timeout, &p->seq, 0, NULL);
    } else {
        p->n = ch_loop_poll(loop, evs, 8, p->timeout, NULL);
    }
    p->token = p->n > 0 ? evs[0].token : 0;
}

static void sleep_ms(unsigned ms) { uv_sleep(ms); }

static void test_lease_and_preference(void)
{
    ch_event_t evs[8];
    uint64_t seq = ch_loop_batch_seq(loop);
    /* Nothing there: an application poll times out without the lease. */
    CHECK_EQ(ch_loop_poll_app(loop, evs, 8, 0.01, &seq, 0, NULL), 0);

    ch_loop_wake(loop, 7);
    CHECK_EQ(ch_loop_poll_app(loop, evs, 8, unit_seconds(1.0), &seq, 0, NULL), 1);
    CHECK_EQ(evs[0].type, CH_EV_WAKE);
    CHECK_EQ(evs[0].token, 7u);

    /* While this thread holds the batch, nobody else gets the next one. */
    ch_loop_wake(loop, 8);
    poller_t other = {.app = 1, .timeout = 0.2};
    uv_thread_create(&other.thread, poll_once, &other);
    uv_thread_join(&other.thread);
    CHECK_EQ(other.n, 0);
    /* The batch ends; then the next one can be had. */
    ch_loop_poll_done(loop);
    seq = ch_loop_batch_seq(loop);
    CHECK_EQ(ch_loop_poll_app(loop, evs, 8, unit_seconds(1.0), &seq, 0, NULL), 1);
    CHECK_EQ(evs[0].token, 8u);
    ch_loop_poll_done(loop);

    /* An application poller waiting gets the events, not the dispatcher. */
    poller_t disp = {.app = 0, .timeout = unit_seconds(2.0)};
    poller_t app = {.app = 1, .timeout = unit_seconds(2.0)};
    uv_thread_create(&app.thread, poll_once, &app);
    sleep_ms((unsigned)(unit_seconds(0.05) * 1000)); /* let it wait first */
    uv_thread_create(&disp.thread, poll_once, &disp);
    sleep_ms((unsigned)(unit_seconds(0.05) * 1000));
    ch_loop_wake(loop, 9);
    uv_thread_join(&app.thread);
    CHECK_EQ(app.n, 1);
    CHECK_EQ(app.token, 9u);
    /* The dispatcher still waits (no events for it) until the batch ends
     * and more events come. */
    ch_loop_poll_done(loop);
    ch_loop_wake(loop, 10);
    uv_thread_join(&disp.thread);
    CHECK_EQ(disp.n, 1);
    CHECK_EQ(disp.token, 10u);
    /* The dispatcher's next poll ends its batch; a kick makes it return 0
     * (holding the lease, e.g. for its timers). */
    ch_loop_kick(loop);
    CHECK_EQ(ch_loop_poll(loop, evs, 8, unit_seconds(2.0), NULL), 0);
    /* ...which the next app poll cannot take before the dispatcher polls again. */
    ch_loop_wake(loop, 11);
    seq = ch_loop_batch_seq(loop);
    CHECK_EQ(ch_loop_poll_app(loop, evs, 8, 0.1, &seq, 0, NULL), 0);
    CHECK_EQ(ch_loop_poll(loop, evs, 8, unit_seconds(1.0), NULL), 1); /* ends the lease, takes 11 */
    CHECK_EQ(evs[0].token, 11u);
}

static void test_stale_sequence_returns_at_once(void)
{
    ch_event_t evs[8];
    /* The dispatcher (this thread) still holds its batch from the last test. */
    uint64_t seq = ch_loop_batch_seq(loop);
    CHECK_EQ(ch_loop_poll(loop, evs, 8, 0.01, NULL), 0); /* ends it; returns 0 with the lease */
    uint64_t start = uv_hrtime();
    /* A batch ended after seq was read: the app poll returns 0 without waiting. */
    CHECK_EQ(ch_loop_poll_app(loop, evs, 8, 5.0, &seq, 0, NULL), 0);
    CHECK(uv_hrtime() - start < 4000000000ULL);
    CHECK_EQ(seq, ch_loop_batch_seq(loop));
    CHECK_EQ(ch_loop_poll(loop, evs, 8, 0.01, NULL), 0); /* end the lease taken above */
}

static void run_loop(void *arg) { ch_loop_run(arg); }

static void test_end(void)
{
    ch_event_t evs[8];
    uv_thread_t t;
    uv_thread_create(&t, run_loop, loop);
    ch_loop_wake(loop, 12);
    ch_loop_stop(loop);
    uv_thread_join(&t);
    /* Ended, one event left: it is still handed out, then -CH_SHUTDOWN for everyone. */
    CHECK_EQ(ch_loop_poll(loop, evs, 8, unit_seconds(1.0), NULL), 1);
    CHECK_EQ(evs[0].token, 12u);
    CHECK_EQ(ch_loop_poll(loop, evs, 8, unit_seconds(1.0), NULL), -CH_SHUTDOWN);
    uint64_t seq = ch_loop_batch_seq(loop);
    CHECK_EQ(ch_loop_poll_app(loop, evs, 8, unit_seconds(1.0), &seq, 0, NULL), -CH_SHUTDOWN);
}

int main(void)
{
    if (ch_loop_new(&loop) != CH_SUCCESS)
        return 1;
    UNIT_RUN(test_lease_and_preference);
    UNIT_RUN(test_stale_sequence_returns_at_once);
    UNIT_RUN(test_end);
    ch_loop_free(loop);
    return unit_summary();
}
