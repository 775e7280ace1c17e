/*
 * fuzz_tls.c: libFuzzer entry point over the TLS engine's record input
 * (csrc/tls.h: ch_tls_feed, ch_tls_handshake, ch_tls_read, ch_tls_write).
 *
 * Theory of operation
 * -------------------
 * Three SSL_CTX are built once per process with ch_tls_ctx_new() from test
 * material embedded below (one EC P-256 CA; an EC server node, an EC client
 * node and an RSA 2048 server node, valid until 2126; the RFC 7919 ffdhe2048
 * group as DH parameters). The PEM files live in a temporary directory only
 * while the contexts are built. EC keys keep a full handshake cheap; the RSA
 * node is there because TLS 1.2 allows only the DHE-RSA suites.
 *
 * Input layout: byte 0 holds flags, the rest is ciphertext from the peer.
 *   bit 0  the engine under test is a TLS client (else a server)
 *   bit 1  the server uses the RSA node (else the EC node)
 *   bit 2  once the handshake is done, write a little plaintext
 *   bits 4-7  how the ciphertext is cut into ch_tls_feed() calls: 0 and 1
 *          byte by byte, 2..14 pieces of up to 2 .. 16389 bytes (sizes from
 *          a PRNG), 15 all at once; after MAX_FEEDS pieces the rest at once
 * A fresh engine per input is fed the ciphertext piece by piece; after every
 * piece the harness does what a connection does: drive the handshake, read
 * plaintext until CH_MORE (with read buffers of varying size), and take out
 * whatever ciphertext the engine produced.
 *
 * Determinism: OpenSSL's random generator is replaced by a counter-based one
 * that restarts for every input (RAND_set_rand_method). The engine under test
 * therefore picks the same randoms, key shares and signature nonces on every
 * run, and a recorded session replays in full: the fuzzer starts from whole
 * conversations (handshake, application data, key updates, close_notify,
 * TLS 1.2 with DHE, a HelloRetryRequest, an ffdhe key share) and mutates
 * records that decrypt, not only the unencrypted ClientHello. The recordings
 * are made by this same file built with -DFUZZ_TLS_RECORD (a main() that
 * pumps the engine against a plain OpenSSL peer and writes one seed file per
 * scenario, then replays each through the fuzz entry point to show it still
 * completes the handshake). The peer draws from a second, separate stream,
 * so the engine's draws are the same with or without it.
 *
 * Checked on every call: return codes come only from the documented set
 * (0, CH_MORE, -CH_TLS_ERROR, -CH_PROTOCOL_ERROR, -CH_ENOMEM); ch_tls_read
 * returns 0 with 0 < got <= cap, CH_MORE or a failure with got == 0;
 * ch_tls_write takes at most len; ch_tls_take_out copies at most cap and
 * drains exactly ch_tls_pending_out(); once the handshake returned 0 it keeps
 * returning 0; the error text is "" before a failure and not "" after it
 * (except behind a read that returned the last plaintext in front of the
 * failure, see note()); a failure is sticky for feed, handshake, read and
 * write with the same text; a completed handshake names its version and
 * cipher. Violations abort().
 */
#define OPENSSL_SUPPRESS_DEPRECATED /* RAND_METHOD: the only way to make it repeatable */

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include "tls.h"

#define REQUIRE(cond)                                                                      \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "fuzz_tls: invariant failed at %s:%d: %s\n", __FILE__,          \
                    __LINE__, #cond);                                                      \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

#define F_CLIENT 0x01
#define F_RSA 0x02
#define F_WRITE 0x04

#define MAX_FEEDS 200

/* ------------------------------------------------------------------------ */
/* Test material (see the header comment). Regenerate with the openssl tool: */
/*   req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -days 36500 (CA), */
/*   req -newkey ec|rsa:2048 + x509 -req -CA ... -days 36500 (nodes);        */
/*   each string is key, node certificate, CA certificate. The recorded TLS  */
/*   seeds replay only with the material they were recorded with.            */
/* ------------------------------------------------------------------------ */

