#!/usr/bin/env python3
"""A mesh: several nodes all asking each other, request and answer.

Every node runs two threads: a *server* takes incoming requests from its queue
and answers each by sending the message back with new data (the answer keeps
the request's identity, which is how ``request()`` recognises it); a *client*
sends ``--requests`` requests to every other node at once and collects the
answers as they arrive. Addresses alternate between 127.0.0.1 and ::1 (when
the machine has IPv6), so both families are used. At the end every node
reports what it asked, what came back and what it served, together with the
message counters from ``statistics()``.

Collecting answers as they complete (``as_completed``) matters: the answer
future's ``result()`` releases the answer's slot, and in synchronous mode a
connection carries one unreleased message at a time.

Every node takes a free port (``Config.PORT = 0``) unless ``--port P`` is
given; then the nodes listen on P, P+1, ...

Run: ``.venv/bin/python examples/mesh.py`` (after ``make build``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import queue
import socket
import sys
import threading
import time
from concurrent.futures import Future
from typing import Dict, List, Optional, Tuple

import libchirp
from libchirp.queue import Chirp, Message

NAMES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class Peer:
    """One node of the mesh with its counters."""

    def __init__(self, loop: libchirp.Loop, name: str, port: int, synchronous: bool) -> None:
        self.name = name
        cfg = libchirp.Config()
        cfg.PORT = port  # 0: a free port, which self.node.port reports
        cfg.SYNCHRONOUS = synchronous
        cfg.DISABLE_ENCRYPTION = True  # loopback only: never encrypted anyway
        self.node = Chirp(loop, cfg)
        self.asked = self.answered = self.served = 0
        self.errors: List[str] = []
        self.stop = threading.Event()

    def serve(self) -> None:
        """Answer every request: send the message back with new data."""
        pending: List[Future[Message]] = []
        while not self.stop.is_set():
            try:
                msg = self.node.get(timeout=0.1)  # AUTO_RELEASE: released here
            except queue.Empty:
                continue
            msg.data = b"%s, answered by %s" % (msg.data, self.name.encode())
            pending.append(self.node.send(msg))
            self.served += 1
        for fut in pending:
            exc = fut.exception(timeout=30)
            if exc is not None:
                self.errors.append("answer failed: %r" % exc)

    def ask(self, peers: List[Peer], count: int, use_ipv6: bool) -> None:
        """Send ``count`` requests to every other peer, collect the answers."""
        futures: Dict[Future[Message], Tuple[str, bytes]] = {}
        for other in peers:
            if other is self:
                continue
            for i in range(count):
                msg = Message()
                msg.address = "::1" if use_ipv6 and i % 2 else "127.0.0.1"
                msg.port = other.node.port
                msg.data = b"%s asks %s #%d" % (self.name.encode(), other.name.encode(), i)
                futures[self.node.request(msg)] = (other.name, msg.data)
                self.asked += 1
        for fut in concurrent.futures.as_completed(futures, timeout=60):
            asked, question = futures[fut]
            try:
                answer = fut.result()  # releases the answer's slot
            except Exception as exc:
                self.errors.append("request to %s failed: %r" % (asked, exc))
                continue
            if answer.data != b"%s, answered by %s" % (question, asked.encode()):
                self.errors.append("wrong answer from %s: %r" % (asked, answer.data))
                continue
            self.answered += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4, choices=range(2, 27), metavar="2..26")
    parser.add_argument("--requests", type=int, default=25, help="per pair of nodes")
    parser.add_argument("--async", dest="asynchronous", action="store_true")
    parser.add_argument(
        "--port", type=int, default=0, help="port of the first node, the others follow (0: free)"
    )
    args = parser.parse_args()
    use_ipv6 = has_ipv6()

    mode = "asynchronous" if args.asynchronous else "synchronous"
    print(
        "mesh: %d nodes, each sends %d requests to every other node (%s mode, over %s)"
        % (args.nodes, args.requests, mode, "127.0.0.1 and ::1" if use_ipv6 else "127.0.0.1")
    )
    with libchirp.Loop() as loop:
        peers: List[Peer] = []
        took: Optional[float] = None
        try:
            for i in range(args.nodes):
                port = args.port + i if args.port else 0
                peers.append(Peer(loop, NAMES[i], port, not args.asynchronous))
            servers = [threading.Thread(target=p.serve) for p in peers]
            clients = [
                threading.Thread(target=p.ask, args=(peers, args.requests, use_ipv6)) for p in peers
            ]
            start = time.monotonic()
            for t in servers + clients:
                t.start()
            for t in clients:
                t.join(90)
            took = time.monotonic() - start
            for p in peers:
                p.stop.set()
            for t in servers:
                t.join(60)
            for p in peers:
                stats = p.node.statistics()
                totals = stats["totals"]
                print(
                    "node %s (port %d): asked %d, got %d answers, served %d; "
                    "%d messages in, %d out, %d remotes"
                    % (
                        p.name,
                        p.node.port,
                        p.asked,
                        p.answered,
                        p.served,
                        totals["messages_in"],
                        totals["messages_out"],
                        len(stats["remotes"]),
                    )
                )
                for error in p.errors[:5]:
                    print("node %s: %s" % (p.name, error))
        finally:
            for p in peers:
                p.node.stop()

    asked = sum(p.asked for p in peers)
    answered = sum(p.answered for p in peers)
    errors = sum(len(p.errors) for p in peers)
    print(
        "mesh: %d nodes, %d requests, %d answers, %d errors in %.2f s"
        % (len(peers), asked, answered, errors, took or 0.0)
    )
    return 0 if answered == asked and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
