"""The programs in examples/ run, exit 0 and print what they promise.

Each example runs as a subprocess, as a user would start it, with a time limit.
The examples pick free ports themselves and stop every node and child process
they start; a leftover child would keep the output pipe open, so a hanging
example fails here by its timeout.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

pytestmark = [pytest.mark.timeout(120), pytest.mark.multiprocess]

#: example file, extra arguments, lines (regular expressions) its output must contain.
CASES = [
    (
        "demo.py",
        [],
        [
            r"== SYNCHRONOUS",
            r"10 requests: round trip",
            r"ConnectionError|CannotConnect",
            r"^done: both nodes stopped, bob exited with status 0\.$",
        ],
    ),
    (
        "producer_consumer.py",
        [],
        [
            r"^producer p1: 200 messages sent, 0 failed",
            r"^consumer: consumed 600 of 600 messages in [\d.]+ s, in order per producer$",
            r"^consumer: held at most (\d+) unreleased messages at once \(limit: 3 producers x 4",
        ],
    ),
    (
        "timeseries_pipe.py",
        [],
        [
            r"^source: 400 points sent in [\d.]+ s .*, 0 failed",
            r"^sink: 400 of 400 points arrived, in order, none lost$",
            r"^timeseries_pipe: done$",
        ],
    ),
    (
        "mesh.py",
        [],
        [
            r"^node A \(port \d+\): asked 75, got 75 answers, served 75;",
            r"^mesh: 4 nodes, 300 requests, 300 answers, 0 errors in [\d.]+ s$",
        ],
    ),
    (
        "mesh.py",
        ["--async", "--nodes", "3", "--requests", "10"],
        [r"^mesh: 3 nodes, 60 requests, 60 answers, 0 errors in [\d.]+ s$"],
    ),
]


#: Examples run by the tests of their own module, with the servers and hosts they need.
TESTED_ELSEWHERE = {
    "kiwi_": os.path.join(ROOT, "tests", "test_kiwi_examples.py"),
    "mp_": os.path.join(ROOT, "tests", "test_mp_hosts.py"),
}


def test_every_example_is_tested():
    tested = {name for name, _, _ in CASES}
    present = {name for name in os.listdir(EXAMPLES) if name.endswith(".py")}
    for name in sorted(present - tested):
        prefix = next((p for p in TESTED_ELSEWHERE if name.startswith(p)), None)
        assert prefix is not None, "example %s is not tested" % name
        with open(TESTED_ELSEWHERE[prefix]) as f:
            assert name in f.read(), "%s does not run %s" % (TESTED_ELSEWHERE[prefix], name)
        tested.add(name)
    assert present == tested


@pytest.mark.parametrize(
    "name,args,expected", CASES, ids=["%s %s" % (c[0], " ".join(c[1])) for c in CASES]
)
def test_example(name, args, expected):
    res = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *args],
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    out = res.stdout
    assert res.returncode == 0, "exit %d\nstdout:\n%s\nstderr:\n%s" % (
        res.returncode,
        out,
        res.stderr,
    )
    for pattern in expected:
        assert re.search(pattern, out, re.M), "no line matching %r in:\n%s" % (pattern, out)
    assert "Traceback" not in res.stderr, res.stderr
