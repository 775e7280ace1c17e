#!/usr/bin/env python3
"""kiwiPy's worker, without a broker: takes tasks, one second per dot (docs/kiwi.md).

Run one or more: ``python examples/kiwi_worker.py --port 9001``, then send
tasks with ``python examples/kiwi_new_task.py --peer 127.0.0.1:9001 hello...``.
Start several workers (each with ``--peer`` of another): every task is done by
exactly one of them, the least busy.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any, Optional

from libchirp.kiwi import ChirpCommunicator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=9001, help="listening port (0: any free one)")
    ap.add_argument("--peer", help="ADDRESS:PORT of another member, if any")
    ap.add_argument("--tasks", type=int, help="stop after this many tasks (default: never)")
    ap.add_argument("--dot-seconds", type=float, default=1.0)
    args = ap.parse_args()
    peers = []
    if args.peer:
        address, _, port = args.peer.rpartition(":")
        peers.append((address, int(port)))
    finished = threading.Event()
    done = 0

    def callback(_comm: Any, task: str) -> Optional[str]:
        nonlocal done
        print(" [x] Received %r" % task, flush=True)
        time.sleep(task.count(".") * args.dot_seconds)
        print(" [x] Done", flush=True)
        done += 1
        if args.tasks is not None and done >= args.tasks:
            finished.set()
        return "%s done" % task

    with ChirpCommunicator(args.port, peers) as comm:
        comm.add_task_subscriber(callback)
        print(" [*] Waiting for tasks on port %d" % comm.port, flush=True)
        finished.wait()
        time.sleep(0.2)  # let the last outcome leave


if __name__ == "__main__":
    main()
