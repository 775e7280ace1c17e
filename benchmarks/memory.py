"""RSS of a node holding idle connections, per connection (target: <= 64 KiB).

A node (plaintext, in a fresh Python process so that nothing else lives in its
heap) is started and warmed up; its RSS is read from /proc/self/status. A
child process (tests/loadclient.py) then opens N connections to it on
127.0.0.1 and completes the chirp handshake on each, each announcing a port of
its own, so the node holds N connections under N remotes, as with N peers.
Once they are in, the RSS is read again; the difference divided by N is the
figure. The connections are idle: no message was ever sent on them.

    python benchmarks/memory.py [--n 1000] [--json]

``measure(n)`` returns the figures as a dict for benchmarks/run.py (and the
load tests): connections, rss_before, rss_after (bytes), per_conn_bytes and
connect_seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOADCLIENT = os.path.join(ROOT, "tests", "loadclient.py")

#: Target: RSS per idle connection.
TARGET_BYTES = 64 * 1024


def rss_bytes(pid: int | str = "self") -> int:
    """VmRSS of a process, in bytes."""
    with open("/proc/%s/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/%s/status" % pid)


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir("/proc/%s/fd" % pid))


def raise_nofile(want: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE to at least want (root may raise the hard limit); return the old one."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = old
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            hard = want
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return old


class LoadClient:
    """tests/loadclient.py as a child: ``count`` idle connections to 127.0.0.1:port."""

    def __init__(
        self, port: int, count: int, timeout: float = 60.0, keepalive: float = 0.0
    ) -> None:
        self.count = count
        self.proc = subprocess.Popen(
            [sys.executable, LOADCLIENT, "--port", str(port), "--count", str(count)]
            + ["--keepalive", str(keepalive)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.connect_seconds = float(self.expect("ready", timeout)[2])

    def expect(self, word: str, timeout: float) -> list[str]:
        """Wait for the child's next line, which must start with word."""
        import selectors

        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError("load client: no %r line within %.0f s" % (word, timeout))
        line = self.proc.stdout.readline().split()
        if not line or line[0] != word:
            raise RuntimeError("load client: expected %r, got %r" % (word, line))
        return line

    def idle(self) -> None:
        """Stop the keep-alive NOOPs: from now on the connections are idle."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("idle\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def measure_here(n: int = 1000) -> dict:
    """The measurement in this process (measure() runs it in a fresh one)."""
    for p in (ROOT, os.path.join(ROOT, "tests")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import rawpeer

    import libchirp
    import libchirp.queue

    raise_nofile(n + 1024)
    loop = libchirp.Loop()
    cfg = libchirp.Config()
    cfg.PORT = rawpeer.free_port()
    cfg.DISABLE_ENCRYPTION = True
    cfg.REUSE_TIME = 600.0  # the garbage collector must not close them meanwhile
    cfg.BACKLOG = 127
    node = libchirp.queue.Chirp(loop, cfg)
    client = None
    try:
        # Warm up whatever the first connection allocates once (statistics included).
        warm = LoadClient(cfg.PORT, 8)
        warm.close()
        node.statistics()
        time.sleep(0.3)
        before = rss_bytes()
        client = LoadClient(cfg.PORT, n)
        time.sleep(0.5)  # the last handshakes reach the node
        after = rss_bytes()
        connections = node.statistics()["connections"]
        if connections < n:
            raise RuntimeError("node holds %d connections, expected %d" % (connections, n))
        return {
            "connections": n,
            "rss_before": before,
            "rss_after": after,
            "per_conn_bytes": (after - before) / n,
            "connect_seconds": client.connect_seconds,
        }
    finally:
        if client is not None:
            client.close()
        node.stop()
        loop.stop()


def measure(n: int = 1000) -> dict:
    """RSS per idle connection of a node in a fresh process (see the module doc)."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--here", "--json", "--n", str(n)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0:
        raise RuntimeError("benchmarks/memory.py failed: " + out.stderr.strip()[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def describe(r: dict) -> str:
    return (
        "RSS per idle connection: %.1f KiB (%d connections, RSS %.1f -> %.1f MiB; target <= %d KiB)"
        % (
            r["per_conn_bytes"] / 1024,
            r["connections"],
            r["rss_before"] / 2**20,
            r["rss_after"] / 2**20,
            TARGET_BYTES // 1024,
        )
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="idle connections")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--here", action="store_true", help="measure in this process")
    args = ap.parse_args(argv)
    r = measure_here(args.n) if args.here else measure(args.n)
    print(json.dumps(r) if args.json else describe(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
