"""Soak: steady traffic between two processes for a long time; RSS and fds must not grow.

    python benchmarks/soak.py [--seconds 600] [--sample 5]     (make soak, SOAK_SECONDS=...)

Two child processes run on 127.0.0.1 (plaintext), each with two nodes:

* requests (SYNCHRONOUS = True): four threads of the client make requests to
  the server, which answers each (acknowledged both ways);
* one-way (SYNCHRONOUS = False): one thread of the client streams messages to
  the server with up to 32 unfinished sends, paced to about --rate per second.

Messages are 64 bytes, every 100th one 64 KiB. REUSE_TIME is small (effective R
= 6 s with TIMEOUT = 2 s), and each kind of traffic pauses for 14 s every
minute (the two half a minute apart), so the garbage collector closes the idle
connections and the next send opens new ones: connection churn throughout.

This process samples VmRSS and the number of open fds of both children every
--sample seconds and compares the averages of the first and of the last
minute (the first and last third of the run if it is shorter than three
minutes); the first minute starts after 30 s of warm-up, while the processes
still grow to their working size. It exits with status 1 if, in either child,
the RSS grew by more than --rss-growth MiB (default 16) or the largest fd count
of the last minute exceeds that of the first minute, or if any message was
lost (a one-way send that completed but never arrived, a request that neither
completed nor failed) or traffic stopped. Failed sends are counted and
reported, not fatal: a send that times out on a busy machine or meets a
connection being closed fails (docs/protocol.md#errors) and its sender is told.

Why 16 MiB: the client holds about rate x TIMEOUT finished requests (their
timers are cancelled lazily, so ~2,600 requests with their replies, ~10 MiB),
and its RSS swings by 10-20 MiB with the pauses; with pauses of a 45 s cycle the
one-minute windows held different traffic and the client "grew" by 11-17 MiB
between first and last minute while its RSS by minute was flat from minute 3
on. With the one-minute cycle (reference run, 600 s, 2 shared cores): client
61.5 -> 62.9 MiB (+1.4), server 22.7 -> 22.7 MiB, fds 16 -> 16. A real leak of a
single 300-byte object per request would add ~30 MiB a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Every kind of traffic pauses once per minute, so that each one-minute window
# holds the same mix of traffic and pauses and first and last minute compare
# like with like.
CYCLE = 60.0  # seconds between the starts of two pauses of one kind of traffic
PAUSE = 14.0  # > 2 R: the collector certainly closes the idle connections
WARMUP = 30.0  # seconds of traffic before the first sample that counts
MiB = 1 << 20


def _paths() -> None:
    for p in (ROOT, os.path.join(ROOT, "tests")):
        if p not in sys.path:
            sys.path.insert(0, p)


def _node(loop, port: int, synchronous: bool):
    import libchirp
    import libchirp.queue

    cfg = libchirp.Config()
    cfg.PORT = port
    cfg.DISABLE_ENCRYPTION = True
    cfg.SYNCHRONOUS = synchronous
    cfg.REUSE_TIME = 3.0
    cfg.TIMEOUT = 2.0  # R = max(REUSE_TIME, 3 * TIMEOUT) = 6 s
    return libchirp.queue.Chirp(loop, cfg)


def _payload(i: int) -> bytes:
    return bytes(65536) if i % 100 == 99 else bytes(64)


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.errors: dict[str, int] = {}

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def error(self, exc: BaseException) -> None:
        key = "%s: %s" % (type(exc).__name__, str(exc).split(" (")[0][:80])
        with self.lock:
            self.errors[key] = self.errors.get(key, 0) + 1


def _stdin_closed(stop: threading.Event) -> None:
    """Set stop when the parent closes our stdin (or dies)."""
    sys.stdin.read()
    stop.set()


def run_server() -> int:
    _paths()
    import queue

    import rawpeer

    import libchirp

    loop = libchirp.Loop()
    sync_node = _node(loop, rawpeer.free_port(), True)
    async_node = _node(loop, rawpeer.free_port(), False)
    stop = threading.Event()
    counters = Counters()

    def answer(fut) -> None:
        exc = fut.exception()
        if exc is None:
            counters.add("answers")
        else:
            counters.add("answer_failures")
            counters.error(exc)

    def serve_requests() -> None:
        while not stop.is_set():
            try:
                msg = sync_node.get(timeout=0.2)
            except queue.Empty:
                continue
            counters.add("requests_in")
            sync_node.send(msg).add_done_callback(answer)

    def count_stream() -> None:
        while not stop.is_set():
            try:
                async_node.get(timeout=0.2)
            except queue.Empty:
                continue
            counters.add("oneway_in")

    threads = [threading.Thread(target=f, daemon=True) for f in (serve_requests, count_stream)]
    for t in threads:
        t.start()
    print("ports %d %d" % (sync_node.port, async_node.port), flush=True)
    _stdin_closed(stop)
    for t in threads:
        t.join(5)
    stats = {"sync": sync_node.statistics()["totals"], "async": async_node.statistics()["totals"]}
    sync_node.stop()
    async_node.stop()
    loop.stop()
    print(json.dumps({"counts": counters.counts, "errors": counters.errors, "totals": stats}))
    return 0


def _active(start: float, offset: float) -> bool:
    """False during the pause of this kind of traffic."""
    phase = (time.monotonic() - start + offset) % CYCLE
    return phase >= PAUSE


def run_client(sync_port: int, async_port: int, seconds: float, rate: float) -> int:
    _paths()
    import rawpeer

    import libchirp
    import libchirp.queue

    loop = libchirp.Loop()
    sync_node = _node(loop, rawpeer.free_port(), True)
    async_node = _node(loop, rawpeer.free_port(), False)
    sync_node.disable_queue = True
    async_node.disable_queue = True
    stop = threading.Event()
    counters = Counters()
    start = time.monotonic()

    def message(port: int, i: int):
        msg = libchirp.queue.Message()
        msg.address = "127.0.0.1"
        msg.port = port
        msg.data = _payload(i)
        return msg

    def requester(k: int) -> None:
        i = k
        while not stop.is_set():
            if not _active(start, 0.0):
                time.sleep(0.1)
                continue
            i += 4
            fut = sync_node.request(message(sync_port, i))
            try:
                reply = fut.result(10)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                counters.add("request_failures")
                counters.error(exc)
                continue
            if len(reply.data) != len(_payload(i)):
                counters.add("wrong_replies")
            counters.add("requests_ok")

    def streamer() -> None:
        window: list = []
        i = 0
        next_at = time.monotonic()
        while not stop.is_set():
            if not _active(start, CYCLE / 2):
                time.sleep(0.1)
                next_at = time.monotonic()
                continue
            now = time.monotonic()
            if now < next_at:
                time.sleep(next_at - now)
            next_at += 1.0 / rate
            while len(window) >= 32 or (window and window[0].done()):
                fut = window.pop(0)
                exc = fut.exception(30)
                if exc is None:
                    counters.add("oneway_ok")
                else:
                    counters.add("oneway_failures")
                    counters.error(exc)
            window.append(async_node.send(message(async_port, i)))
            i += 1
        for fut in window:
            exc = fut.exception(30)
            counters.add("oneway_ok" if exc is None else "oneway_failures")

    threads = [threading.Thread(target=requester, args=(k,), daemon=True) for k in range(4)]
    threads.append(threading.Thread(target=streamer, daemon=True))
    for t in threads:
        t.start()
    print("started", flush=True)
    deadline = start + seconds
    while time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(40)
    hung = sum(t.is_alive() for t in threads)
    stats = {"sync": sync_node.statistics()["totals"], "async": async_node.statistics()["totals"]}
    sync_node.stop()
    async_node.stop()
    loop.stop()
    counters.add("hung_threads", hung)
    print(json.dumps({"counts": counters.counts, "errors": counters.errors, "totals": stats}))
    return 0


# ---- the parent -------------------------------------------------------------------------


def _sample(pid: int) -> tuple[int, int]:
    with open("/proc/%d/status" % pid) as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir("/proc/%d/fd" % pid))


def _avg(xs: list) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _slope(points: list) -> float:
    """Least-squares slope of (t, y) points (y units per second)."""
    if len(points) < 2:
        return 0.0
    mt = _avg([t for t, _ in points])
    my = _avg([y for _, y in points])
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / den if den else 0.0


def soak(
    seconds: float, sample: float, rate: float, rss_growth_mib: float, csv_path: str = ""
) -> int:
    me = os.path.abspath(__file__)
    server = subprocess.Popen(
        [sys.executable, me, "--role", "server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    words = server.stdout.readline().split()
    if not words or words[0] != "ports":
        server.kill()
        raise SystemExit("soak: the server did not start: %r" % words)
    client = subprocess.Popen(
        [sys.executable, me, "--role", "client", "--ports", words[1], words[2]]
        + ["--seconds", str(seconds), "--rate", str(rate)],
        stdout=subprocess.PIPE,
        text=True,
    )
    if client.stdout.readline().split() != ["started"]:
        client.kill()
        server.kill()
        raise SystemExit("soak: the client did not start")
    procs = {"client": client, "server": server}
    csv = open(csv_path, "w") if csv_path else None
    samples: dict[str, list] = {name: [] for name in procs}  # (t, rss, fds)
    start = time.monotonic()
    print(
        "# soak: %.0f s, sampling every %.0f s, one-way rate %.0f/s, bound: RSS growth <= %.0f MiB"
        % (seconds, sample, rate, rss_growth_mib),
        flush=True,
    )
    while client.poll() is None:
        t = time.monotonic() - start
        line = ["%6.0f s" % t]
        for name, p in procs.items():
            try:
                rss, fds = _sample(p.pid)
            except (OSError, StopIteration):
                continue
            samples[name].append((t, rss, fds))
            line.append("%s RSS %6.1f MiB fds %3d" % (name, rss / MiB, fds))
            if csv:
                csv.write("%.1f,%s,%d,%d\n" % (t, name, rss, fds))
        if len(samples["client"]) % 12 == 1:
            print("  ".join(line), flush=True)
        time.sleep(sample)
    if csv:
        csv.close()
    client_out = client.stdout.read()
    server.stdin.close()
    server_out = server.stdout.read()
    server.wait(60)
    results = {}
    for name, out in (("client", client_out), ("server", server_out)):
        try:
            results[name] = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            print("soak: no result from the %s: %r" % (name, out[-500:]))
            return 1

    window = min(60.0, (seconds - WARMUP) / 3)
    failures = []
    trends = {}
    print()
    print("| process | RSS first min | RSS last min | growth | fds first (max) | fds last (max) |")
    print("|---|---|---|---|---|---|")
    for name, rows in samples.items():
        t_end = rows[-1][0]
        first = [r for r in rows if WARMUP <= r[0] <= WARMUP + window]
        last = [r for r in rows if r[0] >= t_end - window]
        r1, r2 = _avg([r[1] for r in first]), _avg([r[1] for r in last])
        f1, f2 = max(r[2] for r in first), max(r[2] for r in last)
        growth = (r2 - r1) / MiB
        print(
            "| %s | %.1f MiB | %.1f MiB | %+.2f MiB | %d | %d |"
            % (name, r1 / MiB, r2 / MiB, growth, f1, f2)
        )
        if growth > rss_growth_mib:
            failures.append("%s RSS grew by %.1f MiB" % (name, growth))
        minutes = [
            _avg([r[1] for r in rows if m * 60 <= r[0] < (m + 1) * 60]) / MiB
            for m in range(int(t_end // 60))
        ]
        trends[name] = (minutes, _slope([(r[0], r[1]) for r in rows if r[0] >= t_end / 2]))
        if f2 > f1:
            failures.append("%s fd count grew from %d to %d" % (name, f1, f2))
    for name, (minutes, slope) in trends.items():
        print(
            "%s: RSS by minute %s MiB; trend over the second half %+.2f MiB/min"
            % (name, " ".join("%.1f" % m for m in minutes), slope * 60 / MiB)
        )
    c, s = results["client"]["counts"], results["server"]["counts"]
    elapsed = time.monotonic() - start
    print()
    print(
        "requests: %d answered (%.0f/s), %d failed (server: %d received, %d answers"
        " failed); one-way: %d sent (%.0f/s), %d failed, %d received"
        % (
            c.get("requests_ok", 0),
            c.get("requests_ok", 0) / elapsed,
            c.get("request_failures", 0),
            s.get("requests_in", 0),
            s.get("answer_failures", 0),
            c.get("oneway_ok", 0),
            c.get("oneway_ok", 0) / elapsed,
            c.get("oneway_failures", 0),
            s.get("oneway_in", 0),
        )
    )
    connects = {
        name: sum(results[name]["totals"][k]["connects"] for k in ("sync", "async"))
        for name in results
    }
    print("connections opened: client %(client)d, server %(server)d (churn)" % connects)
    for name in results:
        if results[name]["errors"]:
            print("%s errors: %s" % (name, json.dumps(results[name]["errors"])))
    if c.get("hung_threads"):
        failures.append("%d client threads hung" % c["hung_threads"])
    if c.get("wrong_replies"):
        failures.append("%d wrong replies" % c["wrong_replies"])
    if s.get("oneway_in", 0) < c.get("oneway_ok", 0):
        failures.append(
            "one-way: %d sends completed but only %d received"
            % (c.get("oneway_ok", 0), s.get("oneway_in", 0))
        )
    if not c.get("requests_ok") or not c.get("oneway_ok"):
        failures.append("no traffic")
    if failures:
        print("SOAK FAILED: " + "; ".join(failures))
        return 1
    print("soak passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "600")))
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--rate", type=float, default=2000.0, help="one-way messages per second")
    ap.add_argument("--rss-growth", type=float, default=16.0, help="allowed RSS growth, MiB")
    ap.add_argument("--csv", default="", help="write every sample to this file")
    ap.add_argument("--role", choices=("parent", "server", "client"), default="parent")
    ap.add_argument("--ports", type=int, nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "server":
        return run_server()
    if args.role == "client":
        return run_client(args.ports[0], args.ports[1], args.seconds, args.rate)
    return soak(args.seconds, args.sample, args.rate, args.rss_growth, args.csv)


if __name__ == "__main__":
    sys.exit(main())
