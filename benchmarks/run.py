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
7. the C core alone (benchmarks/cbench.c): our ceiling;
8. roundtrips, 1 in flight, on asyncio: libchirp.asyncio (the asyncio loop runs the chirp
   loop; server an echo handler, client ``await request()``) against zmq.asyncio (ROUTER echo,
   DEALER ``await send()``/``await recv()``).

Shape 1 also reports CPU and context switches per roundtrip of both processes (all threads,
``getrusage`` deltas over the timed phase, client + server). With the key ``floor`` shape 1's
rounds also measure plain Python blocking sockets (``pybench.py --system plain``), the floor
libchirp must reach half of. ``lat``: latency p50/p99 at 1 in flight with 0.3 ms and 3 ms
pauses between roundtrips (libchirp against pyzmq, and against today's figures,
LATENCY_BASELINE). ``idle``: CPU and wake-ups of an idle node (benchmarks/idle.py), once.

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
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT, os.path.join(ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

PYBENCH = os.path.join(HERE, "pybench.py")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
TARGET_FILES = ("README.md", os.path.join("docs", "benchmarks.md"))
SYSTEMS = ("libchirp", "pyzmq")
#: Shape 1 with the floor: libchirp, pyzmq and plain blocking sockets (pybench.py --system plain).
ALL_SYSTEMS = ("libchirp", "pyzmq", "plain")
WORKER_SYSTEM = {"libchirp": "chirp", "pyzmq": "zmq", "plain": "plain"}
SHOWN = {"libchirp": "libchirp", "pyzmq": "pyzmq", "plain": "plain sockets"}
SHAPES = ("1", "floor", "lat", "2", "3", "4", "5", "6", "7", "8", "mem", "idle")
#: Pauses (seconds) of the latency rows (shape key ``lat``).
PAUSES = (0.0003, 0.003)
#: Today's libchirp latency (µs: p50, p99) with those pauses, the baseline of "no worse than
#: today": medians of `benchmarks/run.py --shapes lat --rounds 9 --no-write` on main as of
#: 2026-12-06 (commit 22fce0f), machine of the table; docs/benchmarks.md.
LATENCY_BASELINE: Dict[float, Tuple[float, float]] = {0.0003: (102.0, 314.0), 0.003: (247.0, 967.0)}
#: Target of the CPU row: both processes together, per roundtrip at 1 in flight (µs).
CPU_TARGET_US = 40.0
#: Targets of the idle rows: % of one core, wake-ups (context switches of all threads) per second.
IDLE_CPU_PCT = 1.0
IDLE_WAKEUPS = 10.0


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
        arg = ["--system", WORKER_SYSTEM[system]]
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

    def echo_port(self, size: int, sync: bool) -> int:
        if self.system == "libchirp":
            return self.ports["sync" if sync else "async"]
        if self.system == "plain":
            return self.ports["echo"]
        if "router_big" in self.ports:
            return self.ports["router_big" if size >= 16384 else "router"]
        return self.ports["router"]  # the asyncio workers (--aio) have one echo socket

    def roundtrips(
        self,
        window: int,
        size: int,
        duration: float,
        warmup: float,
        sync: bool = False,
        usage: bool = False,
    ) -> Dict[str, float]:
        """``{"rate": rt/s}``; with ``usage`` (1 in flight) also both processes' CPU and
        context switches per roundtrip (``cpu_us``, ``ctx``), client + server."""
        cmd = {"op": "rt", "addr": self.addr, "port": self.echo_port(size, sync), "window": window,
               "size": size, "duration": duration, "warmup": warmup, "sync": sync,
               "usage": usage}  # fmt: skip
        res = self.client.call(cmd)
        out = {"rate": res["rate"]}
        if usage:
            srv = self.server.expect("USAGE", 60)
            n = res["count"]
            out["cpu_us"] = (res["cpu_s"] + srv["cpu_s"]) * 1e6 / n
            out["ctx"] = (res["ctx"] + srv["ctx"]) / n
        return out

    def latency(self, pause: float, size: int, duration: float, warmup: float) -> Dict[str, float]:
        """p50/p99 (µs) of single roundtrips with ``pause`` s between reply and next request."""
        cmd = {"op": "lat", "addr": self.addr, "port": self.echo_port(size, False), "size": size,
               "pause": pause, "duration": duration, "warmup": warmup}  # fmt: skip
        res = self.client.call(cmd, limit=duration + warmup + 60)
        return {"p50": res["p50"], "p99": res["p99"]}

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


Result = Union[float, Dict[str, float]]
Check = Callable[["Row"], Optional[Tuple[bool, str]]]


class Row:
    """One line of the table: how to measure it per system, and its target.

    ``values[system][field]`` holds the figures of the rounds (a measurement that
    returns a bare number fills the field ``rate``). The second column shows the
    system ``versus`` (pyzmq unless stated), the ratio is libchirp / ``versus``;
    ``aside`` names a third system whose figure goes into the label. A row with
    a ``source`` measures nothing itself: it shows another field or system of the
    figures measured for ``source``.
    """

    def __init__(
        self,
        key: str,
        label: str,
        unit: str,
        measure: Dict[str, Callable[[], Result]],
        target: str = "—",
        check: Optional[Check] = None,
        note: str = "",
        *,
        versus: str = "pyzmq",
        field: str = "rate",
        digits: int = 0,
        source: Optional["Row"] = None,
        aside: Optional[str] = None,
    ) -> None:
        self.key, self.label, self.unit = key, label, unit
        self.measure = measure
        self.target = target
        self.check = check  # the row -> (met, remark), None if it cannot tell
        self.note = note
        self.versus, self.field, self.digits = versus, field, digits
        self.source, self.aside = source, aside
        self.values: Dict[str, Dict[str, List[float]]] = source.values if source is not None else {}

    def add(self, system: str, result: Result) -> None:
        fields = result if isinstance(result, dict) else {"rate": result}
        for name, v in fields.items():
            self.values.setdefault(system, {}).setdefault(name, []).append(v)

    def median(self, system: str, field: Optional[str] = None) -> Optional[float]:
        vals = self.values.get(system, {}).get(field or self.field)
        return statistics.median(vals) if vals else None

    def cell(self, system: str) -> str:
        return fmt_rate(self.median(system), self.unit, self.digits)

    def ratio(self) -> str:
        ours, theirs = self.median("libchirp"), self.median(self.versus)
        return "—" if ours is None or not theirs else "%.2f×" % (ours / theirs)

    def met(self) -> str:
        if self.check is None or self.median("libchirp") is None:
            return "—"
        try:
            verdict = self.check(self)
        except (TypeError, ZeroDivisionError):
            return "—"
        if verdict is None:
            return "—"
        ok, remark = verdict
        return ("yes" if ok else "**no**") + (" (%s)" % remark if remark else "")

    def title(self) -> str:
        label = self.label + (" (%s)" % self.note if self.note else "")
        if self.aside is not None and self.median(self.aside) is not None:
            label += " (%s: %s)" % (SHOWN[self.aside], self.cell(self.aside))
        return label

    def line(self) -> str:
        if not any(self.median(s) is not None for s in ("libchirp", self.versus)):
            return f"| {self.title()} | — | — | — | {self.target} | — |"
        return (
            f"| {self.title()} | {self.cell('libchirp')} | {self.cell(self.versus)} "
            f"| {self.ratio()} | {self.target} | {self.met()} |"
        )


class LatencyRow(Row):
    """p50 / p99 of single roundtrips with a pause between them (fields ``p50``, ``p99``)."""

    def __init__(self, key: str, label: str, measure: Dict[str, Callable[[], Result]],
                 pause: float) -> None:  # fmt: skip
        base = LATENCY_BASELINE.get(pause)
        target = "≤ today (%s)" % (
            "p50 %s / p99 %s µs" % (f"{base[0]:,.0f}", f"{base[1]:,.0f}") if base else "no baseline"
        )
        super().__init__(key, label, "µs", measure, target, self.no_worse, field="p50")
        self.pause = pause

    def cell(self, system: str) -> str:
        p50, p99 = self.median(system, "p50"), self.median(system, "p99")
        return "—" if p50 is None or p99 is None else f"{p50:,.0f} / {p99:,.0f} µs"

    def ratio(self) -> str:
        parts = []
        for f in ("p50", "p99"):
            ours, theirs = self.median("libchirp", f), self.median(self.versus, f)
            if ours is None or not theirs:
                return "—"
            parts.append("%.2f×" % (ours / theirs))
        return " / ".join(parts)

    def no_worse(self, row: Row) -> Optional[Tuple[bool, str]]:
        base = LATENCY_BASELINE.get(self.pause)
        if base is None:
            return None
        p50, p99 = self.median("libchirp", "p50"), self.median("libchirp", "p99")
        ok = p50 <= base[0] and p99 <= base[1]
        return ok, "p50 %.2f×, p99 %.2f× today" % (p50 / base[0], p99 / base[1])


class IdleRow(Row):
    """A node left idle: CPU % of one core and wake-ups/s (fields ``cpu_pct``, ``wakeups``)."""

    def __init__(self, key: str, label: str, note: str = "") -> None:
        target = "< %g %% of a core, ≤ %g wake-ups/s" % (IDLE_CPU_PCT, IDLE_WAKEUPS)
        super().__init__(key, label, "", {}, target, self.within, note, field="cpu_pct")

    def cell(self, system: str) -> str:
        cpu, wake = self.median(system, "cpu_pct"), self.median(system, "wakeups")
        if cpu is None or wake is None:
            return "—"
        return f"{cpu:.2f} % of a core, {wake:.1f} wake-ups/s"

    def ratio(self) -> str:
        return "—"

    def within(self, row: Row) -> Optional[Tuple[bool, str]]:
        cpu, wake = self.median("libchirp", "cpu_pct"), self.median("libchirp", "wakeups")
        return cpu < IDLE_CPU_PCT and wake <= IDLE_WAKEUPS, ""


def ratio_at_least(bound: float) -> Check:
    """Met if libchirp / the second column is at least ``bound``."""

    def check(row: Row) -> Tuple[bool, str]:
        return row.median("libchirp") / row.median(row.versus) >= bound, ""

    return check


def rate_at_least(bound: float) -> Check:
    def check(row: Row) -> Tuple[bool, str]:
        return row.median("libchirp") >= bound, ""

    return check


def at_most(bound: float) -> Check:
    def check(row: Row) -> Tuple[bool, str]:
        return row.median("libchirp") <= bound, ""

    return check


class Sizes:
    """Counts and durations, from the command line (``--quick`` shrinks them)."""

    def __init__(self, args: argparse.Namespace) -> None:
        q = args.quick
        self.duration = args.duration if args.duration else (0.3 if q else 1.5)
        self.warmup = 0.1 if q else 0.3
        self.latency = args.lat_duration if args.lat_duration else 2 * self.duration
        self.stream = args.stream_count if args.stream_count else (20_000 if q else 200_000)
        self.sync_stream = args.sync_count if args.sync_count else (5_000 if q else 60_000)
        self.warm = 200 if q else 2000
        self.c_count = 20_000 if q else 200_000
        self.mem_n = 200 if q else 1000
        self.idle = args.idle_secs if args.idle_secs else (1.0 if q else 10.0)


def selected(spec: str) -> List[str]:
    keys = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in keys if k not in SHAPES]
    if bad:
        raise SystemExit(
            "bench: unknown shape(s) %s; choose from %s" % (", ".join(bad), ", ".join(SHAPES))
        )
    if "floor" in keys and "1" not in keys:
        keys.insert(0, "1")  # the floor row is measured in shape 1's rounds
    return keys


