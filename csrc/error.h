/*
 * error.h: the single list of error codes. CH_ERROR_MAP expands to one entry
 * per code: X(NAME, value, "description"). error.c turns it into
 * ch_strerror()/ch_error_name() and checks it against the enum in chirp_ffi.h.
 *
 * Sign convention, the same in every file of the core (as errno in C):
 *  - A function that can fail returns 0 (CH_SUCCESS) or a negative code
 *    -CH_<NAME>, so `if (rc < 0)` and `if (rc != 0)` both test for failure.
 *    Functions that also report progress or a count use non-negative values
 *    for those: ch_reader_feed() returns CH_RD_* states, the TLS engine
 *    CH_MORE, ch_loop_poll() a number of events (-CH_SHUTDOWN once the loop
 *    has ended). libuv's own negative UV_E* results never leave the file that
 *    called libuv: they are turned into a -CH_<NAME> or a close reason there.
 *  - A code carried as data is the positive CH_<NAME> (the libchirp 1.x
 *    value): the status of an event, the reason handed to ch__conn_close(),
 *    ch__send_done() or ch__msg_fail(), and, in Python, an exception's
 *    `ecode`. `-rc` turns a returned code into such a value.
 * Python maps codes to exceptions in one function (libchirp/errors.py,
 * chirp_error_to_exception), which accepts either sign.
 */
#ifndef CH_ERROR_H
#define CH_ERROR_H

#include "chirp.h"

#define CH_ERROR_MAP(X)                                                         \
    X(SUCCESS, 0, "success")                                                    \
    X(VALUE_ERROR, 1, "invalid value")                                          \
    X(UV_ERROR, 2, "event loop error")                                          \
    X(PROTOCOL_ERROR, 3, "protocol error: bad data, or the peer closed")        \
    X(EADDRINUSE, 4, "cannot bind or listen: address in use")                   \
    X(FATAL, 5, "fatal error")                                                  \
    X(TLS_ERROR, 6, "TLS error")                                                \
    X(NOT_INITIALIZED, 7, "not initialized")                                    \
    X(IN_PRORESS, 8, "action already in progress")                              \
    X(TIMEOUT, 9, "timed out")                                                  \
    X(ENOMEM, 10, "out of memory, or message over MAX_MSG_SIZE")                \
    X(SHUTDOWN, 11, "connection closed by garbage collection or node stop")     \
    X(CANNOT_CONNECT, 12, "cannot connect")                                     \
    X(QUEUED, 13, "message queued")                                             \
    X(USED, 14, "message already in use")                                       \
    X(MORE, 15, "more data needed")                                             \
    X(BUSY, 16, "busy")                                                         \
    X(EMPTY, 17, "empty")                                                       \
    X(WRITE_ERROR, 18, "write of the chirp handshake failed")                   \
    X(INIT_FAIL, 19, "resource initialization failed")                         \
    X(SEND_QUEUE_FULL, 20, "send queue full (MAX_SEND_QUEUE)")

#endif
