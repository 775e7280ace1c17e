"""The kiwiPy examples in examples/kiwi_*.py run and print what they promise (docs/kiwi.md).

Each pair runs as a user would start it: the serving program with ``--port 0``
in the background (it prints its port), the other one with ``--peer`` to it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

pytestmark = [pytest.mark.timeout(60), pytest.mark.multiprocess]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, e.get("PYTHONPATH")) if p)
    e["PYTHONUNBUFFERED"] = "1"
    return e


def start(name, *args):
    proc = subprocess.Popen(
        [sys.executable, os.path.join(EXAMPLES, name), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
        cwd=ROOT,
    )
    first = proc.stdout.readline()
    port = re.search(r"port (\d+)", first)
    assert port, "%s printed %r" % (name, first)
    return proc, int(port.group(1))


def run(name, *args):
    done = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *args],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=40,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def finish(proc):
    try:
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return out


def test_rpc_client_and_server():
    server, port = start("kiwi_rpc_server.py", "--port", "0", "--seconds", "8")
    try:
        out = run("kiwi_rpc_client.py", "--peer", "127.0.0.1:%d" % port, "30")
        assert "fib(30) = 832040" in out
        assert "fac(30) = 265252859812191058636308480000000" in out
        assert "'nobody' is unroutable" in out
    finally:
        server.kill()
        finish(server)


def test_worker_and_new_task():
    worker, port = start("kiwi_worker.py", "--port", "0", "--tasks", "1", "--dot-seconds", "0.1")
    out = run("kiwi_new_task.py", "--peer", "127.0.0.1:%d" % port, "Hello", "World...")
    assert "Result: 'Hello World... done'" in out
    rest = finish(worker)
    assert "Received 'Hello World...'" in rest and "Done" in rest
    assert worker.returncode == 0


def test_broadcast_client_and_server():
    server, port = start("kiwi_broadcast_server.py", "--port", "0", "--count", "1")
    out = run("kiwi_broadcast_client.py", "--peer", "127.0.0.1:%d" % port, "hello")
    assert "Sent 'hello'" in out
    rest = finish(server)
    assert "'hello' from 'bob.jones' about 'purchase.car'" in rest
    assert "about 'sell.car'" not in rest
    assert server.returncode == 0
