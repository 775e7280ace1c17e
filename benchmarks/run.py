"""Run the benchmarks (docs/benchmarks.md); print and record one comparable table (``make bench``).

libchirp's queue interface against pyzmq, two processes per system (a server
and a client, ``benchmarks/pybench.py``), 64-byte messages unless stated,
plaintext over 127.0.0.1 except shape 6:

1. roundtrips, one message in flight (libchirp: send, echo, get; pyzmq: DEALER->ROUTER echo),
   libchirp asynchronous and SYNCHRONOUS (every message acknowledged; pyzmq the same echo);
2. roundtrips with 16 and with 64 in flight;
3. roundtrips, 16 in flight, 64 KiB messages;
4. one-way asynchronous stream (libchirp SYNCHRONOUS=False; pyzmq PUSH->PULL), rate at the
   receiver;
5. acknowledged one-way stream (libchirp SYNCHRONOUS=True, MAX_SLOTS=32, 64 in flight,
   pipelined ACKs) against the same unacknowledged PUSH->PULL and against our shape 4;
6. TLS roundtrips between two network namespaces, 16 in flight (pyzmq: CURVE if it has it);
7. the C core alone (benchmarks/cbench.c): our ceiling.

Plus memory: RSS per idle connection for 1,000 idle connections (benchmarks/memory.py, if
present). Every round measures each shape once per system, libchirp and pyzmq alternating
(the order flips every round); the table shows medians over the rounds and the ratio
libchirp/pyzmq. Absolute figures depend on the machine and its load; compare ratios from the
same run.

A full run (every shape, no --quick) writes the table into README.md and docs/benchmarks.md
between the markers ``<!-- bench:begin -->`` and ``<!-- bench:end -->``; those parts are
generated, never edited by hand. ``--no-write`` prints only, ``--write`` forces writing.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import queue
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT, os.path.join(ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

PYBENCH = os.path.join(HERE, "pybench.py")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
TARGET_FILES = ("README.md", os.path.join("docs", "benchmarks.md"))
SYSTEMS = ("libchirp", "pyzmq")


class BenchError(RuntimeError):
    pass


def note(text: str) -> None:
    sys.stderr.write("bench: %s\n" % text)
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# Worker processes (benchmarks/pybench.py)
# ---------------------------------------------------------------------------------------------


class Worker:
    """One pybench.py process; its stdout lines are read by a thread into a queue."""

    def __init__(self, name: str, argv: List[str], popen: Callable[..., subprocess.Popen]) -> None:
        self.name = name
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        self.proc = popen(
            [sys.executable, PYBENCH, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, kind: str, limit: float = 120.0) -> dict:
        """The fields of the next line starting with ``kind`` (BenchError on ERROR/EOF/time)."""
        deadline = time.monotonic() + limit
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError("%s: no %s within %.0f s" % (self.name, kind, limit)) from None
            if line is None:
                raise BenchError("%s ended (exit %s)" % (self.name, self.proc.wait()))
            word, _, rest = line.strip().partition(" ")
            if word == "ERROR":
                raise BenchError("%s: %s" % (self.name, json.loads(rest)["error"]))
            if word == kind:
                return json.loads(rest) if rest else {}

    def call(self, cmd: dict, limit: float = 120.0) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.expect("RESULT", limit)

    def close(self) -> None:
        from tls_bench import end_worker

        end_worker(self.proc)


class Pair:
    """Server and client of one system (libchirp or pyzmq), possibly on two hosts."""

    def __init__(
        self,
        system: str,
        server_args: List[str],
        client_args: List[str],
        server_popen: Callable[..., subprocess.Popen] = subprocess.Popen,
        client_popen: Callable[..., subprocess.Popen] = subprocess.Popen,
        addr: str = "127.0.0.1",
    ) -> None:
        arg = ["--system", "chirp" if system == "libchirp" else "zmq"]
        self.system, self.addr = system, addr
        self.server = Worker(system + " server", ["server", *arg, *server_args], server_popen)
        self.client: Optional[Worker] = None
        try:
            self.ports = self.server.expect("READY", 60)
            self.client = Worker(system + " client", ["client", *arg, *client_args], client_popen)
            self.client.expect("READY", 60)
        except BaseException:
            self.close()
            raise

    def roundtrips(
        self, window: int, size: int, duration: float, warmup: float, sync: bool = False
    ) -> float:
        if self.system == "libchirp":
            port = self.ports["sync" if sync else "async"]
        else:
            port = self.ports["router_big" if size >= 16384 else "router"]
        cmd = {"op": "rt", "addr": self.addr, "port": port, "window": window, "size": size,
               "duration": duration, "warmup": warmup, "sync": sync}  # fmt: skip
        return self.client.call(cmd)["rate"]

    def stream(self, count: int, size: int, window: int, sync: bool, warm: int) -> float:
        if self.system == "libchirp":
            port = self.ports["sync" if sync else "async"]
        else:
            port = self.ports["pull"]
        cmd = {"op": "stream", "addr": self.addr, "port": port, "count": count, "size": size,
               "window": window, "sync": sync, "warm": warm}  # fmt: skip
        self.client.call(cmd, limit=300)
        got = self.server.expect("STREAM", 60)
        if got["count"] != count:
            raise BenchError(
                "%s: the receiver counted %d of %d" % (self.system, got["count"], count)
            )
        return (count - 1) / got["secs"]

    def close(self) -> None:
        for w in (self.client, self.server):
            if w is not None:
                w.close()


# ---------------------------------------------------------------------------------------------
# The C core (benchmarks/cbench.c)
# ---------------------------------------------------------------------------------------------


def pkg_config(*args: str) -> List[str]:
    out = subprocess.run(["pkg-config", *args, "libuv", "openssl"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit("bench: pkg-config cannot find libuv/openssl: " + out.stderr.strip())
    return shlex.split(out.stdout)


def build_cbench() -> str:
    exe = os.path.join(ROOT, "build", "cbench")
    os.makedirs(os.path.dirname(exe), exist_ok=True)
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.c")))
    cmd = ["cc", "-std=c11", "-D_GNU_SOURCE", "-O2", "-g", "-I", os.path.join(ROOT, "csrc")]
    cmd += pkg_config("--cflags") + ["-o", exe, os.path.join(HERE, "cbench.c")]
    cmd += sources + pkg_config("--libs")
    subprocess.run(cmd, check=True)
    return exe


def run_cbench(exe: str, shape: str, count: int, window: int, size: int, sync: int = 0) -> float:
    env = dict(os.environ)
    if sync:
        env["CBENCH_SLOTS"] = "32"
    argv = [exe, shape, str(count), str(window), str(size), str(sync)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    if out.returncode != 0:
        raise BenchError("cbench %s failed: %s" % (" ".join(argv[1:]), out.stderr.strip()))
    line = out.stdout.strip().splitlines()[-1]
    return float(line.rsplit("rate=", 1)[1].rstrip("/s"))


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


class Row:
    """One line of the table: how to measure it per system, and its target."""

    def __init__(
        self,
        key: str,
        label: str,
        unit: str,
        measure: Dict[str, Callable[[], float]],
        target: str = "—",
        check: Optional[Callable[[Dict[str, Optional[float]]], Tuple[float, float]]] = None,
        note: str = "",
    ) -> None:
        self.key, self.label, self.unit = key, label, unit
        self.measure = measure
        self.target = target
        self.check = check  # medians -> (value, bound): met if value >= bound
        self.note = note
        self.values: Dict[str, List[float]] = {s: [] for s in measure}

    def median(self, system: str) -> Optional[float]:
        vals = self.values.get(system)
        return statistics.median(vals) if vals else None


def ratio_at_least(bound: float) -> Callable[[Dict[str, Optional[float]]], Tuple[float, float]]:
    def check(m: Dict[str, Optional[float]]) -> Tuple[float, float]:
        return m["libchirp"] / m["pyzmq"], bound

    return check


def rate_at_least(bound: float) -> Callable[[Dict[str, Optional[float]]], Tuple[float, float]]:
    def check(m: Dict[str, Optional[float]]) -> Tuple[float, float]:
        return m["libchirp"], bound

    return check


class Sizes:
    """Counts and durations, from the command line (``--quick`` shrinks them)."""

    def __init__(self, args: argparse.Namespace) -> None:
        q = args.quick
        self.duration = args.duration if args.duration else (0.3 if q else 1.5)
        self.warmup = 0.1 if q else 0.3
        self.stream = args.stream_count if args.stream_count else (20_000 if q else 200_000)
        self.sync_stream = args.sync_count if args.sync_count else (5_000 if q else 60_000)
        self.warm = 200 if q else 2000
        self.c_count = 20_000 if q else 200_000
        self.mem_n = 200 if q else 1000


def selected(spec: str) -> List[str]:
    keys = [k.strip() for k in spec.split(",") if k.strip()]
    allowed = {"1", "2", "3", "4", "5", "6", "7", "mem"}
    bad = [k for k in keys if k not in allowed]
    if bad:
        raise SystemExit("bench: unknown shape(s) %s; choose from 1-7 and mem" % ", ".join(bad))
    return keys


def build_rows(keys: List[str], sz: Sizes, ctx: Dict[str, Any]) -> List[Row]:
    """The table rows of the selected shapes; ``ctx`` holds the pairs and cbench."""
    rows: List[Row] = []
    lo = ctx.get("pairs", {})

    def rt(
        pairs: Dict[str, Pair], window: int, size: int, sync: bool = False
    ) -> Dict[str, Callable[[], float]]:
        return {
            s: (lambda p=p: p.roundtrips(window, size, sz.duration, sz.warmup, sync))
            for s, p in pairs.items()
        }

    def stream(sync: bool, window: int, count: int) -> Dict[str, Callable[[], float]]:
        return {
            "libchirp": lambda: lo["libchirp"].stream(count, 64, window, sync, sz.warm),
            "pyzmq": lambda: lo["pyzmq"].stream(count, 64, window, False, sz.warm),
        }

    if "1" in keys:
        rows.append(Row("1", "1. roundtrips, 1 in flight", "rt/s", rt(lo, 1, 64),
                        "≥ 1.0× pyzmq", ratio_at_least(1.0)))  # fmt: skip
        rows.append(Row("1s", "1. roundtrips, 1 in flight, SYNCHRONOUS", "rt/s",
                        rt(lo, 1, 64, sync=True), note="pyzmq: the same echo, "
                        "unacknowledged"))  # fmt: skip
    if "2" in keys:
        for w in (16, 64):
            rows.append(Row("2/%d" % w, "2. roundtrips, %d in flight" % w, "rt/s",
                            rt(lo, w, 64), "≥ 1.0× pyzmq", ratio_at_least(1.0)))  # fmt: skip
    if "3" in keys:
        rows.append(Row("3", "3. roundtrips, 16 in flight, 64 KiB", "rt/s", rt(lo, 16, 65536),
                        "≥ 1.0× pyzmq", ratio_at_least(1.0)))  # fmt: skip
    if "4" in keys:
        rows.append(Row("4", "4. one-way stream, async (%s msgs)" % f"{sz.stream:,}", "msg/s",
                        stream(False, 1024, sz.stream), "≥ 0.5× pyzmq",
                        ratio_at_least(0.5)))  # fmt: skip
    if "5" in keys:
        check = None
        target = "≥ 0.5× libchirp shape 4"
        if "4" in keys:
            shape4 = rows[-1]

            def check(m: Dict[str, Optional[float]], shape4: Row = shape4) -> Tuple[float, float]:
                return m["libchirp"] / shape4.median("libchirp"), 0.5

        rows.append(Row("5", "5. one-way stream, acknowledged, 64 in flight", "msg/s",
                        stream(True, 64, sz.sync_stream), target, check,
                        note="pyzmq: PUSH/PULL, unacknowledged"))  # fmt: skip
    if "6" in keys:
        tls = ctx.get("tls")
        if tls is None:
            rows.append(Row("6", "6. TLS roundtrips, 16 in flight, 2 namespaces", "rt/s", {},
                            note="not run: %s" % ctx.get("tls_problem")))  # fmt: skip
        else:
            rows.append(Row("6", "6. TLS roundtrips, 16 in flight, 2 namespaces", "rt/s",
                            rt(tls, 16, 64), note=ctx.get("tls_note", "")))  # fmt: skip
    if "7" in keys:
        exe = ctx["cbench"]
        n = sz.c_count
        for key, label, unit, args, target, check in (
            ("7/rt1", "7. C core: roundtrips, 1 in flight", "rt/s",
             ("roundtrip", max(n // 20, 1000), 1, 64), "—", None),
            ("7/rt64", "7. C core: roundtrips, 64 in flight", "rt/s",
             ("roundtrip", n, 64, 64), "≥ 150,000 rt/s", rate_at_least(150_000)),
            ("7/stream", "7. C core: one-way stream, async", "msg/s",
             ("stream", n, 1000, 64), "—", None),
            ("7/sync", "7. C core: one-way stream, acknowledged, 64 in flight", "msg/s",
             ("stream", n, 64, 64, 1), "—", None),
        ):  # fmt: skip
            rows.append(Row(key, label, unit, {"libchirp": lambda a=args: run_cbench(exe, *a)},
                            target, check))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# Set-up of the systems
# ---------------------------------------------------------------------------------------------


def start_loopback() -> Dict[str, Pair]:
    pairs: Dict[str, Pair] = {}
    try:
        for system in SYSTEMS:
            pairs[system] = Pair(system, [], [])
    except BaseException:
        for p in pairs.values():
            p.close()
        raise
    return pairs


def start_tls(ctx: Dict[str, Any], tmp: str) -> None:
    """Two namespaces; a libchirp TLS pair and a pyzmq CURVE (or plaintext) pair across them."""
    import netns
    import zmq
    from tls_bench import make_certs

    try:
        hosts = netns.Hosts(2)
    except netns.NetnsUnavailable as exc:
        ctx["tls_problem"] = "needs network namespaces (%s)" % exc
        return
    ctx["hosts"] = hosts
    pairs: Dict[str, Pair] = {}
    ctx["tls"] = pairs

    def on(i: int) -> Callable[..., subprocess.Popen]:
        return lambda argv, **kw: hosts.popen(i, argv, **kw)

    certs = make_certs(tmp)
    pairs["libchirp"] = Pair(
        "libchirp",
        ["--cert", certs["b"], "--dh", certs["dh"]],
        ["--cert", certs["a"], "--dh", certs["dh"]],
        on(1),
        on(0),
        hosts.addr(1),
    )
    zs: List[str] = ["--bind", hosts.addr(1)]
    zc: List[str] = []
    if zmq.has("curve"):
        spub, ssec = (k.decode() for k in zmq.curve_keypair())
        cpub, csec = (k.decode() for k in zmq.curve_keypair())
        zs += ["--curve-public", spub, "--curve-secret", ssec]
        zc += ["--curve-public", cpub, "--curve-secret", csec, "--curve-server-public", spub]
        ctx["tls_note"] = "libchirp: TLS 1.3; pyzmq: CURVE"
    else:
        ctx["tls_note"] = "libchirp: TLS 1.3; pyzmq: **plaintext** (no CURVE in this libzmq)"
    pairs["pyzmq"] = Pair("pyzmq", zs, zc, on(1), on(0), hosts.addr(1))


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------


def fmt_rate(v: Optional[float], unit: str) -> str:
    return "—" if v is None else f"{v:,.0f} {unit}"


def machine_line(argv: List[str]) -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cmd = " ".join(["benchmarks/run.py", *argv])
    if os.environ.get("MAKELEVEL") and not argv:
        cmd = "make bench"
    try:
        import zmq

        zv = "pyzmq %s (libzmq %s)" % (zmq.__version__, zmq.zmq_version())
    except ImportError:
        zv = "pyzmq missing"
    return (
        f"Machine: `{platform.node()}`, {cpu}, {os.cpu_count()} cores; "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; command: `{cmd}`; "
        f"Python {platform.python_version()}, {zv}."
    )


def table(rows: List[Row], rounds: int, memory: Optional[str], argv: List[str]) -> str:
    out = [machine_line(argv), ""]
    out.append(
        f"Medians of {rounds} round(s); each round measures every shape once per system, "
        "libchirp and pyzmq alternating. Two processes on loopback, plaintext, 64-byte "
        "messages unless stated; libchirp roundtrips (except the SYNCHRONOUS row) and "
        "shape 4 are asynchronous (SYNCHRONOUS=False), every libchirp node has MAX_SLOTS=32 "
        "and uses the batch forms send_many()/get_many(). Ratio = libchirp / pyzmq. "
        f"Bound: the client and server processes of both systems share the machine's "
        f"{os.cpu_count()} cores with whatever else runs on it (the machine is shared); "
        "on loopback every figure is bounded by CPU time on those cores."
    )
    out.append("")
    out.append("| shape | libchirp | pyzmq | ratio | target | met? |")
    out.append("|---|---:|---:|---:|---|---|")
    for r in rows:
        m = {s: r.median(s) for s in SYSTEMS}
        ratio = "—"
        if m["libchirp"] is not None and m["pyzmq"] is not None:
            ratio = "%.2f×" % (m["libchirp"] / m["pyzmq"])
        met = "—"
        if r.check is not None and m["libchirp"] is not None:
            try:
                value, bound = r.check(m)
            except (TypeError, ZeroDivisionError):
                value, bound = None, None
            if value is not None:
                met = "yes" if value >= bound else "**no**"
                if r.key == "5":
                    met += " (%.2f× shape 4)" % value
        label = r.label + (" (%s)" % r.note if r.note else "")
        if not r.measure:
            out.append(f"| {label} | — | — | — | {r.target} | — |")
            continue
        out.append(
            f"| {label} | {fmt_rate(m['libchirp'], r.unit)} | {fmt_rate(m['pyzmq'], r.unit)} "
            f"| {ratio} | {r.target} | {met} |"
        )
    if memory is not None:
        out.append(memory)
    return "\n".join(out) + "\n"


def memory_row(n: int) -> str:
    label = f"memory: RSS per idle connection ({n:,} connections)"
    if not os.path.exists(os.path.join(HERE, "memory.py")):
        return f"| {label} | n/a (benchmarks/memory.py missing) | — | — | ≤ 64 KiB | — |"
    try:
        import memory

        res = memory.measure(n=n)
        per = float(res["per_conn_bytes"])
    except Exception as exc:  # a helper's module: report, do not abort the table
        note("memory.measure failed: %s: %s" % (type(exc).__name__, exc))
        return f"| {label} | failed ({type(exc).__name__}) | — | — | ≤ 64 KiB | — |"
    met = "yes" if per <= 64 * 1024 else "**no**"
    return f"| {label} | {per / 1024:,.1f} KiB | — | — | ≤ 64 KiB | {met} |"


def write_tables(text: str) -> None:
    block = "%s\n\n%s\n%s" % (BEGIN, text.rstrip("\n"), END)
    for rel in TARGET_FILES:
        path = os.path.join(ROOT, rel)
        with open(path, encoding="utf-8") as f:
            old = f.read()
        start, stop = old.find(BEGIN), old.find(END)
        if start < 0 or stop < start:
            note("%s has no %s ... %s markers; not written" % (rel, BEGIN, END))
            continue
        new = old[:start] + block + old[stop + len(END) :]
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
        note("table written into %s" % rel)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small counts, 1 round: a smoke run")
    ap.add_argument("--rounds", type=int, help="rounds per shape (default 9, --quick 1)")
    ap.add_argument("--shapes", default="1,2,3,4,5,6,7,mem", help="e.g. 1,4 (mem = memory line)")
    ap.add_argument("--duration", type=float, help="seconds per roundtrip measurement")
    ap.add_argument("--stream-count", type=int, help="messages of the shape-4 stream")
    ap.add_argument("--sync-count", type=int, help="messages of the shape-5 stream")
    wr = ap.add_mutually_exclusive_group()
    wr.add_argument("--write", action="store_true", help="write README/docs even if partial")
    wr.add_argument("--no-write", action="store_true", help="only print the table")
    ap.add_argument("--json", help="also write the raw per-round figures to this file")
    args = ap.parse_args(argv)
    keys = selected(args.shapes)
    rounds = args.rounds or (1 if args.quick else 9)
    sz = Sizes(args)
    full = set(keys) == {"1", "2", "3", "4", "5", "6", "7", "mem"} and not args.quick
    write = args.write or (full and not args.no_write)

    ctx: Dict[str, Any] = {}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chirp-bench-") as tmp:
        try:
            if "7" in keys:
                note("building cbench")
                ctx["cbench"] = build_cbench()
            if set(keys) & {"1", "2", "3", "4", "5"}:
                note("starting loopback workers")
                ctx["pairs"] = start_loopback()
            if "6" in keys:
                note("starting namespace (TLS) workers")
                start_tls(ctx, tmp)
            rows = build_rows(keys, sz, ctx)
            for rnd in range(rounds):
                order = SYSTEMS if rnd % 2 == 0 else SYSTEMS[::-1]
                for row in rows:
                    for system in order:
                        fn = row.measure.get(system)
                        if fn is None:
                            continue
                        v = fn()
                        row.values[system].append(v)
                        note("round %d/%d  %-48s %-8s %12s" % (
                            rnd + 1, rounds, row.label, system, fmt_rate(v, row.unit)))  # fmt: skip
        except BenchError as exc:
            note("failed: %s" % exc)
            return 1
        finally:
            for key in ("pairs", "tls"):
                for p in ctx.get(key, {}).values():
                    p.close()
            if "hosts" in ctx:
                ctx["hosts"].close()
    mem = memory_row(sz.mem_n) if "mem" in keys else None
    text = table(rows, rounds, mem, argv)
    note("took %.0f s" % (time.monotonic() - t_start))
    print(text, end="")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({r.key: r.values for r in rows}, f, indent=1)
    if write:
        write_tables(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
