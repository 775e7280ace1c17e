/*
 * tls.c: the TLS engine over OpenSSL memory BIOs (see tls.h for the contract).
 *
 * Theory of operation
 * -------------------
 * The context. ch_tls_ctx_new() reads CERT_CHAIN_PEM once into memory and
 * walks it three times, as docs/tls.md#the-two-files-a-node-needs describes: every certificate goes
 * into the trust store, the first one becomes the own (leaf) certificate and
 * the others its chain, and the first private key block becomes the key,
 * which must match the leaf. Reading the file ourselves rather than handing
 * its name to OpenSSL three times lets every problem be reported with the
 * file name and a plain sentence, and keeps OpenSSL from ever prompting on a
 * terminal for the password of an encrypted key (our password callback
 * refuses, and the error says the key is encrypted). DH_PARAMS_PEM is read
 * the same way and installed as the server's DHE group with
 * SSL_CTX_set0_tmp_dh_pkey(), the OpenSSL 3 interface.
 *
 * The engine. Each ch_tls_t owns an SSL object with two memory BIOs: "in"
 * holds ciphertext fed from the socket until OpenSSL consumes it, "out"
 * collects the ciphertext OpenSSL produces until the caller takes it. The in
 * BIO reports "retry" instead of EOF when empty, so an empty buffer surfaces
 * as SSL_ERROR_WANT_READ (CH_MORE) and never as an end of stream; a real EOF
 * is the connection code's business (an ordinary close, docs/tls.md#what-is-negotiated).
 * The out BIO grows as needed, so OpenSSL never sees a blocked write: writes
 * complete record by record (SSL_MODE_ENABLE_PARTIAL_WRITE) and
 * ch_tls_write() bounds the pending ciphertext itself (CH_TLS_OUT_HIGH).
 *
 * Every SSL_* call is preceded by ERR_clear_error() (the queue is per thread
 * and shared by all engines of the loop thread) and its result goes through
 * ch__tls_result(), the one switch over SSL_get_error(). A failure drains the
 * error queue into the engine's reason text and becomes sticky.
 */
#include "tls.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#if OPENSSL_VERSION_NUMBER < 0x30000000L
#error "libchirp needs OpenSSL 3.0 or newer"
#endif

#include "error.h"

/* docs/tls.md#what-is-negotiated: the only TLS 1.2 suites; TLS 1.3 keeps the defaults. */
#define CH__TLS12_CIPHERS                                                      \
    "DHE-DSS-AES256-GCM-SHA384:DHE-RSA-AES256-GCM-SHA384:"                     \
    "DHE-RSA-AES256-SHA256:DHE-DSS-AES256-SHA256"
#define CH__TLS_VERIFY_DEPTH 5
#define CH__TLS_MAX_FILE (1024 * 1024) /* PEM files are a few KiB */
#define CH__TLS_REASON_LEN 256

struct ch_tls_s {
    SSL *ssl;
    BIO *in;  /* ciphertext from the peer, read by OpenSSL */
    BIO *out; /* ciphertext for the peer, written by OpenSSL */
    int done; /* handshake complete */
    int failed; /* 0, or the sticky negative code */
    char reason[CH__TLS_REASON_LEN];
};

/* ------------------------------------------------------------------------ */
/* Error text                                                               */
/* ------------------------------------------------------------------------ */

/* Write the text of OpenSSL's oldest queued error (usually the root cause)
 * into buf and empty the queue. Returns the packed error code, 0 if none. */
static unsigned long ch__tls_drain_errors(char *buf, size_t len)
{
    unsigned long e, first = 0;
    const char *data = NULL;
    int flags = 0;

    if (len > 0)
        buf[0] = '\0';
    while ((e = ERR_get_error_all(NULL, NULL, NULL, &data, &flags)) != 0) {
        if (first != 0)
            continue;
        first = e;
        const char *reason = ERR_reason_error_string(e);
        char code[128];
        if (reason == NULL) {
            ERR_error_string_n(e, code, sizeof(code));
            reason = code;
        }
        if ((flags & ERR_TXT_STRING) && data != NULL && data[0] != '\0')
            snprintf(buf, len, "%s (%s)", reason, data);
        else
            snprintf(buf, len, "%s", reason);
    }
    return first;
}

