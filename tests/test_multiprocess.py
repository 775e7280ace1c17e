"""Chirp nodes in separate processes (tests/nodeproc.py runs the other node).

* messages both ways between two processes, in both modes;
* a receiver process SIGKILLed in the middle of a stream in synchronous mode:
  every send that reported success must be in the receiver's on-disk record,
  and every other send must have raised. No future may stay pending.
"""

import collections
import concurrent.futures
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import end_process

pytestmark = pytest.mark.multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODEPROC = os.path.join(ROOT, "tests", "nodeproc.py")


def settle(fut, limit=10.0, what="future"):
    done, _ = concurrent.futures.wait([fut], timeout=limit)
    assert done, "%s still pending after %.0f s" % (what, limit)
    return fut.exception()


def receive(node, limit=10.0, what="message"):
    try:
        return node.get(timeout=limit)
    except queue.Empty:
        pytest.fail("no %s received within %.0f s" % (what, limit), pytrace=False)


class NodeProcess:
    """tests/nodeproc.py in a child process, with its stdout read line by line."""

    def __init__(self, *args):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, NODEPROC, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.lines = queue.Queue()
        self.seen = []
        self.stderr = []
        threading.Thread(
            target=self._pump, args=(self.proc.stdout, self.lines), daemon=True
        ).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink.put(line.rstrip("\n"))
        sink.put(None)

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))

    def describe(self):
        return "nodeproc %s (exit %s)\nstdout: %s\nstderr:\n%s" % (
            " ".join(self.args),
            self.proc.poll(),
            self.seen[-5:],
            "\n".join(self.stderr[-30:]),
        )

    def expect(self, prefix, limit=30.0):
        """Return the next stdout line starting with ``prefix`` (split into words)."""
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                pytest.fail(
                    "no %r line within %.0f s from %s" % (prefix, limit, self.describe()),
                    pytrace=False,
                )
            if line is None:
                time.sleep(0.2)  # let stderr drain
                pytest.fail("%r: process ended; %s" % (prefix, self.describe()), pytrace=False)
            self.seen.append(line)
            if line.startswith(prefix):
                return line.split()

    def ready(self):
        words = self.expect("READY", 60)
        return int(words[1]), bytes.fromhex(words[2])

    def finish(self, limit=30.0):
        """Close stdin (asks the process to stop) and wait for a clean exit."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            rc = self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail("process did not exit within %.0f s: %s" % (limit, self.describe()))
        assert rc == 0, self.describe()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def cleanup(self):
        end_process(self.proc)


@pytest.fixture
def spawn():
    procs = []

    def start(*args):
        p = NodeProcess(*[str(a) for a in args])
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.cleanup()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_messages_both_ways_between_processes(make_node, spawn, free_ports, sync):
    mode = [] if sync else ["--async"]
    count = 100

    # 1. This process sends, the child echoes every message back.
    echo = spawn("echo", "--port", free_ports(), *mode)
    echo_port, echo_id = echo.ready()
    node = make_node(SYNCHRONOUS=sync)
    sent = []
    futs = []
    for i in range(count):
        msg = make_node.message(port=echo_port, data=b"%d" % i, header=b"to-echo")
        sent.append(msg)
        futs.append(node.send(msg))
    for i in range(count):
        got = receive(node, 30, "echo %d" % i)
        assert got.data == b"%d" % i, "echoes out of order"
        assert got.identity == sent[i].identity
        assert got.header == b"to-echo"
        assert got.port == echo_port and got.remote_identity == echo_id
    for i, f in enumerate(futs):
        assert settle(f, 30, "send %d" % i) is None
    echo.finish()
    assert echo.expect("COUNT")[1:] == [str(count), "failed=0"]

    # 2. The child sends, this process receives.
    sender = spawn(
        "send", "--port", free_ports(), "--to-port", make_node.port(node), "--count", count, *mode
    )
    sender_port, sender_id = sender.ready()
    for i in range(count):
        got = receive(node, 30, "message %d from the child" % i)
        assert got.data == b"%d" % i, "messages out of order"
        assert got.port == sender_port and got.remote_identity == sender_id
    assert sender.expect("DONE", 60)[1:] == ["ok=%d" % count, "err=0"]
    sender.expect("BYE")
    sender.finish()


@pytest.mark.timeout(240)
def test_sigkilled_receiver_loses_no_acknowledged_message(make_node, spawn, free_ports, tmp_path):
    record = tmp_path / "received.txt"
    receiver = spawn("record", "--port", free_ports(), "--record", record)
    receiver_port, _ = receiver.ready()
    sender = make_node(SYNCHRONOUS=True, TIMEOUT=5.0)

    total, window = 2000, 8
    kill_after = random.randint(300, 600)
    results = {}  # message number -> None (success) or the exception
    pending = collections.deque()
    next_n = ok = early_failures = 0
    time_to_kill = threading.Event()
    killed = threading.Event()
    ok_at_kill = []

    def killer():
        # Kill from another thread while the main loop keeps sends in flight.
        if time_to_kill.wait(200):
            time.sleep(random.uniform(0, 0.02))
            ok_at_kill.append(ok)
            receiver.kill()
        killed.set()

    kill_thread = threading.Thread(target=killer, name="killer", daemon=True)
    kill_thread.start()

    def issuing():
        # Stop issuing once the receiver is dead, or if the stream fails before
        # the kill (the assertions below then report what happened).
        return not killed.is_set() and early_failures <= 20 and next_n < total

    while issuing() or pending:
        while issuing() and len(pending) < window:
            msg = make_node.message(port=receiver_port, data=b"%d" % next_n)
            pending.append((next_n, sender.send(msg)))
            next_n += 1
        n, fut = pending.popleft()
        results[n] = settle(fut, 60, "send %d" % n)
        if results[n] is None:
            ok += 1
        elif not time_to_kill.is_set():
            early_failures += 1
        if ok >= kill_after:
            time_to_kill.set()
    time_to_kill.set()
    kill_thread.join(60)
    assert killed.is_set(), "the killer thread hung"
    # One more send after the kill: nobody can acknowledge it.
    probe = next_n
    results[probe] = settle(
        sender.send(make_node.message(port=receiver_port, data=b"%d" % probe)), 60, "probe"
    )
    next_n += 1

    lines = record.read_text().split("\n") if record.exists() else [""]
    # The last element is "" or a line the kill cut short (never released).
    recorded = [int(x) for x in lines[:-1]]
    recorded_set = set(recorded)
    succeeded = {n for n, e in results.items() if e is None}
    failed = {n: e for n, e in results.items() if e is not None}
    lost = sorted(succeeded - recorded_set)
    summary = (
        "sent %d, succeeded %d, failed %d (%d before the kill), recorded %d, "
        "recorded but failed %d, killed after %s successes; lost %s; failures: %s"
        % (
            len(results),
            len(succeeded),
            len(failed),
            early_failures,
            len(recorded),
            len(recorded_set & set(failed)),
            ok_at_kill[0] if ok_at_kill else None,
            lost[:10],
            dict(collections.Counter(type(e).__name__ for e in failed.values())),
        )
    )
    print(summary)
    assert ok_at_kill and ok_at_kill[0] >= kill_after, "stream broke before the kill: " + summary
    assert not lost, "acknowledged sends missing from the receiver's record: " + summary
    assert len(results) == next_n, "a send never completed: " + summary
    assert results[probe] is not None, "a send to the killed receiver succeeded: " + summary
    assert len(recorded) == len(recorded_set), "a message was delivered twice: " + summary
    assert recorded == sorted(recorded), "delivery out of order: " + summary
    assert recorded_set <= set(results), "recorded a message that was never sent: " + summary
    assert all(isinstance(e, (ConnectionError, TimeoutError)) for e in failed.values()), summary
