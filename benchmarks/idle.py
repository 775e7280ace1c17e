"""CPU and wake-ups of an idle libchirp node (``benchmarks/run.py --shapes idle``).

A node (``libchirp.queue.Chirp`` on a ``libchirp.Loop``, the default Config:
TLS with certificates from ``libchirp.pki``, only ``PORT`` set to a free port)
runs in a process of its own and is left idle for ``--secs`` seconds in three
states, one after the other:

a. no application thread waits (nothing calls ``get()``);
b. one thread blocked in ``get()`` (no timeout);
c. one idle connection to a second node: a peer process (another node) sends
   one message, which ends the ``get()`` of b; then no application thread
   waits and the connection stays open (within ``REUSE_TIME``, 30 s).

Before each state the node settles for a second. Per state: CPU % of one core
(user + system) and wake-ups per second (voluntary + involuntary context
switches) of the whole process, all threads, from ``getrusage(RUSAGE_SELF)``;
and per thread the same from ``/proc/self/task/<tid>/schedstat`` (CPU time in
ns) and ``.../status`` (context switches), named by ``threading`` where Python
knows the thread (else by the kernel's ``comm``). The main thread measures: it
sleeps through the interval (one wake-up at its end, counted).

    python benchmarks/idle.py [--secs 10] [--json]

``measure(secs)`` runs this in a fresh process and returns the figures as a
dict for benchmarks/run.py: ``{"secs": s, "states": [{"key", "label",
"cpu_pct", "wakeups", "threads": [{"name", "cpu_pct", "wakeups"}, ...]}]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from pybench import free_port, rusage_now  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
#: Seconds a state settles before it is measured (at most; less with short --secs).
SETTLE = 1.0

#: tid -> (name, CPU seconds, context switches)
ThreadStats = Dict[int, Tuple[str, float, int]]


def thread_cpu(tid: str, stat: str) -> float:
    """CPU seconds of one thread: ``schedstat`` (ns) if the kernel has it, else ``stat`` ticks."""
    try:
        with open("/proc/self/task/%s/schedstat" % tid) as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        fields = stat.rsplit(")", 1)[1].split()  # fields[11], [12]: utime, stime
        return (int(fields[11]) + int(fields[12])) / TICKS


def thread_stats() -> ThreadStats:
    """CPU time and context switches of every thread of this process right now."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: ThreadStats = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open("/proc/self/task/%s/stat" % tid) as f:
                stat = f.read()
            with open("/proc/self/task/%s/status" % tid) as f:
                status = f.read()
        except OSError:  # ended meanwhile
            continue
        ctx = sum(
            int(line.split()[1])
            for line in status.splitlines()
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
        )
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        out[int(tid)] = (names.get(int(tid), comm), thread_cpu(tid, stat), ctx)
    return out


def idle_for(secs: float, key: str, label: str) -> Dict[str, Any]:
    """Sleep ``secs`` in this (the main) thread; what the process and each thread used."""
    threads0, (cpu0, ctx0), t0 = thread_stats(), rusage_now(), time.monotonic()
    time.sleep(secs)
    cpu1, ctx1 = rusage_now()
    took = time.monotonic() - t0
    threads1 = thread_stats()
    per = []
    for tid, (name, cpu, ctx) in sorted(threads1.items()):
        _, cpu_a, ctx_a = threads0.get(tid, (name, 0.0, 0))
        per.append({"name": name, "tid": tid, "cpu_pct": 100 * (cpu - cpu_a) / took,
                    "wakeups": (ctx - ctx_a) / took})  # fmt: skip
    return {"key": key, "label": label, "secs": took, "cpu_pct": 100 * (cpu1 - cpu0) / took,
            "wakeups": (ctx1 - ctx0) / took, "threads": per}  # fmt: skip


def node_config(port: int, cert: str, dh: str):
    """The default Config; only the port (free) and the certificate files set."""
    import libchirp

    cfg = libchirp.Config()
    cfg.PORT = port
    cfg.CERT_CHAIN_PEM = cert
    cfg.DH_PARAMS_PEM = dh
    return cfg