static void ch__tls_msg(char *err, size_t errlen, const char *fmt, ...)
{
    if (err == NULL || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* ------------------------------------------------------------------------ */
/* The context                                                              */
/* ------------------------------------------------------------------------ */

/* Read a whole (small) file into a fresh buffer. On failure returns
 * -CH_VALUE_ERROR with "<what> <path>: <problem>" in err. */
static int ch__tls_slurp(const char *what, const char *path, char **data, size_t *len, char *err,
                         size_t errlen)
{
    *data = NULL;
    *len = 0;
    if (path == NULL || path[0] == '\0') {
        ch__tls_msg(err, errlen, "%s is not set", what);
        return -CH_VALUE_ERROR;
    }
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        ch__tls_msg(err, errlen, "%s %s: cannot open: %s", what, path, strerror(errno));
        return -CH_VALUE_ERROR;
    }
    size_t cap = 8192, used = 0;
    char *buf = malloc(cap);
    int rc = buf == NULL ? -CH_ENOMEM : 0;
    while (rc == 0) {
        if (used + 1 == cap) { /* keep room for a terminating NUL */
            char *bigger = cap < CH__TLS_MAX_FILE ? realloc(buf, cap * 2) : NULL;
            if (bigger == NULL && cap >= CH__TLS_MAX_FILE) {
                ch__tls_msg(err, errlen, "%s %s: file larger than %d bytes", what, path,
                            CH__TLS_MAX_FILE);
                rc = -CH_VALUE_ERROR;
                break;
            }
            if (bigger == NULL) {
                rc = -CH_ENOMEM;
                break;
            }
            buf = bigger;
            cap *= 2;
        }
        size_t n = fread(buf + used, 1, cap - used - 1, f);
        used += n;
        if (n == 0) {
            if (ferror(f)) {
                ch__tls_msg(err, errlen, "%s %s: cannot read: %s", what, path, strerror(errno));
                rc = -CH_VALUE_ERROR;
            }
            break;
        }
    }
    fclose(f);
    if (rc == -CH_ENOMEM)
        ch__tls_msg(err, errlen, "%s %s: out of memory", what, path);
    if (rc != 0) {
        free(buf);
        return rc;
    }
    buf[used] = '\0';
    *data = buf;
    *len = used;
    return 0;
}

/* Password callback: encrypted keys are not supported (a node starts
 * unattended), so refuse at once instead of prompting on a terminal, and
 * note that a password was asked for. */
static int ch__tls_no_password(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    *(int *)u = 1;
    return -1;
}

/* Is the oldest queued error "no more PEM blocks of this kind"? */
static int ch__tls_pem_exhausted(void)
{
    unsigned long e = ERR_peek_error();
    return ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE;
}

/* Does the NUL-terminated PEM text hold a "-----BEGIN <label>-----" line
 * whose label ends with suffix ("PRIVATE KEY", "PARAMETERS")? OpenSSL 3's
 * decoders do not say "nothing found" clearly, so we look ourselves. */
static int ch__tls_has_block(const char *pem, const char *suffix)
{
    static const char begin[] = "-----BEGIN ";
    size_t slen = strlen(suffix);
    for (const char *p = strstr(pem, begin); p != NULL; p = strstr(p, begin)) {
        p += sizeof(begin) - 1;
        const char *end = strstr(p, "-----");
        const char *nl = strchr(p, '\n');
        if (end == NULL)
            break;
        if ((nl == NULL || end < nl) && (size_t)(end - p) >= slen &&
            memcmp(end - slen, suffix, slen) == 0)
            return 1;
    }
    return 0;
}

/* Certificates: trust all, first = leaf, the rest = chain. */
static int ch__tls_load_certs(SSL_CTX *ctx, const char *path, const char *pem, size_t len,
                              char *err, size_t errlen)
{
    const char *what = "CERT_CHAIN_PEM";
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    if (bio == NULL) {
        ch__tls_msg(err, errlen, "%s %s: out of memory", what, path);
        return -CH_ENOMEM;
    }
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    int count = 0, rc = 0;
    char why[CH__TLS_REASON_LEN];
    for (;;) {
        int pw = 0;
        X509 *x = PEM_read_bio_X509(bio, NULL, ch__tls_no_password, &pw);
        if (x == NULL) {
            if (ch__tls_pem_exhausted()) {
                ERR_clear_error();
                break;
            }
            ch__tls_drain_errors(why, sizeof(why));
            ch__tls_msg(err, errlen, "%s %s: bad certificate #%d: %s", what, path, count + 1,
                        why);
            rc = -CH_VALUE_ERROR;
            break;
        }
        count++;
        int ok = X509_STORE_add_cert(store, x);
        if (ok && count == 1)
            ok = SSL_CTX_use_certificate(ctx, x);
        else if (ok && SSL_CTX_add0_chain_cert(ctx, x))
            x = NULL; /* the context owns it now */
        else
            ok = 0;
        X509_free(x);
        if (!ok) {
            ch__tls_drain_errors(why, sizeof(why));
            ch__tls_msg(err, errlen, "%s %s: cannot use certificate #%d: %s", what, path, count,
                        why);
            rc = -CH_TLS_ERROR;
            break;
        }
    }
    BIO_free(bio);
    if (rc == 0 && count == 0) {
        ch__tls_msg(err, errlen, "%s %s: no certificate found", what, path);
        rc = -CH_VALUE_ERROR;
    }
    return rc;
}

/* The first private key block; it must match the leaf certificate. */
static int ch__tls_load_key(SSL_CTX *ctx, const char *path, const char *pem, size_t len,
                            char *err, size_t errlen)
{
    const char *what = "CERT_CHAIN_PEM";
    char why[CH__TLS_REASON_LEN];
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    if (bio == NULL) {
        ch__tls_msg(err, errlen, "%s %s: out of memory", what, path);
        return -CH_ENOMEM;
    }
    int pw = 0;
    EVP_PKEY *key = PEM_read_bio_PrivateKey(bio, NULL, ch__tls_no_password, &pw);
    BIO_free(bio);
    if (key == NULL) {
        int none = !ch__tls_has_block(pem, "PRIVATE KEY");
        ch__tls_drain_errors(why, sizeof(why));
        if (pw)
            ch__tls_msg(err, errlen, "%s %s: the private key is encrypted (not supported)", what,
                        path);
        else if (none)
            ch__tls_msg(err, errlen, "%s %s: no private key found", what, path);
        else
            ch__tls_msg(err, errlen, "%s %s: bad private key: %s", what, path, why);
        return -CH_VALUE_ERROR;
    }
    int rc = 0;
    X509 *leaf = SSL_CTX_get0_certificate(ctx);
    if (leaf == NULL || !X509_check_private_key(leaf, key)) {
        ERR_clear_error();
        ch__tls_msg(err, errlen,
                    "%s %s: the private key does not match the first certificate", what, path);
        rc = -CH_VALUE_ERROR;
    } else if (!SSL_CTX_use_PrivateKey(ctx, key)) {
        ch__tls_drain_errors(why, sizeof(why));
        ch__tls_msg(err, errlen, "%s %s: cannot use the private key: %s", what, path, why);
        rc = -CH_TLS_ERROR;
    }
    EVP_PKEY_free(key);
    return rc;
}

/* PKCS#3 DH parameters for the server's DHE key exchange. */
static int ch__tls_load_dh(SSL_CTX *ctx, const char *path, const char *pem, size_t len,
                           char *err, size_t errlen)
{
    const char *what = "DH_PARAMS_PEM";
    char why[CH__TLS_REASON_LEN];
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    if (bio == NULL) {
        ch__tls_msg(err, errlen, "%s %s: out of memory", what, path);
        return -CH_ENOMEM;
    }
    EVP_PKEY *dh = PEM_read_bio_Parameters(bio, NULL);
    BIO_free(bio);
    if (dh == NULL) {
        int none = !ch__tls_has_block(pem, "PARAMETERS");
        ch__tls_drain_errors(why, sizeof(why));
        if (none)
            ch__tls_msg(err, errlen, "%s %s: no DH parameters found", what, path);
        else
            ch__tls_msg(err, errlen, "%s %s: bad DH parameters: %s", what, path, why);
        return -CH_VALUE_ERROR;
    }
    if (!EVP_PKEY_is_a(dh, "DH") && !EVP_PKEY_is_a(dh, "DHX")) {
        ch__tls_msg(err, errlen, "%s %s: not DH parameters (%s)", what, path,
                    EVP_PKEY_get0_type_name(dh));
        EVP_PKEY_free(dh);
        return -CH_VALUE_ERROR;
    }
    if (!SSL_CTX_set0_tmp_dh_pkey(ctx, dh)) {
        ch__tls_drain_errors(why, sizeof(why));
        ch__tls_msg(err, errlen, "%s %s: DH parameters rejected: %s", what, path, why);
        EVP_PKEY_free(dh); /* only taken over on success */
        return -CH_VALUE_ERROR;
    }
    return 0;
}

int ch_tls_ctx_new(const char *cert_chain_pem, const char *dh_params_pem, SSL_CTX **out,
                   char *err, size_t errlen)
{
    char *chain = NULL, *dh = NULL;
    size_t chain_len = 0, dh_len = 0;
    char why[CH__TLS_REASON_LEN];
    SSL_CTX *ctx = NULL;
    int rc;

    *out = NULL;
    ch__tls_msg(err, errlen, "%s", "");
    ERR_clear_error();
    rc = ch__tls_slurp("CERT_CHAIN_PEM", cert_chain_pem, &chain, &chain_len, err, errlen);
    if (rc == 0)
        rc = ch__tls_slurp("DH_PARAMS_PEM", dh_params_pem, &dh, &dh_len, err, errlen);
    if (rc != 0)
        goto done;

    ctx = SSL_CTX_new(TLS_method());
    if (ctx == NULL) {
        ch__tls_drain_errors(why, sizeof(why));
        ch__tls_msg(err, errlen, "cannot create a TLS context: %s", why);
        rc = -CH_TLS_ERROR;
        goto done;
    }
    if (!SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) ||
        !SSL_CTX_set_cipher_list(ctx, CH__TLS12_CIPHERS)) {
        ch__tls_drain_errors(why, sizeof(why));
        ch__tls_msg(err, errlen, "cannot configure TLS versions or ciphers: %s", why);
        rc = -CH_TLS_ERROR;
        goto done;
    }
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    SSL_CTX_set_verify_depth(ctx, CH__TLS_VERIFY_DEPTH);

    rc = ch__tls_load_certs(ctx, cert_chain_pem, chain, chain_len, err, errlen);
    if (rc == 0)
        rc = ch__tls_load_key(ctx, cert_chain_pem, chain, chain_len, err, errlen);
    if (rc == 0)
        rc = ch__tls_load_dh(ctx, dh_params_pem, dh, dh_len, err, errlen);

done:
    ERR_clear_error();
    free(chain);
    free(dh);
    if (rc != 0) {
        SSL_CTX_free(ctx);
        return rc;
    }
    *out = ctx;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The engine                                                               */
/* ------------------------------------------------------------------------ */

static int ch__tls_fail(ch_tls_t *t, int code, const char *reason)
{
    if (t->failed == 0) {
        t->failed = code;
        snprintf(t->reason, sizeof(t->reason), "%s", reason);
    }
    return t->failed;
}

/* A failure reported through the error queue (SSL_ERROR_SSL): name the root
 * cause, add the certificate verification result where it explains more,
 * and hint at a plaintext peer where that is the likely story (1.2). */
static int ch__tls_fail_queue(ch_tls_t *t, const char *fallback)
{
    char why[CH__TLS_REASON_LEN / 2], reason[CH__TLS_REASON_LEN];
    unsigned long e = ch__tls_drain_errors(why, sizeof(why));
    int lib = ERR_GET_LIB(e), code = ERR_GET_REASON(e);

    if (e == 0) {
        snprintf(reason, sizeof(reason), "%s", fallback);
    } else if (lib == ERR_LIB_SSL && code == SSL_R_CERTIFICATE_VERIFY_FAILED &&
               SSL_get_verify_result(t->ssl) != X509_V_OK) {
        snprintf(reason, sizeof(reason), "%s: %s", why,
                 X509_verify_cert_error_string(SSL_get_verify_result(t->ssl)));
    } else if (lib == ERR_LIB_SSL &&
               (code == SSL_R_WRONG_VERSION_NUMBER || code == SSL_R_PACKET_LENGTH_TOO_LONG ||
                code == SSL_R_UNKNOWN_PROTOCOL || code == SSL_R_HTTP_REQUEST ||
                code == SSL_R_RECORD_LENGTH_MISMATCH)) {
        snprintf(reason, sizeof(reason), "%s (peer speaks plaintext?)", why);
    } else {
        snprintf(reason, sizeof(reason), "%s", why);
    }
    return ch__tls_fail(t, -CH_TLS_ERROR, reason);
}

/* The one place that interprets SSL_get_error(): ret is the return value of
 * the failed SSL_* call. Returns CH_MORE or a (sticky) negative failure. */
static int ch__tls_result(ch_tls_t *t, int ret)
{
    int e = SSL_get_error(t->ssl, ret);
    switch (e) {
    case SSL_ERROR_NONE:
        return 0;
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE: /* the out BIO never blocks; treated alike */
        ERR_clear_error();
        return CH_MORE;
    case SSL_ERROR_ZERO_RETURN:
        ERR_clear_error();
        return ch__tls_fail(t, -CH_PROTOCOL_ERROR, "peer closed the TLS session (close_notify)");
    case SSL_ERROR_SSL:
        return ch__tls_fail_queue(t, "TLS protocol error");
    case SSL_ERROR_SYSCALL:
        return ch__tls_fail_queue(t, "unexpected end of the TLS stream");
    default: {
        char reason[64];
        ERR_clear_error();
        snprintf(reason, sizeof(reason), "unexpected TLS state (SSL_get_error %d)", e);
        return ch__tls_fail(t, -CH_TLS_ERROR, reason);
    }
    }
}

int ch_tls_new(SSL_CTX *ctx, int is_server, ch_tls_t **out)
{
    *out = NULL;
    ch_tls_t *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return -CH_ENOMEM;
    ERR_clear_error();
    t->ssl = SSL_new(ctx);
    t->in = BIO_new(BIO_s_mem());
    t->out = BIO_new(BIO_s_mem());
    if (t->ssl == NULL || t->in == NULL || t->out == NULL) {
        ERR_clear_error();
        BIO_free(t->in);
        BIO_free(t->out);
        SSL_free(t->ssl);
        free(t);
        return -CH_ENOMEM;
    }
    /* Empty means "retry later", not EOF. */
    BIO_set_mem_eof_return(t->in, -1);
    BIO_set_mem_eof_return(t->out, -1);
    SSL_set_bio(t->ssl, t->in, t->out); /* the SSL owns both BIOs now */
    if (is_server)
        SSL_set_accept_state(t->ssl);
    else
        SSL_set_connect_state(t->ssl);
    *out = t;
    return 0;
}

void ch_tls_free(ch_tls_t *t)
{
    if (t == NULL)
        return;
    SSL_free(t->ssl); /* frees the BIOs; no close_notify is sent */
    free(t);
}

int ch_tls_feed(ch_tls_t *t, const uint8_t *cipher, size_t len)
{
    if (t->failed)
        return t->failed;
    while (len > 0) {
        int n = len > INT_MAX ? INT_MAX : (int)len;
        if (BIO_write(t->in, cipher, n) != n) {
            ERR_clear_error();
            return ch__tls_fail(t, -CH_ENOMEM, "out of memory buffering TLS input");
        }
        cipher += n;
        len -= (size_t)n;
    }
    return 0;
}

size_t ch_tls_pending_out(const ch_tls_t *t) { return BIO_ctrl_pending(t->out); }

size_t ch_tls_take_out(ch_tls_t *t, uint8_t *buf, size_t cap)
{
    int n = BIO_read(t->out, buf, cap > INT_MAX ? INT_MAX : (int)cap);
    return n > 0 ? (size_t)n : 0;
}

int ch_tls_handshake(ch_tls_t *t)
{
    if (t->failed)
        return t->failed;
    if (t->done)
        return 0;
    ERR_clear_error();
    int ret = SSL_do_handshake(t->ssl);
    if (ret == 1) {
        t->done = 1;
        return 0;
    }
    return ch__tls_result(t, ret);
}

int ch_tls_read(ch_tls_t *t, uint8_t *buf, size_t cap, size_t *got)
{
    *got = 0;
    int rc = ch_tls_handshake(t);
    if (rc != 0)
        return rc;
    rc = CH_MORE;
    while (*got < cap) {
        size_t n = 0;
        ERR_clear_error();
        int ret = SSL_read_ex(t->ssl, buf + *got, cap - *got, &n);
        if (ret != 1) {
            rc = ch__tls_result(t, ret);
            break;
        }
        *got += n;
    }
    /* Plaintext first; a failure behind it is sticky and reported next time. */
    return *got > 0 ? 0 : rc;
}

int ch_tls_write(ch_tls_t *t, const uint8_t *buf, size_t len, size_t *taken)
{
    *taken = 0;
    int rc = ch_tls_handshake(t);
    if (rc != 0)
        return rc;
    while (*taken < len && BIO_ctrl_pending(t->out) < CH_TLS_OUT_HIGH) {
        size_t n = 0;
        ERR_clear_error();
        /* Partial-write mode: one record per call; a retry after CH_MORE may
         * pass a moved buffer (ACCEPT_MOVING_WRITE_BUFFER). */
        int ret = SSL_write_ex(t->ssl, buf + *taken, len - *taken, &n);
        if (ret != 1) {
            rc = ch__tls_result(t, ret);
            if (rc < 0 || *taken == 0)
                return rc;
            break; /* CH_MORE after progress: report the progress */
        }
        *taken += n;
    }
    return 0;
}

const char *ch_tls_error(const ch_tls_t *t) { return t->reason; }

const char *ch_tls_version(const ch_tls_t *t) { return t->done ? SSL_get_version(t->ssl) : ""; }

const char *ch_tls_cipher(const ch_tls_t *t)
{
    return t->done ? SSL_CIPHER_get_name(SSL_get_current_cipher(t->ssl)) : "";
}