static const char SRV_EC_PEM[] =
    "-----BEGIN PRIVATE KEY-----\n"
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg8goAvANrBf+IBMw/\n"
    "O98uIJq9oLZQEaxP1yIhGPKe+p2hRANCAASWPNcfeYpywm155w73T5tPtfg4CmTA\n"
    "hM8XGbtcxnqBiO5kIaYdjSj2mmihNgU4yfwakTK1XyLlvNn1XIO9Dsiz\n"
    "-----END PRIVATE KEY-----\n"
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBIDCByAIUJhYLLCLdjZSoV19cQJmDlZZf6JEwCgYIKoZIzj0EAwIwEjEQMA4G\n"
    "A1UEAwwHZnV6ei1jYTAgFw0yNjExMjMxMDEzNDlaGA8yMTI2MTAzMDEwMTM0OVow\n"
    "EzERMA8GA1UEAwwIZnV6ei1zcnYwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASW\n"
    "PNcfeYpywm155w73T5tPtfg4CmTAhM8XGbtcxnqBiO5kIaYdjSj2mmihNgU4yfwa\n"
    "kTK1XyLlvNn1XIO9DsizMAoGCCqGSM49BAMCA0cAMEQCIDTGHoVFVUGS5YIqPymJ\n"
    "13qIasyzQg2nVM0WEO1PRkaDAiA1zzeyphjqCRCoYRhlOReFu4JHdn5WV3bXk+Q6\n"
    "fZ0j1w==\n"
    "-----END CERTIFICATE-----\n"
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBfDCCASGgAwIBAgIUQOe2o+ZdtqbvAjbjbdh8yKyxUs8wCgYIKoZIzj0EAwIw\n"
    "EjEQMA4GA1UEAwwHZnV6ei1jYTAgFw0yNjExMjMxMDEzNDlaGA8yMTI2MTAzMDEw\n"
    "MTM0OVowEjEQMA4GA1UEAwwHZnV6ei1jYTBZMBMGByqGSM49AgEGCCqGSM49AwEH\n"
    "A0IABGkjlkpI8l8CZX3AY1jnBoQWdDgY8WCKqTnt4lkTFNbi+uvBs7cyrU+YVF14\n"
    "OGM4qFlZ2QPr+rWee6ooVjlLS/ejUzBRMB0GA1UdDgQWBBRrGFt5LP+aWD+4tm/Z\n"
    "v9Na48eNvzAfBgNVHSMEGDAWgBRrGFt5LP+aWD+4tm/Zv9Na48eNvzAPBgNVHRMB\n"
    "Af8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQCuU5Q+a2xw9qr+6bacRAwexN9y\n"
    "jF6BnIYwt2qVeh/9aAIhAKqRCTK/fjh0ybiFgV+YUBvV+T9XCtYkAu8d3d/WZYJM\n"
    "-----END CERTIFICATE-----\n";

static const char CLI_EC_PEM[] =
    "-----BEGIN PRIVATE KEY-----\n"
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgOcPdntC2YRMN973v\n"
    "7RIvm1Hhdr2EWeVL9srtAhmI1J+hRANCAARL8mUON6AuGba2wNm7oZZC2Ft9J+I8\n"
    "o+ON6/BtGobAOhzmI07RgZEPVbtTbxt52Fi/uhZVoN7o4PZ9Gqdbsifo\n"
    "-----END PRIVATE KEY-----\n"
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBIjCByAIUJhYLLCLdjZSoV19cQJmDlZZf6JIwCgYIKoZIzj0EAwIwEjEQMA4G\n"
    "A1UEAwwHZnV6ei1jYTAgFw0yNjExMjMxMDEzNDlaGA8yMTI2MTAzMDEwMTM0OVow\n"
    "EzERMA8GA1UEAwwIZnV6ei1jbGkwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAARL\n"
    "8mUON6AuGba2wNm7oZZC2Ft9J+I8o+ON6/BtGobAOhzmI07RgZEPVbtTbxt52Fi/\n"
    "uhZVoN7o4PZ9GqdbsifoMAoGCCqGSM49BAMCA0kAMEYCIQC+BGxOIpx7qin4riGL\n"
    "DPoHK4bfiEw11imte84xduFxFwIhALUQqDrX+kbDnvciU4MTaQKnywfB4zlmyfLU\n"
    "LGqYvl8x\n"
    "-----END CERTIFICATE-----\n"
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBfDCCASGgAwIBAgIUQOe2o+ZdtqbvAjbjbdh8yKyxUs8wCgYIKoZIzj0EAwIw\n"
    "EjEQMA4GA1UEAwwHZnV6ei1jYTAgFw0yNjExMjMxMDEzNDlaGA8yMTI2MTAzMDEw\n"
    "MTM0OVowEjEQMA4GA1UEAwwHZnV6ei1jYTBZMBMGByqGSM49AgEGCCqGSM49AwEH\n"
    "A0IABGkjlkpI8l8CZX3AY1jnBoQWdDgY8WCKqTnt4lkTFNbi+uvBs7cyrU+YVF14\n"
    "OGM4qFlZ2QPr+rWee6ooVjlLS/ejUzBRMB0GA1UdDgQWBBRrGFt5LP+aWD+4tm/Z\n"
    "v9Na48eNvzAfBgNVHSMEGDAWgBRrGFt5LP+aWD+4tm/Zv9Na48eNvzAPBgNVHRMB\n"
    "Af8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQCuU5Q+a2xw9qr+6bacRAwexN9y\n"
    "jF6BnIYwt2qVeh/9aAIhAKqRCTK/fjh0ybiFgV+YUBvV+T9XCtYkAu8d3d/WZYJM\n"
    "-----END CERTIFICATE-----\n";

