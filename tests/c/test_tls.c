/*
 * test_tls.c: unit tests for the TLS engine (csrc/tls.c), without sockets.
 *
 * Two engines, a client and a server, are pumped against each other in
 * memory: whatever one has in ch_tls_pending_out() is fed to the other, the
 * way a connection moves bytes between the engine and its socket. The tests
 * cover the handshake (TLS 1.3 by default, TLS 1.2 with the DHE suite when the
 * client is limited to it), plaintext in both directions up to 1 MiB, the
 * rejections docs/tls.md#what-is-negotiated requires (client without a certificate, peer of
 * a foreign CA, a plaintext peer) and the context's file errors.
 *
 * Test material: the directory named by the environment variable
 * CH_TLS_TESTDIR, or a fresh temporary directory removed at the end. Missing
 * files are generated with the openssl command line tool (a CA, a foreign CA,
 * three RSA 2048 nodes); the DH parameters are the RFC 7919 ffdhe2048 group.
 * Reusing a CH_TLS_TESTDIR saves the key generation on repeated runs (for
 * example under valgrind).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <openssl/ssl.h>

#include "error.h"
#include "tls.h"
#include "unit.h"

/* A call that must succeed (return 0); evaluates to the truth of that. */
#define CHECK_OK(expr) CHECK((expr) == 0)

static const char FFDHE2048_PEM[] =
    "-----BEGIN DH PARAMETERS-----\n"
    "MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz\n"
    "+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a\n"
    "87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7\n"
    "YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi\n"
    "7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD\n"
    "ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==\n"
    "-----END DH PARAMETERS-----\n";

/* Generates the material with the openssl tool; run by /bin/sh in the test
 * directory. Files: node.pem, node2.pem (same CA), foreign.pem (foreign CA),
 * intruder.pem (foreign chain that trusts our CA), nokey.pem, mismatch.pem,
 * encrypted.pem, ca.crt. */
static const char GEN_SCRIPT[] =
    "set -e\n"
    "q() { \"$@\" >/dev/null 2>&1 || { echo \"failed: $*\" >&2; exit 1; }; }\n"
    "ca() { q openssl req -x509 -newkey rsa:2048 -nodes -keyout $1.key -out $1.crt -days 30 "
    "-subj /CN=$1 -addext basicConstraints=critical,CA:TRUE; }\n"
    "node() { q openssl req -newkey rsa:2048 -nodes -keyout $1.key -out $1.csr -subj /CN=$1\n"
    "  q openssl x509 -req -in $1.csr -CA $2.crt -CAkey $2.key -CAcreateserial -out $1.crt "
    "-days 30\n"
    "  q openssl rsa -in $1.key -traditional -out $1.rsa; }\n"
    "ca ca; ca fca; node a ca; node b ca; node f fca\n"
    "q openssl rsa -in a.key -aes256 -passout pass:secret -out a.enc\n"
    "cat a.rsa a.crt ca.crt > node.pem\n"
    "cat b.rsa b.crt ca.crt > node2.pem\n"
    "cat f.rsa f.crt fca.crt > foreign.pem\n"
    "cat f.rsa f.crt fca.crt ca.crt > intruder.pem\n"
    "cat a.crt ca.crt > nokey.pem\n"
    "cat f.rsa a.crt ca.crt > mismatch.pem\n"
    "cat a.crt a.enc ca.crt > encrypted.pem\n";

static char dir[512];
static int own_dir; /* created here: remove at the end */

static const char *path(const char *name)
{
    static char buf[8][600];
    static int next;
    char *p = buf[next++ % 8];
    snprintf(p, sizeof(buf[0]), "%s/%s", dir, name);
    return p;
}

