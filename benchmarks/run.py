"""Run the benchmarks and print comparable tables (``make bench``).

For now this covers the C core alone (benchmarks/cbench.c, built here with the
same flags as the extension): roundtrips with a window of messages in flight
and a one-way stream, both between two processes on loopback. Figures are
rates from one run on whatever machine runs it; compare them only with figures
from the same run. The Python-level shapes against pyzmq come later.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import platform
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pkg_config(*args: str) -> list[str]:
    out = subprocess.run(["pkg-config", *args, "libuv", "openssl"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit("bench: pkg-config cannot find libuv/openssl: " + out.stderr.strip())
    return shlex.split(out.stdout)


def build_cbench() -> str:
    exe = os.path.join(ROOT, "build", "cbench")
    os.makedirs(os.path.dirname(exe), exist_ok=True)
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.c")))
    cmd = ["cc", "-std=c11", "-D_GNU_SOURCE", "-O2", "-g", "-I", os.path.join(ROOT, "csrc")]
    cmd += pkg_config("--cflags") + ["-o", exe, os.path.join(ROOT, "benchmarks", "cbench.c")]
    cmd += sources + pkg_config("--libs")
    subprocess.run(cmd, check=True)
    return exe


def run_cbench(exe: str, *args: object) -> float:
    out = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit("bench: cbench failed: " + out.stderr.strip())
    line = out.stdout.strip().splitlines()[-1]
    return float(line.rsplit("rate=", 1)[1].rstrip("/s"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200_000, help="messages per shape")
    ap.add_argument("--repeat", type=int, default=3, help="runs per shape (best is shown)")
    args = ap.parse_args(argv)
    exe = build_cbench()
    shapes = [
        ("C core: roundtrips, 1 in flight, 64 B", ("roundtrip", args.count // 10, 1, 64)),
        ("C core: roundtrips, 64 in flight, 64 B", ("roundtrip", args.count, 64, 64)),
        ("C core: one-way async stream, 64 B", ("stream", args.count, 1000, 64)),
        ("C core: one-way async stream, 64 KiB", ("stream", args.count // 20, 64, 65536)),
    ]
    print(
        f"# libchirp benchmarks, {datetime.date.today()}, {platform.node()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print("# command: make bench")
    print()
    print(f"| {'shape':<45} | {'rate (best of %d)' % args.repeat:>18} |")
    print(f"|{'-' * 47}|{'-' * 20}|")
    for name, shape in shapes:
        best = max(run_cbench(exe, *shape) for _ in range(args.repeat))
        print(f"| {name:<45} | {best:>14,.0f} /s |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
