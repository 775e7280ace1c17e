/*
 * test_tls_conn.c: TLS through real connections of the core.
 *
 * The program moves itself into a fresh network namespace (unshare, needs
 * root as on CI) and gives its loopback interface the extra address
 * 10.211.0.1, which exists only there and disappears with the process. A
 * node dialing 10.211.0.1 sees a non-loopback peer and so does the acceptor
 * (Linux uses the destination as source address), so both sides encrypt
 * (docs/tls.md#when-a-connection-is-encrypted). Certificates are made with the openssl tool in a
 * temporary directory. Checked: messages both ways in synchronous mode, a
 * 1 MiB message, a node with a foreign-CA chain never gets a message through
 * (its send fails with TLS_ERROR or PROTOCOL_ERROR and nothing is delivered),
 * a plaintext node (DISABLE_ENCRYPTION) is refused too, and start-up fails
 * with VALUE_ERROR naming the file for a chain without a private key.
 */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "chirp.h"
#include "unit.h"
#include "events.h"

static char dir[256];

static char *path(const char *name)
{
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof(buf[k]), "%s/%s", dir, name);
    return buf[k];
}

static int start(ch_node_t **node, uint16_t port, const char *chain, int plain, uint64_t tok,
                 ch_event_t *ev)
{
    ch_config_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.reuse_time = 30;
    cfg.timeout = unit_seconds(2);
    cfg.port = port;
    cfg.backlog = 100;
    cfg.synchronous = 1;
    cfg.max_msg_size = 4 << 20;
    cfg.cert_chain_pem = path(chain);
    cfg.dh_params_pem = path("dh.pem");
    cfg.disable_encryption = (uint8_t)plain;
    ch_node_new(loop, &cfg, tok, node);
    ch_node_start(*node, tok);
    if (wait_event(CH_EV_NODE_STARTED, tok, ev) != 0)
        return -1;
    return ev->status;
}

static void stop(ch_node_t *node, uint64_t tok) { CHECK_EQ(stop_node(node, tok), 0); }

static const uint8_t addr[4] = {10, 211, 0, 1};

static int send_wait(ch_node_t *from, uint16_t port, const uint8_t *data, uint32_t len,
                     uint64_t tok, ch_event_t *ev)
{
    uint8_t id[16];
    memset(id, (int)tok, sizeof(id));
    if (ch_node_send(from, tok, (const char *)id, 4, (const char *)addr, port, "hd", 2,
                     (const char *)data, len) != 0)
        return -1;
    if (wait_event(CH_EV_SEND_DONE, tok, ev) != 0)
        return -1;
    return ev->status;
}

static void test_tls_exchange(void)
{
    ch_node_t *a, *b;
    ch_event_t ev;
    CHECK_EQ(start(&a, 24101, "node.pem", 0, 1, &ev), CH_SUCCESS);
    CHECK_EQ(start(&b, 24102, "node2.pem", 0, 2, &ev), CH_SUCCESS);
    delivered = 0;
    for (uint64_t i = 0; i < 20; i++)
        CHECK_EQ(send_wait(a, 24102, (const uint8_t *)"hello", 5, 100 + i, &ev), CH_SUCCESS);
    CHECK_EQ(send_wait(b, 24101, (const uint8_t *)"back", 4, 200, &ev), CH_SUCCESS);
    size_t big = 1 << 20;
    uint8_t *data = malloc(big);
    for (size_t i = 0; i < big; i++)
        data[i] = (uint8_t)(i * 7);
    CHECK_EQ(send_wait(a, 24102, data, (uint32_t)big, 300, &ev), CH_SUCCESS);
    free(data);
    CHECK_EQ(delivered, 22);
    stop(a, 3);
    stop(b, 4);
}