static const char SRV_RSA_PEM[] =
    "-----BEGIN PRIVATE KEY-----\n"
    "MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQCpTMPrVy2JZP1d\n"
    "FQgjznDmooStgK32yoF6jsysPnzp1U5dYy4l73nMvso2kTfWVkfJXw5nvGdL67BU\n"
    "cja0rd17gctjK4N7qH5IgwQJvxyxLqcR14ho+5VaQFJOBd4YZD7gWWKwYD1xwpGw\n"
    "lq4Gyy62rO9sVjxEzpRbb9/WY+i9+QimTQ6oTnvLQDestMP09E4/6Fqb8nL0I556\n"
    "ae88UT7/xS2DqLGLCuTYnMXHZlp8OtsfpxbKLdL0PHx0xcEG9yvq0TSdL/1DBLUd\n"
    "HzApi0XCBbg90xyuNCWTDySFJcFqtyg/EE2Lh3OY4TVof/xuzZ2VUyCplYAQ1zKr\n"
    "qpLQVyBLAgMBAAECggEAB9M9rlfctHWKWm45mUIWU4AJMZB5j1HOiJt8wqyuubYm\n"
    "GvNAc6NtK0qu7l++8iARzbEgPtOP/gvaSMTwr2A76lSrpx1LRKtwjtRzcCnjtHLW\n"
    "E7aKc7kb2aHly/0XG2SCyCbe2g0mDzyG3wp6kmN7eMO8hfLkcpUOeWgjM0sckQSU\n"
    "PGz6C4RqI5PJ+c21/MlzA2tfP5xZ8G6P97iKDDbhAu3A8q/v6+al9Tkhd8jup0il\n"
    "pbSOgJEud+j7sRStXOfP6kGwHVLTbNSi9WukVWl01+DocKbgClDnMtZOuDym6MYt\n"
    "rZpH6x3Z+dD1nyYSoScX61rjK0oe3KptW9tgSm/IDQKBgQDi+ss1UKed3elzqZYo\n"
    "Jr8vaVIQe5L2DUCKXJ+KPLqhsNPDsx0/UxF4M2HtN9iQJKRXLpWTD2ldXd01XWHO\n"
    "rHd0uqCMORgk1iX/8AXKhDwftkfaGytZDj8tiITXZF4yL0ygQY2FRj6qrSVr0yFQ\n"
    "aFiEJVKDiJ++5qyj1olNoz8kzwKBgQC+8hISF64NIKhfDh5UmsX9iaKAWzLjwcIS\n"
    "OBZVcN5NtvC/ZtvD7U1mEHtXI2Mo0nFLN/h3rRpu0Zc+dzzdYzsmReafUbBPyOl8\n"
    "lzzFmq2uecwCtbULX4kd3jadplxxUjoU9c9HFs7pQrOYVQo8QOgV5HKam0taIoWL\n"
    "+jXy8rCjxQKBgC+IDV3Q0gkBG44ZCVTHKGopSAIjnpbgF4/h7ZbpOLv7Z50nuQw1\n"
    "vQbK28rtUvB8e92156SwKYRfz58JOx4oh6tuGYjDvAaawcJi5ROPtXd+mHVYEy/H\n"
    "B/vlBsyEPCWOOiGlGJm8KAtdzuRRhjxsXXzuw+S/i5RSgfydRIt5kBOJAoGARsmn\n"
    "OV3eAK/iu5qYU/UtAVlNDRjCPP1P3UE9xl8ZiuYPSmXvgysuTnA9yYgs8q1RovkU\n"
    "/AkIi5zX3SiHP+vRudagMOAv5OQu6ymGNhup18z/fOGwRI8eXhxLUxahnsFFFxAp\n"
    "z8j83C0GN6sPKFdHsxYGBpsbzEaQC9yus2qVYaECgYB0vQYtfUpMM47zmiL+vcfB\n"
    "6iDMNOzq35mUF+gag3IyX+tUgpCiKatZHTeqP91OVvZ2VcnQvALu/yGhNrVqUanG\n"
    "u5dj5R9yI0yjoAvUlusnRF9eglb8pl378MePh7q8hMKeL8UySOiiqvPBD6exyQQn\n"
    "y6c0DLs4baKMKIAvouhK3A==\n"
    "-----END PRIVATE KEY-----\n"
    "-----BEGIN CERTIFICATE-----\n"
    "MIIB7TCCAZMCFCYWCywi3Y2UqFdfXECZg5WWX+iTMAoGCCqGSM49BAMCMBIxEDAO\n"
    "BgNVBAMMB2Z1enotY2EwIBcNMjYxMTIzMTAxMzQ5WhgPMjEyNjEwMzAxMDEzNDla\n"
    "MBMxETAPBgNVBAMMCGZ1enotcnNhMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIB\n"
    "CgKCAQEAqUzD61ctiWT9XRUII85w5qKErYCt9sqBeo7MrD586dVOXWMuJe95zL7K\n"
    "NpE31lZHyV8OZ7xnS+uwVHI2tK3de4HLYyuDe6h+SIMECb8csS6nEdeIaPuVWkBS\n"
    "TgXeGGQ+4FlisGA9ccKRsJauBssutqzvbFY8RM6UW2/f1mPovfkIpk0OqE57y0A3\n"
    "rLTD9PROP+ham/Jy9COeemnvPFE+/8Utg6ixiwrk2JzFx2ZafDrbH6cWyi3S9Dx8\n"
    "dMXBBvcr6tE0nS/9QwS1HR8wKYtFwgW4PdMcrjQlkw8khSXBarcoPxBNi4dzmOE1\n"
    "aH/8bs2dlVMgqZWAENcyq6qS0FcgSwIDAQABMAoGCCqGSM49BAMCA0gAMEUCIFXs\n"
    "b+dbSxcVAwZPtgkBlU0S7OvAGn2xX8ywDMySJdajAiEAybUz0wjJPASe6EAfSrbA\n"
    "EodZtee5D5Yy4fR3jPc9elc=\n"
    "-----END CERTIFICATE-----\n"
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBfDCCASGgAwIBAgIUQOe2o+ZdtqbvAjbjbdh8yKyxUs8wCgYIKoZIzj0EAwIw\n"
    "EjEQMA4GA1UEAwwHZnV6ei1jYTAgFw0yNjExMjMxMDEzNDlaGA8yMTI2MTAzMDEw\n"
    "MTM0OVowEjEQMA4GA1UEAwwHZnV6ei1jYTBZMBMGByqGSM49AgEGCCqGSM49AwEH\n"
    "A0IABGkjlkpI8l8CZX3AY1jnBoQWdDgY8WCKqTnt4lkTFNbi+uvBs7cyrU+YVF14\n"
    "OGM4qFlZ2QPr+rWee6ooVjlLS/ejUzBRMB0GA1UdDgQWBBRrGFt5LP+aWD+4tm/Z\n"
    "v9Na48eNvzAfBgNVHSMEGDAWgBRrGFt5LP+aWD+4tm/Zv9Na48eNvzAPBgNVHRMB\n"
    "Af8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQCuU5Q+a2xw9qr+6bacRAwexN9y\n"
    "jF6BnIYwt2qVeh/9aAIhAKqRCTK/fjh0ybiFgV+YUBvV+T9XCtYkAu8d3d/WZYJM\n"
    "-----END CERTIFICATE-----\n";

