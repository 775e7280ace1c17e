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

Run: ``python examples/mesh.py`` (after ``make build``).
"""

import argparse
import concurrent.futures
import os
import queue
import socket
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import libchirp  # noqa: E402
from libchirp.queue import Chirp, Message  # noqa: E402

NAMES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def has_ipv6():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_port():
    """A port nobody listens on, on IPv4 and IPv6 (a node binds both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s4:
            s4.bind(("0.0.0.0", 0))
            port = s4.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s6.bind(("::", port))
            except OSError as exc:
                if exc.errno == 97:  # no IPv6 on this machine
                    return port
                continue
            if port > 1024:
                return port


class Peer:
    """One node of the mesh with its counters."""

    def __init__(self, loop, name, synchronous):
        self.name = name
        cfg = libchirp.Config()
        cfg.PORT = free_port()
        cfg.SYNCHRONOUS = synchronous
        cfg.DISABLE_ENCRYPTION = True  # loopback only: never encrypted anyway
        self.node = Chirp(loop, cfg)
        self.asked = self.answered = self.served = 0
        self.errors = []
        self.stop = threading.Event()

    def serve(self):
        """Answer every request: send the message back with new data."""
        pending = []
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

    def ask(self, peers, count, use_ipv6):
        """Send ``count`` requests to every other peer, collect the answers."""
        futures = {}
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
            other, question = futures[fut]
            try:
                answer = fut.result()  # releases the answer's slot
            except Exception as exc:
                self.errors.append("request to %s failed: %r" % (other, exc))
                continue
            if answer.data != b"%s, answered by %s" % (question, other.encode()):
                self.errors.append("wrong answer from %s: %r" % (other, answer.data))
                continue
            self.answered += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4, choices=range(2, 27), metavar="2..26")
    parser.add_argument("--requests", type=int, default=25, help="per pair of nodes")
    parser.add_argument("--async", dest="asynchronous", action="store_true")
    args = parser.parse_args()
    use_ipv6 = has_ipv6()

    mode = "asynchronous" if args.asynchronous else "synchronous"
    print(
        "mesh: %d nodes, each sends %d requests to every other node (%s mode, over %s)"
        % (args.nodes, args.requests, mode, "127.0.0.1 and ::1" if use_ipv6 else "127.0.0.1")
    )
    with libchirp.Loop() as loop:
        peers = []
        try:
            for i in range(args.nodes):
                peers.append(Peer(loop, NAMES[i], not args.asynchronous))
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
        % (len(peers), asked, answered, errors, took)
    )
    return 0 if answered == asked and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
