"""The benchmark driver (``make bench``) runs end to end: a tiny smoke run.

Runs ``benchmarks/run.py`` on shapes 1 and 4 only (loopback, libchirp and
pyzmq, one round, tiny counts, nothing written) and checks that it prints the
table with a figure for both systems: shape 1 has an asynchronous and a
SYNCHRONOUS row. The full benchmark is not part of the
tests; it runs with ``make bench``.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(60)


def test_quick_bench_prints_a_table():
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--no-write",
         "--shapes", "1,4", "--rounds", "1", "--duration", "0.2", "--stream-count", "3000"],
        capture_output=True, text=True, timeout=50, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "| shape | libchirp | pyzmq | ratio | target | met? |" in out
    rows = [line for line in out.splitlines() if re.match(r"\| [14]\. ", line)]
    assert len(rows) == 3, out
    assert sum("SYNCHRONOUS" in row for row in rows) == 1, out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert re.match(r"[\d,]+ (rt|msg)/s$", cells[1]), row  # libchirp
        assert re.match(r"[\d,]+ (rt|msg)/s$", cells[2]), row  # pyzmq
        assert re.match(r"[\d.]+×$", cells[3]), row