class Peer:
    """The second node, in a process of its own (``idle.py peer``)."""

    def __init__(self, cert: str, dh: str) -> None:
        argv = [sys.executable, os.path.abspath(__file__), "peer", "--cert", cert, "--dh", dh]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.expect("READY")

    def expect(self, word: str) -> None:
        line = self.proc.stdout.readline().strip()
        if line != word:
            raise RuntimeError("idle peer: %r instead of %s" % (line, word))

    def send_to(self, port: int) -> None:
        """The peer sends one message to ``port`` and waits for its completion."""
        self.proc.stdin.write("%d\n" % port)
        self.proc.stdin.flush()
        self.expect("SENT")

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def peer_main(args: argparse.Namespace) -> None:
    import libchirp
    from libchirp.queue import Chirp, Message

    with libchirp.Loop() as loop, Chirp(loop, node_config(free_port(), args.cert, args.dh)) as n:
        print("READY", flush=True)
        for line in sys.stdin:
            msg = Message()
            msg.address, msg.port = "127.0.0.1", int(line)
            msg.header, msg.data = b"idle", b"hello"
            n.send(msg).result(timeout=30)
            print("SENT", flush=True)


def blocked_get(node: Any, got: List[Any]) -> None:
    """Wait in ``get()`` without a timeout (state b); keep what arrives."""
    from libchirp.errors import ChirpShutdown

    try:
        got.append(node.get())
    except ChirpShutdown:
        pass


def node_main(secs: float) -> Dict[str, Any]:
    """The three states of one node; the figures of each."""
    from tls_bench import make_certs

    import libchirp
    from libchirp.queue import Chirp

    settle = min(SETTLE, secs)
    states = []
    with tempfile.TemporaryDirectory(prefix="chirp-idle-") as tmp:
        certs = make_certs(tmp)
        peer = Peer(certs["a"], certs["dh"])
        try:
            with libchirp.Loop() as loop:
                node = Chirp(loop, node_config(free_port(), certs["b"], certs["dh"]))
                with node:
                    time.sleep(settle)
                    states.append(idle_for(secs, "a", "one node, no application thread waiting"))
                    got: List[Any] = []
                    waiter = threading.Thread(target=blocked_get, args=(node, got), name="get()")
                    waiter.start()
                    time.sleep(settle)
                    states.append(idle_for(secs, "b", "one node, one thread blocked in get()"))
                    peer.send_to(node.port)  # ends the get()
                    waiter.join(30)
                    if not got:
                        raise RuntimeError("the peer's message did not arrive")
                    time.sleep(settle)
                    states.append(idle_for(secs, "c", "one node, one idle connection to a "
                                           "second node, no thread waiting"))  # fmt: skip
        finally:
            peer.close()
    return {"secs": secs, "states": states}


def measure(secs: float = 10.0) -> Dict[str, Any]:
    """Run the node in a fresh process (``idle.py node --json``); its figures."""
    argv = [sys.executable, os.path.abspath(__file__), "node", "--secs", str(secs), "--json"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=3 * secs + 120, env=env)
    if out.returncode != 0:
        raise RuntimeError("idle.py node failed: %s" % out.stderr.strip()[-2000:])
    return json.loads(out.stdout)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("role", nargs="?", default="node", choices=["node", "peer"])
    ap.add_argument("--secs", type=float, default=10.0, help="idle seconds per state")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--cert", help="peer: certificate chain")
    ap.add_argument("--dh", help="peer: DH parameters")
    args = ap.parse_args(argv)
    if args.role == "peer":
        peer_main(args)
        return 0
    res = node_main(args.secs)
    if args.json:
        print(json.dumps(res))
        return 0
    for st in res["states"]:
        print("%s. %s: %.3f %% of a core, %.1f wake-ups/s" % (
            st["key"], st["label"], st["cpu_pct"], st["wakeups"]))  # fmt: skip
        for t in st["threads"]:
            print("    %-24s %6.3f %%  %6.1f wake-ups/s" % (t["name"], t["cpu_pct"], t["wakeups"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
