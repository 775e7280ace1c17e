#!/usr/bin/env python3
"""kiwiPy's new_task, without a broker: sends one task and waits for it (docs/kiwi.md).

Run ``examples/kiwi_worker.py`` first, then
``python examples/kiwi_new_task.py --peer 127.0.0.1:9001 "Hello World..."``.
With ``--outbox FILE`` the task survives a crash of this program: run it
again with the same file and the task is sent again.
"""

from __future__ import annotations

import argparse

from libchirp.kiwi import ChirpCommunicator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", default="127.0.0.1:9001", help="ADDRESS:PORT of any member")
    ap.add_argument("--port", type=int, default=0, help="our own port (0: any free one)")
    ap.add_argument("--outbox", help="SQLite file keeping tasks until they are done")
    ap.add_argument("words", nargs="*")
    args = ap.parse_args()
    message = " ".join(args.words) or "Hello World"
    address, _, port = args.peer.rpartition(":")
    with ChirpCommunicator(args.port, [(address, int(port))], outbox=args.outbox) as comm:
        for earlier in comm.recovered_tasks():
            print(" [x] Earlier task: %r" % earlier.result(60))
        print(" [x] Sent %r" % message)
        future = comm.task_send(message)  # None only with no_reply=True
        assert future is not None
        result = future.result(60)
        print(" [x] Result: %r" % result)


if __name__ == "__main__":
    main()
