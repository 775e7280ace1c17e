/*
 * events.h: the dispatcher's side for C tests that run a whole loop. The test
 * thread polls events in batches like the Python dispatcher does; events it
 * has not asked for yet wait in a backlog. Received messages are counted in
 * `delivered` and released at once (token 1000). Include after unit.h.
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

static void run_loop(void *arg) { ch_loop_run(arg); }

/* Wait for an event of this type (and token, if nonzero). Returns 0, -1 once
 * the loop ended, -2 after unit_seconds(20). CH_TEST_VERBOSE=1 prints every event. */
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
        ch_event_t evs[64];
        int n = ch_loop_poll(loop, evs, 64, 0.2);
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
                ch_node_release(evs[i].node, evs[i].msg, 1000);
            } else if (evs[i].type != CH_EV_LOG && nbacklog < 4096) {
                backlog[nbacklog++] = evs[i];
            }
        }
    }
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
