/*
 * cbench.c: the C core alone, no Python: our ceiling.
 *
 * Two processes on loopback (plaintext). The child runs an echo node that
 * sends every received message back to its sender (same identity) and
 * releases it once the echo was written. The parent runs the measuring node:
 *   roundtrip: keeps WINDOW messages in flight, each completes when its echo
 *              arrives; prints roundtrips/s.
 *   stream:    sends COUNT messages one way as fast as flow control allows
 *              (asynchronous mode), in batches (ch_node_send_batch, as the
 *              Python interface does; at most WINDOW unfinished); the receiver
 *              counts them, releases each poll's messages with one
 *              ch_node_release_batch, and answers with one final message;
 *              prints messages/s.
 * Usage: cbench roundtrip|stream [count] [window] [size] [sync]
 * Output: one line "cbench <shape> count=<n> window=<w> size=<b> mode=<m> rate=<r>/s".
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "chirp.h"

static const uint8_t lo[4] = {127, 0, 0, 1};
/* The stream's sends: batches of at most this many, tokens from STREAM_TOKEN. */
#define STREAM_BATCH 256
#define STREAM_TOKEN 1000

typedef struct bench_s {
    ch_loop_t *loop;
    uv_thread_t thread;
    ch_node_t *node;
} bench_t;

static void run_loop(void *arg) { ch_loop_run(arg); }

static void die(const char *what)
{
    fprintf(stderr, "cbench: %s\n", what);
    exit(2);
}

static void start(bench_t *b, uint16_t port, int sync)
{
    ch_config_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.reuse_time = 30;
    cfg.timeout = 10;
    cfg.port = port;
    cfg.backlog = 100;
    cfg.synchronous = (uint8_t)sync;
    cfg.max_slots = (uint8_t)(getenv("CBENCH_SLOTS") ? atoi(getenv("CBENCH_SLOTS")) : 0);
    cfg.max_msg_size = 1 << 26;
    cfg.disable_encryption = 1;
    if (ch_loop_new(&b->loop) != 0)
        die("loop");
    uv_thread_create(&b->thread, run_loop, b->loop);
    ch_node_new(b->loop, &cfg, 1, &b->node);
    ch_node_start(b->node, 1);
    ch_event_t ev;
    for (;;) {
        int n = ch_loop_poll(b->loop, &ev, 1, 5, NULL);
        if (n <= 0)
            die("no start answer");
        if (ev.type == CH_EV_NODE_STARTED) {
            if (ev.status != 0) {
                fprintf(stderr, "cbench: start failed: %s\n", ev.text);
                exit(2);
            }
            return;
        }
    }
}

/* Echo: send every message back; release it when the echo is written. */
static void echo_main(uint16_t port, uint16_t peer, int sync)
{
    bench_t b;
    start(&b, port, sync);
    static ch_event_t evs[512];
    static ch_message_t *done_msgs[512];
    uint64_t stream_count = 0;
    for (;;) {
        int n = ch_loop_poll(b.loop, evs, 512, -1, NULL);
        if (n < 0)
            break;
        int ndone = 0;
        for (int i = 0; i < n; i++) {
            ch_event_t *ev = &evs[i];
            if (ev->type == CH_EV_RECV) {
                ch_msg_info_t info;
                ch_msg_info(ev->msg, &info);
                if (info.header_len == 1 && info.header[0] == 'S') { /* stream: count only */
                    stream_count++;
                    done_msgs[ndone++] = ev->msg; /* released with the poll's batch */
                    continue;
                }
                if (info.header_len == 1 && info.header[0] == 'E') { /* end of stream */
                    uint8_t id[16] = {0};
                    static uint64_t reply;
                    reply = stream_count;
                    ch_node_send(b.node, 2, (const char *)id, 4, (const char *)lo, peer, "R", 1,
                                 (const char *)&reply, sizeof(reply));
                    stream_count = 0;
                    ch_node_release(b.node, ev->msg, 0);
                    continue;
                }
                ch_node_send(b.node, (uint64_t)(uintptr_t)ev->msg, (const char *)info.identity, 4,
                             (const char *)lo, peer, (const char *)info.header,
                             info.header_len, (const char *)info.data, info.data_len);
            } else if (ev->type == CH_EV_SEND_DONE && ev->token > 2) {
                ch_node_release(b.node, (ch_message_t *)(uintptr_t)ev->token, 0);
            }
        }
        if (ndone)
            ch_node_release_batch(b.node, done_msgs, ndone, 0);
    }
}

