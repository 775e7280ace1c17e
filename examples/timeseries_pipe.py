#!/usr/bin/env python3
"""Pipe time-series points into a database, synchronously: a source and a sink.

Two programs in one file, each a process of its own:

* ``sink`` runs a synchronous node with AUTO_RELEASE off. For every point that
  arrives it writes the point to the database and only then releases the
  message. In synchronous mode the release is what completes the sender's
  send, so a completed send means *the point is stored*.
* ``source`` samples a noisy sine wave at a steady rate (``--rate`` points per
  second, each stamped with the real time it was taken) and sends the points
  to the sink, one at a time, each waiting for its send to complete. A sampler
  thread keeps taking samples while the sender waits, so the rate stays steady
  even when the sink is slow or away. When a send fails (the sink died, or was
  restarted) the same point is sent again until it goes through.

A point sent again may already be stored: the sink may have died after storing
it but before its release reached the source. The database makes such a resend
harmless: a point is identified by its series and its time, so the second copy
does not add a row.

* **SQLite** (the default, ``--db FILE``): a table ``points`` with the columns
  ``series``, ``time_ns`` and ``value`` and the primary key (series, time_ns),
  in WAL mode with ``synchronous = FULL``: each point is committed (and on
  disk) before it is released. A resent point is ignored.
* **InfluxDB 1.x** (``--influx URL``): each point is written with the line
  protocol over HTTP (``POST /write``, measurement ``points``, tag ``series``,
  field ``value``, nanosecond time). InfluxDB stores one point per
  measurement, tags and time, so a resent point overwrites itself. The write
  has succeeded when InfluxDB answers 204.

Run (after ``make build``), in two terminals::

    .venv/bin/python examples/timeseries_pipe.py sink --port 7000 --db points.sqlite
    .venv/bin/python examples/timeseries_pipe.py source 127.0.0.1:7000 --rate 50

Kill the sink and start it again while the source runs: the source reports
the failed sends, waits, and continues; nothing is lost and nothing stored twice.
``--journal FILE`` makes the source append every point whose send completed
(``series time_ns`` per line), which is how tests/test_timeseries.py checks it.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import random
import signal
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from types import FrameType
from typing import IO, NamedTuple, Optional, Protocol

import libchirp
from libchirp.queue import Chirp, Message

HEADER = b"point"


class Point(NamedTuple):
    series: str
    time_ns: int
    value: float

    def encode(self) -> bytes:
        fields = {"series": self.series, "time_ns": self.time_ns, "value": self.value}
        return json.dumps(fields).encode()

    @classmethod
    def decode(cls, data: bytes) -> Point:
        fields = json.loads(data)
        return cls(str(fields["series"]), int(fields["time_ns"]), float(fields["value"]))


def say(text: str) -> None:
    print(text, flush=True)


def stop_on_signals() -> threading.Event:
    """An Event set by SIGINT or SIGTERM: both end a program cleanly."""
    stop = threading.Event()

    def handle(signum: int, frame: Optional[FrameType]) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


# -- the sink --------------------------------------------------------------------------------------


class Store(Protocol):
    def write(self, point: Point) -> bool:
        """Store ``point`` durably; False if it was stored already (a resend)."""

    def close(self) -> None: ...


class SqliteStore:
    """Points in an SQLite table; one transaction per point."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)  # transactions by hand
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")  # a commit is on disk
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS points ("
            " series TEXT NOT NULL,"
            " time_ns INTEGER NOT NULL,"
            " value REAL NOT NULL,"
            " PRIMARY KEY (series, time_ns))"
        )

    def write(self, point: Point) -> bool:
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO points (series, time_ns, value) VALUES (?, ?, ?)", point
        )
        return cursor.rowcount == 1

    def close(self) -> None:
        self.db.close()


class InfluxStore:
    """Points in an InfluxDB 1.x database, written with the line protocol."""

    def __init__(self, url: str, database: str) -> None:
        self.url = url.rstrip("/")
        self.database = database
        self._post("/query", {"q": 'CREATE DATABASE "%s"' % database})  # no-op if it exists

    def _post(self, path: str, params: dict[str, str], body: bytes = b"") -> int:
        url = "%s%s?%s" % (self.url, path, urllib.parse.urlencode(params))
        request = urllib.request.Request(url, data=body, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)

    def write(self, point: Point) -> bool:
        series = point.series.replace("\\", "\\\\").replace(",", "\\,").replace(" ", "\\ ")
        series = series.replace("=", "\\=")
        line = "points,series=%s value=%r %d" % (series, point.value, point.time_ns)
        status = self._post("/write", {"db": self.database, "precision": "ns"}, line.encode())
        if status != 204:
            raise OSError("InfluxDB answered %d to a write" % status)
        return True  # InfluxDB cannot tell; a resend overwrites the same point

    def close(self) -> None:
        pass


def run_sink(args: argparse.Namespace) -> int:
    stop = stop_on_signals()
    store: Store = InfluxStore(args.influx, args.influx_db) if args.influx else SqliteStore(args.db)
    where = "InfluxDB %s, database %s" % (args.influx, args.influx_db) if args.influx else args.db
    stored = resent = 0
    config = libchirp.Config()
    config.PORT = args.port  # 0: a free port, which node.port reports
    config.SYNCHRONOUS = True  # the default, spelled out: a send waits for the release
    config.AUTO_RELEASE = False  # released only once the point is stored
    config.DISABLE_ENCRYPTION = True  # on one host; between hosts use TLS (docs/tls.md)
    try:
        with libchirp.Loop() as loop:
            node = Chirp(loop, config)
            with node:
                say("sink: listening on port %d, storing points in %s" % (node.port, where))
                while not stop.is_set():
                    try:
                        msg = node.get(timeout=0.2)
                    except queue.Empty:
                        continue
                    if msg.header == HEADER:
                        # An exception here ends the sink without releasing the
                        # message: the source's send fails and it sends the point again.
                        if store.write(Point.decode(msg.data)):
                            stored += 1
                        else:
                            resent += 1
                    msg.release_slot()
    finally:
        store.close()
    say("sink: %d points stored, %d resent ones were stored already" % (stored, resent))
    return 0


