"""A chirp node in a process of its own, driven by tests/test_multiprocess.py.

    python tests/nodeproc.py ROLE --port PORT [--async] [--timeout T] [role options]

Roles:

echo
    Send every received message back to its sender (answer by re-sending the
    message object, so it keeps its identity). Runs until stdin reaches EOF.
send --to-port P --count N [--window W]
    Send N messages with data b"0", b"1", ... to 127.0.0.1:P, keeping at most W
    sends in flight, report each result, then stop and exit.
record --record FILE
    AUTO_RELEASE off. For each received message append its data and a newline
    to FILE, flush and fsync, and only then release the message (so in
    synchronous mode the sender's send succeeds only after the record is on
    disk). Runs until stdin reaches EOF or the process is killed.
hold
    AUTO_RELEASE off. Report every received message (GOT <data>) and never
    release it nor answer: in synchronous mode its sender waits for the ACK
    until this process ends. Runs until stdin reaches EOF or it is killed.

Everything the process reports goes to stdout, one flushed line each:

    READY <port> <identity as hex>       node started
    SENT <n> OK                          (send) message n succeeded
    SENT <n> ERR <exception name> <ecode>
    DONE ok=<n> err=<n>                  (send) all sends completed
    GOT <data>                           (hold) a message arrived
    COUNT <n> failed=<n>                 (echo, record) messages handled, at exit
    BYE                                  node and loop stopped cleanly

Errors go to stderr; the exit status is 0 only if everything went as expected.
"""

import argparse
import collections
import concurrent.futures
import os
import queue
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import libchirp  # noqa: E402
import libchirp.queue  # noqa: E402

SETTLE_LIMIT = 60.0


def say(*parts):
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def stdin_closed_event():
    """An Event that is set once stdin reaches EOF (the parent wants us to stop)."""
    ev = threading.Event()

    def watch():
        try:
            while sys.stdin.read(4096):
                pass
        finally:
            ev.set()

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()
    return ev


def settle(fut, limit=SETTLE_LIMIT):
    done, _ = concurrent.futures.wait([fut], timeout=limit)
    if not done:
        raise SystemExit("a future was still pending after %.0f s" % limit)
    return fut.exception()


def run_echo(node, args):
    stop = stdin_closed_event()
    echoed = failed = 0
    pending = collections.deque()
    while not stop.is_set():
        try:
            msg = node.get(timeout=0.1)
        except queue.Empty:
            msg = None
        if msg is not None:
            pending.append(node.send(msg))
            echoed += 1
        while pending and pending[0].done():
            if pending.popleft().exception() is not None:
                failed += 1
    for fut in pending:
        if settle(fut) is not None:
            failed += 1
    say("COUNT", echoed, "failed=%d" % failed)
    return failed == 0


def run_send(node, args):
    ok = err = 0
    pending = collections.deque()
    n = 0
    while n < args.count or pending:
        while n < args.count and len(pending) < args.window:
            msg = libchirp.queue.Message()
            msg.address = "127.0.0.1"
            msg.port = args.to_port
            msg.data = b"%d" % n
            pending.append((n, node.send(msg)))
            n += 1
        i, fut = pending.popleft()
        exc = settle(fut)
        if exc is None:
            ok += 1
            say("SENT", i, "OK")
        else:
            err += 1
            say("SENT", i, "ERR", type(exc).__name__, getattr(exc, "ecode", "-"))
    say("DONE", "ok=%d" % ok, "err=%d" % err)
    return True


def run_record(node, args):
    stop = stdin_closed_event()
    count = failed = 0
    with open(args.record, "a") as f:
        while not stop.is_set():
            try:
                msg = node.get(timeout=0.1)
            except queue.Empty:
                continue
            f.write(msg.data.decode("ascii") + "\n")
            f.flush()
            os.fsync(f.fileno())
            # Only now may the sender learn that the message arrived.
            if settle(msg.release_slot()) is not None:
                failed += 1
            count += 1
    say("COUNT", count, "failed=%d" % failed)
    return failed == 0


def run_hold(node, args):
    stop = stdin_closed_event()
    held = []  # never released (stop() releases them at the end)
    while not stop.is_set():
        try:
            msg = node.get(timeout=0.1)
        except queue.Empty:
            continue
        held.append(msg)
        say("GOT", msg.data.decode("ascii", "replace"))
    for msg in held:
        msg.release_slot()
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("role", choices=["echo", "send", "record", "hold"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--async", dest="asynchronous", action="store_true")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--to-port", type=int)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--record")
    args = parser.parse_args()

    config = libchirp.Config()
    config.PORT = args.port
    config.DISABLE_ENCRYPTION = True
    config.SYNCHRONOUS = not args.asynchronous
    config.TIMEOUT = args.timeout
    config.AUTO_RELEASE = args.role not in ("record", "hold")

    loop = libchirp.Loop()
    node = libchirp.queue.Chirp(loop, config)
    say("READY", args.port, node.identity().hex())
    try:
        roles = {"echo": run_echo, "send": run_send, "record": run_record, "hold": run_hold}
        good = roles[args.role](node, args)
    finally:
        node.stop()
        loop.stop()
    say("BYE")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
