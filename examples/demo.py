#!/usr/bin/env python3
"""libchirp demo: two processes exchange messages in both modes.

Run it with ``make demo`` (or ``python examples/demo.py`` after ``make build``).

* **bob** runs in a child process. His node is SYNCHRONOUS with AUTO_RELEASE
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

import argparse
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import libchirp  # noqa: E402
from libchirp.queue import Chirp, Message  # noqa: E402

WORK_TIME = 0.3  # how long bob holds each ordinary message
_print_lock = threading.Lock()
_t0 = time.time()  # bob gets alice's start time, so both print the same clock


def show(who, text):
    with _print_lock:
        print("%7.3f s  %-12s %s" % (time.time() - _t0, who, text), flush=True)


def free_port():
    """A port nobody listens on (IPv4 and IPv6), as a node binds both."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s4:
            s4.bind(("0.0.0.0", 0))
            port = s4.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s6.bind(("::", port))
            except OSError as exc:
                if exc.errno == 97:  # no IPv6 at all: the IPv4 check is enough
                    return port
                continue
            return port


def make_config(port, synchronous=True, auto_release=True):
    config = libchirp.Config()
    config.PORT = port
    config.SYNCHRONOUS = synchronous
    config.AUTO_RELEASE = auto_release
    # Plain TCP: loopback never uses TLS, and TLS needs certificates.
    config.DISABLE_ENCRYPTION = True
    return config


# -- bob (child process) ---------------------------------------------------------------------------


def run_bob(port):
    stop = threading.Event()

    def watch_stdin():  # alice closes our stdin when she is done
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    with libchirp.Loop() as loop:
        with Chirp(loop, make_config(port, auto_release=False)) as bob:
            print("READY", flush=True)
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
    return 0


# -- alice (this process) --------------------------------------------------------------------------


def start_bob(port):
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--bob", str(port), "--t0", repr(_t0)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    ready = threading.Event()

    def relay():  # bob's lines are printed by us, so the output does not interleave
        for line in child.stdout:
            if line.startswith("READY"):
                ready.set()
            else:
                with _print_lock:
                    sys.stdout.write(line)
                    sys.stdout.flush()
        ready.set()

    threading.Thread(target=relay, daemon=True).start()
    if not ready.wait(20) or child.poll() is not None:
        raise SystemExit("bob did not start")
    return child


def report_completion(who, text, start):
    """A done-callback for a send future that prints when and how it completed."""

    def done(fut):
        ms = (time.monotonic() - start) * 1000
        if fut.exception() is None:
            show(who, "send of %r completed after %.0f ms" % (text, ms))
        else:
            show(who, "send of %r FAILED: %r" % (text, fut.exception()))

    return done


def send_three(node, who, bob_port, label):
    start = time.monotonic()
    futures = []
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


def main():
    parser = argparse.ArgumentParser(description="libchirp demo")
    parser.add_argument("--bob", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bob:
        global _t0
        _t0 = args.t0 or _t0
        return run_bob(args.bob)

    bob_port = free_port()
    print("libchirp demo: alice (this process) talks to bob (a child process, port %d)." % bob_port)
    print("bob holds every message for %.1f s before he releases it.\n" % WORK_TIME)
    bob = start_bob(bob_port)
    try:
        with libchirp.Loop() as loop:
            alice_sync = Chirp(loop, make_config(free_port()))
            alice_async = Chirp(loop, make_config(free_port(), synchronous=False))
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
                msg = Message()
                msg.address = "127.0.0.1"
                msg.port = free_port()
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
        bob.stdin.close()
        try:
            bob.wait(10)
        except subprocess.TimeoutExpired:
            bob.kill()
    print("\ndone: both nodes stopped, bob exited with status %s." % bob.returncode)
    return 0 if bob.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