static const char FFDHE2048_PEM[] =
    "-----BEGIN DH PARAMETERS-----\n"
    "MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz\n"
    "+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a\n"
    "87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7\n"
    "YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi\n"
    "7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD\n"
    "ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==\n"
    "-----END DH PARAMETERS-----\n";

/* ------------------------------------------------------------------------ */
/* A repeatable random generator for OpenSSL                                */
/* ------------------------------------------------------------------------ */

#define STREAM_ENGINE 0 /* the engine under test */
#define STREAM_PEER 1   /* the recorder's OpenSSL peer */

static uint64_t rng_state[2];
static int rng_stream;

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int rng_bytes(unsigned char *buf, int num)
{
    for (int i = 0; i < num; i += 8) {
        uint64_t x = splitmix64(&rng_state[rng_stream]);
        int k = num - i < 8 ? num - i : 8;
        memcpy(buf + i, &x, (size_t)k);
    }
    return 1;
}

static int rng_seed(const void *buf, int num)
{
    (void)buf;
    (void)num;
    return 1;
}

static int rng_add(const void *buf, int num, double entropy)
{
    (void)buf;
    (void)num;
    (void)entropy;
    return 1;
}

static int rng_status(void) { return 1; }

static const RAND_METHOD rng_method = {rng_seed, rng_bytes, NULL, rng_add, rng_bytes, rng_status};

static void rng_restart(void)
{
    rng_state[STREAM_ENGINE] = 0x6368697270656e67ull; /* "chirpeng" */
    rng_state[STREAM_PEER] = 0x6368697270706565ull;   /* "chirppee" */
    rng_stream = STREAM_ENGINE;
}

/* ------------------------------------------------------------------------ */
/* Contexts, built once                                                     */
/* ------------------------------------------------------------------------ */

static SSL_CTX *ctx_srv_ec, *ctx_srv_rsa, *ctx_cli;

