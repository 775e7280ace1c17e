"""A chirp node in a process of its own, for tests between private hosts.

Usually started inside a network namespace of tests/netns.py
(``ip netns exec NS python tests/hostproc.py ...``) by tests/test_hosts.py.

    python tests/hostproc.py ROLE --port PORT [options]

Roles:

listen
    Report every received message (RECV line) and release it.
echo
    Like listen, and send every received message back to its sender (the
    same message object, so it keeps its identity and data).
send
    Like listen, and at start send --count messages of --size random bytes
    to --peer-ip:--peer-port (as the stdin command ``send`` below does).

Options: --bind-ip IP (BIND_V4, default 0.0.0.0), --cert FILE (CERT_CHAIN_PEM),
--dh FILE (DH_PARAMS_PEM), --plaintext (DISABLE_ENCRYPTION), --async,
--timeout T, --max-msg-size N; for sending --peer-ip, --peer-port, --count,
--size, --window W (sends in flight, default 16), --interval S (pause between
sends; implies window 1), --tag NAME.

Commands on stdin, one a line (every role); EOF stops the node and the process:

    send IP PORT COUNT SIZE [WINDOW [TAG [INTERVAL]]]
    stats                                 print the node's statistics() (STATS line)

Reports on stdout, one flushed line each:

    READY <port> <identity hex>
    START_ERR <exception class> <ecode> <text>        node did not start (exit 3)
    RECV <n> <address> <port> <remote identity hex> <identity hex> <header hex> <len> <sha256 hex>
    SENT <tag> <i> OK <identity hex> <len> <sha256 hex> <secs>
    SENT <tag> <i> ERR <identity hex> <len> <sha256 hex> <secs> <exception class> <ecode> <text>
    DONE <tag> ok=<n> err=<n> secs=<seconds>
    STATS <statistics() as one line of JSON>
    COUNT recv=<n> echoed=<n> echo_failed=<n>          at exit
    BYE                                                 node and loop stopped

``secs`` of a SENT line is the time from the send call to its completion.
Problems go to stderr; the exit status is 0 when the node ran and stopped.
"""

import argparse
import collections
import concurrent.futures
import hashlib
import json
import os
import queue
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import libchirp  # noqa: E402
import libchirp.queue  # noqa: E402

#: No future may stay pending longer than this (seconds).
SETTLE_LIMIT = 90.0

_out_lock = threading.Lock()


def say(*parts):
    line = " ".join(str(p) for p in parts).replace("\n", " ")
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def digest(data):
    return hashlib.sha256(data).hexdigest()


def settle(fut, limit=SETTLE_LIMIT):
    """Wait for ``fut``; return its exception (None on success)."""
    done, _ = concurrent.futures.wait([fut], timeout=limit)
    if not done:
        print("hostproc: a future was still pending after %.0f s" % limit, file=sys.stderr)
        os._exit(4)  # a hang is a bug the parent must see
    return fut.exception()


def describe(exc):
    return "%s %s %s" % (type(exc).__name__, getattr(exc, "ecode", "-"), str(exc) or "-")


def send_batch(node, ip, port, count, size, window, tag, interval=0.0):
    """Send ``count`` messages of ``size`` random bytes; report each result."""
    if interval > 0:
        window = 1
    window = max(1, window)
    pending = collections.deque()
    ok = err = 0
    started = time.monotonic()

    def report(i, msg, t0, fut):
        nonlocal ok, err
        exc = settle(fut)
        secs = "%.3f" % (time.monotonic() - t0)
        meta = (msg.identity.hex(), len(msg.data), digest(msg.data), secs)
        if exc is None:
            ok += 1
            say("SENT", tag, i, "OK", *meta)
        else:
            err += 1
            say("SENT", tag, i, "ERR", *meta, describe(exc))

    for i in range(count):
        while len(pending) >= window:
            report(*pending.popleft())
        msg = libchirp.queue.Message()
        msg.address = ip
        msg.port = port
        msg.header = tag.encode()
        msg.data = os.urandom(size)
        pending.append((i, msg, time.monotonic(), node.send(msg)))
        if interval > 0:
            report(*pending.popleft())
            time.sleep(interval)
    while pending:
        report(*pending.popleft())
    say("DONE", tag, "ok=%d" % ok, "err=%d" % err, "secs=%.3f" % (time.monotonic() - started))


