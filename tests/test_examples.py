"""The programs in examples/ run, exit 0, print what they promise and read as patterns.

Each example runs as a subprocess, as a user would start it, with a time limit.
The examples take free ports (``Config.PORT = 0``) and stop every node and child
process they start; a leftover child would keep the output pipe open, so a
hanging example fails here by its timeout. The time-series pipe, which needs a
partner process and a database, is run by tests/test_timeseries.py.

As patterns to copy, the examples import the installed package (no edits of
``sys.path``), choose ports with ``Config.PORT = 0`` (no port-finding helper),
take ``--port``, have no hidden options and pass ``mypy --strict``.
"""

import ast
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

pytestmark = [pytest.mark.timeout(300), pytest.mark.multiprocess]

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


#: Examples run by a test module of their own, with the processes and servers they need.
ELSEWHERE = {
    "timeseries_pipe.py": "tests/test_timeseries.py",
    "kiwi_broadcast_client.py": "tests/test_kiwi_examples.py",
    "kiwi_broadcast_server.py": "tests/test_kiwi_examples.py",
    "kiwi_new_task.py": "tests/test_kiwi_examples.py",
    "kiwi_rpc_client.py": "tests/test_kiwi_examples.py",
    "kiwi_rpc_server.py": "tests/test_kiwi_examples.py",
    "kiwi_worker.py": "tests/test_kiwi_examples.py",
    "mp_two_hosts.py": "tests/test_mp_hosts.py",
}


def example_names():
    return sorted(name for name in os.listdir(EXAMPLES) if name.endswith(".py"))


def test_every_example_is_tested():
    tested = {name for name, _, _ in CASES} | set(ELSEWHERE)
    assert set(example_names()) == tested
    for name, path in ELSEWHERE.items():
        with open(os.path.join(ROOT, path)) as f:
            assert name in f.read(), "%s does not run %s" % (path, name)


@pytest.mark.parametrize("name", example_names())
def test_example_reads_as_a_pattern(name):
    with open(os.path.join(EXAMPLES, name)) as f:
        source = f.read()
    assert "sys.path" not in source, "the examples import the installed package"
    assert "SUPPRESS" not in source, "no hidden options"
    tree = ast.parse(source)
    functions = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert not functions & {"free_port", "find_free_port"}, "use Config.PORT = 0"
    ports = re.findall(r"^\s+\w+\.PORT = (\S+)", source, re.M)
    # libchirp.mp takes the port of its node as an argument (mp.Queue(port=...))
    ports += re.findall(r"\bport=([\w.]+)", source)
    if "Config()" in source:
        assert ports and all(p in ("0", "port", "args.port") for p in ports), ports
    assert '"--port"' in source


@pytest.mark.parametrize(
    "name,command",
    [(n, []) for n in example_names() if n not in ELSEWHERE]
    + [(n, []) for n in example_names() if n.startswith("kiwi_")]
    + [("timeseries_pipe.py", ["sink"]), ("timeseries_pipe.py", ["source"])],
)
def test_example_help_offers_port(name, command):
    res = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *command, "--help"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "--port" in res.stdout


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_examples_pass_mypy_strict():
    """Errors inside libchirp are not the examples' (--follow-imports=silent)."""
    res = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--no-error-summary", *[os.path.join(EXAMPLES, n) for n in example_names()]],
        capture_output=True, text=True, timeout=280, cwd=ROOT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


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