def build_rows(keys: List[str], sz: Sizes, ctx: Dict[str, Any]) -> List[Row]:
    """The table rows of the selected shapes; ``ctx`` holds the pairs and cbench."""
    rows: List[Row] = []
    lo = ctx.get("pairs", {})
    duo = {s: p for s, p in lo.items() if s in SYSTEMS}

    def rt(
        pairs: Dict[str, Pair], window: int, size: int, sync: bool = False, usage: bool = False
    ) -> Dict[str, Callable[[], Result]]:
        return {
            s: (lambda p=p: p.roundtrips(window, size, sz.duration, sz.warmup, sync, usage))
            for s, p in pairs.items()
        }

    def stream(sync: bool, window: int, count: int) -> Dict[str, Callable[[], Result]]:
        return {
            "libchirp": lambda: lo["libchirp"].stream(count, 64, window, sync, sz.warm),
            "pyzmq": lambda: lo["pyzmq"].stream(count, 64, window, False, sz.warm),
        }

    if "1" in keys:
        # plain sockets too when the floor is selected; CPU and context switches of all
        shape1 = Row("1", "1. roundtrips, 1 in flight", "rt/s", rt(lo, 1, 64, usage=True),
                     "≥ 2.0× pyzmq", ratio_at_least(2.0))  # fmt: skip
        rows.append(shape1)
        rows.append(Row("1s", "1. roundtrips, 1 in flight, SYNCHRONOUS", "rt/s",
                        rt(duo, 1, 64, sync=True), "≥ 1.5× pyzmq", ratio_at_least(1.5),
                        note="pyzmq: the same echo, unacknowledged"))  # fmt: skip
        if "floor" in keys:
            rows.append(Row("floor", "1. roundtrips, 1 in flight, against the floor", "rt/s", {},
                            "≥ 0.5× plain sockets", ratio_at_least(0.5),
                            note="second column: plain blocking sockets, not pyzmq",
                            versus="plain", source=shape1))  # fmt: skip
        aside = "plain" if "floor" in keys else None
        rows.append(Row("1/cpu", "1. CPU per roundtrip, 1 in flight, both processes", "µs/rt",
                        {}, "≤ %g µs/rt" % CPU_TARGET_US, at_most(CPU_TARGET_US),
                        field="cpu_us", source=shape1, aside=aside))  # fmt: skip
        rows.append(Row("1/ctx", "1. context switches per roundtrip, 1 in flight, both processes",
                        "/rt", {}, field="ctx", digits=2, source=shape1,
                        aside=aside))  # fmt: skip
    if "lat" in keys:
        for pause in PAUSES:
            rows.append(LatencyRow(
                "lat/%g" % (pause * 1e3),
                "1. latency p50 / p99, 1 in flight, %g ms pause between roundtrips" % (pause * 1e3),
                {s: (lambda p=p, pause=pause: p.latency(pause, 64, sz.latency, sz.warmup))
                 for s, p in duo.items()},
                pause,
            ))  # fmt: skip
    if "2" in keys:
        for w in (16, 64):
            rows.append(Row("2/%d" % w, "2. roundtrips, %d in flight" % w, "rt/s",
                            rt(duo, w, 64), "≥ 1.5× pyzmq", ratio_at_least(1.5)))  # fmt: skip
    if "3" in keys:
        rows.append(Row("3", "3. roundtrips, 16 in flight, 64 KiB", "rt/s", rt(duo, 16, 65536),
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

            def check(row: Row, shape4: Row = shape4) -> Tuple[bool, str]:
                v = row.median("libchirp") / shape4.median("libchirp")
                return v >= 0.5, "%.2f× shape 4" % v

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
        # The core's one-way stream should at least keep up with pyzmq's Python
        # stream (shape 4): the core must not be what bounds shape 4.
        stream_target, stream_check = "—", None
        shape4 = next((r for r in rows if r.key == "4"), None)
        if shape4 is not None:
            stream_target = "≥ pyzmq shape 4"

            def stream_check(row: Row, shape4: Row = shape4) -> Tuple[bool, str]:
                v = row.median("libchirp") / shape4.median("pyzmq")
                return v >= 1.0, "%.2f× pyzmq shape 4" % v

        for key, label, unit, args, target, check in (
            ("7/rt1", "7. C core: roundtrips, 1 in flight", "rt/s",
             ("roundtrip", max(n // 20, 1000), 1, 64), "—", None),
            ("7/rt64", "7. C core: roundtrips, 64 in flight", "rt/s",
             ("roundtrip", n, 64, 64), "≥ 150,000 rt/s", rate_at_least(150_000)),
            ("7/stream", "7. C core: one-way stream, async", "msg/s",
             ("stream", n, 1000, 64), stream_target, stream_check),
            ("7/sync", "7. C core: one-way stream, acknowledged, 64 in flight", "msg/s",
             ("stream", n, 64, 64, 1), "—", None),
        ):  # fmt: skip
            rows.append(Row(key, label, unit, {"libchirp": lambda a=args: run_cbench(exe, *a)},
                            target, check))  # fmt: skip
    if "8" in keys:
        on = " on uvloop" if ctx.get("uvloop") else ""
        rows.append(Row("8", "8. roundtrips, 1 in flight, asyncio" + on, "rt/s",
                        rt(ctx["aio_pairs"], 1, 64), "≥ 2.0× pyzmq", ratio_at_least(2.0),
                        note="libchirp.asyncio against zmq.asyncio"))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# Set-up of the systems
# ---------------------------------------------------------------------------------------------


def start_loopback(
    extra: Optional[List[str]] = None, systems: Tuple[str, ...] = SYSTEMS
) -> Dict[str, Pair]:
    pairs: Dict[str, Pair] = {}
    try:
        for system in systems:
            pairs[system] = Pair(system, list(extra or []), list(extra or []))
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


def fmt_rate(v: Optional[float], unit: str, digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f} {unit}".rstrip()


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
    keys = {r.key for r in rows}
    out = [machine_line(argv), ""]
    out.append(
        f"Medians of {rounds} round(s); each round measures every shape once per system, "
        "libchirp and pyzmq alternating (and the plain sockets in shape 1's rounds). Two "
        "processes on loopback, plaintext, 64-byte "
        "messages unless stated; libchirp roundtrips (except the SYNCHRONOUS row) and "
        "shape 4 are asynchronous (SYNCHRONOUS=False), every libchirp node has MAX_SLOTS=32 "
        "and uses the batch forms send_many()/get_many(). Ratio = libchirp / pyzmq "
        "(or / the system the row names). "
        f"Bound: the client and server processes of both systems share the machine's "
        f"{os.cpu_count()} cores with whatever else runs on it (the machine is shared); "
        "on loopback every figure is bounded by CPU time on those cores."
    )
    extra = []
    if "floor" in keys:
        extra.append(
            "The floor: plain Python blocking sockets (`TCP_NODELAY`, 4-byte length + "
            "64-byte frames, `sendall()` and blocking `recv()`), measured in shape 1's rounds."
        )
    if "1/cpu" in keys:
        extra.append(
            "CPU (user + system) and context switches (voluntary + involuntary) per "
            "roundtrip: `getrusage(RUSAGE_SELF)` deltas of the client and the server process "
            "(all their threads) over exactly shape 1's timed phase, added."
        )
    if any(k.startswith("lat/") for k in keys):
        extra.append(
            "Latency: one request at a time, send to reply, the client sleeping "
            "(`time.sleep`) between a reply and the next request; p50 / p99 µs, target "
            "no worse than today's libchirp figures (docs/benchmarks.md)."
        )
    if any(k.startswith("idle/") for k in keys):
        extra.append(
            "Idle: a node with the default Config (TLS) in a process of its own, "
            "`getrusage(RUSAGE_SELF)` over the idle time; wake-ups = context switches of "
            "all its threads (the measuring main thread sleeps through, one wake-up)."
        )
    if extra:
        out.append("")
        out.append(" ".join(extra))
    out.append("")
    out.append("| shape | libchirp | pyzmq | ratio | target | met? |")
    out.append("|---|---:|---:|---:|---|---|")
    out.extend(r.line() for r in rows)
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


def idle_rows(secs: float) -> List[Row]:
    """The idle rows (benchmarks/idle.py): one node in three states, measured once."""
    import idle

    try:
        res = idle.measure(secs)
    except Exception as exc:  # report in the table, do not abort it
        note("idle.measure failed: %s: %s" % (type(exc).__name__, exc))
        return [IdleRow("idle/failed", "idle node", "failed: %s" % type(exc).__name__)]
    rows: List[Row] = []
    for st in res["states"]:
        for t in st["threads"]:
            note("idle %s: %-28s %6.3f %% of a core %6.1f wake-ups/s" % (
                st["key"], t["name"], t["cpu_pct"], t["wakeups"]))  # fmt: skip
        busy = [t for t in st["threads"] if t["wakeups"] >= 0.05]
        by_thread = ", ".join("%s %.1f" % (t["name"], t["wakeups"]) for t in busy)
        label = "idle %s: %s, %g s, once" % (st["key"], st["label"], secs)
        row = IdleRow(
            "idle/" + st["key"], label, "wake-ups/s by thread: %s" % (by_thread or "none")
        )
        row.add("libchirp", {"cpu_pct": st["cpu_pct"], "wakeups": st["wakeups"]})
        rows.append(row)
    return rows


def describe(v: Result, unit: str) -> str:
    """One measurement, for the progress lines."""
    if not isinstance(v, dict):
        return fmt_rate(v, unit)
    parts = []
    if "rate" in v:
        parts.append(fmt_rate(v["rate"], unit))
    if "cpu_us" in v:
        parts.append("%.1f µs/rt, %.2f ctx/rt" % (v["cpu_us"], v["ctx"]))
    if "p50" in v:
        parts.append("p50 %.0f / p99 %.0f µs" % (v["p50"], v["p99"]))
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small counts, 1 round: a smoke run")
    ap.add_argument("--rounds", type=int, help="rounds per shape (default 9, --quick 1)")
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help="e.g. 1,4; any of %s" % ",".join(SHAPES))  # fmt: skip
    ap.add_argument("--duration", type=float, help="seconds per roundtrip measurement")
    ap.add_argument("--lat-duration", type=float, help="seconds per latency measurement")
    ap.add_argument("--idle-secs", type=float, help="seconds per idle state (default 10)")
    ap.add_argument("--stream-count", type=int, help="messages of the shape-4 stream")
    ap.add_argument("--sync-count", type=int, help="messages of the shape-5 stream")
    wr = ap.add_mutually_exclusive_group()
    wr.add_argument("--write", action="store_true", help="write README/docs even if partial")
    wr.add_argument("--no-write", action="store_true", help="only print the table")
    ap.add_argument("--json", help="also write the raw per-round figures to this file")
    ap.add_argument("--uvloop", action="store_true", help="shape 8 on uvloop (both systems)")
    args = ap.parse_args(argv)
    keys = selected(args.shapes)
    rounds = args.rounds or (1 if args.quick else 9)
    sz = Sizes(args)
    full = set(keys) == set(SHAPES) and not args.quick
    write = args.write or (full and not args.no_write)

    ctx: Dict[str, Any] = {"uvloop": args.uvloop}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chirp-bench-") as tmp:
        try:
            if "7" in keys:
                note("building cbench")
                ctx["cbench"] = build_cbench()
            if set(keys) & {"1", "lat", "2", "3", "4", "5"}:
                note("starting loopback workers")
                ctx["pairs"] = start_loopback(systems=ALL_SYSTEMS if "floor" in keys else SYSTEMS)
            if "8" in keys:
                note("starting asyncio workers")
                ctx["aio_pairs"] = start_loopback(["--aio"] + (["--uvloop"] if args.uvloop else []))
            if "6" in keys:
                note("starting namespace (TLS) workers")
                start_tls(ctx, tmp)
            rows = build_rows(keys, sz, ctx)
            for rnd in range(rounds):
                order = ALL_SYSTEMS if rnd % 2 == 0 else ALL_SYSTEMS[::-1]
                for row in rows:
                    for system in order:
                        fn = row.measure.get(system)
                        if fn is None:
                            continue
                        v = fn()
                        row.add(system, v)
                        note("round %d/%d  %-48s %-8s %s" % (
                            rnd + 1, rounds, row.label, system, describe(v, row.unit)))  # fmt: skip
        except BenchError as exc:
            note("failed: %s" % exc)
            return 1
        finally:
            for key in ("pairs", "tls", "aio_pairs"):
                for p in ctx.get(key, {}).values():
                    p.close()
            if "hosts" in ctx:
                ctx["hosts"].close()
    if "idle" in keys:
        note("idle node: 3 states of %g s" % sz.idle)
        rows.extend(idle_rows(sz.idle))
    mem = memory_row(sz.mem_n) if "mem" in keys else None
    text = table(rows, rounds, mem, argv)
    note("took %.0f s" % (time.monotonic() - t_start))
    print(text, end="")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({r.key: r.values for r in rows if r.source is None}, f, indent=1)
    if write:
        write_tables(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
