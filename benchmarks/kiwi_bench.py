"""libchirp.kiwi against kiwiPy on RabbitMQ, in one run (``make bench-kiwi``; docs/kiwi.md).

What it does
------------
1. Installs what is missing: Debian's ``rabbitmq-server`` (apt-get, with
   services kept from starting during the install) and ``kiwipy[rmq]`` into
   this interpreter's environment (pip).
2. Starts a private RabbitMQ on loopback only (AMQP, epmd and the Erlang
   distribution port all on 127.0.0.1, free ports, its own node name, HOME,
   data and log directories in a temporary directory) and stops it at the end.
3. For each system starts four worker processes (this file with ``--role
   worker``); each is a task subscriber, a broadcast subscriber and answers an
   RPC ``count-<i>``; worker 0 also answers ``echo``. The benchmark process is
   the client. Measured:

   * RPC roundtrips/s with 1 and with 16 calls in flight, p50/p99 latency;
   * tasks/s through 4 workers, with reply (every future awaited) and without
     (``no_reply``; done when the workers' counters add up);
   * broadcasts/s reaching each of 4 subscribers.

Both systems use their defaults (kiwiPy: YAML encoding, prefetch unlimited;
libchirp.kiwi: its JSON codec), except that libchirp.kiwi's workers take
``--chirp-prefetch`` tasks at a time (default 8). Prints a markdown table with
the ratios libchirp.kiwi / kiwiPy.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Any, Callable, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RMQ_CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"


# -- set-up ----------------------------------------------------------------------------------


def ensure_rabbitmq() -> None:
    if os.path.exists(RMQ_SERVER):
        return
    print("installing rabbitmq-server (apt-get) ...", flush=True)
    policy = "/usr/sbin/policy-rc.d"
    made_policy = not os.path.exists(policy)
    if made_policy:  # keep the package from starting a system-wide broker
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "rabbitmq-server"],
            check=True,
            env=env,
        )
    finally:
        if made_policy:
            os.unlink(policy)


def ensure_kiwipy_rmq() -> None:
    try:
        import aio_pika  # noqa: F401
        import kiwipy.rmq  # noqa: F401
    except ImportError:
        print("installing kiwipy[rmq] (pip) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "kiwipy[rmq]"], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RabbitMQ:
    """A private broker on 127.0.0.1 with its own directories; ``stop()`` ends it."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="kiwi-bench-rmq-")
        self.port = free_port()
        self.node = "kiwibench%d@localhost" % os.getpid()
        epmd_port = free_port()
        plugins = os.path.join(self.dir, "enabled_plugins")
        with open(plugins, "w") as f:
            f.write("[].\n")
        self.env = dict(
            os.environ,
            HOME=self.dir,
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(free_port()),
            RABBITMQ_MNESIA_BASE=os.path.join(self.dir, "mnesia"),
            RABBITMQ_LOG_BASE=os.path.join(self.dir, "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=plugins,
            RABBITMQ_CONFIG_FILE=os.path.join(self.dir, "none"),
            RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(self.dir, "none-advanced.config"),
            RABBITMQ_CONF_ENV_FILE=os.path.join(self.dir, "none-env.conf"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            # Erlang distribution (broker and rabbitmqctl) on loopback too
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_PORT=str(epmd_port),
        )
        self.log = open(os.path.join(self.dir, "server.out"), "w")
        self.proc = subprocess.Popen(
            [RMQ_SERVER], env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir
        )
        self.url = "amqp://guest:guest@127.0.0.1:%d/" % self.port
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("rabbitmq-server exited; see %s" % self.dir)
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5):
                    pass
                ok = subprocess.run(
                    [RMQ_CTL, "-n", self.node, "await_startup"],
                    env=self.env,
                    capture_output=True,
                    timeout=60,
                )
                if ok.returncode == 0:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("rabbitmq-server did not start; see %s" % self.dir)
            time.sleep(0.5)

    def stop(self) -> None:
        subprocess.run(
            [RMQ_CTL, "-n", self.node, "stop"], env=self.env, capture_output=True, timeout=60
        )
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        # the epmd this broker started (on its own port) ends with it
        subprocess.run(["epmd", "-port", self.env["ERL_EPMD_PORT"], "-kill"], capture_output=True)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the two systems -------------------------------------------------------------------------


def make_comm(system: str, target: str, port: int = 0, prefetch: int = 8) -> Any:
    if system == "chirp":
        from libchirp.kiwi import ChirpCommunicator

        peers = []
        if target:
            address, _, peer_port = target.rpartition(":")
            peers.append((address, int(peer_port)))
        return ChirpCommunicator(port, peers, task_prefetch_count=prefetch)
    from kiwipy.rmq import RmqThreadCommunicator

    return RmqThreadCommunicator.connect(connection_params=target, testing_mode=True)


def worker_main(args: argparse.Namespace) -> int:
    comm = make_comm(args.system, args.target, prefetch=args.chirp_prefetch)
    counts = {"tasks": 0, "bcasts": 0}
    lock = threading.Lock()

    def on_task(_c: Any, task: Any) -> Any:
        with lock:
            counts["tasks"] += 1
        return task

    def on_bcast(
        _c: Any, body: Any, sender: Any = None, subject: Any = None, correlation_id: Any = None
    ) -> None:
        with lock:
            counts["bcasts"] += 1

    def count(_c: Any, reset: Any) -> Dict[str, int]:
        with lock:
            now = dict(counts)
            if reset:
                counts["tasks"] = counts["bcasts"] = 0
        return now

    comm.add_task_subscriber(on_task)
    comm.add_broadcast_subscriber(on_bcast)
    comm.add_rpc_subscriber(count, "count-%d" % args.index)
    if args.index == 0:
        comm.add_rpc_subscriber(lambda _c, msg: msg, "echo")
    print("READY", flush=True)
    sys.stdin.read()
    comm.close()
    return 0


class System:
    """The client side of one system plus its four worker processes."""

    def __init__(self, system: str, target: str, workers: int, prefetch: int) -> None:
        self.name = system
        self.workers = workers
        self.comm = make_comm(system, "" if system == "chirp" else target)
        if system == "chirp":
            target = "127.0.0.1:%d" % self.comm.port
        self.procs = []
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        for i in range(workers):
            proc = subprocess.Popen(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--role",
                    "worker",
                    "--system",
                    system,
                    "--target",
                    target,
                    "--index",
                    str(i),
                    "--chirp-prefetch",
                    str(prefetch),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                cwd=ROOT,
            )
            self.procs.append(proc)
        for proc in self.procs:
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError("a %s worker did not start" % system)
        deadline = time.monotonic() + 30
        while True:  # every worker reachable (gossip, or queues bound)
            try:
                for i in range(workers):
                    self.comm.rpc_send("count-%d" % i, True).result(5)
                self.comm.rpc_send("echo", 0).result(5)
                if system == "chirp":
                    route = self.comm._task_route.get("kiwipy.tasks", {})
                    bcast = self.comm._bcast_route
                    if len(route) < workers or len(bcast) < workers:
                        raise RuntimeError("mesh not complete yet")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def counts(self, reset: bool = False) -> List[Dict[str, int]]:
        return [self.comm.rpc_send("count-%d" % i, reset).result(30) for i in range(self.workers)]

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.close()
                proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait(10)
        self.comm.close()


# -- measurements ----------------------------------------------------------------------------


def rpc_rate(sys_: System, in_flight: int, seconds: float) -> Tuple[float, float, float]:
    """Roundtrips/s and p50/p99 latency (ms) for ``seconds`` with ``in_flight`` calls open."""
    latencies: List[float] = []
    window: deque = deque()
    lock = threading.Lock()

    def start() -> None:
        t0 = time.perf_counter()
        future = sys_.comm.rpc_send("echo", 1)

        def done(_f: Any, t0: float = t0) -> None:
            with lock:
                latencies.append(time.perf_counter() - t0)

        future.add_done_callback(done)
        window.append(future)

    for _ in range(50):  # warm up
        sys_.comm.rpc_send("echo", 1).result(10)
    t_start = time.perf_counter()
    end = t_start + seconds
    n = 0
    for _ in range(in_flight):
        start()
    while True:
        window.popleft().result(30)
        n += 1
        if time.perf_counter() < end:
            start()
        elif not window:
            break
    elapsed = time.perf_counter() - t_start
    lat = sorted(latencies)
    return n / elapsed, 1e3 * lat[len(lat) // 2], 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.99))]


def task_rate(sys_: System, n: int, no_reply: bool) -> float:
    sys_.counts(reset=True)
    t0 = time.perf_counter()
    if no_reply:
        for i in range(n):
            sys_.comm.task_send(i, no_reply=True)
        while sum(c["tasks"] for c in sys_.counts()) < n:
            time.sleep(0.005)
    else:
        futures = [sys_.comm.task_send(i) for i in range(n)]
        for f in futures:
            f.result(120)
    return n / (time.perf_counter() - t0)


def broadcast_rate(sys_: System, n: int) -> float:
    """Broadcasts/s that reach each of the subscribers (all ``n`` at all of them)."""
    sys_.counts(reset=True)
    t0 = time.perf_counter()
    for i in range(n):
        sys_.comm.broadcast_send(i, sender="bench", subject="bench.%d" % (i % 4))
    deadline = time.monotonic() + 120
    while min(c["bcasts"] for c in sys_.counts()) < n:
        if time.monotonic() > deadline:
            raise RuntimeError("broadcasts lost")
        time.sleep(0.005)
    return n / (time.perf_counter() - t0)


def measure(sys_: System, seconds: float, tasks: int, bcasts: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    out["rpc1"] = rpc_rate(sys_, 1, seconds)
    out["rpc16"] = rpc_rate(sys_, 16, seconds)
    out["tasks"] = task_rate(sys_, tasks, False)
    out["tasks_nr"] = task_rate(sys_, tasks, True)
    out["bcast"] = broadcast_rate(sys_, bcasts)
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def kiwipy_version() -> str:
    import kiwipy

    return kiwipy.__version__


def rabbitmq_version() -> str:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"], capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def table(chirp: Dict[str, Any], rmq: Dict[str, Any], command: str) -> str:
    rows: List[Tuple[str, Callable[[Dict[str, Any]], float], str, str, bool]] = [
        ("RPC roundtrips/s, 1 in flight", lambda r: r["rpc1"][0], "%.0f", "≥ 10×", True),
        ("RPC p50 latency, 1 in flight (ms)", lambda r: r["rpc1"][1], "%.3f", "≤ 0.1×", False),
        ("RPC p99 latency, 1 in flight (ms)", lambda r: r["rpc1"][2], "%.3f", "", False),
        ("RPC roundtrips/s, 16 in flight", lambda r: r["rpc16"][0], "%.0f", "≥ 10×", True),
        ("RPC p50 latency, 16 in flight (ms)", lambda r: r["rpc16"][1], "%.3f", "", False),
        ("RPC p99 latency, 16 in flight (ms)", lambda r: r["rpc16"][2], "%.3f", "", False),
        ("tasks/s, 4 workers, with reply", lambda r: r["tasks"], "%.0f", "≥ 10×", True),
        ("tasks/s, 4 workers, no reply", lambda r: r["tasks_nr"], "%.0f", "≥ 10×", True),
        ("broadcasts/s to each of 4 subscribers", lambda r: r["bcast"], "%.0f", "≥ 10×", True),
    ]
    lines = [
        "Machine: `%s`, %s, %d cores; %s; command: `%s`; Python %s, kiwiPy %s, RabbitMQ %s."
        % (
            platform.node(),
            cpu_model(),
            os.cpu_count() or 0,
            time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            command,
            platform.python_version(),
            kiwipy_version(),
            rabbitmq_version(),
        ),
        "",
        "| shape | libchirp.kiwi | kiwiPy + RabbitMQ | ratio | goal | met? |",
        "|---|---:|---:|---:|---|---|",
    ]
    for label, get, fmt, goal, _higher in rows:
        c, r = get(chirp), get(rmq)
        ratio = c / r if r else float("nan")
        if goal == "≥ 10×":
            met = "yes" if ratio >= 10 else "**no**"
        elif goal == "≤ 0.1×":
            met = "yes" if ratio <= 0.1 else "**no**"
        else:
            met = ""
        lines.append(
            "| %s | %s | %s | %.2f× | %s | %s |" % (label, fmt % c, fmt % r, ratio, goal, met)
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", default="bench", choices=["bench", "worker"])
    ap.add_argument("--system", default="chirp", choices=["chirp", "rmq"])
    ap.add_argument("--target", default="")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=3.0, help="per RPC shape")
    ap.add_argument("--tasks-chirp", type=int, default=10000)
    ap.add_argument("--tasks-rmq", type=int, default=1000)
    ap.add_argument("--bcasts-chirp", type=int, default=10000)
    ap.add_argument("--bcasts-rmq", type=int, default=1000)
    ap.add_argument("--chirp-prefetch", type=int, default=8)
    ap.add_argument("--only", choices=["chirp", "rmq"], help="measure one system")
    args = ap.parse_args()
    if args.role == "worker":
        return worker_main(args)

    results: Dict[str, Dict[str, Any]] = {}
    if args.only != "rmq":
        print("libchirp.kiwi ...", flush=True)
        chirp = System("chirp", "", 4, args.chirp_prefetch)
        try:
            results["chirp"] = measure(chirp, args.seconds, args.tasks_chirp, args.bcasts_chirp)
        finally:
            chirp.close()
        print(results["chirp"], flush=True)
    if args.only != "chirp":
        ensure_rabbitmq()
        ensure_kiwipy_rmq()
        broker = RabbitMQ()
        try:
            print("kiwiPy on RabbitMQ (%s) ..." % broker.url, flush=True)
            rmq = System("rmq", broker.url, 4, args.chirp_prefetch)
            try:
                results["rmq"] = measure(rmq, args.seconds, args.tasks_rmq, args.bcasts_rmq)
            finally:
                rmq.close()
        finally:
            broker.stop()
        print(results["rmq"], flush=True)
    if len(results) == 2:
        print()
        print(table(results["chirp"], results["rmq"], "make bench-kiwi"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
