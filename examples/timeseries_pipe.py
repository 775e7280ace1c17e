#!/usr/bin/env python3
"""Time-series events piped through a chain of nodes: source -> transformer -> sink.

Three processes, one node each, all in synchronous mode:

* the **source** (this process) samples a noisy sine wave and sends one event per
  sample to the transformer, waiting for each send to complete;
* the **transformer** (a child process) smooths the values with an exponential
  moving average and forwards each event to the sink. It releases the incoming
  event only after the forward completed (AUTO_RELEASE off);
* the **sink** (a child process) stores each event and only then releases it.

Because every hop is synchronous and releases late, the source's send completes
only when the sink has stored the event: a completed send means the event is
at the end of the pipe, and a failure anywhere shows up as a failed send at
the source. Nothing can be lost silently. At the end the source sends an
``end`` event with the number of samples, and the sink prints a summary.

Run: ``python examples/timeseries_pipe.py`` (after ``make build``).
"""

import argparse
import math
import os
import queue
import random
import socket
import struct
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import libchirp  # noqa: E402
from libchirp.queue import Chirp, Message  # noqa: E402

POINT = struct.Struct("!Idd")  # sequence number, time stamp, value
SMOOTHED = struct.Struct("!Iddd")  # ... plus the smoothed value
ALPHA = 0.2  # weight of the newest value in the moving average
WAIT = 30.0  # upper bound for one send (they take milliseconds)


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


def config(port):
    cfg = libchirp.Config()
    cfg.PORT = port
    cfg.SYNCHRONOUS = True  # the default, spelled out: a send waits for the release
    cfg.AUTO_RELEASE = False  # release only when the event is handled
    cfg.DISABLE_ENCRYPTION = True  # 127.0.0.1 is never encrypted anyway
    return cfg


def say(text):
    print(text, flush=True)


def stdin_closed():
    """An Event set when stdin reaches EOF: the parent tells a child to stop."""
    ev = threading.Event()

    def watch():
        sys.stdin.read()
        ev.set()

    threading.Thread(target=watch, daemon=True).start()
    return ev


def event(port, header, data):
    msg = Message()
    msg.address = "127.0.0.1"
    msg.port = port
    msg.header = header
    msg.data = data
    return msg


# -- transformer and sink (child processes) --------------------------------------------------------


def run_transformer(port, sink_port):
    stop = stdin_closed()
    average = None
    with libchirp.Loop() as loop, Chirp(loop, config(port)) as node:
        say("READY")
        while not stop.is_set():
            try:
                msg = node.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg.header == b"point":
                seq, stamp, value = POINT.unpack(msg.data)
                average = value if average is None else ALPHA * value + (1 - ALPHA) * average
                out = event(sink_port, b"point", SMOOTHED.pack(seq, stamp, value, average))
            else:
                out = event(sink_port, msg.header, msg.data)  # "end": pass it on
            try:
                node.send(out).result(timeout=WAIT)  # the sink has stored it ...
            finally:
                msg.release_slot()  # ... so now the source's send may complete
    return 0


def run_sink(port):
    stop = stdin_closed()
    points = []
    with libchirp.Loop() as loop, Chirp(loop, config(port)) as node:
        say("READY")
        while not stop.is_set():
            try:
                msg = node.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg.header == b"point":
                points.append(SMOOTHED.unpack(msg.data))  # "store" it, then release
            elif msg.header == b"end":
                summarize(points, int(msg.data))
            msg.release_slot()
    return 0


def summarize(points, expected):
    seqs = [p[0] for p in points]
    in_order = seqs == list(range(len(points)))
    lost = expected - len(points)
    say(
        "sink: %d of %d points arrived, %s, %s"
        % (
            len(points),
            expected,
            "in order" if in_order else "OUT OF ORDER",
            "none lost" if lost == 0 else "%d LOST" % lost,
        )
    )
    if points:
        raw = [p[2] for p in points]
        smooth = [p[3] for p in points]
        say(
            "sink: t = %.2f .. %.2f s; raw values %.3f .. %.3f, smoothed %.3f .. %.3f"
            % (points[0][1], points[-1][1], min(raw), max(raw), min(smooth), max(smooth))
        )
        noise = [abs(r - math.sin(p[1])) for r, p in zip(raw, points)]
        rest = [abs(s - math.sin(p[1])) for s, p in zip(smooth, points)]
        say(
            "sink: mean distance from the true sine: raw %.3f, smoothed %.3f"
            % (sum(noise) / len(noise), sum(rest) / len(rest))
        )


# -- the source (this process) ---------------------------------------------------------------------


def start_child(args, children):
    """Start this script with ``args`` (added to ``children`` at once); wait for READY."""
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)] + [str(a) for a in args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    children.append(child)
    ready = threading.Event()
    lines = []

    def relay():  # print the child's lines in this process, so output does not interleave
        for line in child.stdout:
            if line.startswith("READY"):
                ready.set()
            else:
                lines.append(line)
                sys.stdout.write(line)
                sys.stdout.flush()
        ready.set()

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    child.relay_thread = relay_thread
    if not ready.wait(30) or child.poll() is not None:
        raise SystemExit("a child process did not start")
    return child, lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=400)
    parser.add_argument("--transformer", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.transformer:
        return run_transformer(*args.transformer)
    if args.sink:
        return run_sink(args.sink)

    sink_port, transformer_port = free_port(), free_port()
    say(
        "timeseries_pipe: source (this process) -> transformer (port %d) -> sink (port %d), "
        "synchronous, %d points" % (transformer_port, sink_port, args.points)
    )
    children = []
    sink_lines = []
    failed = 0
    try:
        _, sink_lines = start_child(["--sink", sink_port], children)
        start_child(["--transformer", transformer_port, sink_port], children)
        rng = random.Random(7)
        with libchirp.Loop() as loop, Chirp(loop, config(free_port())) as source:
            start = time.monotonic()
            for seq in range(args.points):
                stamp = seq * 0.02
                value = math.sin(stamp) + rng.gauss(0.0, 0.2)
                msg = event(transformer_port, b"point", POINT.pack(seq, stamp, value))
                try:
                    source.send(msg).result(timeout=WAIT)  # done: the sink stored it
                except Exception as exc:
                    failed += 1
                    say("source: point %d failed: %r" % (seq, exc))
            took = time.monotonic() - start
            say(
                "source: %d points sent in %.2f s (%.0f per second), %d failed; each send "
                "completed only after the sink had stored the point"
                % (args.points, took, args.points / took, failed)
            )
            end = event(transformer_port, b"end", b"%d" % args.points)
            source.send(end).result(timeout=WAIT)  # the sink printed its summary by now
    finally:
        for child in children:
            child.stdin.close()
        for child in children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            child.relay_thread.join(10)
    ok = (
        failed == 0
        and all(c.returncode == 0 for c in children)
        and any("none lost" in line for line in sink_lines)
    )
    say("timeseries_pipe: %s" % ("done" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
