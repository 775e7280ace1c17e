#!/usr/bin/env python3
"""Several producers, one consumer: asynchronous mode with slots as flow control.

Three producer nodes send blocks of data to one consumer node as fast as they
can. All nodes are asynchronous, so a send completes as soon as it is written.
What keeps the producers from burying the consumer is chirp's flow control:

* the consumer has ``MAX_SLOTS = 4``: it holds at most 4 unreleased messages
  per connection, i.e. per producer. With all slots taken it stops reading that
  connection;
* the consumer's ``AUTO_RELEASE`` is off: it releases a message only after it
  "worked" on it, so a slot stays taken for the whole work;
* a producer whose data cannot be read fills its socket buffers, its writes
  stall, its send futures complete late, and its window of unfinished sends
  (``WINDOW``) blocks it: the slow consumer paces every producer.

The consumer checks that every message arrived, in order per producer, and
that it never held more than producers x MAX_SLOTS messages at once.

Every node takes a free port (``Config.PORT = 0``); ``--port P`` puts the
consumer on P.

Run: ``.venv/bin/python examples/producer_consumer.py`` (after ``make build``).
"""

from __future__ import annotations

import argparse
import collections
import queue
import sys
import threading
import time
from concurrent.futures import Future
from typing import Counter, Deque, Dict, Tuple

import libchirp
from libchirp.queue import Chirp, Message

MAX_SLOTS = 4  # consumer: unreleased messages per connection
WINDOW = 8  # producer: sends in flight before it waits for the oldest one


def config(port: int = 0) -> libchirp.Config:
    cfg = libchirp.Config()
    cfg.PORT = port  # 0: a free port, which node.port reports
    cfg.SYNCHRONOUS = False
    cfg.DISABLE_ENCRYPTION = True  # all nodes talk over 127.0.0.1, never encrypted anyway
    return cfg


#: Producer name -> (seconds until its last send completed, failed sends).
Report = Dict[str, Tuple[float, int]]


def produce(
    node: Chirp, name: str, consumer_port: int, count: int, size: int, report: Report
) -> None:
    """Send ``count`` blocks to the consumer, at most WINDOW unfinished at a time."""
    start = time.monotonic()
    pending: Deque[Future[Message]] = collections.deque()
    failed = 0
    for seq in range(count):
        msg = Message()
        msg.address = "127.0.0.1"
        msg.port = consumer_port
        msg.header = name.encode()
        msg.data = seq.to_bytes(4, "big") + bytes(size - 4)
        pending.append(node.send(msg))
        if len(pending) >= WINDOW:  # flow control reaches the application here
            if pending.popleft().exception(timeout=30) is not None:
                failed += 1
    for fut in pending:
        if fut.exception(timeout=30) is not None:
            failed += 1
    report[name] = (time.monotonic() - start, failed)


def consume(
    node: Chirp, expected: int, work: float, deadline: float
) -> Tuple[Counter[str], int, bool]:
    """Take messages until ``expected`` arrived; return (per producer, max held, ordered)."""
    seen: Counter[str] = collections.Counter()
    next_seq: Dict[str, int] = collections.defaultdict(int)
    ordered = True
    max_held = 0
    while sum(seen.values()) < expected and time.monotonic() < deadline:
        try:
            msg = node.get(timeout=0.5)  # AUTO_RELEASE is off: the slot stays taken
        except queue.Empty:
            continue
        # Unreleased right now: this one plus those waiting in the queue.
        max_held = max(max_held, node.qsize() + 1)
        name = msg.header.decode()
        seq = int.from_bytes(msg.data[:4], "big")
        if seq != next_seq[name]:
            ordered = False
        next_seq[name] = seq + 1
        seen[name] += 1
        time.sleep(work)  # the work on the message ...
        msg.release_slot()  # ... and only then the slot is free again
    return seen, max_held, ordered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--producers", type=int, default=3)
    parser.add_argument("--count", type=int, default=200, help="messages per producer")
    parser.add_argument("--size", type=int, default=64 * 1024, help="bytes per message")
    parser.add_argument("--work", type=float, default=0.002, help="seconds of work per message")
    parser.add_argument("--port", type=int, default=0, help="the consumer's port (0: a free one)")
    args = parser.parse_args()
    total = args.producers * args.count
    limit = args.producers * MAX_SLOTS

    print(
        "producer_consumer: %d producers -> 1 consumer, %d messages of %d KiB each, "
        "asynchronous mode, consumer MAX_SLOTS=%d, %.0f ms of work per message"
        % (args.producers, total, args.size // 1024, MAX_SLOTS, args.work * 1000)
    )
    with libchirp.Loop() as loop:
        consumer_config = config(args.port)
        consumer_config.MAX_SLOTS = MAX_SLOTS
        consumer_config.AUTO_RELEASE = False
        consumer = Chirp(loop, consumer_config)
        producers = [Chirp(loop, config()) for _ in range(args.producers)]
        report: Report = {}
        with consumer:
            try:
                start = time.monotonic()
                threads = [
                    threading.Thread(
                        target=produce,
                        args=(node, "p%d" % (i + 1), consumer.port, args.count, args.size, report),
                    )
                    for i, node in enumerate(producers)
                ]
                for t in threads:
                    t.start()
                seen, max_held, ordered = consume(consumer, total, args.work, start + 60)
                consumed_after = time.monotonic() - start
                for t in threads:
                    t.join(60)
            finally:
                for node in producers:
                    node.stop()

    failures = 0
    for name in sorted(report):
        took, failed = report[name]
        failures += failed
        print(
            "producer %s: %d messages sent, %d failed; its last send completed after %.2f s"
            % (name, args.count, failed, took)
        )
    consumed = sum(seen.values())
    print(
        "consumer: consumed %d of %d messages in %.2f s, %s"
        % (consumed, total, consumed_after, "in order per producer" if ordered else "OUT OF ORDER")
    )
    print(
        "consumer: held at most %d unreleased messages at once (limit: %d producers x %d slots)"
        % (max_held, args.producers, MAX_SLOTS)
    )
    if report:
        print(
            "The consumer set the pace: the producers could write only as fast as it released "
            "slots, so they finished %.2f s after the start instead of at once; what was left "
            "at that point sat in socket buffers." % max(took for took, _ in report.values())
        )
    good = consumed == total and ordered and max_held <= limit and failures == 0
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
