/*
 * reader.h: the frame reader, a pure state machine over bytes (no libuv).
 * The public entry points are declared in chirp_ffi.h (ch_reader_*).
 *
 * Protocol per docs/protocol.md#wire-format: first an 18-byte handshake (accepted in
 * any number of pieces), then 27-byte frame headers followed by header_len
 * header bytes and data_len data bytes.
 *
 * ch_reader_feed() consumes bytes until it has something to report:
 *  - CH_RD_HANDSHAKE once the handshake is complete;
 *  - CH_RD_ACK / CH_RD_NOOP for a validated control frame;
 *  - CH_RD_DATA_HEADER once a data frame's 27-byte header passed validation.
 *    Nothing has been allocated yet. The caller takes a receive slot and
 *    calls feed again (possibly with len 0); if it has no slot it simply
 *    stops feeding and keeps the unconsumed bytes for later.
 *  - CH_RD_MESSAGE when the body is complete; ch_reader_take_message()
 *    returns the malloc'd message (CH_MSGF_INLINE, type/serial/identity set,
 *    flag CH_MSGF_ACK_OWED when REQ_ACK was set and ACK was not).
 *  - CH_RD_MORE when all bytes were consumed.
 *  - a negative -CH_PROTOCOL_ERROR or -CH_ENOMEM: sticky; ch_reader_error()
 *    says why in a sentence.
 * Validation order (3.3): size check (64-bit sum, over MAX_MSG_SIZE is
 * -CH_ENOMEM), then ACK/NOOP must have zero lengths and no REQ_ACK
 * (-CH_PROTOCOL_ERROR). NOOP wins over ACK. Unknown bits are ignored.
 */
#ifndef CH_READER_H
#define CH_READER_H

#include "message.h"

#endif
