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

/* Frame type bits (docs/protocol.md#wire-format). */
#define CH_MSG_REQ_ACK 0x01
#define CH_MSG_ACK 0x02
#define CH_MSG_NOOP 0x04

/*
 * Extension: capability NOOP (docs/extensions.md#pipelined-acknowledgements).
 * A NOOP frame whose type also has CH_MSG_EXT set and whose identity starts
 * with CH_EXT_MAGIC announces capabilities: identity[4] holds flags,
 * identity[5] the number of unacknowledged REQ_ACK frames the announcer
 * accepts on that connection, identity[6..9] its MAX_MSG_SIZE as a big-endian
 * uint32 (0 = not announced; docs/extensions.md). libchirp 1.x treats it as a plain NOOP
 * (docs/protocol.md#wire-format: NOOP wins, unknown bits are ignored). The connecting side
 * announces first; the accepting side answers only an announcement, so a
 * 1.x connector never sees one. Without an answer, one REQ_ACK frame at a time.
 */
#define CH_MSG_EXT 0x40
#define CH_EXT_MAGIC "chx1"
#define CH_EXT_F_PIPELINE 0x01
#define CH_EXT_WINDOW 32

#endif
