"""Many idle raw chirp clients in one process, for load tests and benchmarks.

Run as a child process::

    python tests/loadclient.py --port PORT --count N

It raises its own open-file limit, opens N plaintext TCP connections to
127.0.0.1:PORT and completes the chirp handshake on each (docs/protocol.md#wire-format:
read the node's 18 bytes, send ours), in batches smaller than the node's listen
backlog so that no SYN is dropped. Every connection announces its own port in
its handshake (``--hs-port-base`` + i), so the node files each one under a
remote of its own, as with N different peers. Then the connections stay idle.

Lines on stdout tell the parent what happened:

* ``ready N SECONDS``: N connections completed their handshake in SECONDS;
* ``closed N``: the node has closed all N of them (EOF seen on each);
* ``error TEXT``: giving up (the process exits with status 1).

With ``--keepalive SECONDS`` every connection sends a NOOP frame (docs/protocol.md
"Wire format") that often, which keeps it from looking idle to the node's garbage
collector, until a line ``idle`` arrives on stdin; from then on they are quiet.
The process closes everything and exits when its stdin reaches EOF (or a line
``exit`` arrives), so a parent that dies takes it along.

Only the standard library is used; the package under test is never imported.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import socket
import struct
import sys
import time

HANDSHAKE = struct.Struct("!H16s")
NOOP = struct.pack("!16sIIHB", bytes(16), 0, 0, 0, 0x04)


def raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        hard = want  # needs CAP_SYS_RESOURCE (root), as on CI
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = b""
    while len(buf) < n:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("node closed the connection during the handshake")
        buf += chunk
    return buf


def send_noops(socks) -> None:
    for s in socks:
        try:
            s.send(NOOP)
        except OSError:
            pass  # a full buffer or a closed peer: hold() sees the latter


def open_connections(
    port: int, count: int, batch: int, hs_port_base: int, timeout: float, keepalive: float
) -> list[socket.socket]:
    """count sockets with a completed handshake, batch by batch."""
    socks: list[socket.socket] = []
    next_noop = time.monotonic() + keepalive
    while len(socks) < count:
        if keepalive and time.monotonic() >= next_noop:  # a slow start must not look idle
            send_noops(socks)
            next_noop = time.monotonic() + keepalive
        todo = min(batch, count - len(socks))
        fresh = []
        for _ in range(todo):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(("127.0.0.1", port))
            fresh.append(s)
        deadline = time.monotonic() + timeout
        for s in fresh:
            i = len(socks)
            recv_exact(s, HANDSHAKE.size, deadline)  # the node's handshake
            identity = struct.pack("!4sQI", b"load", i, os.getpid())
            s.settimeout(timeout)
            s.sendall(HANDSHAKE.pack(hs_port_base + i, identity))
            s.setblocking(False)
            socks.append(s)
    return socks


def hold(socks: list[socket.socket], keepalive: float) -> None:
    """Keep the connections until stdin ends; close each one the node closes."""
    ep = select.epoll()
    by_fd = {}
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        by_fd[s.fileno()] = s
    stdin = sys.stdin.fileno()
    ep.register(stdin, select.EPOLLIN | select.EPOLLHUP)
    total = len(socks)
    closed = 0
    next_noop = 0.0
    try:
        while True:
            if keepalive and time.monotonic() >= next_noop:
                send_noops(by_fd.values())
                next_noop = time.monotonic() + keepalive
            for fd, _ in ep.poll(min(1.0, keepalive) if keepalive else 1.0):
                if fd == stdin:
                    line = os.read(stdin, 4096)
                    if not line or b"exit" in line:
                        return
                    if b"idle" in line:
                        keepalive = 0.0
                    continue
                s = by_fd.pop(fd)
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    by_fd[fd] = s
                    continue
                except OSError:
                    data = b""
                if data:  # an idle peer gets nothing but NOOPs; ignore them
                    by_fd[fd] = s
                    continue
                ep.unregister(fd)
                s.close()
                closed += 1
                if closed == total:
                    print("closed %d" % total, flush=True)
    finally:
        ep.close()
        for s in by_fd.values():
            s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True, help="the node's port on 127.0.0.1")
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=64, help="connects in flight (< node BACKLOG)")
    ap.add_argument("--hs-port-base", type=int, default=1025, help="handshake port of the first")
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--keepalive", type=float, default=0.0, help="NOOP interval until 'idle'")
    args = ap.parse_args(argv)
    if args.hs_port_base + args.count > 65536:
        ap.error("--hs-port-base + --count must stay below 65536")
    raise_nofile(args.count + 256)
    start = time.monotonic()
    try:
        socks = open_connections(
            args.port, args.count, args.batch, args.hs_port_base, args.timeout, args.keepalive
        )
    except OSError as e:
        print("error %s" % e, flush=True)
        return 1
    print("ready %d %.3f" % (len(socks), time.monotonic() - start), flush=True)
    hold(socks, args.keepalive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
