#!/usr/bin/env python3
"""kiwiPy's RPC client, without a broker: calls 'fib' and 'fac' (docs/kiwi.md).

Run ``examples/kiwi_rpc_server.py`` first, then
``python examples/kiwi_rpc_client.py --peer 127.0.0.1:9000 30``.
"""

from __future__ import annotations

import argparse
import sys

import kiwipy

from libchirp.kiwi import ChirpCommunicator


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", default="127.0.0.1:9000", help="ADDRESS:PORT of any member")
    ap.add_argument("--port", type=int, default=0, help="our own port (0: any free one)")
    ap.add_argument("number", type=int, nargs="?", default=30)
    args = ap.parse_args()
    address, _, port = args.peer.rpartition(":")
    with ChirpCommunicator(args.port, [(address, int(port))]) as comm:
        if not (comm.wait_for_rpc("fib", timeout=10) and comm.wait_for_rpc("fac", timeout=10)):
            print("nobody answers 'fib' and 'fac' at %s" % args.peer)
            return 1
        print(" [x] fib(%d) = %r" % (args.number, comm.rpc_send("fib", args.number).result(10)))
        print(" [x] fac(%d) = %r" % (args.number, comm.rpc_send("fac", args.number).result(10)))
        try:
            comm.rpc_send("nobody", 1).result(10)
        except kiwipy.UnroutableError as exc:
            print(" [x] 'nobody' is unroutable: %s" % exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