static SSL_CTX *ctx_from(const char *dir, const char *name, const char *pem)
{
    char chain[600], dh[600], err[256];
    snprintf(chain, sizeof(chain), "%s/%s.pem", dir, name);
    snprintf(dh, sizeof(dh), "%s/dh.pem", dir);
    FILE *f = fopen(chain, "w");
    REQUIRE(f != NULL && fputs(pem, f) >= 0 && fclose(f) == 0);
    f = fopen(dh, "w");
    REQUIRE(f != NULL && fputs(FFDHE2048_PEM, f) >= 0 && fclose(f) == 0);
    SSL_CTX *ctx = NULL;
    int rc = ch_tls_ctx_new(chain, dh, &ctx, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "fuzz_tls: ch_tls_ctx_new(%s): %d %s\n", name, rc, err);
        abort();
    }
    unlink(chain);
    unlink(dh);
    return ctx;
}

static void init_once(void)
{
    static int done;
    if (done)
        return;
    done = 1;
    REQUIRE(RAND_set_rand_method(&rng_method) == 1);
    rng_restart();
    char dir[] = "/tmp/ch_fuzz_tls_XXXXXX";
    REQUIRE(mkdtemp(dir) != NULL);
    ctx_srv_ec = ctx_from(dir, "srv_ec", SRV_EC_PEM);
    ctx_srv_rsa = ctx_from(dir, "srv_rsa", SRV_RSA_PEM);
    ctx_cli = ctx_from(dir, "cli", CLI_EC_PEM);
    rmdir(dir);
}

/* ------------------------------------------------------------------------ */
/* Driving one engine                                                       */
/* ------------------------------------------------------------------------ */

typedef struct {
    ch_tls_t *t;
    int done;       /* the handshake returned 0 */
    int failed;     /* the sticky failure code, or 0 */
    int written;    /* plaintext was written (F_WRITE) */
    int flags;
    uint32_t rng;   /* chunking and buffer sizes */
    size_t plain;   /* plaintext bytes read */
    size_t cipher;  /* ciphertext bytes taken out */
    int pending;    /* a read returned 0 but the error text is set */
    char pending_text[512];
    /* The recorder moves the engine's output to its peer; else it is dropped. */
    void (*sink)(void *arg, const uint8_t *buf, size_t len);
    void *sink_arg;
} engine_t;