int main(int argc, char **argv)
{
    const char *shape = argc > 1 ? argv[1] : "roundtrip";
    long count = argc > 2 ? atol(argv[2]) : 200000;
    int window = argc > 3 ? atoi(argv[3]) : 64;
    size_t size = argc > 4 ? (size_t)atol(argv[4]) : 64;
    int sync = argc > 5 ? atoi(argv[5]) : 0;
    uint16_t pa = (uint16_t)(20000 + getpid() % 10000), pb = pa + 1;
    pid_t child = fork();
    if (child == 0) {
        echo_main(pb, pa, sync);
        _exit(0);
    }
    bench_t b;
    start(&b, pa, sync);
    uint8_t *data = calloc(1, size ? size : 1);
    static ch_event_t evs[512];
    uint8_t id[16] = {0};
    long sent = 0, done = 0;
    uint64_t t0 = 0, t1 = 0;
    usleep(200000); /* let the echo node start */
    if (strcmp(shape, "roundtrip") == 0) {
        /* A message completes when its echo (same identity) arrives. */
        t0 = uv_hrtime();
        while (done < count) {
            while (sent < count && sent - done < window) {
                memcpy(id, &sent, sizeof(sent));
                ch_node_send(b.node, 10, (const char *)id, 4, (const char *)lo, pb, "P", 1,
                             (const char *)data,
                             (uint32_t)size);
                sent++;
            }
            int n = ch_loop_poll(b.loop, evs, 512, 10, NULL);
            if (n <= 0)
                die("roundtrip stalled");
            for (int i = 0; i < n; i++) {
                if (evs[i].type == CH_EV_RECV) {
                    done++;
                    ch_node_release(b.node, evs[i].msg, 0);
                } else if (evs[i].type == CH_EV_SEND_DONE && evs[i].status != 0) {
                    fprintf(stderr, "cbench: send failed: %s\n", evs[i].text);
                    exit(2);
                }
            }
        }
        t1 = uv_hrtime();
    } else {
        long acked = 0;
        static ch_send_t recs[STREAM_BATCH];
        uint8_t *payload = malloc((size_t)STREAM_BATCH * (1 + size));
        if (!payload)
            die("memory");
        for (int j = 0; j < STREAM_BATCH; j++) {
            payload[(size_t)j * (1 + size)] = 'S';
            memset(payload + (size_t)j * (1 + size) + 1, 0, size);
        }
        t0 = uv_hrtime();
        int ended = 0;
        while (!ended) {
            /* Batches, as the Python interface sends: one call, one lock and at
             * most one wake-up per batch; consecutive tokens (STREAM_TOKEN + i),
             * so that the core reports their completions as counts. */
            while (sent < count && sent - acked < window) {
                long k = window - (sent - acked);
                if (k > STREAM_BATCH)
                    k = STREAM_BATCH;
                if (k > count - sent)
                    k = count - sent;
                for (long j = 0; j < k; j++) {
                    ch_send_t *r = &recs[j];
                    memset(r, 0, sizeof(*r));
                    r->token = STREAM_TOKEN + (uint64_t)(sent + j);
                    r->data_len = (uint32_t)size;
                    r->header_len = 1;
                    r->port = pb;
                    r->family = 4;
                    memcpy(r->addr, lo, 4);
                }
                if (ch_node_send_batch(b.node, (const char *)recs, (int)k, (const char *)payload,
                                       (size_t)k * (1 + size)) != 0)
                    die("send batch");
                sent += k;
            }
            if (sent == count && acked == count) {
                ch_node_send(b.node, 11, (const char *)id, 4, (const char *)lo, pb, "E", 1,
                             NULL, 0);
                acked++;
            }
            int n = ch_loop_poll(b.loop, evs, 512, 10, NULL);
            if (n <= 0)
                die("stream stalled");
            for (int i = 0; i < n; i++) {
                if (evs[i].type == CH_EV_SEND_DONE && evs[i].token >= STREAM_TOKEN) {
                    if (evs[i].status != 0)
                        die(evs[i].text);
                    acked += evs[i].count;
                } else if (evs[i].type == CH_EV_RECV) {
                    ch_msg_info_t info;
                    ch_msg_info(evs[i].msg, &info);
                    uint64_t got;
                    memcpy(&got, info.data, sizeof(got));
                    if ((long)got != count)
                        fprintf(stderr, "cbench: receiver counted %llu of %ld\n",
                                (unsigned long long)got, count);
                    ch_node_release(b.node, evs[i].msg, 0);
                    ended = 1;
                }
            }
        }
        t1 = uv_hrtime();
    }
    double secs = (double)(t1 - t0) / 1e9;
    printf("cbench %s count=%ld window=%d size=%zu mode=%s rate=%.0f/s\n", shape, count, window,
           size, sync ? "sync" : "async", (double)count / secs);
    kill(child, SIGTERM);
    waitpid(child, NULL, 0);
    return 0;
}
