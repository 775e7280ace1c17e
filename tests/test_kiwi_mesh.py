"""libchirp.kiwi across processes (docs/kiwi.md): crashes, load, outbox, filters, a mesh.

Every member but the test's own runs tests/kiwiproc.py in a process of its
own, on loopback, plaintext. Checked:

* the interface behaviours across three processes: RPC to each, exceptions,
  tasks with and without reply, broadcasts;
* a worker SIGKILLed in the middle of a task: the task completes on another
  worker and the sender's future resolves once, with that worker's result;
* three workers of different speed: the fastest takes the most tasks, the
  slowest the fewest (credit, not round-robin);
* the outbox: a sender SIGKILLed after task_send() returned; a new
  communicator with the same outbox file sends its tasks again;
* broadcast filters across processes, applied by the sender: a broadcast that
  a member's filters refuse never reaches that member;
* five processes, each knowing one other, converge into one mesh; one that is
  killed is forgotten, and when it starts again it is taken in again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import kiwipy
import pytest

from libchirp.kiwi import ChirpCommunicator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KIWIPROC = os.path.join(HERE, "kiwiproc.py")

pytestmark = [pytest.mark.timeout(90), pytest.mark.multiprocess]

WAIT = 10.0


class Member:
    """tests/kiwiproc.py in a process; ``port`` and ``id`` from its READY line."""

    def __init__(self, *options, log=None, wrap=None):
        argv = [sys.executable, KIWIPROC, *[str(o) for o in options]]
        if log is not None:
            argv += ["--log", str(log)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        self.log = log
        self.proc = subprocess.Popen(
            wrap(argv) if wrap is not None else argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.lines = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()
        ready = self.wait_line("READY").split()
        self.port, self.id = int(ready[1]), ready[2]

    def _pump(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.strip())
                self._cond.notify_all()
        with self._cond:
            self.lines.append("EOF")
            self._cond.notify_all()

    def wait_line(self, prefix, limit=WAIT):
        deadline = time.monotonic() + limit
        with self._cond:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                if "EOF" in self.lines or time.monotonic() > deadline:
                    err = self.proc.stderr.read() if "EOF" in self.lines else ""
                    pytest.fail("no %s line from kiwiproc: %s %s" % (prefix, self.lines, err))
                self._cond.wait(0.1)

    @property
    def peer(self):
        return "127.0.0.1:%d" % self.port

    def events(self):
        if self.log is None or not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [json.loads(line) for line in f if line.strip()]

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


@pytest.fixture
def members():
    started = []

    def start(*options, log=None):
        member = Member(*options, log=log)
        started.append(member)
        return member

    yield start
    for member in started:
        member.stop()


@pytest.fixture
def me():
    comms = []

    def make(*peers, **kwargs):
        kwargs.setdefault("heartbeat", 0.1)
        kwargs.setdefault("dead_after", 1.0)
        comm = ChirpCommunicator(0, [("127.0.0.1", p.port) for p in peers], **kwargs)
        comms.append(comm)
        return comm

    yield make
    for comm in comms:
        comm.close()


def wait_until(pred, what, limit=WAIT):
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail("%s not reached within %s s" % (what, limit))
        time.sleep(0.02)


def workers_known(comm, n, queue="kiwipy.tasks"):
    return len(comm._task_route.get(queue, {})) == n


# -----------------------------------------------------------------------------------------


def test_three_processes_rpc_tasks_broadcasts(members, me, tmp_path):
    a = members("--name", "a", "--rpc", "--worker", "0", log=tmp_path / "a.log")
    b = members(
        "--name",
        "b",
        "--rpc",
        "--peer",
        a.peer,
        "--bcast-subject",
        "news.*",
        log=tmp_path / "b.log",
    )
    comm = me(b)
    wait_until(lambda: len(comm.members()) == 2, "three members")
    wait_until(lambda: {"a", "b"} <= set(comm._rpc_route), "both RPC identifiers")
    assert comm.rpc_send("a", 1).result(WAIT) == {"name": "a", "msg": 1}
    assert comm.rpc_send("b", [1, 2]).result(WAIT) == {"name": "b", "msg": [1, 2]}
    with pytest.raises(kiwipy.UnroutableError):
        comm.rpc_send("c", None).result(WAIT)
    results = [comm.task_send(i) for i in range(10)]
    assert [f.result(WAIT)["task"] for f in results] == list(range(10))
    assert comm.task_send("quiet", no_reply=True) is None
    wait_until(lambda: any(e.get("task") == "quiet" for e in a.events()), "no_reply task done")
    # the task subscriber here too: tasks now go to both
    comm.add_task_subscriber(lambda _c, task: {"worker": "me", "task": task})
    wait_until(lambda: workers_known(comm, 2), "two workers")
    wait_until(
        lambda: len([e for e in comm.members().values() if e["info"]["bc"]]) == 1, "b's filter"
    )
    comm.broadcast_send("hello", subject="news.today")
    comm.broadcast_send("ignored", subject="sports.today")
    wait_until(lambda: any(e["ev"] == "bcast-ok" for e in b.events()), "broadcast at b")
    time.sleep(0.2)
    assert [e["body"] for e in b.events() if e["ev"] == "bcast"] == ["hello"]


def test_worker_killed_mid_task(members, me, tmp_path):
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    w1 = members("--name", "w1", "--worker", "1.5", log=logs[0])
    w2 = members("--name", "w2", "--worker", "1.5", "--peer", w1.peer, log=logs[1])
    comm = me(w1)
    wait_until(lambda: workers_known(comm, 2), "two workers")
    calls = []
    future = comm.task_send("precious")
    future.add_done_callback(calls.append)
    by_pid = {w1.proc.pid: w1, w2.proc.pid: w2}

    def started():
        return [e for w in (w1, w2) for e in w.events() if e["ev"] == "start"]

    wait_until(started, "the task started on a worker")
    (first,) = started()
    victim = by_pid[first["pid"]]
    survivor = w2 if victim is w1 else w1
    victim.kill()  # SIGKILL in the middle of the task
    result = future.result(WAIT)
    assert result == {"worker": "w2" if survivor is w2 else "w1", "task": "precious"}
    time.sleep(0.3)
    assert len(calls) == 1
    assert [e["ev"] for e in survivor.events()] == ["start", "done"]
    assert [e["ev"] for e in victim.events()] == ["start"]
    wait_until(lambda: victim.id not in comm.members(), "the dead worker forgotten")


def test_faster_worker_takes_more(members, me):
    fast = members("--name", "fast", "--worker", "0.004")
    medium = members("--name", "medium", "--worker", "0.02", "--peer", fast.peer)
    slow = members("--name", "slow", "--worker", "0.06", "--peer", fast.peer)
    comm = me(fast)
    wait_until(lambda: workers_known(comm, 3), "three workers")
    futures = [comm.task_send(i) for i in range(240)]
    counts = {"fast": 0, "medium": 0, "slow": 0}
    for f in futures:
        counts[f.result(30)["worker"]] += 1
    assert counts["fast"] > counts["medium"] > counts["slow"] > 0, counts
    assert counts["fast"] >= 3 * counts["slow"], counts
    del medium, slow


def test_outbox_survives_sender_kill(members, me, tmp_path):
    outbox = tmp_path / "outbox.sqlite"
    sender = members("--name", "sender", "--outbox", outbox, "--send-tasks", "5")
    sender.wait_line("SENT")
    sender.kill()
    worker = members("--name", "w", "--worker", "0", log=tmp_path / "w.log")
    comm = me(worker, outbox=str(outbox))
    recovered = comm.recovered_tasks()
    assert len(recovered) == 5
    results = [f.result(WAIT) for f in recovered]
    assert sorted(r["task"]["n"] for r in results) == [0, 1, 2, 3, 4]
    assert sorted(e["task"]["n"] for e in worker.events() if e["ev"] == "done") == [0, 1, 2, 3, 4]


def test_broadcast_filters_across_processes(members, me, tmp_path):
    subj = members("--name", "subj", "--bcast-subject", "purchase.*", log=tmp_path / "s.log")
    sndr = members(
        "--name", "sndr", "--bcast-sender", "*.jones", "--peer", subj.peer, log=tmp_path / "r.log"
    )
    comm = me(subj)
    wait_until(lambda: len([m for m in comm.members().values() if m["info"]["bc"]]) == 2, "filters")
    senders = ["bob.jones", "bob.smith", "martin.uhrin", "alice.jones"]
    subjects = ["purchase.car", "purchase.piano", "sell.guitar", "sell.house"]
    for sender in senders:
        for subject in subjects:
            comm.broadcast_send({"b": 1}, sender=sender, subject=subject, correlation_id=7)
    wait_until(lambda: len([e for e in subj.events() if e["ev"] == "bcast-ok"]) == 8, "subj")
    wait_until(lambda: len([e for e in sndr.events() if e["ev"] == "bcast-ok"]) == 8, "sndr")
    time.sleep(0.2)
    # what a filter refuses never arrived: everything that arrived passed
    for member, key, wanted in ((subj, "subject", "purchase."), (sndr, "sender", ".jones")):
        arrived = [e for e in member.events() if e["ev"] == "bcast"]
        assert len(arrived) == 8
        assert all(wanted in e[key] for e in arrived)


def test_mesh_of_five_each_knowing_one(members, me):
    chain = [members("--name", "m0", "--rpc")]
    for i in range(1, 5):
        chain.append(members("--name", "m%d" % i, "--rpc", "--peer", chain[-1].peer))
    comm = me(chain[-1])
    names = {"m%d" % i for i in range(5)}
    wait_until(lambda: names <= set(comm._rpc_route), "all five through gossip", limit=15)
    for name in sorted(names):
        assert comm.rpc_send(name, name).result(WAIT)["name"] == name
    # m2 dies: forgotten by everyone (we check ourselves), its identifier unroutable
    chain[2].kill()
    wait_until(lambda: "m2" not in comm._rpc_route, "m2 forgotten", limit=15)
    with pytest.raises(kiwipy.UnroutableError):
        comm.rpc_send("m2", None).result(WAIT)
    # and comes back knowing only m0
    chain[2] = members("--name", "m2", "--rpc", "--peer", chain[0].peer)
    wait_until(lambda: "m2" in comm._rpc_route, "m2 taken in again", limit=15)
    assert comm.rpc_send("m2", "back").result(WAIT) == {"name": "m2", "msg": "back"}
    assert len(comm.members()) == 5