def command_reader(node, stop, workers):
    """Read stdin commands until EOF, then set ``stop``."""
    try:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "send" and 5 <= len(words) <= 8:
                ip, port, count, size = words[1], int(words[2]), int(words[3]), int(words[4])
                window = int(words[5]) if len(words) > 5 else 16
                tag = words[6] if len(words) > 6 else "cmd"
                interval = float(words[7]) if len(words) > 7 else 0.0
                t = threading.Thread(
                    target=send_batch,
                    args=(node, ip, port, count, size, window, tag, interval),
                    name="send-" + tag,
                )
                t.start()
                workers.append(t)
            elif words == ["stats"]:
                say("STATS", json.dumps(node.statistics(), sort_keys=True))
            else:
                print("hostproc: unknown command %r" % line.strip(), file=sys.stderr)
    finally:
        stop.set()


def serve(node, args, stop):
    """Receive until ``stop``; report and possibly echo every message."""
    received = echoed = echo_failed = 0
    echoes = collections.deque()
    while not stop.is_set():
        try:
            msg = node.get(timeout=0.05)
        except queue.Empty:
            msg = None
        if msg is not None:
            say(
                "RECV",
                received,
                msg.address,
                msg.port,
                msg.remote_identity.hex(),
                msg.identity.hex(),
                msg.header.hex() or "-",
                len(msg.data),
                digest(msg.data),
            )
            received += 1
            if args.role == "echo":
                echoes.append(node.send(msg))
                echoed += 1
        while echoes and echoes[0].done():
            if echoes.popleft().exception() is not None:
                echo_failed += 1
    for fut in echoes:
        if settle(fut) is not None:
            echo_failed += 1
    say("COUNT", "recv=%d" % received, "echoed=%d" % echoed, "echo_failed=%d" % echo_failed)


def make_config(args):
    config = libchirp.Config()
    config.PORT = args.port
    config.SYNCHRONOUS = not args.asynchronous
    config.TIMEOUT = args.timeout
    config.MAX_MSG_SIZE = args.max_msg_size
    if args.bind_ip:
        config.BIND_V4 = args.bind_ip
    if args.plaintext:
        config.DISABLE_ENCRYPTION = True
    if args.cert:
        config.CERT_CHAIN_PEM = args.cert
    if args.dh:
        config.DH_PARAMS_PEM = args.dh
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("role", choices=["listen", "echo", "send"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind-ip")
    parser.add_argument("--cert")
    parser.add_argument("--dh")
    parser.add_argument("--plaintext", action="store_true")
    parser.add_argument("--async", dest="asynchronous", action="store_true")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--max-msg-size", type=int, default=104857600)
    parser.add_argument("--peer-ip")
    parser.add_argument("--peer-port", type=int)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--interval", type=float, default=0.0)
    parser.add_argument("--tag", default="start")
    args = parser.parse_args()
    if args.role == "send" and (not args.peer_ip or not args.peer_port):
        parser.error("role send needs --peer-ip and --peer-port")

    loop = libchirp.Loop()
    try:
        node = libchirp.queue.Chirp(loop, make_config(args))
    except Exception as exc:
        say("START_ERR", describe(exc))
        loop.stop()
        return 3
    say("READY", node.port, node.identity().hex())
    stop = threading.Event()
    workers = []
    threading.Thread(
        target=command_reader, args=(node, stop, workers), name="stdin", daemon=True
    ).start()
    if args.role == "send":
        t = threading.Thread(
            target=send_batch,
            args=(node, args.peer_ip, args.peer_port, args.count, args.size, args.window),
            kwargs={"tag": args.tag, "interval": args.interval},
            name="send-start",
        )
        t.start()
        workers.append(t)
    try:
        serve(node, args, stop)
        for t in list(workers):
            t.join(SETTLE_LIMIT)
    finally:
        try:
            node.stop()
        except RuntimeError as exc:  # unreleased messages: none expected, but report
            print("hostproc: stop: %s" % exc, file=sys.stderr)
        loop.stop()
    say("BYE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