static int setup_material(void)
{
    const char *env = getenv("CH_TLS_TESTDIR");
    if (env != NULL && env[0] != '\0') {
        snprintf(dir, sizeof(dir), "%s", env);
        mkdir(dir, 0700);
    } else {
        snprintf(dir, sizeof(dir), "/tmp/ch_tls_test_XXXXXX");
        if (mkdtemp(dir) == NULL) {
            perror("mkdtemp");
            return -1;
        }
        own_dir = 1;
    }
    struct stat st;
    if (stat(path("encrypted.pem"), &st) != 0) {
        char cmd[1024];
        FILE *f = fopen(path("gen.sh"), "w");
        if (f == NULL || fputs(GEN_SCRIPT, f) < 0 || fclose(f) != 0) {
            perror("gen.sh");
            return -1;
        }
        snprintf(cmd, sizeof(cmd), "cd '%s' && sh gen.sh", dir);
        if (system(cmd) != 0) {
            fprintf(stderr, "cannot generate test material in %s (openssl tool?)\n", dir);
            return -1;
        }
    }
    FILE *f = fopen(path("dh.pem"), "w");
    if (f == NULL || fputs(FFDHE2048_PEM, f) < 0 || fclose(f) != 0) {
        perror("dh.pem");
        return -1;
    }
    return 0;
}

static void teardown_material(void)
{
    if (own_dir) {
        char cmd[600];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
        if (system(cmd) != 0)
            fprintf(stderr, "cannot remove %s\n", dir);
    }
}

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

static SSL_CTX *ctx_for(const char *chain_file)
{
    SSL_CTX *ctx = NULL;
    char err[256];
    int rc = ch_tls_ctx_new(path(chain_file), path("dh.pem"), &ctx, err, sizeof(err));
    if (rc != 0)
        fprintf(stderr, "ch_tls_ctx_new(%s): %d %s\n", chain_file, rc, err);
    CHECK_EQ(rc, 0);
    return ctx;
}

/* Move the pending ciphertext of from into to; step > 0 feeds it in pieces
 * of that size. Returns the number of bytes moved. */
static size_t pump_step(ch_tls_t *from, ch_tls_t *to, size_t step)
{
    uint8_t buf[4096];
    size_t n, moved = 0;
    size_t cap = step > 0 && step < sizeof(buf) ? step : sizeof(buf);
    while ((n = ch_tls_take_out(from, buf, cap)) > 0) {
        ch_tls_feed(to, buf, n);
        moved += n;
    }
    return moved;
}

static size_t pump(ch_tls_t *from, ch_tls_t *to) { return pump_step(from, to, 0); }

/* Drive both handshakes until neither moves; step as in pump_step. */
static void handshake_step(ch_tls_t *c, ch_tls_t *s, int *rc_c, int *rc_s, size_t step)
{
    *rc_c = *rc_s = CH_MORE;
    for (int i = 0; i < 10000; i++) {
        if (*rc_c == CH_MORE)
            *rc_c = ch_tls_handshake(c);
        size_t moved = pump_step(c, s, step);
        if (*rc_s == CH_MORE)
            *rc_s = ch_tls_handshake(s);
        moved += pump_step(s, c, step);
        if (moved == 0 && (*rc_c != CH_MORE || *rc_s != CH_MORE))
            break;
        if (moved == 0 && i > 0)
            break;
    }
}

static void handshake(ch_tls_t *c, ch_tls_t *s, int *rc_c, int *rc_s)
{
    handshake_step(c, s, rc_c, rc_s, 0);
}

typedef struct {
    ch_tls_t *c, *s;
} pair_t;

static int pair_new(pair_t *p, SSL_CTX *cctx, SSL_CTX *sctx)
{
    p->c = p->s = NULL;
    int ok = CHECK_OK(ch_tls_new(cctx, 0, &p->c)) & CHECK_OK(ch_tls_new(sctx, 1, &p->s));
    return ok;
}

static void pair_free(pair_t *p)
{
    ch_tls_free(p->c);
    ch_tls_free(p->s);
}

/* Send len bytes from a to b in ch_tls_write calls of at most chunk bytes,
 * pumping and reading as a connection would; returns 1 when b received
 * exactly the bytes sent. */
