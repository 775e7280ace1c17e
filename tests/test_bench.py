"""The benchmark driver (``make bench``) runs end to end: tiny smoke runs.

Runs ``benchmarks/run.py`` on a few shapes only (loopback, one round, tiny
counts, nothing written) and checks that it prints the table with a figure
for every system of each row: shape 1 has an asynchronous and a SYNCHRONOUS
row, with the floor (plain sockets) a row against them, and rows of CPU and
context switches per roundtrip; the latency rows show p50 / p99 for both
systems; the idle rows CPU % and wake-ups per second of a node. The full
benchmark is not part of the tests; it runs with ``make bench``.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(60)


def run_bench(*args: str) -> str:
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--no-write",
         "--rounds", "1", "--duration", "0.2", *args],
        capture_output=True, text=True, timeout=50, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "| shape | libchirp | pyzmq | ratio | target | met? |" in res.stdout
    return res.stdout


def cells(row: str) -> list:
    return [c.strip() for c in row.strip("|").split("|")]


def test_quick_bench_prints_a_table():
    out = run_bench("--shapes", "1,4", "--stream-count", "3000")
    rows = [line for line in out.splitlines() if re.match(r"\| [14]\. .*(rt|msg)/s \|", line)]
    assert len(rows) == 3, out
    assert sum("SYNCHRONOUS" in row for row in rows) == 1, out
    for row in rows:
        c = cells(row)
        assert re.match(r"[\d,]+ (rt|msg)/s$", c[1]), row  # libchirp
        assert re.match(r"[\d,]+ (rt|msg)/s$", c[2]), row  # pyzmq
        assert re.match(r"[\d.]+×$", c[3]), row


def test_quick_bench_floor_usage_latency_idle():
    out = run_bench("--shapes", "floor,lat,idle", "--lat-duration", "0.3", "--idle-secs", "0.5")
    lines = out.splitlines()

    def row(prefix: str) -> list:
        found = [line for line in lines if line.startswith("| " + prefix)]
        assert len(found) == 1, (prefix, out)
        return cells(found[0])

    floor = row("1. roundtrips, 1 in flight, against the floor")
    assert re.match(r"[\d,]+ rt/s$", floor[1]) and re.match(r"[\d,]+ rt/s$", floor[2]), floor
    assert re.match(r"[\d.]+×$", floor[3]) and floor[4] == "≥ 0.5× plain sockets", floor
    cpu = row("1. CPU per roundtrip")
    assert re.search(r"\(plain sockets: [\d,]+ µs/rt\)$", cpu[0]), cpu
    assert re.match(r"[\d,]+ µs/rt$", cpu[1]) and re.match(r"[\d,]+ µs/rt$", cpu[2]), cpu
    ctx = row("1. context switches per roundtrip")
    assert re.match(r"[\d.]+ /rt$", ctx[1]) and re.match(r"[\d.]+ /rt$", ctx[2]), ctx
    for pause in ("0.3", "3"):
        lat = row("1. latency p50 / p99, 1 in flight, %s ms pause" % pause)
        assert re.match(r"[\d,]+ / [\d,]+ µs$", lat[1]), lat
        assert re.match(r"[\d,]+ / [\d,]+ µs$", lat[2]), lat
    for state in "abc":
        idle = row("idle %s: " % state)
        assert re.match(r"[\d.]+ % of a core, [\d.]+ wake-ups/s$", idle[1]), idle
        assert idle[5] in ("yes", "**no**"), idle
