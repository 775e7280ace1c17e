"""A mesh member in a process of its own, for tests/test_kiwi_mesh.py and test_kiwi_tls.py.

It starts a :class:`libchirp.kiwi.ChirpCommunicator`, subscribes what the
options ask for, prints ``READY <port> <id>`` and then serves until its stdin
closes (or it is killed). Events go to ``--log`` as JSON lines, flushed at once,
so a test can read them even after a SIGKILL:

* ``{"ev": "start"|"done", "task": ...}`` around every task it works on;
* ``{"ev": "bcast", ...}`` for every broadcast that reaches the communicator
  (before the subscriber's own filter), ``{"ev": "bcast-ok", ...}`` for those
  the filter passed.

``--send-tasks N`` (with ``--outbox``) sends N tasks to nobody in particular,
prints ``SENT`` and waits (the outbox test kills it then). ``--client`` calls
the RPC ``--client`` names and sends one task, prints ``RESULT <json>`` lines and
exits (the TLS test's second host).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any, Optional

import kiwipy

import libchirp
from libchirp.kiwi import ChirpCommunicator

_log_lock = threading.Lock()
_log_file: Optional[Any] = None


def log(**event: Any) -> None:
    if _log_file is None:
        return
    event["pid"] = os.getpid()
    with _log_lock:
        _log_file.write(json.dumps(event) + "\n")
        _log_file.flush()


class CountingFilter(kiwipy.BroadcastFilter):
    """A BroadcastFilter that logs every broadcast reaching it, passed or not."""

    def __call__(self, communicator, body, sender=None, subject=None, correlation_id=None):
        log(ev="bcast", sender=sender, subject=subject, body=body)
        return super().__call__(communicator, body, sender, subject, correlation_id)


def main() -> int:
    global _log_file
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--peer", action="append", default=[], help="ADDRESS:PORT")
    ap.add_argument("--name", default="member")
    ap.add_argument("--log")
    ap.add_argument("--worker", type=float, help="be a task worker taking this many seconds")
    ap.add_argument("--prefetch", type=int, default=1)
    ap.add_argument("--rpc", action="store_true", help="answer RPC '<name>' with the name")
    ap.add_argument("--bcast-subject")
    ap.add_argument("--bcast-sender")
    ap.add_argument("--outbox")
    ap.add_argument("--send-tasks", type=int, default=0)
    ap.add_argument("--client", help="call this RPC identifier, send a task, print, exit")
    ap.add_argument("--client-wait", type=float, default=30.0)
    ap.add_argument("--cert")
    ap.add_argument("--dh")
    args = ap.parse_args()
    if args.log:
        _log_file = open(args.log, "a")

    config = libchirp.Config()
    if args.cert:
        config.CERT_CHAIN_PEM = args.cert
        config.DH_PARAMS_PEM = args.dh
    else:
        config.DISABLE_ENCRYPTION = True
    peers = []
    for peer in args.peer:
        address, _, port = peer.rpartition(":")
        peers.append((address, int(port)))
    comm = ChirpCommunicator(
        args.port,
        peers,
        config=config,
        outbox=args.outbox,
        task_prefetch_count=args.prefetch,
        heartbeat=0.1,
        dead_after=1.0,
    )

    if args.worker is not None:
        delay = args.worker

        def work(_comm: Any, task: Any) -> Any:
            log(ev="start", task=task)
            time.sleep(delay)
            log(ev="done", task=task)
            return {"worker": args.name, "task": task}

        comm.add_task_subscriber(work)
    if args.rpc:
        comm.add_rpc_subscriber(lambda _c, msg: {"name": args.name, "msg": msg}, args.name)
    if args.bcast_subject or args.bcast_sender:

        def heard(_comm: Any, body: Any, sender: Any, subject: Any, correlation_id: Any) -> None:
            log(ev="bcast-ok", sender=sender, subject=subject, body=body)

        comm.add_broadcast_subscriber(
            CountingFilter(heard, subject=args.bcast_subject, sender=args.bcast_sender)
        )

    print("READY %d %s" % (comm.port, comm.id), flush=True)

    if args.send_tasks:
        for i in range(args.send_tasks):
            comm.task_send({"n": i})
        print("SENT", flush=True)
    if args.client:
        deadline = time.monotonic() + args.client_wait
        while time.monotonic() < deadline:
            try:
                answer = comm.rpc_send(args.client, "hello").result(timeout=10)
                break
            except kiwipy.UnroutableError:
                time.sleep(0.1)
        else:
            print("RESULT unroutable", flush=True)
            return 1
        print("RESULT " + json.dumps(answer), flush=True)
        print("RESULT " + json.dumps(comm.task_send("tls task").result(timeout=20)), flush=True)
        comm.close()
        return 0

    sys.stdin.read()  # until the test closes our stdin
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