static uint32_t xorshift(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

static int known_failure(int rc)
{
    return rc == -CH_TLS_ERROR || rc == -CH_PROTOCOL_ERROR || rc == -CH_ENOMEM;
}

/* Take out everything pending, in pieces of varying size. */
static void drain(engine_t *e)
{
    uint8_t buf[4096];
    size_t pending = ch_tls_pending_out(e->t), total = 0;
    for (;;) {
        size_t cap = 1 + xorshift(&e->rng) % sizeof(buf);
        size_t n = ch_tls_take_out(e->t, buf, cap);
        REQUIRE(n <= cap);
        if (n == 0)
            break;
        if (e->sink)
            e->sink(e->sink_arg, buf, n);
        total += n;
    }
    REQUIRE(total == pending);
    REQUIRE(ch_tls_pending_out(e->t) == 0);
    e->cipher += total;
}

/* Record a result: 0 and CH_MORE pass, a failure becomes sticky. A read
 * may deliver the last plaintext before the failure behind it (a record
 * followed by close_notify or garbage): it returns 0 and the error text is
 * already set; the next read must then report that failure. */
static int note(engine_t *e, int rc, int is_read)
{
    REQUIRE(rc == 0 || rc == CH_MORE || known_failure(rc));
    const char *text = ch_tls_error(e->t);
    REQUIRE(text != NULL);
    if (e->pending)
        REQUIRE(rc < 0 && strcmp(text, e->pending_text) == 0);
    if (rc < 0) {
        REQUIRE(text[0] != '\0');
        e->failed = rc;
    } else if (text[0] != '\0') {
        REQUIRE(is_read && rc == 0);
        e->pending = 1;
        snprintf(e->pending_text, sizeof(e->pending_text), "%s", text);
    }
    return rc;
}

/* Everything after a failure must fail the same way, with the same text. */
static void check_sticky(engine_t *e)
{
    char text[512];
    snprintf(text, sizeof(text), "%s", ch_tls_error(e->t));
    uint8_t buf[64] = {0x17, 0x03, 0x03, 0x00, 0x01, 0x00};
    size_t n = 99;
    REQUIRE(ch_tls_feed(e->t, buf, 6) == e->failed);
    REQUIRE(ch_tls_handshake(e->t) == e->failed);
    REQUIRE(ch_tls_read(e->t, buf, sizeof(buf), &n) == e->failed);
    REQUIRE(n == 0);
    n = 99;
    REQUIRE(ch_tls_write(e->t, buf, sizeof(buf), &n) == e->failed);
    REQUIRE(n == 0);
    REQUIRE(strcmp(text, ch_tls_error(e->t)) == 0);
    drain(e);
}

/* What a connection does after every feed. */
static void step(engine_t *e)
{
    if (!e->done) {
        int rc = note(e, ch_tls_handshake(e->t), 0);
        drain(e);
        if (rc != 0)
            return;
        e->done = 1;
        const char *v = ch_tls_version(e->t), *c = ch_tls_cipher(e->t);
        REQUIRE(v != NULL && v[0] != '\0' && c != NULL && c[0] != '\0');
    } else {
        REQUIRE(note(e, ch_tls_handshake(e->t), 0) == 0);
    }
    static const size_t caps[4] = {1, 7, 1000, 16384};
    uint8_t buf[16384];
    for (;;) {
        size_t cap = caps[xorshift(&e->rng) % 4], got = 12345;
        int rc = note(e, ch_tls_read(e->t, buf, cap, &got), 1);
        drain(e);
        if (rc == 0) {
            REQUIRE(got > 0 && got <= cap);
            e->plain += got;
            continue;
        }
        REQUIRE(got == 0);
        if (rc < 0)
            return;
        break;
    }
    if ((e->flags & F_WRITE) && !e->written) {
        static const uint8_t msg[40] = "\x0f\xa0 chirp handshake, then a frame";
        size_t taken = 12345;
        int rc = note(e, ch_tls_write(e->t, msg, sizeof(msg), &taken), 0);
        REQUIRE(taken <= sizeof(msg));
        REQUIRE(rc != 0 || taken == sizeof(msg)); /* far below CH_TLS_OUT_HIGH */
        REQUIRE(rc == 0 || taken == 0);
        e->written = 1;
        drain(e);
    }
}

static void engine_start(engine_t *e, int flags, size_t n)
{
    memset(e, 0, sizeof(*e));
    e->flags = flags;
    e->rng = 0x2545f491u ^ (uint32_t)flags << 24 ^ (uint32_t)n;
    if (e->rng == 0)
        e->rng = 1;
    SSL_CTX *ctx = (flags & F_CLIENT) ? ctx_cli : (flags & F_RSA) ? ctx_srv_rsa : ctx_srv_ec;
    REQUIRE(ch_tls_new(ctx, !(flags & F_CLIENT), &e->t) == 0);
    REQUIRE(strcmp(ch_tls_error(e->t), "") == 0);
    REQUIRE(ch_tls_pending_out(e->t) == 0);
}

/* Feed one piece of ciphertext and react to it. */
static void engine_feed(engine_t *e, const uint8_t *buf, size_t len)
{
    if (e->failed)
        return;
    if (note(e, ch_tls_feed(e->t, buf, len), 0) < 0)
        return;
    step(e);
}

static void engine_end(engine_t *e)
{
    if (e->failed)
        check_sticky(e);
    ch_tls_free(e->t);
    e->t = NULL;
}

/* Run one input; the engine's statistics are left in *out. */
static void run_input(const uint8_t *data, size_t size, engine_t *e)
{
    init_once();
    rng_restart();
    if (size == 0)
        return;
    int flags = data[0];
    const uint8_t *d = data + 1;
    size_t n = size - 1;
    engine_start(e, flags, n);
    if (flags & F_CLIENT)
        step(e); /* the ClientHello */

    static const uint32_t limits[16] = {1,   1,   2,   3,    5,    13,   64,   100,
                                        300, 517, 1000, 2000, 4096, 8192, 16389, 0};
    uint32_t limit = limits[(flags >> 4) & 15];
    size_t pos = 0;
    for (int feeds = 0; pos < n && !e->failed; feeds++) {
        /* At most MAX_FEEDS pieces, then the rest at once: a conversation
         * fed byte by byte would cost thousands of engine calls. */
        size_t step_len = limit == 0 || feeds >= MAX_FEEDS ? n : 1 + xorshift(&e->rng) % limit;
        if (step_len > n - pos)
            step_len = n - pos;
        engine_feed(e, d + pos, step_len);
        pos += step_len;
    }
    if (!e->failed && (xorshift(&e->rng) & 1))
        engine_feed(e, d, 0); /* an empty feed changes nothing */
    engine_end(e);
}

#ifndef FUZZ_TLS_RECORD

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    engine_t e;
    run_input(data, size, &e);
    /* Leave nothing in this thread's error queue for the next input. */
    ERR_clear_error();
    return 0;
}

#else /* FUZZ_TLS_RECORD */

/* ------------------------------------------------------------------------ */
/* The recorder: pump the engine against a plain OpenSSL peer and save what */
/* the peer sent as a seed (flags byte + ciphertext).                       */
/* ------------------------------------------------------------------------ */

