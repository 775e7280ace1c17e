"""libchirp.mp against multiprocessing on one host (or across two, see --help).

Throughput: one producer process puts N items (bytes of 64 B or 64 KiB) into a
queue created by this process; 1 or 4 consumer processes get until a sentinel.
Timed from a common start (a barrier) until every consumer reported.
Latency: ping-pong of a small dict over a Pipe (roundtrips/s), and the same
over a plain TCP socket (pickle, no libchirp): the floor of any transport
over TCP, which ``multiprocessing.Pipe`` (a Unix socket pair) does not pay.
Processes are started with spawn. Prints a markdown table with ratios against
``multiprocessing.Queue`` (throughput) and ``multiprocessing.Pipe`` (latency).

    .venv/bin/python benchmarks/mp_bench.py [--items N] [--big-items N] [--roundtrips N]
        [--pull-items N] [--sizes 64,65536] [--only TEXT ...]

``--only`` keeps the rows whose implementation contains TEXT (and the
``multiprocessing.Queue`` row each ratio needs; ``--only ping-pong`` the Pipe).
"""

from __future__ import annotations

import argparse
import multiprocessing
import pickle
import platform
import socket
import struct
import sys
import time
from typing import Any, Callable, List, Tuple

from libchirp import mp as cmp

SMALL = b"x" * 64
BIG = b"y" * 65536


def producer(q: Any, n: int, size: int, consumers: int, barrier: Any) -> None:
    item = SMALL if size == 64 else BIG
    barrier.wait()
    for _ in range(n):
        q.put(item)
    for _ in range(consumers):
        q.put(None)
    if hasattr(q, "join_thread"):
        q.join_thread()


def consumer(q: Any, done: Any, barrier: Any, many: bool) -> None:
    barrier.wait()
    n = 0
    stop = False
    while not stop:
        items = q.get_many(256) if many else [q.get()]
        for x in items:
            if x is None:
                stop = True
                rest = items[items.index(None) + 1 :]
                for r in rest:
                    q.put(r)
                break
            n += 1
    if hasattr(q, "close") and many is not None:
        try:
            q.close()
        except Exception:
            pass
    done.put(n)


def throughput(make: Callable[[], Any], n: int, size: int, consumers: int, many=False) -> float:
    ctx = multiprocessing.get_context("spawn")
    q = make()
    done = ctx.Queue()
    barrier = ctx.Barrier(consumers + 2)
    procs = [ctx.Process(target=consumer, args=(q, done, barrier, many)) for _ in range(consumers)]
    procs.append(ctx.Process(target=producer, args=(q, n, size, consumers, barrier)))
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    total = sum(done.get(timeout=600) for _ in range(consumers))
    secs = time.perf_counter() - t0
    for p in procs:
        p.join(60)
    assert total == n, (total, n)
    return n / secs


def echo(conn: Any, n: int) -> None:
    for _ in range(n):
        conn.send(conn.recv())
    conn.close()


