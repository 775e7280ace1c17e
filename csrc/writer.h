/*
 * writer.h: encodes the handshake and frame headers into caller buffers
 * (big-endian, docs/protocol.md#wire-format). Declared in chirp_ffi.h:
 * ch_writer_handshake(), ch_writer_header().
 */
#ifndef CH_WRITER_H
#define CH_WRITER_H

#include "chirp.h"

#endif
