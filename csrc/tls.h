/*
 * tls.h: the TLS engine, OpenSSL over two memory BIOs. It does no I/O.
 *
 * Theory of operation
 * -------------------
 * One SSL_CTX per node is built by ch_tls_ctx_new() from CERT_CHAIN_PEM and
 * DH_PARAMS_PEM with the parameters of docs/tls.md#what-is-negotiated and
 * docs/tls.md#the-two-files-a-node-needs: TLS 1.2 as the
 * minimum (TLS 1.3 when both sides support it), the TLS 1.2 cipher list
 * restricted to the four DHE suites, library-default TLS 1.3 suites, mutual
 * authentication on both roles (verify the peer and fail when it presents no
 * certificate, depth 5), every certificate of the chain file as a trust
 * anchor, the first certificate of the file as the own leaf and the rest as
 * its chain, the first private key block of the file as the key, the DH
 * parameters for the server's DHE key exchange, no compression, no SNI and no
 * hostname check. Session caching, session tickets and renegotiation are
 * switched off: nobody resumes sessions, so they would only cost memory.
 *
 * One ch_tls_t per connection wraps an SSL object whose read BIO and write
 * BIO are plain memory buffers. The connection code is the only one that
 * touches the socket; it moves bytes between the socket and the engine:
 *
 *     socket --read--> ch_tls_feed()            (ciphertext in)
 *     ch_tls_take_out() --write--> socket       (ciphertext out)
 *     ch_tls_read()  --> frame reader           (plaintext out)
 *     writer --> ch_tls_write()                 (plaintext in)
 *
 * Any engine call may produce ciphertext (handshake messages, alerts, TLS 1.3
 * post-handshake messages), so after EVERY call the caller checks
 * ch_tls_pending_out() and sends what is there, also when the call failed:
 * the pending bytes then hold the alert that tells the peer why.
 *
 * Return values: 0 for success, CH_MORE (a positive code) for "nothing more
 * can happen until more ciphertext is fed in", and a negative code on
 * failure: -CH_TLS_ERROR (handshake or record failure), -CH_PROTOCOL_ERROR
 * (the peer closed the TLS session with close_notify), -CH_ENOMEM. Failures
 * are sticky: every later call returns the same code. ch_tls_error() then
 * gives the reason as one line of text, taken from OpenSSL's error queue and
 * the certificate verification result, e.g. "certificate verify failed:
 * unable to get local issuer certificate", "peer did not return a
 * certificate" or "wrong version number (peer speaks plaintext?)".
 * ch_tls_ctx_new() returns -CH_VALUE_ERROR for problems with the files
 * (unset, missing, unreadable, no certificate or key, encrypted key, key not
 * matching, bad or too weak DH parameters), -CH_TLS_ERROR when OpenSSL itself
 * refuses (for example no usable cipher) and -CH_ENOMEM; its message names
 * the file and the problem.
 *
 * EOF: the engine never sends close_notify
 * (docs/protocol.md#compatibility-with-libchirp-1x) and has no
 * notion of the socket's EOF. A socket EOF is an ordinary close decided by
 * the connection code; it never needs to ask the engine.
 *
 * Threads: an engine is used by one thread at a time (the loop thread). An
 * SSL_CTX is shared by all engines of a node; each engine holds a reference
 * on it. OpenSSL's error queue is per thread; the engine clears it before
 * every operation and drains it after a failure.
 */
#ifndef CH_TLS_H
#define CH_TLS_H

#include <openssl/ssl.h>

#include "chirp.h"

/* ch_tls_write() stops accepting plaintext once this much ciphertext waits
 * to be taken out; the caller sends it and calls again with the rest. */
#define CH_TLS_OUT_HIGH (64 * 1024)

typedef struct ch_tls_s ch_tls_t;

/* Build the node's context from the chain file and the DH parameters file.
 * On success stores it in *out (free with SSL_CTX_free) and returns 0. On
 * failure stores NULL, returns -CH_VALUE_ERROR, -CH_TLS_ERROR or -CH_ENOMEM
 * and writes a one-line, NUL-terminated message of at most errlen bytes
 * into err (err may be NULL), for example "CERT_CHAIN_PEM /x/y.pem: no
 * private key found". On success err holds "". */
int ch_tls_ctx_new(const char *cert_chain_pem, const char *dh_params_pem, SSL_CTX **out,
                   char *err, size_t errlen);

/* Create an engine for one connection: is_server != 0 for the accepting side
 * (TLS server), 0 for the connecting side (TLS client). The engine holds a
 * reference on ctx, so the node may drop its own reference (SSL_CTX_free)
 * while engines still live. Returns 0 or -CH_ENOMEM. */
int ch_tls_new(SSL_CTX *ctx, int is_server, ch_tls_t **out);
void ch_tls_free(ch_tls_t *t); /* NULL is fine; sends nothing */

/* Ciphertext received from the socket. Copies all len bytes. Returns 0,
 * -CH_ENOMEM or the sticky failure. */
int ch_tls_feed(ch_tls_t *t, const uint8_t *cipher, size_t len);

/* Ciphertext waiting to be sent, and taking it out: copies at most cap bytes
 * into buf and returns how many were copied. */
size_t ch_tls_pending_out(const ch_tls_t *t);
size_t ch_tls_take_out(ch_tls_t *t, uint8_t *buf, size_t cap);

/* Drive the handshake with what has been fed. Returns 0 once it is complete
 * (and on every call after that), CH_MORE while it waits for the peer, or a
 * negative failure. A client may see 0 before the server has checked the
 * client's certificate (TLS 1.3); a rejection then shows up as a failure of
 * a later ch_tls_read(). */
int ch_tls_handshake(ch_tls_t *t);

/* Plaintext out: decrypts what has been fed into buf (up to cap bytes) and
 * stores the count in *got. Returns 0 with *got > 0, CH_MORE with *got == 0
 * when no complete record is buffered, or a negative failure (*got == 0).
 * Plaintext may already be buffered when the handshake completes (it can
 * arrive together with the last handshake flight): call this right after
 * ch_tls_handshake() returned 0, and again until CH_MORE after every feed. */
int ch_tls_read(ch_tls_t *t, uint8_t *buf, size_t cap, size_t *got);

/* Plaintext in: encrypts up to len bytes of buf and stores how many were
 * taken in *taken. Returns 0 (possibly with *taken < len: it stops once
 * CH_TLS_OUT_HIGH bytes of ciphertext are pending), CH_MORE when nothing can
 * be written before more ciphertext is fed in, or a negative failure. Call
 * again with buf + *taken after sending the pending ciphertext. Only valid
 * after the handshake completed; -CH_TLS_ERROR before. Every call of at most
 * 16384 bytes is written as one TLS record. */
int ch_tls_write(ch_tls_t *t, const uint8_t *buf, size_t len, size_t *taken);

/* The failure reason (one line), or "" when the engine has not failed. */
const char *ch_tls_error(const ch_tls_t *t);

/* Negotiated protocol and cipher names ("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
 * for logs and tests; "" before the handshake completed. */
const char *ch_tls_version(const ch_tls_t *t);
const char *ch_tls_cipher(const ch_tls_t *t);

#endif