def pingpong(pipe: Callable[[], Tuple[Any, Any]], n: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    a, b = pipe()
    p = ctx.Process(target=echo, args=(b, n + 50))
    p.start()
    msg = {"seq": 0, "name": "ping", "values": [1, 2, 3]}
    for _ in range(50):  # warm up (connections)
        a.send(msg)
        a.recv()
    t0 = time.perf_counter()
    for i in range(n):
        msg["seq"] = i
        a.send(msg)
        a.recv()
    secs = time.perf_counter() - t0
    p.join(60)
    return n / secs


def tcp_echo(port: int, n: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with sock, sock.makefile("rb") as f:
        for _ in range(n):
            head = f.read(4)
            sock.sendall(head + f.read(struct.unpack("!I", head)[0]))


def pingpong_tcp(n: int) -> float:
    """The Pipe ping-pong over a plain TCP socket (pickle, 4-byte length): the
    floor of any transport over TCP, which multiprocessing's Pipe (a Unix
    socket pair) does not pay."""
    ctx = multiprocessing.get_context("spawn")
    listener = socket.create_server(("127.0.0.1", 0))
    p = ctx.Process(target=tcp_echo, args=(listener.getsockname()[1], n + 50))
    p.start()
    sock, _ = listener.accept()
    listener.close()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = {"seq": 0, "name": "ping", "values": [1, 2, 3]}
    with sock, sock.makefile("rb") as f:

        def roundtrip() -> None:
            body = pickle.dumps(msg)
            sock.sendall(struct.pack("!I", len(body)) + body)
            pickle.loads(f.read(struct.unpack("!I", f.read(4))[0]))

        for _ in range(50):
            roundtrip()
        t0 = time.perf_counter()
        for i in range(n):
            msg["seq"] = i
            roundtrip()
        secs = time.perf_counter() - t0
    p.join(60)
    return n / secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=100_000, help="64 B items per run")
    ap.add_argument("--big-items", type=int, default=3000, help="64 KiB items per run")
    ap.add_argument(
        "--pull-items", type=int, default=None, help="items for pull with get() (default: --items)"
    )
    ap.add_argument("--roundtrips", type=int, default=5000)
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        help="run only the rows whose implementation contains this text (repeatable; "
        "'ping-pong' for the Pipe rows); the first row of each size stays the base",
    )
    ap.add_argument("--sizes", default="64,65536", help="item sizes (64 and/or 65536)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]

    ctx = multiprocessing.get_context("spawn")
    impls: List[Tuple[str, Callable[[], Any], Any]] = [
        ("multiprocessing.Queue", ctx.Queue, False),
        ("multiprocessing.SimpleQueue", ctx.SimpleQueue, False),
        ("libchirp.mp.Queue push, get()", lambda: cmp.Queue(mode="push"), False),
        ("libchirp.mp.Queue pull, get_many()", lambda: cmp.Queue(mode="pull"), True),
        ("libchirp.mp.Queue pull, get()", lambda: cmp.Queue(mode="pull"), False),
    ]
    rows: List[List[str]] = []
    for size, n in ((64, args.items), (65536, args.big_items)):
        if size not in sizes:
            continue
        for consumers in (1, 4):
            base = None
            for name, make, many in impls:
                if args.only and base is not None and not any(o in name for o in args.only):
                    continue
                count = n
                if name.endswith("pull, get()") and args.pull_items is not None:
                    count = min(n, args.pull_items)
                rate = throughput(make, count, size, consumers, many)
                base = base or rate
                label = "64 B" if size == 64 else "64 KiB"
                rows.append(
                    [label, str(consumers), name, "{:,.0f} items/s".format(rate),
                     "%.2fx" % (rate / base)]
                )  # fmt: skip
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    if args.only and not any("ping-pong" in o for o in args.only):
        return report(rows)
    base_rt = pingpong(ctx.Pipe, args.roundtrips)
    rt = pingpong(cmp.Pipe, args.roundtrips)
    floor_rt = pingpong_tcp(args.roundtrips)
    rows.append(
        ["dict", "-", "multiprocessing.Pipe ping-pong", "{:,.0f} rt/s".format(base_rt), "1.00x"]
    )
    rows.append(
        ["dict", "-", "plain TCP socket ping-pong (no libchirp)", "{:,.0f} rt/s".format(floor_rt),
         "%.2fx" % (floor_rt / base_rt)]
    )  # fmt: skip
    rows.append(
        [
            "dict",
            "-",
            "libchirp.mp.Pipe ping-pong",
            "{:,.0f} rt/s".format(rt),
            "%.2fx" % (rt / base_rt),
        ]
    )
    return report(rows)


def report(rows: List[List[str]]) -> int:
    print("%s, Python %s, %s, %s" % (platform.node(), platform.python_version(),
          time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "spawn"))  # fmt: skip
    print()
    print("| item | consumers | implementation | rate | vs multiprocessing |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