static void test_foreign_and_plain_refused(void)
{
    ch_node_t *a, *f, *p;
    ch_event_t ev;
    CHECK_EQ(start(&a, 24111, "node.pem", 0, 1, &ev), CH_SUCCESS);
    CHECK_EQ(start(&f, 24112, "foreign.pem", 0, 2, &ev), CH_SUCCESS);
    CHECK_EQ(start(&p, 24113, "node2.pem", 1, 5, &ev), CH_SUCCESS);
    delivered = 0;
    int rc = send_wait(f, 24111, (const uint8_t *)"x", 1, 10, &ev);
    CHECK(rc == CH_TLS_ERROR || rc == CH_PROTOCOL_ERROR);
    if (getenv("CH_TEST_VERBOSE"))
        fprintf(stderr, "foreign -> ours: %d %s\n", rc, ev.text);
    rc = send_wait(a, 24112, (const uint8_t *)"x", 1, 11, &ev);
    CHECK(rc == CH_TLS_ERROR || rc == CH_PROTOCOL_ERROR);
    CHECK(strlen(ev.text) > 0);
    rc = send_wait(p, 24111, (const uint8_t *)"x", 1, 12, &ev);
    CHECK(rc != CH_SUCCESS);
    rc = send_wait(a, 24113, (const uint8_t *)"x", 1, 13, &ev);
    CHECK(rc != CH_SUCCESS);
    CHECK_EQ(delivered, 0);
    stop(a, 3);
    stop(f, 4);
    stop(p, 6);
}

static void test_bad_chain(void)
{
    ch_node_t *n;
    ch_event_t ev;
    CHECK_EQ(start(&n, 24121, "nokey.pem", 0, 1, &ev), CH_VALUE_ERROR);
    CHECK(strstr(ev.text, "nokey.pem") != NULL);
    stop(n, 2);
}

static const char GEN[] =
    "set -e; cd %s\n"
    "q() { \"$@\" >/dev/null 2>&1 || { echo \"failed: $*\" >&2; exit 1; }; }\n"
    "ca() { q openssl req -x509 -newkey rsa:2048 -nodes -keyout $1.key -out $1.crt -days 3 "
    "-subj /CN=$1 -addext basicConstraints=critical,CA:TRUE; }\n"
    "node() { q openssl req -newkey rsa:2048 -nodes -keyout $1.key -out $1.csr -subj /CN=$1\n"
    "  q openssl x509 -req -in $1.csr -CA $2.crt -CAkey $2.key -CAcreateserial -out $1.crt "
    "-days 3; }\n"
    "ca ca; ca fca; node a ca; node b ca; node f fca\n"
    "cat a.key a.crt ca.crt > node.pem; cat b.key b.crt ca.crt > node2.pem\n"
    "cat f.key f.crt fca.crt > foreign.pem; cat a.crt ca.crt > nokey.pem\n"
    "q openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048 -out dh.pem\n";

int main(void)
{
    if (unshare(CLONE_NEWNET) != 0) {
        fprintf(stderr, "test_tls_conn: cannot create a network namespace (needs root): %m\n");
        return 1;
    }
    if (system("ip link set lo up && ip addr add 10.211.0.1/32 dev lo") != 0) {
        fprintf(stderr, "test_tls_conn: cannot configure the namespace's loopback\n");
        return 1;
    }
    snprintf(dir, sizeof(dir), "/tmp/chirp-tls-XXXXXX");
    if (!mkdtemp(dir))
        return 1;
    char cmd[2048];
    snprintf(cmd, sizeof(cmd), GEN, dir);
    if (system(cmd) != 0) {
        fprintf(stderr, "test_tls_conn: cannot make certificates with openssl\n");
        return 1;
    }
    CHECK_EQ(ch_loop_new(&loop), CH_SUCCESS);
    uv_thread_create(&loop_thread, run_loop, loop);
    UNIT_RUN(test_tls_exchange);
    UNIT_RUN(test_foreign_and_plain_refused);
    UNIT_RUN(test_bad_chain);
    ch_loop_stop(loop);
    ch_event_t ev;
    CHECK_EQ(wait_event(-1, 0, &ev), -1);
    uv_thread_join(&loop_thread);
    ch_loop_free(loop);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "cannot remove %s\n", dir);
    return unit_summary();
}
