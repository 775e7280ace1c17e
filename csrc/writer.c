/*
 * writer.c: encodes the chirp handshake and frame headers.
 *
 * Theory of operation
 * -------------------
 * The writer is the mirror image of the reader and just as free of I/O: it
 * fills a caller's fixed-size buffer with the wire form of docs/protocol.md#wire-format
 * (18-byte handshake: port, identity) or 3.1 (27-byte frame header: identity,
 * serial, data_len, header_len, type). All integers are written big-endian,
 * byte by byte, so the result does not depend on the host's byte order or on
 * the buffer's alignment. Header and data bytes are not copied here; the
 * connection writes them from their owners' buffers right behind the header.
 */
#include <string.h>

#include "writer.h"

static void ch__wr_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void ch__wr_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

void ch_writer_handshake(uint8_t out[18], uint16_t port, const uint8_t identity[16])
{
    ch__wr_be16(out, port);
    memcpy(out + 2, identity, CH_ID_SIZE);
}

void ch_writer_header(uint8_t out[27], const uint8_t identity[16], uint32_t serial,
                      uint32_t data_len, uint16_t header_len, uint8_t type)
{
    memcpy(out, identity, CH_ID_SIZE);
    ch__wr_be32(out + 16, serial);
    ch__wr_be32(out + 20, data_len);
    ch__wr_be16(out + 24, header_len);
    out[26] = type;
}
