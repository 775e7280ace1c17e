"""The time-series example stores every point exactly once, also when its sink is killed.

examples/timeseries_pipe.py runs as a user runs it: a ``sink`` process storing
into a real database and a ``source`` process sending points to it at a steady
rate. In the middle of the run the sink is killed with SIGKILL (no chance to
clean up) and started again on the same port. Then every point the source saw
complete (its ``--journal``) must be in the database exactly once, and nothing
else may be there:

* SQLite: the table ``points``, read with the sqlite3 module;
* InfluxDB 1.x: a private ``influxd`` (tests/influx.py; installed with
  apt-get when missing, which needs root, as CI has), queried over HTTP.
"""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import influx  # noqa: E402

EXAMPLE = os.path.join(ROOT, "examples", "timeseries_pipe.py")
POINTS = 150
RATE = 50.0

pytestmark = [pytest.mark.timeout(120), pytest.mark.multiprocess]


class Program:
    """``timeseries_pipe.py ARGS`` in the background; stdout lines are collected."""

    def __init__(self, *args, cwd):
        self.proc = subprocess.Popen(
            [sys.executable, EXAMPLE, *map(str, args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
        )
        self.lines = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern, timeout=30):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    m = rx.search(line)
                    if m:
                        return m
                if time.monotonic() > deadline or not self._reader.is_alive():
                    pytest.fail("no line matching %r; output: %r" % (pattern, self.lines))
                self._cond.wait(0.2)

    def finish(self, timeout=60):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("did not exit within %d s; output: %r" % (timeout, self.lines))
        self._reader.join(10)
        self.proc.stdout.close()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        self.proc.stdout.close()


def start_sink(tmp_path, store_args, port=0):
    sink = Program("sink", "--port", port, *store_args, cwd=tmp_path)
    return sink, int(sink.wait_for(r"^sink: listening on port (\d+)").group(1))


def journal_lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def run_with_a_killed_sink(tmp_path, store_args):
    """Run source and sink, SIGKILL the sink mid-way, restart it; return the journal."""
    journal = tmp_path / "journal.txt"
    sink, port = start_sink(tmp_path, store_args)
    programs = [sink]
    try:
        source = Program(
            "source", "127.0.0.1:%d" % port, "--rate", RATE, "--points", POINTS,
            "--journal", journal, "--timeout", 2, cwd=tmp_path,
        )  # fmt: skip
        programs.append(source)
        deadline = time.monotonic() + 30
        while len(journal_lines(journal)) < POINTS // 3:
            assert time.monotonic() < deadline, source.lines
            time.sleep(0.02)
        sink.proc.send_signal(signal.SIGKILL)
        sink.finish(10)
        time.sleep(0.5)  # the source's sends fail meanwhile
        sink, again = start_sink(tmp_path, store_args, port)
        programs.append(sink)
        assert again == port
        assert source.finish(90) == 0, source.lines
        sink.proc.send_signal(signal.SIGTERM)
        assert sink.finish(30) == 0, sink.lines
    finally:
        for program in programs:
            program.kill()
    out = "\n".join(source.lines)
    assert "a send failed" in out, out  # the kill was noticed ...
    assert "source: %d points stored" % POINTS in out and "none lost" in out, out  # ... and healed
    lines = journal_lines(journal)
    assert len(lines) == POINTS and len(set(lines)) == POINTS
    points = [(series, int(t)) for series, t in (line.split() for line in lines)]
    times = [t for _, t in points]
    assert times == sorted(times)
    # Real time stamps at a steady rate: the points span POINTS / RATE seconds.
    span = (times[-1] - times[0]) / 1e9
    assert (POINTS - 1) / RATE * 0.8 < span < (POINTS - 1) / RATE * 1.5 + 1, span
    assert abs(times[0] / 1e9 - time.time()) < 120
    return points


def test_sqlite_sink_killed_and_restarted(tmp_path):
    expected = run_with_a_killed_sink(tmp_path, ["--db", "points.sqlite"])
    db = sqlite3.connect(str(tmp_path / "points.sqlite"))
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = db.execute("SELECT series, time_ns FROM points ORDER BY time_ns").fetchall()
        (total,) = db.execute("SELECT count(*) FROM points").fetchone()
    finally:
        db.close()
    assert total == len(rows) == POINTS
    assert rows == expected  # every completed point, once; nothing else


@pytest.fixture(scope="module")
def influxd():
    try:
        influx.install(log=sys.stderr)
    except Exception as exc:  # not root and not installed: nothing to test against
        pytest.skip("InfluxDB is not available: %s" % exc)
    with influx.Influxd() as server:
        yield server


@pytest.mark.slow
def test_influx_sink_killed_and_restarted(tmp_path, influxd):
    expected = run_with_a_killed_sink(tmp_path, ["--influx", influxd.url, "--influx-db", "pipe"])
    (result,) = influxd.query('SELECT "value", "series" FROM "points"', db="pipe")
    (series,) = result["series"]
    assert series["columns"] == ["time", "value", "series"]
    rows = [(name, t) for t, _, name in series["values"]]
    (count,) = influxd.query('SELECT count("value") FROM "points"', db="pipe")
    assert count["series"][0]["values"][0][1] == POINTS
    assert sorted(rows, key=lambda r: r[1]) == expected
