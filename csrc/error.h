/*
 * error.h: the single list of error codes. CH_ERROR_MAP expands to one entry
 * per code: X(NAME, value, "description"). error.c turns it into
 * ch_strerror()/ch_error_name() and checks it against the enum in chirp_ffi.h.
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
