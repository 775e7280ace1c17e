/*
 * test_poll.c: the loop's ownership token (loop.c), without nodes.
 *
 * Events are made with ch_loop_wake(). Checked: a thread that drives holds
 * the token until it gives it up, and nobody else drives or gets events
 * meanwhile; a stale batch sequence makes ch_loop_drive() return
 * CH_DRIVE_AGAIN at once; ch_loop_kick() makes the owner's drive return 0;
 * the background thread (ch_loop_run) gives the loop up to an application
 * thread that wants it, also from its I/O poll; ch_loop_stop() works from any
 * thread; drives answer -CH_SHUTDOWN once the loop has ended and every
 * event was handed out.
 */
#include <uv.h>

#include "chirp.h"
#include "unit.h"

static ch_loop_t *loop;

typedef struct poller_s {
    uv_thread_t thread;
    double timeout;
    int n; /* what the drive returned */
    uint64_t token;
} poller_t;

static void drive_once(void *arg)
{
    poller_t *p = arg;
    ch_event_t evs[8];
    uint64_t seq = ch_loop_batch_seq(loop);
    p->n = ch_loop_drive(loop, evs, 8, p->timeout, &seq, 0, NULL);
    p->token = p->n > 0 ? evs[0].token : 0;
    if (p->n >= 0)
        ch_loop_release(loop);
}

static void test_token(void)
{
    ch_event_t evs[8];
    uint64_t seq = ch_loop_batch_seq(loop);
    /* Nothing there: the drive times out holding the token. */
    CHECK_EQ(ch_loop_drive(loop, evs, 8, 0.01, &seq, 0, NULL), 0);
    ch_loop_release(loop);

    ch_loop_wake(loop, 7);
    seq = ch_loop_batch_seq(loop);
    CHECK_EQ(ch_loop_drive(loop, evs, 8, unit_seconds(1.0), &seq, 0, NULL), 1);
    CHECK_EQ(evs[0].type, CH_EV_WAKE);
    CHECK_EQ(evs[0].token, 7u);

    /* While this thread holds the token, nobody else gets the next event. */
    ch_loop_wake(loop, 8);
    poller_t other = {.timeout = 0.2};
    uv_thread_create(&other.thread, drive_once, &other);
    uv_thread_join(&other.thread);
    CHECK_EQ(other.n, CH_DRIVE_AGAIN);
    /* Given up; then the next one can be had. */
    ch_loop_release(loop);
    seq = ch_loop_batch_seq(loop);
    CHECK_EQ(ch_loop_drive(loop, evs, 8, unit_seconds(1.0), &seq, 0, NULL), 1);
    CHECK_EQ(evs[0].token, 8u);

    /* A waiter gets the token when the holder gives it up, and then its event. */
    poller_t app = {.timeout = unit_seconds(2.0)};
    uv_thread_create(&app.thread, drive_once, &app);
    uv_sleep((unsigned)(unit_seconds(0.05) * 1000)); /* let it wait first */
    ch_loop_wake(loop, 9);
    ch_loop_release(loop);
    uv_thread_join(&app.thread);
    /* It returned either at once (a batch ended: re-check) or with the event. */
    if (app.n == CH_DRIVE_AGAIN) {
        seq = ch_loop_batch_seq(loop);
        CHECK_EQ(ch_loop_drive(loop, evs, 8, unit_seconds(1.0), &seq, 0, NULL), 1);
        CHECK_EQ(evs[0].token, 9u);
        ch_loop_release(loop);
    } else {
        CHECK_EQ(app.n, 1);
        CHECK_EQ(app.token, 9u);
    }

    /* A kick makes the holder's drive return 0. */
    seq = ch_loop_batch_seq(loop);
    ch_loop_kick(loop);
    CHECK_EQ(ch_loop_drive(loop, evs, 8, unit_seconds(2.0), &seq, 0, NULL), 0);
    ch_loop_release(loop);
}

static void test_stale_sequence_returns_at_once(void)
{
    ch_event_t evs[8];
    uint64_t seq = ch_loop_batch_seq(loop);
    uint64_t seq2 = seq;
    CHECK_EQ(ch_loop_drive(loop, evs, 8, 0.01, &seq2, 0, NULL), 0);
    ch_loop_release(loop); /* a batch ended after seq was read */
    uint64_t start = uv_hrtime();
    CHECK_EQ(ch_loop_drive(loop, evs, 8, 5.0, &seq, 0, NULL), CH_DRIVE_AGAIN);
    CHECK(uv_hrtime() - start < 4000000000ULL);
    CHECK_EQ(seq, ch_loop_batch_seq(loop));
}

static void run_loop(void *arg) { ch_loop_run(arg); }

static void test_background(void)
{
    ch_event_t evs[8];
    uv_thread_t t;
    uv_thread_create(&t, run_loop, loop);
    uv_sleep((unsigned)(unit_seconds(0.05) * 1000)); /* it takes the loop and sleeps in it */
    /* An application thread gets the loop from it, and the event. */
    ch_loop_wake(loop, 10);
    CHECK_EQ(ch_loop_poll(loop, evs, 8, unit_seconds(2.0), NULL), 1);
    CHECK_EQ(evs[0].token, 10u);
    uv_sleep((unsigned)(unit_seconds(0.05) * 1000));
    /* Also when nothing is pending: the poll times out holding the loop. */
    uint64_t start = uv_hrtime();
    CHECK_EQ(ch_loop_poll(loop, evs, 8, 0.05, NULL), 0);
    CHECK(uv_hrtime() - start >= 40000000ULL);
    ch_loop_wake(loop, 12);
    ch_loop_stop(loop); /* from this thread; the background thread ends the loop */
    uv_thread_join(&t);
    /* Ended, one event left: it is still handed out, then -CH_SHUTDOWN for everyone. */
    CHECK_EQ(ch_loop_poll(loop, evs, 8, unit_seconds(1.0), NULL), 1);
    CHECK_EQ(evs[0].token, 12u);
    CHECK_EQ(ch_loop_poll(loop, evs, 8, unit_seconds(1.0), NULL), -CH_SHUTDOWN);
    uint64_t seq = ch_loop_batch_seq(loop);
    CHECK_EQ(ch_loop_drive(loop, evs, 8, unit_seconds(1.0), &seq, 0, NULL), -CH_SHUTDOWN);
}

int main(void)
{
    if (ch_loop_new(&loop) != CH_SUCCESS)
        return 1;
    UNIT_RUN(test_token);
    UNIT_RUN(test_stale_sequence_returns_at_once);
    UNIT_RUN(test_background);
    ch_loop_free(loop);
    return unit_summary();
}
