"""One side of the multi-host libchirp.mp test (tests/test_mp_hosts.py).

``host``: hosts the named queues ``work`` and ``done`` (TLS config), starts
local producers and consumers (spawn), waits until every producer, local and
remote, reported, sends one sentinel per consumer, collects the consumers'
reports and prints ``RESULT`` with the check of exactly-once and order.
``remote``: attaches to both queues and starts producers and consumers.
``intruder``: attaches with another CA's certificate and tries to put.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections import Counter

import mp_workers

import libchirp
from libchirp import mp


def produce_and_report(q: mp.Queue, done: mp.Queue, producer: int, n: int) -> None:
    mp_workers.produce(q, producer, n)
    done.put(("produced", producer))
    done.join_thread()
    done.close()


def config(args: argparse.Namespace) -> libchirp.Config:
    c = libchirp.Config()
    c.CERT_CHAIN_PEM = args.cert
    c.DH_PARAMS_PEM = args.dh
    return c


def start(args, work, done, first_producer: int, tag: str):
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=produce_and_report, args=(work, done, first_producer + i, args.items))
        for i in range(args.producers)
    ]
    procs += [
        ctx.Process(target=mp_workers.consume, args=(work, done, "%s%d" % (tag, i), 256))
        for i in range(args.consumers)
    ]
    for p in procs:
        p.start()
    return procs


def host(args: argparse.Namespace) -> int:
    kw = dict(address=args.address, port=args.port, config=config(args))
    work = mp.Queue(name="work", **kw)
    done = mp.Queue(name="done", **kw)
    print("READY", flush=True)
    t0 = time.monotonic()
    procs = start(args, work, done, 0, "a")
    producers = args.producers + args.remote_producers
    consumers = args.consumers + args.remote_consumers
    reports = []
    produced = 0
    while produced < producers:
        msg = done.get(timeout=120)
        if msg[0] == "produced":
            produced += 1
        else:
            reports.append(msg)
    for _ in range(consumers):
        work.put(None)
    while len(reports) < consumers:
        msg = done.get(timeout=120)
        if msg[0] != "produced":
            reports.append(msg)
    secs = time.monotonic() - t0
    for p in procs:
        p.join(30)
    got: Counter = Counter()
    order = all(ok for _, _, ok in reports)
    for _, items, _ in reports:
        got.update(items)
    expected = {(p, i) for p in range(producers) for i in range(args.items)}
    missing = len(expected - set(got))
    extra = len(set(got) - expected)
    dups = sum(1 for v in got.values() if v > 1)
    shares = ",".join("%s=%d" % (name, len(items)) for name, items, _ in sorted(reports))
    print(
        "RESULT items=%d missing=%d extra=%d dups=%d order=%s secs=%.2f shares=%s"
        % (len(expected), missing, extra, dups, order, secs, shares),
        flush=True,
    )
    return 0


def remote(args: argparse.Namespace) -> int:
    addr, port = args.connect.rsplit(":", 1)
    work = mp.attach(addr, int(port), "work", config=config(args))
    done = mp.attach(addr, int(port), "done", config=config(args))
    procs = start(args, work, done, args.first_producer, "b")
    for p in procs:
        p.join(180)
    print("REMOTE DONE", [p.exitcode for p in procs], flush=True)
    return 0 if all(p.exitcode == 0 for p in procs) else 1


def intruder(args: argparse.Namespace) -> int:
    addr, port = args.connect.rsplit(":", 1)
    work = mp.attach(addr, int(port), "work", config=config(args))
    try:
        work.put(("intruder", 0))
        work.join_thread(30)
        print("ACCEPTED", flush=True)
    except (ConnectionError, TimeoutError) as exc:
        print("REFUSED put %s" % exc, flush=True)
    try:
        work.get(timeout=2)
        print("ACCEPTED get", flush=True)
    except (ConnectionError, mp.Empty, EOFError) as exc:
        print("REFUSED get %r" % exc, flush=True)
    work.cancel_join_thread()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["host", "remote", "intruder"])
    ap.add_argument("--address")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--connect")
    ap.add_argument("--cert", required=True)
    ap.add_argument("--dh", required=True)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--consumers", type=int, default=2)
    ap.add_argument("--remote-producers", type=int, default=2)
    ap.add_argument("--remote-consumers", type=int, default=2)
    ap.add_argument("--first-producer", type=int, default=2)
    ap.add_argument("--items", type=int, default=5000, help="per producer")
    args = ap.parse_args()
    return {"host": host, "remote": remote, "intruder": intruder}[args.role](args)


if __name__ == "__main__":
    sys.exit(main())
