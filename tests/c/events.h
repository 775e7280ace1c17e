/*
 * events.h: the dispatcher's side for C tests that run a whole loop. The test
 * thread polls events in batches like the Python dispatcher does; events it
 * has not asked for yet wait in a backlog. A SEND_DONE that covers several
 * sends (count > 1) answers a wait for any of their tokens, one at a time. Received messages are counted in
 * `delivered` and released at once (token 1000), or handed to `recv_hook` if a
 * test sets one (it then owns them; header and data may be copies in `arena`,
 * valid until the next poll). Include after unit.h.
 */
#ifndef CH_TEST_EVENTS_H
#define CH_TEST_EVENTS_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "chirp.h"

static ch_loop_t *loop;
static uv_thread_t loop_thread;
static ch_event_t backlog[4096];
static int nbacklog;
static int delivered;
static ch_node_t *stopping; /* stop_node() in progress: nothing may be submitted */
static ch_message_t *orphans[4096];
static int norphans;
static void (*recv_hook)(const ch_event_t *ev);
/* A small arena (ch_arena_t): some payloads of a batch are copied, some not. */
static char arena_buf[2048];
static ch_arena_t arena = {arena_buf, sizeof(arena_buf), 0};

static void run_loop(void *arg) { ch_loop_run(arg); }

static int poll_once(void);

/* Wait for an event of this type (and token, if nonzero). Returns 0, -1 once
 * the loop ended, -2 after unit_seconds(20). CH_TEST_VERBOSE=1 prints every event. */
static int wait_event(int type, uint64_t token, ch_event_t *out)
{
    uint64_t deadline = uv_hrtime() + (uint64_t)(unit_seconds(20) * 1e9);
    for (;;) {
        for (int i = 0; i < nbacklog; i++) {
            ch_event_t *b = &backlog[i];
            if (b->type == CH_EV_SEND_DONE && b->count > 1 && type == b->type && token &&
                token > b->token && token < b->token + b->count && nbacklog < 4096) {
                /* A coalesced SEND_DONE covering token: split off what is before it. */
                memmove(&backlog[i + 1], &backlog[i], (size_t)(nbacklog - i) * sizeof(*out));
                nbacklog++;
                backlog[i].count = (uint32_t)(token - b->token);
                backlog[i + 1].token = token;
                backlog[i + 1].count -= backlog[i].count;
                continue; /* backlog[i + 1] starts with token now */
            }
            if (b->type == type && (!token || b->token == token)) {
                *out = *b;
                if (b->type == CH_EV_SEND_DONE && b->count > 1) {
                    /* Hand out the first send of a coalesced event, keep the rest. */
                    out->count = 1;
                    b->token++;
                    b->count--;
                    return 0;
                }
                memmove(&backlog[i], &backlog[i + 1], (size_t)(nbacklog - i - 1) * sizeof(*out));
                nbacklog--;
                return 0;
            }
        }
        if (uv_hrtime() > deadline)
            return -2;
        if (poll_once() < 0)
            return -1;
    }
}

/* One ch_loop_poll() (up to 0.2 s); its events handled or put in the backlog. */
static int poll_once(void)
{
    ch_event_t evs[64];
    int n = ch_loop_poll(loop, evs, 64, 0.2, &arena);
    if (n < 0)
        return -1;
    for (int i = 0; i < n; i++) {
        if (getenv("CH_TEST_VERBOSE"))
            fprintf(stderr, "ev %d tok %llu st %d %s\n", evs[i].type,
                    (unsigned long long)evs[i].token, evs[i].status, evs[i].text);
        if (evs[i].type == CH_EV_RECV && evs[i].node == stopping) {
            if (norphans < 4096)
                orphans[norphans++] = evs[i].msg; /* freed after NODE_STOPPED */
        } else if (evs[i].type == CH_EV_RECV) {
            delivered++;
            if (recv_hook)
                recv_hook(&evs[i]);
            else
                ch_node_release(evs[i].node, evs[i].msg, 1000);
        } else if (evs[i].type != CH_EV_LOG && nbacklog < 4096) {
            backlog[nbacklog++] = evs[i];
        }
    }
    return n;
}

/* Stop a node the way the API asks: submit nothing after ch_node_stop(); free
 * messages that still arrived once NODE_STOPPED came, then the node. */
static int stop_node(ch_node_t *node, uint64_t tok)
{
    ch_event_t ev;
    stopping = node;
    ch_node_stop(node, tok);
    int rc = wait_event(CH_EV_NODE_STOPPED, tok, &ev);
    stopping = NULL;
    for (int i = 0; i < norphans; i++)
        ch_msg_free(orphans[i]);
    norphans = 0;
    if (rc == 0)
        ch_node_free(node);
    return rc;
}

#endif
