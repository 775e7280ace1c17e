#!/usr/bin/env python3
"""kiwiPy's broadcast sender, without a broker: two subjects, one filtered (docs/kiwi.md).

Run ``examples/kiwi_broadcast_server.py`` first, then
``python examples/kiwi_broadcast_client.py --peer 127.0.0.1:9002 hello``.
"""

from __future__ import annotations

import argparse
import sys
import time

from libchirp.kiwi import ChirpCommunicator


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", default="127.0.0.1:9002", help="ADDRESS:PORT of any member")
    ap.add_argument("--port", type=int, default=0, help="our own port (0: any free one)")
    ap.add_argument("words", nargs="*")
    args = ap.parse_args()
    body = " ".join(args.words) or "___"
    address, _, port = args.peer.rpartition(":")
    with ChirpCommunicator(args.port, [(address, int(port))]) as comm:
        if not comm.wait_for_members(1, timeout=10):
            print("no member at %s" % args.peer)
            return 1
        comm.broadcast_send(body, sender="bob.jones", subject="purchase.car")
        comm.broadcast_send(body, sender="bob.jones", subject="sell.car")
        print(" [x] Sent %r about purchase.car and sell.car" % body)
        time.sleep(0.2)  # let the broadcasts leave before closing
    return 0


if __name__ == "__main__":
    sys.exit(main())