typedef struct {
    SSL *ssl;
    BIO *in;  /* engine -> peer */
    BIO *out; /* peer -> engine */
    uint8_t *rec;
    size_t len, cap;
    engine_t e;
} peer_t;

static void to_peer(void *arg, const uint8_t *buf, size_t len)
{
    peer_t *p = arg;
    REQUIRE(BIO_write(p->in, buf, (int)len) == (int)len);
}

/* Move the peer's ciphertext into the engine, recording it. */
static size_t peer_flush(peer_t *p)
{
    uint8_t buf[4096];
    int n;
    size_t moved = 0;
    while ((n = BIO_read(p->out, buf, sizeof(buf))) > 0) {
        if (p->len + (size_t)n > p->cap) {
            p->cap = (p->len + (size_t)n) * 2;
            p->rec = realloc(p->rec, p->cap);
            REQUIRE(p->rec != NULL);
        }
        memcpy(p->rec + p->len, buf, (size_t)n);
        p->len += (size_t)n;
        rng_stream = STREAM_ENGINE;
        engine_feed(&p->e, buf, (size_t)n);
        moved += (size_t)n;
    }
    return moved;
}

/* Let both sides talk until neither has anything to say. */
static void pump(peer_t *p)
{
    for (int i = 0; i < 100; i++) {
        rng_stream = STREAM_PEER;
        if (!SSL_is_init_finished(p->ssl)) {
            SSL_do_handshake(p->ssl);
        } else {
            uint8_t buf[4096];
            while (SSL_read(p->ssl, buf, sizeof(buf)) > 0)
                ;
        }
        ERR_clear_error();
        size_t moved = peer_flush(p);
        if (moved == 0 && BIO_ctrl_pending(p->in) == 0)
            break;
    }
}

static void peer_start(peer_t *p, int flags, SSL_CTX *peer_ctx, int max_version,
                       const char *groups)
{
    memset(p, 0, sizeof(*p));
    rng_restart();
    engine_start(&p->e, flags, 0);
    p->e.sink = to_peer;
    p->e.sink_arg = p;
    rng_stream = STREAM_PEER;
    p->ssl = SSL_new(peer_ctx);
    p->in = BIO_new(BIO_s_mem());
    p->out = BIO_new(BIO_s_mem());
    REQUIRE(p->ssl && p->in && p->out);
    BIO_set_mem_eof_return(p->in, -1);
    SSL_set_bio(p->ssl, p->in, p->out);
    if (flags & F_CLIENT)
        SSL_set_accept_state(p->ssl);
    else
        SSL_set_connect_state(p->ssl);
    if (max_version)
        REQUIRE(SSL_set_max_proto_version(p->ssl, max_version) == 1);
    if (groups)
        REQUIRE(SSL_set1_groups_list(p->ssl, groups) == 1);
    if (flags & F_CLIENT) {
        rng_stream = STREAM_ENGINE;
        step(&p->e); /* the ClientHello, as run_input() does */
    }
}

static void peer_write(peer_t *p, const void *buf, size_t len)
{
    rng_stream = STREAM_PEER;
    const uint8_t *b = buf;
    while (len > 0) {
        size_t n = len < 16384 ? len : 16384;
        REQUIRE(SSL_write(p->ssl, b, (int)n) == (int)n);
        b += n;
        len -= n;
        pump(p);
    }
}

static void peer_key_update(peer_t *p)
{
    rng_stream = STREAM_PEER;
    REQUIRE(SSL_key_update(p->ssl, SSL_KEY_UPDATE_REQUESTED) == 1);
    SSL_do_handshake(p->ssl);
    pump(p);
}

static void peer_close(peer_t *p)
{
    rng_stream = STREAM_PEER;
    SSL_shutdown(p->ssl);
    ERR_clear_error();
    pump(p);
}

static int n_written;

static void save(const char *dir, const char *name, int flags, const uint8_t *rec, size_t len)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    uint8_t fl = (uint8_t)flags;
    REQUIRE(f != NULL && fwrite(&fl, 1, 1, f) == 1);
    REQUIRE(len == 0 || fwrite(rec, 1, len, f) == len);
    REQUIRE(fclose(f) == 0);
    n_written++;

    /* Replay through the fuzz entry point: it must get as far. */
    uint8_t *in = malloc(len + 1);
    REQUIRE(in != NULL);
    in[0] = fl;
    if (len)
        memcpy(in + 1, rec, len);
    engine_t e;
    run_input(in, len + 1, &e);
    free(in);
    printf("%-26s %5zu bytes  replay: handshake %s, %zu plaintext bytes, %s%s\n", name, len,
           e.done ? "done" : "not done", e.plain, e.failed ? "failed " : "no failure",
           e.failed ? ch_error_name(-e.failed) : "");
}

