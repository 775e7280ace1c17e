/*
 * chirp.h: what every C file of the core includes first. It supplies the
 * standard headers that chirp_ffi.h (a cdef-clean declarations file) relies on.
 */
#ifndef CH_CHIRP_H
#define CH_CHIRP_H

#include <stddef.h>
#include <stdint.h>

#include "chirp_ffi.h"

#define CH_HANDSHAKE_SIZE 18
#define CH_HEADER_SIZE 27
#define CH_ID_SIZE 16

/* Frame type bits (PROTOCOL.md 3.2). */
#define CH_MSG_REQ_ACK 0x01
#define CH_MSG_ACK 0x02
#define CH_MSG_NOOP 0x04

#endif
