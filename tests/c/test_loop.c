/*
 * test_loop.c: the core end to end without Python. A loop runs on its own
 * thread; this thread plays the dispatcher, polling events in batches. Two
 * nodes on loopback exchange messages in synchronous and asynchronous mode;
 * a send to a closed port fails with CANNOT_CONNECT; stopping nodes and the
 * loop ends with ch_loop_poll() answering -1 (the loop closed cleanly).
 */
#include "unit.h"
#include "events.h"

static void config(ch_config_t *cfg, uint16_t port, int sync)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->reuse_time = 30;
    cfg->timeout = unit_seconds(2);
    cfg->port = port;
    cfg->backlog = 100;
    cfg->synchronous = (uint8_t)sync;
    cfg->max_msg_size = 1 << 20;
    cfg->disable_encryption = 1;
}

static ch_node_t *start_node(uint16_t port, int sync, uint64_t tok)
{
    ch_config_t cfg;
    ch_node_t *node;
    config(&cfg, port, sync);
    CHECK_EQ(ch_node_new(loop, &cfg, tok, &node), CH_SUCCESS);
    ch_node_start(node, tok);
    ch_event_t ev;
    CHECK_EQ(wait_event(CH_EV_NODE_STARTED, tok, &ev), 0);
    CHECK_EQ(ev.status, CH_SUCCESS);
    return node;
}


static void test_exchange(int sync)
{
    uint16_t pa = (uint16_t)(31000 + (uv_hrtime() % 2000) * 2), pb = pa + 1;
    ch_node_t *a = start_node(pa, sync, 1);
    ch_node_t *b = start_node(pb, sync, 2);
    static const uint8_t lo[4] = {127, 0, 0, 1};
    static const uint8_t data[] = "hello";
    uint8_t id[16] = {1};
    delivered = 0;
    for (uint64_t i = 0; i < 50; i++) {
        id[1] = (uint8_t)i;
        CHECK_EQ(ch_node_send(a, 100 + i, (const char *)id, 4, (const char *)lo, pb, "h", 1,
                              (const char *)data, 5),
                 CH_SUCCESS);
    }
    for (uint64_t i = 0; i < 50; i++) {
        ch_event_t ev;
        CHECK_EQ(wait_event(CH_EV_SEND_DONE, 100 + i, &ev), 0);
        CHECK_EQ(ev.status, CH_SUCCESS);
    }
    /* Statistics: a's counters for b, b's totals. */
    ch_event_t sev;
    CHECK_EQ(ch_node_stats(a, 500), CH_SUCCESS);
    CHECK_EQ(wait_event(CH_EV_STATS, 500, &sev), 0);
    if (CHECK(sev.stats != NULL)) {
        CHECK_EQ(sev.stats->totals.msgs_out, 50);
        CHECK_EQ(sev.stats->totals.bytes_out, 50 * 6);
        CHECK_EQ(sev.stats->nremotes, 1);
        CHECK_EQ(sev.stats->remotes[0].port, pb);
        CHECK(strcmp(sev.stats->remotes[0].address, "127.0.0.1") == 0);
        CHECK_EQ(sev.stats->remotes[0].counters.msgs_out, 50);
        CHECK_EQ(sev.stats->remotes[0].send_queue, 0);
        CHECK(sev.stats->connections >= 1);
        ch_stats_free(sev.stats);
    }
    CHECK_EQ(ch_node_stats(b, 501), CH_SUCCESS);
    CHECK_EQ(wait_event(CH_EV_STATS, 501, &sev), 0);
    if (CHECK(sev.stats != NULL)) {
        if (sync)
            CHECK_EQ(sev.stats->totals.msgs_in, 50);
        ch_stats_free(sev.stats);
    }
    /* A closed port: the send fails with CANNOT_CONNECT. */
    ch_event_t ev;
    CHECK_EQ(ch_node_send(a, 999, (const char *)id, 4, (const char *)lo, 1, NULL, 0, NULL, 0), CH_SUCCESS);
    CHECK_EQ(wait_event(CH_EV_SEND_DONE, 999, &ev), 0);
    CHECK_EQ(ev.status, CH_CANNOT_CONNECT);
    CHECK(strstr(ev.text, "cannot connect") != NULL);
    CHECK_EQ(stop_node(a, 3), 0);
    CHECK_EQ(stop_node(b, 4), 0);
    if (sync)
        CHECK_EQ(delivered, 50);
}

static void test_exchange_sync(void) { test_exchange(1); }
static void test_exchange_async(void) { test_exchange(0); }

int main(void)
{
    CHECK_EQ(ch_loop_new(&loop), CH_SUCCESS);
    uv_thread_create(&loop_thread, run_loop, loop);
    UNIT_RUN(test_exchange_sync);
    UNIT_RUN(test_exchange_async);
    ch_loop_stop(loop);
    ch_event_t ev;
    CHECK_EQ(wait_event(-1, 0, &ev), -1);
    uv_thread_join(&loop_thread);
    ch_loop_free(loop);
    return unit_summary();
}