static int transfer(ch_tls_t *a, ch_tls_t *b, const uint8_t *data, size_t len, size_t chunk)
{
    uint8_t *got = malloc(len + 1);
    uint8_t rbuf[16384];
    size_t sent = 0, recvd = 0;
    int ok = 1, idle = 0;
    while (ok && recvd < len && idle < 3) {
        if (sent < len) {
            size_t n = len - sent < chunk ? len - sent : chunk, taken = 0;
            int rc = ch_tls_write(a, data + sent, n, &taken);
            if (rc != 0 || taken == 0) {
                fprintf(stderr, "write: %d taken %zu (%s)\n", rc, taken, ch_tls_error(a));
                ok = 0;
            }
            sent += taken;
        }
        idle = pump(a, b) == 0 ? idle + 1 : 0;
        for (;;) {
            size_t n = 0;
            int rc = ch_tls_read(b, rbuf, sizeof(rbuf), &n);
            if (rc == CH_MORE)
                break;
            if (rc != 0 || recvd + n > len) {
                fprintf(stderr, "read: %d (%s)\n", rc, ch_tls_error(b));
                ok = 0;
                break;
            }
            memcpy(got + recvd, rbuf, n);
            recvd += n;
        }
        pump(b, a); /* whatever the reader produced (nothing, normally) */
    }
    ok = ok && recvd == len && memcmp(got, data, len) == 0;
    free(got);
    return ok;
}

