#!/usr/bin/env python3
"""libchirp demo: two processes exchange messages in both modes.

Run it with ``make demo`` (or ``.venv/bin/python examples/demo.py`` after
``make build``).

* **bob** runs in a child process (``multiprocessing``), on a free port
  (``Config.PORT = 0``) unless ``--port P`` is given; he reports his port to
  alice through a pipe. His node is SYNCHRONOUS with AUTO_RELEASE
  off: he takes each message, "works" on it for 0.3 s and only then releases it.
  A message with the header ``request`` he answers by sending the same message
  object back with new data.
* **alice** (this process) has two nodes: ``alice-sync`` (SYNCHRONOUS, the
  default) and ``alice-async`` (SYNCHRONOUS = False). She sends the same three
  messages from each, makes requests, and sends one message to a port where
  nobody listens.

Watch when the sends complete: a synchronous send completes only when bob has
released the message; an asynchronous one as soon as it is written.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Callable, List

import libchirp
from libchirp.queue import Chirp, Message

WORK_TIME = 0.3  # how long bob holds each ordinary message
_print_lock = threading.Lock()
_t0 = time.time()  # bob gets alice's start time, so both print the same clock


def show(who: str, text: str) -> None:
    with _print_lock:
        print("%7.3f s  %-12s %s" % (time.time() - _t0, who, text), flush=True)


def make_config(
    port: int = 0, synchronous: bool = True, auto_release: bool = True
) -> libchirp.Config:
    config = libchirp.Config()
    config.PORT = port  # 0: a free port, which node.port reports
    config.SYNCHRONOUS = synchronous
    config.AUTO_RELEASE = auto_release
    # Plain TCP: loopback never uses TLS, and TLS needs certificates.
    config.DISABLE_ENCRYPTION = True
    return config


# -- bob (child process) ---------------------------------------------------------------------------


def run_bob(port: int, t0: float, ready: Connection, stop: Event) -> None:
    """Bob's process: report the port, serve until alice sets ``stop``."""
    global _t0
    _t0 = t0  # alice's start time, so both print the same clock
    with libchirp.Loop() as loop:
        bob = Chirp(loop, make_config(port, auto_release=False))
        with bob:
            ready.send(bob.port)
            while not stop.is_set():
                try:
                    msg = bob.get(timeout=0.1)
                except queue.Empty:
                    continue
                sender = "%s (port %d)" % (msg.header.decode(), msg.port)
                if msg.header == b"request":
                    msg.data = b"answer to " + msg.data
                    bob.send(msg).result(timeout=10)  # answer by re-sending
                    msg.release_slot().result(timeout=10)
                    continue
                show("bob", "got %r from %s, working on it ..." % (msg.data.decode(), sender))
                time.sleep(WORK_TIME)
                show("bob", "done with %r, releasing it" % msg.data.decode())
                msg.release_slot().result(timeout=10)


# -- alice (this process) --------------------------------------------------------------------------


def report_completion(who: str, text: str, start: float) -> Callable[[Future[Message]], None]:
    """A done-callback for a send future that prints when and how it completed."""

    def done(fut: Future[Message]) -> None:
        ms = (time.monotonic() - start) * 1000
        if fut.exception() is None:
            show(who, "send of %r completed after %.0f ms" % (text, ms))
        else:
            show(who, "send of %r FAILED: %r" % (text, fut.exception()))

    return done


def send_three(node: Chirp, who: str, bob_port: int, label: str) -> float:
    start = time.monotonic()
    futures: List[Future[Message]] = []
    for i in range(1, 4):
        msg = Message()
        msg.address = "127.0.0.1"
        msg.port = bob_port
        msg.header = who.encode()  # bob prints it
        msg.data = b"%s #%d" % (label.encode(), i)

        show(who, "sending %r" % msg.data.decode())
        fut = node.send(msg)
        fut.add_done_callback(report_completion(who, msg.data.decode(), start))
        futures.append(fut)
    for fut in futures:
        fut.result(timeout=20)
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description="libchirp demo")
    parser.add_argument("--port", type=int, default=0, help="bob's port (default: a free one)")
    args = parser.parse_args()

    # "spawn": bob starts as a fresh interpreter, not as a copy of this process.
    mp = multiprocessing.get_context("spawn")
    ready, ready_child = mp.Pipe(duplex=False)
    stop = mp.Event()
    bob = mp.Process(target=run_bob, args=(args.port, _t0, ready_child, stop), name="bob")
    bob.start()
    try:
        if not ready.poll(30):
            raise SystemExit("bob did not start")
        bob_port: int = ready.recv()
        print(
            "libchirp demo: alice (this process) talks to bob (a child process, port %d)."
            % bob_port
        )
        print("bob holds every message for %.1f s before he releases it.\n" % WORK_TIME)
        with libchirp.Loop() as loop:
            alice_sync = Chirp(loop, make_config())
            alice_async = Chirp(loop, make_config(synchronous=False))
            with alice_sync, alice_async:
                print("== SYNCHRONOUS: a send completes when bob has released the message")
                took = send_three(alice_sync, "alice-sync", bob_port, "sync")
                show("alice-sync", "all three done after %.0f ms (one at a time)" % (took * 1000))
                time.sleep(0.1)
                print()

                print("== asynchronous: a send completes when the message is written")
                took = send_three(alice_async, "alice-async", bob_port, "async")
                show(
                    "alice-async", "all three done after %.0f ms; bob is still busy" % (took * 1000)
                )
                time.sleep(3 * WORK_TIME + 0.3)  # let bob finish before the next part
                print()

                print("== request/answer: bob answers by sending the message back")
                times = []
                for i in range(10):
                    msg = Message()
                    msg.address = "127.0.0.1"
                    msg.port = bob_port
                    msg.header = b"request"
                    msg.data = b"question %d" % i
                    start = time.monotonic()
                    answer = alice_sync.request(msg).result(timeout=10)
                    times.append((time.monotonic() - start) * 1000)
                    assert answer.identity == msg.identity
                    if i == 0:
                        show(
                            "alice-sync",
                            "asked %r, got %r back from port %d in %.1f ms"
                            % (msg.data.decode(), answer.data.decode(), answer.port, times[0]),
                        )
                show(
                    "alice-sync",
                    "10 requests: round trip min %.1f ms, median %.1f ms, max %.1f ms\n"
                    % (min(times), statistics.median(times), max(times)),
                )

                print("== errors: sending to a port where nobody listens")
                with socket.socket() as unused:
                    unused.bind(("127.0.0.1", 0))  # bound, not listening: connecting is refused
                    msg = Message()
                    msg.address = "127.0.0.1"
                    msg.port = unused.getsockname()[1]
                    msg.data = b"hello?"
                    try:
                        alice_sync.send(msg).result(timeout=20)
                        show("alice-sync", "unexpected: the send succeeded")
                    except ConnectionError as exc:
                        show(
                            "alice-sync",
                            "port %d: %s: %s (ecode %s)"
                            % (msg.port, type(exc).__name__, exc, getattr(exc, "ecode", "?")),
                        )
    finally:
        stop.set()
        bob.join(10)
        if bob.is_alive():
            bob.kill()
            bob.join()
    print("\ndone: both nodes stopped, bob exited with status %s." % bob.exitcode)
    return 0 if bob.exitcode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