/* The peer's plaintext: the 18-byte chirp handshake and one data frame. */
static const uint8_t CHIRP[18 + 27 + 8] = {
    0x0f, 0xa0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d,
    0x1e, 0x1f, 0, 0, 0, 7, 0, 0, 0, 5, 0, 3, 1, 'h', 'd', 'r', 'h', 'e', 'l', 'l', 'o'};

enum { ACT_HELLO_ONLY, ACT_SESSION, ACT_KEYUPDATE, ACT_BIG };

static void scenario(const char *dir, const char *name, int flags, SSL_CTX *peer_ctx,
                     int max_version, const char *groups, int act)
{
    peer_t p;
    peer_start(&p, flags, peer_ctx, max_version, groups);
    if (act == ACT_HELLO_ONLY) {
        rng_stream = STREAM_PEER;
        SSL_do_handshake(p.ssl);
        ERR_clear_error();
        peer_flush(&p);
    } else {
        pump(&p);
        REQUIRE(p.e.done || p.e.failed);
        if (p.e.done && !p.e.failed) {
            peer_write(&p, CHIRP, sizeof(CHIRP));
            if (act == ACT_KEYUPDATE) {
                peer_key_update(&p);
                peer_write(&p, CHIRP + 18, sizeof(CHIRP) - 18);
            }
            if (act == ACT_BIG) {
                size_t big = 17000; /* two records; the fuzzer's -max_len is 20000 */
                uint8_t *b = malloc(big);
                REQUIRE(b != NULL);
                for (size_t i = 0; i < big; i++)
                    b[i] = (uint8_t)(i * 7);
                peer_write(&p, b, big);
                free(b);
            }
            peer_close(&p);
        }
    }
    engine_end(&p.e);
    rng_stream = STREAM_PEER;
    SSL_free(p.ssl);
    save(dir, name, flags, p.rec, p.len);
    free(p.rec);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUTDIR\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    init_once();
    const int W = 0xf0; /* whole-buffer feeding; the fuzzer varies it */
    const int S = F_WRITE;
    /* The engine as a TLS server; the peer is a client with the client node. */
    scenario(dir, "srv13_clienthello", W, ctx_cli, 0, NULL, ACT_HELLO_ONLY);
    scenario(dir, "srv13_session", W | S, ctx_cli, 0, NULL, ACT_SESSION);
    scenario(dir, "srv13_session_bytewise", 0x10, ctx_cli, 0, NULL, ACT_SESSION);
    scenario(dir, "srv13_keyupdate", W | S, ctx_cli, 0, NULL, ACT_KEYUPDATE);
    scenario(dir, "srv13_big", 0x80 | S, ctx_cli, 0, NULL, ACT_BIG);
    scenario(dir, "srv13_ffdhe", W | S, ctx_cli, 0, "ffdhe2048", ACT_HELLO_ONLY);
    scenario(dir, "srv13_rsa_session", W | F_RSA | S, ctx_cli, 0, NULL, ACT_SESSION);
    scenario(dir, "srv12_rsa_session", W | F_RSA | S, ctx_cli, TLS1_2_VERSION, NULL,
             ACT_SESSION);
    scenario(dir, "srv12_ec_refused", W, ctx_cli, TLS1_2_VERSION, NULL, ACT_SESSION);
    save(dir, "srv_plaintext_peer", W, CHIRP, 18);
    /* The engine as a TLS client; the peer is a server with an EC or RSA node. */
    scenario(dir, "cli13_session", W | F_CLIENT | S, ctx_srv_ec, 0, NULL, ACT_SESSION);
    scenario(dir, "cli13_keyupdate", 0x50 | F_CLIENT, ctx_srv_ec, 0, NULL, ACT_KEYUPDATE);
    scenario(dir, "cli13_big", W | F_CLIENT | S, ctx_srv_ec, 0, NULL, ACT_BIG);
    scenario(dir, "cli13_hrr", W | F_CLIENT | S, ctx_srv_ec, 0, "P-256", ACT_SESSION);
    scenario(dir, "cli13_rsa_session", W | F_CLIENT, ctx_srv_rsa, 0, NULL, ACT_SESSION);
    scenario(dir, "cli12_rsa_session", W | F_CLIENT | S, ctx_srv_rsa, TLS1_2_VERSION, NULL,
             ACT_SESSION);
    save(dir, "cli_plaintext_peer", W | F_CLIENT, CHIRP, 18);
    SSL_CTX_free(ctx_srv_ec);
    SSL_CTX_free(ctx_srv_rsa);
    SSL_CTX_free(ctx_cli);
    printf("%d TLS seeds in %s\n", n_written, dir);
    return 0;
}

#endif /* FUZZ_TLS_RECORD */
