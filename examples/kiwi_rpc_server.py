#!/usr/bin/env python3
"""kiwiPy's RPC server, without a broker: answers 'fib' and 'fac' (docs/kiwi.md).

Run: ``python examples/kiwi_rpc_server.py --port 9000``, then
``python examples/kiwi_rpc_client.py --peer 127.0.0.1:9000 30``.
"""

from __future__ import annotations

import argparse
import threading
from typing import Any

from libchirp.kiwi import ChirpCommunicator


def fib(_comm: Any, num: int) -> int:
    a, b = 0, 1
    for _ in range(num):
        a, b = b, a + b
    return a


def fac(_comm: Any, num: int) -> int:
    result = 1
    for i in range(2, num + 1):
        result *= i
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=9000, help="listening port (0: any free one)")
    ap.add_argument("--seconds", type=float, help="stop after this long (default: never)")
    args = ap.parse_args()
    with ChirpCommunicator(args.port) as comm:
        comm.add_rpc_subscriber(fib, "fib")
        comm.add_rpc_subscriber(fac, "fac")
        print("rpc server: 'fib' and 'fac' on port %d" % comm.port, flush=True)
        threading.Event().wait(args.seconds)


if __name__ == "__main__":
    main()