# -- the source ------------------------------------------------------------------------------------


def sample(
    points: queue.Queue[Optional[Point]],
    series: str,
    rate: float,
    count: int,
    stop: threading.Event,
) -> None:
    """Take ``count`` samples (0: until ``stop``), ``rate`` per second; None at the end."""
    rng = random.Random()
    start = time.monotonic()
    taken = 0
    while not stop.is_set() and (count == 0 or taken < count):
        # A steady rate: sample i is due at start + i / rate, however long sends take.
        if stop.wait(max(0.0, start + taken / rate - time.monotonic())):
            break
        now = time.time_ns()
        value = math.sin(now / 1e9) + rng.gauss(0.0, 0.1)
        points.put(Point(series, now, value))
        taken += 1
    points.put(None)


def run_source(args: argparse.Namespace) -> int:
    stop = stop_on_signals()
    address, _, port_text = args.sink.rpartition(":")
    address = address.strip("[]")
    journal: Optional[IO[str]] = open(args.journal, "a") if args.journal else None
    points: queue.Queue[Optional[Point]] = queue.Queue()
    sampler = threading.Thread(
        target=sample, args=(points, args.series, args.rate, args.points, stop), daemon=True
    )
    config = libchirp.Config()
    config.PORT = args.port  # 0: a free port (the sink does not answer; the node listens anyway)
    config.SYNCHRONOUS = True  # a send completes when the sink released, i.e. stored, the point
    config.TIMEOUT = args.timeout
    config.DISABLE_ENCRYPTION = True  # on one host; between hosts use TLS (docs/tls.md)
    sent = resends = 0
    gave_up = False
    start = time.monotonic()
    say(
        "source: %s points of series %r, %g per second, to %s"
        % (args.points or "unlimited", args.series, args.rate, args.sink)
    )
    try:
        with libchirp.Loop() as loop:
            node = Chirp(loop, config)
            with node:
                sampler.start()
                while True:
                    point = points.get()
                    if point is None:
                        break
                    failing_since: Optional[float] = None
                    while not stop.is_set():
                        msg = Message()
                        msg.address, msg.port = address, int(port_text)
                        msg.header = HEADER
                        msg.data = point.encode()
                        try:
                            node.send(msg).result(timeout=3 * args.timeout + 10)
                            break  # stored
                        except Exception as exc:  # noqa: BLE001 - every failure means "again"
                            now = time.monotonic()
                            if failing_since is None:
                                failing_since = now
                                say(
                                    "source: a send failed (%s: %s); sending the point "
                                    "again until it is stored" % (type(exc).__name__, exc)
                                )
                            elif now - failing_since > args.retry_for:
                                say("source: giving up after %.0f s of failures" % args.retry_for)
                                gave_up = True
                                break
                            resends += 1
                            stop.wait(0.2)
                    else:
                        break  # Ctrl-C or SIGTERM while the point was not stored
                    if gave_up:
                        break
                    if failing_since is not None:
                        say(
                            "source: the point went through after %.1f s; continuing"
                            % (time.monotonic() - failing_since)
                        )
                    sent += 1
                    if journal is not None:
                        journal.write("%s %d\n" % (point.series, point.time_ns))
                        journal.flush()
    finally:
        stop.set()
        sampler.join(10)
        if journal is not None:
            journal.close()
    took = time.monotonic() - start
    say(
        "source: %d points stored in %.1f s (%.1f per second), %d resends, %s"
        % (sent, took, sent / took if took else 0.0, resends, "gave up" if gave_up else "none lost")
    )
    return 1 if gave_up else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sink = commands.add_parser("sink", help="store the points that arrive in a database")
    sink.add_argument("--port", type=int, default=0, help="listening port (default: a free one)")
    sink.add_argument(
        "--db", default="timeseries.sqlite", help="SQLite file (default: %(default)s)"
    )
    sink.add_argument("--influx", metavar="URL", help="store in InfluxDB 1.x at URL instead")
    sink.add_argument(
        "--influx-db", default="chirp", help="InfluxDB database (default: %(default)s)"
    )
    source = commands.add_parser("source", help="sample a sine wave and send it to a sink")
    source.add_argument("sink", metavar="ADDR:PORT", help="the sink, e.g. 127.0.0.1:7000")
    source.add_argument("--series", default="sine", help="series name (default: %(default)s)")
    source.add_argument("--rate", type=float, default=50.0, help="points per second (default: 50)")
    source.add_argument("--points", type=int, default=0, help="stop after N points (0: never)")
    source.add_argument(
        "--port", type=int, default=0, help="this node's port (default: a free one)"
    )
    source.add_argument("--timeout", type=float, default=5.0, help="Config.TIMEOUT (default: 5)")
    source.add_argument(
        "--retry-for", type=float, default=60.0, help="give up after S seconds of failed sends"
    )
    source.add_argument("--journal", metavar="FILE", help="append every stored point to FILE")
    args = parser.parse_args()
    return run_sink(args) if args.command == "sink" else run_source(args)


if __name__ == "__main__":
    sys.exit(main())
