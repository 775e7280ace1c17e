#!/usr/bin/env python3
"""kiwiPy's broadcast subscriber, without a broker: a filter on subject (docs/kiwi.md).

Run: ``python examples/kiwi_broadcast_server.py --port 9002``, then
``python examples/kiwi_broadcast_client.py --peer 127.0.0.1:9002 hi``. The
filter ``purchase.*`` travels to the senders, so a broadcast about something
else never reaches this program.
"""

from __future__ import annotations

import argparse
import threading
from typing import Any

import kiwipy

from libchirp.kiwi import ChirpCommunicator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=9002, help="listening port (0: any free one)")
    ap.add_argument("--subject", default="purchase.*", help="subject filter (wildcards: *)")
    ap.add_argument("--count", type=int, help="stop after this many broadcasts")
    args = ap.parse_args()
    heard = 0
    enough = threading.Event()

    def on_broadcast(_comm: Any, body: Any, sender: Any, subject: Any, correlation_id: Any) -> None:
        nonlocal heard
        print(" [x] %r from %r about %r" % (body, sender, subject), flush=True)
        heard += 1
        if args.count is not None and heard >= args.count:
            enough.set()

    with ChirpCommunicator(args.port) as comm:
        comm.add_broadcast_subscriber(kiwipy.BroadcastFilter(on_broadcast, subject=args.subject))
        print(" [*] Waiting for broadcasts on port %d" % comm.port, flush=True)
        enough.wait()


if __name__ == "__main__":
    main()