/* Does hay contain needle? CH_TLS_VERBOSE=1 prints every checked text. */
static int contains(const char *hay, const char *needle)
{
    if (strstr(hay, needle) != NULL) {
        if (getenv("CH_TLS_VERBOSE") != NULL)
            printf("    %s\n", hay);
        return 1;
    }
    fprintf(stderr, "    \"%s\" does not contain \"%s\"\n", hay, needle);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Tests                                                                    */
/* ------------------------------------------------------------------------ */

static void test_handshake_tls13(void)
{
    SSL_CTX *sctx = ctx_for("node.pem"), *cctx = ctx_for("node2.pem");
    pair_t p;
    int rc_c, rc_s;
    if (!sctx || !cctx || !pair_new(&p, cctx, sctx))
        goto out;
    CHECK_EQ(ch_tls_handshake(p.s), CH_MORE); /* the server waits for the client */
    CHECK_EQ(ch_tls_pending_out(p.s), 0);
    CHECK_EQ(ch_tls_handshake(p.c), CH_MORE);
    CHECK(ch_tls_pending_out(p.c) > 0); /* ClientHello */
    CHECK(strcmp(ch_tls_version(p.c), "") == 0);
    handshake(p.c, p.s, &rc_c, &rc_s);
    CHECK_EQ(rc_c, 0);
    CHECK_EQ(rc_s, 0);
    CHECK_EQ(ch_tls_handshake(p.c), 0); /* and stays done */
    CHECK(strcmp(ch_tls_version(p.c), "TLSv1.3") == 0);
    CHECK(strcmp(ch_tls_version(p.s), "TLSv1.3") == 0);
    CHECK(strcmp(ch_tls_cipher(p.s), "TLS_AES_256_GCM_SHA384") == 0);
    CHECK(strcmp(ch_tls_error(p.c), "") == 0);
    CHECK_EQ(ch_tls_pending_out(p.s), 0); /* no session tickets */

    uint8_t buf[64];
    size_t got = 99;
    CHECK_EQ(ch_tls_read(p.s, buf, sizeof(buf), &got), CH_MORE);
    CHECK_EQ(got, 0);
    pair_free(&p);
out:
    SSL_CTX_free(sctx);
    SSL_CTX_free(cctx);
}

static void test_handshake_tls12(void)
{
    SSL_CTX *sctx = ctx_for("node.pem"), *cctx = ctx_for("node.pem");
    pair_t p;
    int rc_c, rc_s;
    if (!sctx || !cctx)
        goto out;
    CHECK(SSL_CTX_set_max_proto_version(cctx, TLS1_2_VERSION));
    if (!pair_new(&p, cctx, sctx))
        goto out;
    handshake(p.c, p.s, &rc_c, &rc_s);
    CHECK_EQ(rc_c, 0);
    CHECK_EQ(rc_s, 0);
    CHECK(strcmp(ch_tls_version(p.c), "TLSv1.2") == 0);
    CHECK(strcmp(ch_tls_cipher(p.c), "DHE-RSA-AES256-GCM-SHA384") == 0);
    CHECK(strcmp(ch_tls_cipher(p.s), "DHE-RSA-AES256-GCM-SHA384") == 0);

    static const uint8_t hello[] = "hello over TLS 1.2";
    CHECK(transfer(p.c, p.s, hello, sizeof(hello), sizeof(hello)));
    CHECK(transfer(p.s, p.c, hello, sizeof(hello), sizeof(hello)));
    pair_free(&p);
out:
    SSL_CTX_free(sctx);
    SSL_CTX_free(cctx);
}

/* The handshake survives ciphertext arriving one byte at a time. */
static void test_handshake_bytewise(void)
{
    SSL_CTX *ctx = ctx_for("node.pem");
    pair_t p;
    int rc_c, rc_s;
    if (!ctx || !pair_new(&p, ctx, ctx))
        goto out;
    handshake_step(p.c, p.s, &rc_c, &rc_s, 1);
    CHECK_EQ(rc_c, 0);
    CHECK_EQ(rc_s, 0);
    static const uint8_t msg[] = "one byte at a time";
    uint8_t buf[64];
    size_t taken = 0, got = 0, total = 0;
    CHECK_EQ(ch_tls_write(p.s, msg, sizeof(msg), &taken), 0);
    CHECK_EQ(taken, sizeof(msg));
    uint8_t b;
    while (ch_tls_take_out(p.s, &b, 1) == 1) {
        CHECK_EQ(ch_tls_feed(p.c, &b, 1), 0);
        int rc = ch_tls_read(p.c, buf + total, sizeof(buf) - total, &got);
        CHECK(rc == 0 || rc == CH_MORE);
        total += got;
    }
    CHECK_EQ(total, sizeof(msg));
    CHECK_MEM(buf, msg, sizeof(msg));
    pair_free(&p);
out:
    SSL_CTX_free(ctx);
}

/* docs/protocol.md#wire-format: the client sends its 18-byte chirp handshake as
 * soon as its TLS handshake is done, so it reaches the server together with
 * the client's Finished message. The server must find it right after its
 * own handshake completes, and the 18 bytes travel as one record. */
static void test_data_behind_finished(void)
{
    SSL_CTX *ctx = ctx_for("node.pem");
    pair_t p;
    if (!ctx || !pair_new(&p, ctx, ctx))
        goto out;
    CHECK_EQ(ch_tls_handshake(p.c), CH_MORE);
    pump(p.c, p.s);
    CHECK_EQ(ch_tls_handshake(p.s), CH_MORE);
    pump(p.s, p.c);
    CHECK_EQ(ch_tls_handshake(p.c), 0); /* TLS 1.3: client done first */

    uint8_t hs[18] = {0x0b, 0xb6, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    size_t before = ch_tls_pending_out(p.c), taken = 0;
    CHECK_EQ(ch_tls_write(p.c, hs, sizeof(hs), &taken), 0);
    CHECK_EQ(taken, sizeof(hs));
    size_t rec = ch_tls_pending_out(p.c) - before;
    CHECK_EQ(rec, 5 + sizeof(hs) + 1 + 16); /* one TLS 1.3 record, AES-GCM */
    pump(p.c, p.s);

    CHECK_EQ(ch_tls_handshake(p.s), 0);
    uint8_t buf[64];
    size_t got = 0;
    CHECK_EQ(ch_tls_read(p.s, buf, sizeof(buf), &got), 0);
    CHECK_EQ(got, sizeof(hs));
    CHECK_MEM(buf, hs, sizeof(hs));
    pair_free(&p);
out:
    SSL_CTX_free(ctx);
}

/* Reading and writing before the handshake completed drive it instead. */
static void test_io_before_handshake(void)
{
    SSL_CTX *ctx = ctx_for("node.pem");
    pair_t p;
    if (!ctx || !pair_new(&p, ctx, ctx))
        goto out;
    uint8_t buf[16];
    size_t n = 7;
    CHECK_EQ(ch_tls_write(p.c, buf, sizeof(buf), &n), CH_MORE);
    CHECK_EQ(n, 0);
    CHECK(ch_tls_pending_out(p.c) > 0); /* the ClientHello */
    CHECK_EQ(ch_tls_read(p.s, buf, sizeof(buf), &n), CH_MORE);
    pair_free(&p);
out:
    SSL_CTX_free(ctx);
}

static void test_payload_1mib(void)
{
    SSL_CTX *sctx = ctx_for("node.pem"), *cctx = ctx_for("node2.pem");
    pair_t p;
    int rc_c, rc_s;
    size_t len = 1024 * 1024;
    uint8_t *data = malloc(len);
    if (!sctx || !cctx || !data || !pair_new(&p, cctx, sctx))
        goto out;
    for (size_t i = 0; i < len; i++)
        data[i] = (uint8_t)(i * 7 + (i >> 11));
    handshake(p.c, p.s, &rc_c, &rc_s);
    CHECK_EQ(rc_c, 0);
    CHECK_EQ(rc_s, 0);
    /* Client to server in odd-sized chunks, server to client in one call per
     * CH_TLS_OUT_HIGH (ch_tls_write stops early and is called again). */
    CHECK(transfer(p.c, p.s, data, len, 10007));
    CHECK(transfer(p.s, p.c, data, len, len));

    size_t taken = 0;
    CHECK_EQ(ch_tls_write(p.c, data, len, &taken), 0);
    CHECK(taken >= CH_TLS_OUT_HIGH && taken < len);
    CHECK(ch_tls_pending_out(p.c) >= CH_TLS_OUT_HIGH);
    CHECK(ch_tls_pending_out(p.c) < CH_TLS_OUT_HIGH + 17000);
    size_t more = 0;
    CHECK_EQ(ch_tls_write(p.c, data + taken, len - taken, &more), 0);
    CHECK_EQ(more, 0); /* nothing until the pending ciphertext is taken */
    pair_free(&p);
out:
    free(data);
    SSL_CTX_free(sctx);
    SSL_CTX_free(cctx);
}

/* A client with no certificate: the server fails the handshake; the TLS 1.3
 * client learns it from the alert on its next read. */
static void test_client_without_cert(void)
{
    SSL_CTX *sctx = ctx_for("node.pem");
    SSL_CTX *cctx = SSL_CTX_new(TLS_method());
    pair_t p;
    int rc_c, rc_s;
    if (!sctx || !CHECK(cctx != NULL))
        goto out;
    CHECK(SSL_CTX_load_verify_locations(cctx, path("ca.crt"), NULL) == 1);
    SSL_CTX_set_verify(cctx, SSL_VERIFY_PEER, NULL);
    if (!pair_new(&p, cctx, sctx))
        goto out;
    handshake(p.c, p.s, &rc_c, &rc_s);
    CHECK_EQ(rc_s, -CH_TLS_ERROR);
    CHECK(contains(ch_tls_error(p.s), "peer did not return a certificate"));
    CHECK_EQ(rc_c, 0);
    uint8_t buf[64];
    size_t got = 0;
    CHECK_EQ(ch_tls_read(p.c, buf, sizeof(buf), &got), -CH_TLS_ERROR);
    CHECK(contains(ch_tls_error(p.c), "certificate required"));
    /* Failures are sticky. */
    CHECK_EQ(ch_tls_read(p.c, buf, sizeof(buf), &got), -CH_TLS_ERROR);
    CHECK_EQ(ch_tls_handshake(p.s), -CH_TLS_ERROR);
    CHECK_EQ(ch_tls_feed(p.s, buf, 1), -CH_TLS_ERROR);
    size_t taken = 1;
    CHECK_EQ(ch_tls_write(p.s, buf, 1, &taken), -CH_TLS_ERROR);
    CHECK_EQ(taken, 0);
    pair_free(&p);
out:
    SSL_CTX_free(sctx);
    SSL_CTX_free(cctx);
}

/* A client of a foreign CA rejects our server (and says why). */
static void test_foreign_ca(void)
{
    SSL_CTX *sctx = ctx_for("node.pem"), *cctx = ctx_for("foreign.pem");
    pair_t p;
    int rc_c, rc_s;
    if (!sctx || !cctx || !pair_new(&p, cctx, sctx))
        goto out;
    handshake(p.c, p.s, &rc_c, &rc_s);
    CHECK_EQ(rc_c, -CH_TLS_ERROR);
    CHECK(contains(ch_tls_error(p.c), "certificate verify failed: "));
    CHECK_EQ(rc_s, -CH_TLS_ERROR); /* the client's alert */
    CHECK(contains(ch_tls_error(p.s), "unknown ca"));
    pair_free(&p);
out:
    SSL_CTX_free(sctx);
    SSL_CTX_free(cctx);
}

/* A client that trusts us but presents a chain of a foreign CA: our server
 * rejects it. */
static void test_foreign_client(void)
{
    SSL_CTX *sctx = ctx_for("node.pem"), *cctx = ctx_for("intruder.pem");
    pair_t p;
    int rc_c, rc_s;
    if (!sctx || !cctx || !pair_new(&p, cctx, sctx))
        goto out;
    handshake(p.c, p.s, &rc_c, &rc_s);
    CHECK_EQ(rc_s, -CH_TLS_ERROR);
    CHECK(contains(ch_tls_error(p.s), "certificate verify failed: "));
    uint8_t buf[16];
    size_t got = 0;
    CHECK_EQ(rc_c, 0); /* TLS 1.3: the rejection arrives after the client's Finished */
    CHECK_EQ(ch_tls_read(p.c, buf, sizeof(buf), &got), -CH_TLS_ERROR);
    CHECK(ch_tls_error(p.c)[0] != '\0');
    pair_free(&p);
out:
    SSL_CTX_free(sctx);
    SSL_CTX_free(cctx);
}

/* docs/tls.md#when-a-connection-is-encrypted: a peer that does not use TLS sends its 18-byte chirp
 * handshake; both roles must fail with a useful hint. */
static void test_plaintext_peer(void)
{
    static const uint8_t hs[18] = {0x0b, 0xb6, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3,
                                   4,    5,    6,    7,    8,    9,    10, 11, 12};
    SSL_CTX *ctx = ctx_for("node.pem");
    ch_tls_t *s = NULL, *c = NULL;
    if (!ctx)
        return;
    if (CHECK_OK(ch_tls_new(ctx, 1, &s))) {
        CHECK_EQ(ch_tls_feed(s, hs, sizeof(hs)), 0);
        CHECK_EQ(ch_tls_handshake(s), -CH_TLS_ERROR);
        CHECK(contains(ch_tls_error(s), "wrong version number (peer speaks plaintext?)"));
    }
    if (CHECK_OK(ch_tls_new(ctx, 0, &c))) {
        CHECK_EQ(ch_tls_handshake(c), CH_MORE);
        CHECK_EQ(ch_tls_feed(c, hs, sizeof(hs)), 0);
        CHECK_EQ(ch_tls_handshake(c), -CH_TLS_ERROR);
        CHECK(contains(ch_tls_error(c), "(peer speaks plaintext?)"));
    }
    ch_tls_free(s);
    ch_tls_free(c);
    SSL_CTX_free(ctx);
}

/* A peer that sends close_notify (a plain OpenSSL client here) ends the
 * session as an ordinary close: -CH_PROTOCOL_ERROR, data before it first. */
static void test_peer_close_notify(void)
{
    SSL_CTX *ctx = ctx_for("node.pem");
    ch_tls_t *s = NULL;
    SSL *raw = NULL;
    BIO *rin = NULL, *rout = NULL;
    if (!ctx || !CHECK_OK(ch_tls_new(ctx, 1, &s)))
        goto out;
    raw = SSL_new(ctx);
    rin = BIO_new(BIO_s_mem());
    rout = BIO_new(BIO_s_mem());
    if (!CHECK(raw && rin && rout))
        goto out;
    BIO_set_mem_eof_return(rin, -1);
    SSL_set_bio(raw, rin, rout);
    SSL_set_connect_state(raw);
    uint8_t buf[4096];
    int n, rc_s = CH_MORE, done = 0;
    for (int i = 0; i < 10 && !(done && rc_s == 0); i++) {
        done = SSL_do_handshake(raw) == 1;
        while ((n = BIO_read(rout, buf, sizeof(buf))) > 0)
            ch_tls_feed(s, buf, (size_t)n);
        rc_s = ch_tls_handshake(s);
        size_t m;
        while ((m = ch_tls_take_out(s, buf, sizeof(buf))) > 0)
            BIO_write(rin, buf, (int)m);
    }
    CHECK(done);
    CHECK_EQ(rc_s, 0);
    CHECK(SSL_write(raw, "bye", 3) == 3);
    SSL_shutdown(raw); /* sends close_notify */
    while ((n = BIO_read(rout, buf, sizeof(buf))) > 0)
        ch_tls_feed(s, buf, (size_t)n);
    size_t got = 0;
    CHECK_EQ(ch_tls_read(s, buf, sizeof(buf), &got), 0);
    CHECK_EQ(got, 3);
    CHECK_EQ(ch_tls_read(s, buf, sizeof(buf), &got), -CH_PROTOCOL_ERROR);
    CHECK(contains(ch_tls_error(s), "close_notify"));
    CHECK_EQ(ch_tls_pending_out(s), 0); /* we never answer with close_notify */
out:
    SSL_free(raw);
    ch_tls_free(s);
    SSL_CTX_free(ctx);
}

/* Garbage in the middle of a session fails it. */
static void test_corrupt_record(void)
{
    SSL_CTX *ctx = ctx_for("node.pem");
    pair_t p;
    int rc_c, rc_s;
    if (!ctx || !pair_new(&p, ctx, ctx))
        goto out;
    handshake(p.c, p.s, &rc_c, &rc_s);
    static const uint8_t msg[] = "tamper with me";
    uint8_t rec[128], buf[64];
    size_t taken = 0, got = 0;
    CHECK_EQ(ch_tls_write(p.c, msg, sizeof(msg), &taken), 0);
    size_t n = ch_tls_take_out(p.c, rec, sizeof(rec));
    CHECK(n > 10);
    rec[n - 3] ^= 0x40; /* inside the GCM tag */
    CHECK_EQ(ch_tls_feed(p.s, rec, n), 0);
    CHECK_EQ(ch_tls_read(p.s, buf, sizeof(buf), &got), -CH_TLS_ERROR);
    CHECK(contains(ch_tls_error(p.s), "bad record mac"));
    CHECK(ch_tls_pending_out(p.s) > 0); /* the alert, to be sent before closing */
    pair_free(&p);
out:
    SSL_CTX_free(ctx);
}

static void expect_ctx_error(const char *chain, const char *dh, int code, const char *text)
{
    SSL_CTX *ctx = NULL;
    char err[256] = "unset";
    CHECK_EQ(ch_tls_ctx_new(chain, dh, &ctx, err, sizeof(err)), code);
    CHECK(ctx == NULL);
    CHECK(contains(err, text));
    SSL_CTX_free(ctx);
}

static void test_ctx_errors(void)
{
    char want[700], dh[600];
    snprintf(dh, sizeof(dh), "%s", path("dh.pem"));

    snprintf(want, sizeof(want), "CERT_CHAIN_PEM %s: cannot open: No such file", path("nope.pem"));
    expect_ctx_error(path("nope.pem"), dh, -CH_VALUE_ERROR, want);
    expect_ctx_error(NULL, dh, -CH_VALUE_ERROR, "CERT_CHAIN_PEM is not set");
    expect_ctx_error(path("node.pem"), "", -CH_VALUE_ERROR, "DH_PARAMS_PEM is not set");
    snprintf(want, sizeof(want), "DH_PARAMS_PEM %s: cannot open", path("nodh.pem"));
    expect_ctx_error(path("node.pem"), path("nodh.pem"), -CH_VALUE_ERROR, want);
    expect_ctx_error(dir, dh, -CH_VALUE_ERROR, "cannot read: Is a directory");

    snprintf(want, sizeof(want), "CERT_CHAIN_PEM %s: no private key found", path("nokey.pem"));
    expect_ctx_error(path("nokey.pem"), dh, -CH_VALUE_ERROR, want);
    snprintf(want, sizeof(want), "CERT_CHAIN_PEM %s: the private key does not match",
             path("mismatch.pem"));
    expect_ctx_error(path("mismatch.pem"), dh, -CH_VALUE_ERROR, want);
    expect_ctx_error(path("encrypted.pem"), dh, -CH_VALUE_ERROR, "private key is encrypted");
    snprintf(want, sizeof(want), "CERT_CHAIN_PEM %s: no certificate found", dh);
    expect_ctx_error(dh, dh, -CH_VALUE_ERROR, want);
    snprintf(want, sizeof(want), "DH_PARAMS_PEM %s: no DH parameters found", path("node.pem"));
    expect_ctx_error(path("node.pem"), path("node.pem"), -CH_VALUE_ERROR, want);

    /* A damaged certificate block. */
    FILE *f = fopen(path("broken.pem"), "w");
    if (CHECK(f != NULL)) {
        fputs("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", f);
        fclose(f);
        expect_ctx_error(path("broken.pem"), dh, -CH_VALUE_ERROR, "bad certificate #1");
    }
    /* Success clears the message. */
    SSL_CTX *ctx = NULL;
    char err[256];
    CHECK_EQ(ch_tls_ctx_new(path("node.pem"), dh, &ctx, err, sizeof(err)), 0);
    CHECK(strcmp(err, "") == 0);
    SSL_CTX_free(ctx);
    /* A tiny error buffer is fine. */
    ctx = NULL;
    CHECK_EQ(ch_tls_ctx_new(NULL, NULL, &ctx, err, 4), -CH_VALUE_ERROR);
    CHECK_EQ(strlen(err), 3);
    CHECK_EQ(ch_tls_ctx_new(NULL, NULL, &ctx, NULL, 0), -CH_VALUE_ERROR);
}

int main(void)
{
    if (setup_material() != 0) {
        CHECK(!"test material");
        return unit_summary();
    }
    UNIT_RUN(test_handshake_tls13);
    UNIT_RUN(test_handshake_tls12);
    UNIT_RUN(test_handshake_bytewise);
    UNIT_RUN(test_data_behind_finished);
    UNIT_RUN(test_io_before_handshake);
    UNIT_RUN(test_payload_1mib);
    UNIT_RUN(test_client_without_cert);
    UNIT_RUN(test_foreign_ca);
    UNIT_RUN(test_foreign_client);
    UNIT_RUN(test_plaintext_peer);
    UNIT_RUN(test_peer_close_notify);
    UNIT_RUN(test_corrupt_record);
    UNIT_RUN(test_ctx_errors);
    teardown_material();
    return unit_summary();
}
