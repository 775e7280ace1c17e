"""Fan work out to worker processes on two hosts with libchirp.mp (docs/mp.md).

The *host* side creates two named queues, ``tasks`` and ``results``, starts
``--workers`` worker processes of its own and puts ``--tasks`` tasks; a
*worker* side (on another machine, or the same one) attaches to the queues by
address, port and name and starts its own workers. Every worker says it is
ready first, and the host puts the tasks once all of them are (local workers
would otherwise take every task before the other host's workers have
started). Every task is done exactly once, by whichever worker asks first
(pull mode: a fast worker asks for several, see docs/mp.md). The host
collects the results, tells every worker to stop and prints who did how much.

One machine, two terminals (loopback, no TLS needed)::

    python examples/mp_two_hosts.py host --port 7000 --remote-workers 2
    python examples/mp_two_hosts.py worker --connect 127.0.0.1:7000 --workers 2

Two machines: certificates from one CA (``python -m libchirp.pki``, docs/tls.md)
and the address the other host reaches::

    host-a$ python examples/mp_two_hosts.py host --address 10.0.0.1 --port 7000 \\
                --cert a.pem --dh dh.pem --remote-workers 2
    host-b$ python examples/mp_two_hosts.py worker --connect 10.0.0.1:7000 \\
                --cert b.pem --dh dh.pem

``demo`` runs both sides on this machine (the worker side as a subprocess).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
from collections import Counter
from typing import List, Optional, Tuple

import libchirp
from libchirp import mp


def work(tasks: mp.Queue, results: mp.Queue, tag: str) -> None:
    """A worker process: say it is ready; take tasks until None; answer each with its result."""
    results.put(("ready", tag))
    while True:
        task = tasks.get()
        if task is None:
            break
        i, n = task
        results.put((i, sum(k * k for k in range(n)), tag, os.getpid()))
    results.join_thread()  # every result confirmed by the host before we go
    tasks.close()
    results.close()


def task_size(i: int) -> int:
    return (i % 50) * 200


def make_config(args: argparse.Namespace) -> Optional[libchirp.Config]:
    if not args.cert:
        return None
    config = libchirp.Config()
    config.CERT_CHAIN_PEM = args.cert
    config.DH_PARAMS_PEM = args.dh
    return config


def start_workers(
    tasks: mp.Queue, results: mp.Queue, n: int, tag: str
) -> List[multiprocessing.context.SpawnProcess]:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=work, args=(tasks, results, "%s/%d" % (tag, i))) for i in range(n)]
    for p in procs:
        p.start()
    return procs


def host(args: argparse.Namespace) -> int:
    config = make_config(args)
    tasks = mp.Queue(name="tasks", address=args.address, port=args.port, config=config)
    results = mp.Queue(name="results", address=args.address, port=args.port, config=config)
    print("hosting tasks and results at %s:%d" % tasks.address, flush=True)
    procs = start_workers(tasks, results, args.workers, args.tag)
    for _ in range(args.workers + args.remote_workers):
        ready, tag = results.get(timeout=args.timeout)
        assert ready == "ready", (ready, tag)
    t0 = time.monotonic()
    tasks.put_many([(i, task_size(i)) for i in range(args.tasks)])
    done: Counter[int] = Counter()
    by: Counter[str] = Counter()
    bad = 0
    for _ in range(args.tasks):
        i, value, tag, _pid = results.get(timeout=args.timeout)
        done[i] += 1
        by[tag.split("/")[0]] += 1
        bad += value != sum(k * k for k in range(task_size(i)))
    secs = time.monotonic() - t0
    for _ in range(args.workers + args.remote_workers):
        tasks.put(None)
    for p in procs:
        p.join(60)
    ok = set(done) == set(range(args.tasks)) and max(done.values()) == 1 and not bad
    shares = " ".join("%s=%d" % kv for kv in sorted(by.items()))
    print("RESULT %s tasks=%d secs=%.2f %s" % ("OK" if ok else "BAD", args.tasks, secs, shares))
    return 0 if ok else 1


def parse_connect(text: str) -> Tuple[str, int]:
    address, _, port = text.rpartition(":")
    return address.strip("[]"), int(port)


def worker(args: argparse.Namespace) -> int:
    address, port = parse_connect(args.connect)
    config = make_config(args)
    tasks = mp.attach(address, port, "tasks", config=config)
    results = mp.attach(address, port, "results", config=config)
    deadline = time.monotonic() + args.timeout
    while True:  # the host may not be up yet
        try:
            tasks.qsize()
            break
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    procs = start_workers(tasks, results, args.workers, args.tag)
    for p in procs:
        p.join()
    print("WORKERS DONE", args.tag, flush=True)
    return 0 if all(p.exitcode == 0 for p in procs) else 1


def demo(args: argparse.Namespace) -> int:
    args.remote_workers = args.workers
    cmd = [sys.executable, os.path.abspath(__file__), "worker", "--tag", "B"]
    cmd += ["--connect", "127.0.0.1:%d" % args.port, "--workers", str(args.workers)]
    side = subprocess.Popen(cmd)
    try:
        rc = host(args)
        return rc or side.wait(60)
    finally:
        if side.poll() is None:
            side.kill()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("role", choices=["host", "worker", "demo"])
    ap.add_argument("--address", default="127.0.0.1", help="address the host advertises")
    ap.add_argument("--port", type=int, default=7000, help="port of the host's node")
    ap.add_argument("--connect", default="127.0.0.1:7000", help="worker: the host's ADDRESS:PORT")
    ap.add_argument("--cert", help="CERT_CHAIN_PEM (needed between machines)")
    ap.add_argument("--dh", help="DH_PARAMS_PEM (needed between machines)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes on this side")
    ap.add_argument("--remote-workers", type=int, default=0, help="host: workers elsewhere")
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--tag", default="A", help="name of this side in the summary")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    if args.role == "worker" and args.tag == "A":
        args.tag = "B"
    return {"host": host, "worker": worker, "demo": demo}[args.role](args)


if __name__ == "__main__":
    sys.exit(main())
