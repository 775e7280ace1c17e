"""Hostile peers and process life (docs/reliability.md).

The node under attack runs in a process of its own (tests/hostilenode.py), so
that its resident and virtual size can be measured alone and its resource
limits (RLIMIT_NOFILE, RLIMIT_AS) lowered without touching the test process.
The attackers are raw sockets (tests/rawpeer.py); a "good client" is a raw peer
that does everything right and must be served while the attack goes on.

The figures each test prints (run with ``-s``) are those docs/reliability.md
quotes.
"""

import json
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time

import pytest
import rawpeer
from conftest import SANITIZER, TIMEOUT_SCALE, find_free_port

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20

#: A data frame asking for an ACK, as a flood sends it back to back.
FLOOD_DATA = b"x" * 1024


class NodeProcess:
    """tests/hostilenode.py in a child process, driven through stdin/stdout."""

    def __init__(self, *args):
        self.port = find_free_port()
        cmd = [sys.executable, os.path.join(HERE, "hostilenode.py"), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            cmd + [str(a) for a in args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self.expect("READY", 30)
        self.as_limit = int(ready[2])

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, word, limit):
        deadline = time.monotonic() + limit * TIMEOUT_SCALE
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    "node process: no %s line within %.0f s" % (word, limit)
                ) from None
            if line is None:
                raise AssertionError("node process ended (status %r)" % self.proc.wait(5))
            parts = line.split(" ", 1)
            if parts[0] == word:
                return line.split(" ")

    def stats(self):
        self.proc.stdin.write("STATS\n")
        self.proc.stdin.flush()
        line = self.expect("STATS", 30)
        return json.loads(" ".join(line[1:]))

    def cpu_seconds(self):
        """User + system CPU time of the node process so far."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("QUIT\n")
                self.proc.stdin.flush()
                self.expect("BYE", 30)
            except (AssertionError, OSError):
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc.stdin.close()
        self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture
def node_process():
    started = []

    def start(*args):
        p = NodeProcess(*args)
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()


def good_roundtrip(port, ident, limit=5.0):
    """A well-behaved client: handshake, one REQ_ACK message, its ACK. Returns seconds."""
    start = time.monotonic()
    peer = rawpeer.connect(port, name="good client")
    try:
        peer.recv_handshake(timeout=limit * TIMEOUT_SCALE)
        peer.send_handshake(4321, bytes([0x42]) * 16)
        peer.send_frame(ident, 1, rawpeer.REQ_ACK, b"hdr", b"good data")
        ack, _ = peer.recv_frame_skip_noops(timeout=limit * TIMEOUT_SCALE)
        assert ack.type & rawpeer.ACK and ack.identity == ident, ack
    finally:
        peer.close()
    return time.monotonic() - start


# --------------------------------------------------------------------------------------------
# A peer that floods REQ_ACK frames and never reads its ACKs.

#: Growth of the node process's resident size during the flood that the test
#: allows. Measured (2 cores, TIMEOUT = 5): see docs/reliability.md.
ACK_FLOOD_RSS_BOUND = 16 * MiB


@pytest.mark.timeout(90)
@pytest.mark.skipif(SANITIZER == "asan", reason="ASan's quarantine keeps freed memory resident")
def test_ack_flood_without_reading_is_bounded(node_process):
    node = node_process("--timeout", 5)
    base = node.stats()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive buffer: the node's ACKs stall after a few KiB.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", node.port))
    sock.sendall(rawpeer.pack_handshake(5555, bytes([0x66]) * 16))  # never reads the node's
    batch = b"".join(
        rawpeer.pack_frame(i.to_bytes(4, "big") * 4, i, rawpeer.REQ_ACK, b"", FLOOD_DATA)
        for i in range(64)
    )
    sent = [0]
    stop = threading.Event()
    closed = []

    def flood():
        sock.setblocking(False)
        view = memoryview(batch)
        off = 0
        while not stop.is_set():
            _, writable, _ = select.select([], [sock], [], 0.1)
            if not writable:
                continue
            try:
                n = sock.send(view[off:])
            except BlockingIOError:
                continue
            except OSError:
                closed.append(time.monotonic())
                return
            sent[0] += n
            off = (off + n) % len(batch)

    t0 = time.monotonic()
    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    peak = base["memory"]["VmRSS"]
    good = None
    samples = []
    while time.monotonic() - t0 < 12.0 and not closed:
        time.sleep(0.25)
        st = node.stats()
        peak = max(peak, st["memory"]["VmRSS"])
        samples.append((round(time.monotonic() - t0, 2), st["memory"]["VmRSS"], st["taken"]))
        if good is None and time.monotonic() - t0 > 2.0:
            good = good_roundtrip(node.port, bytes([0x51]) * 16)
    stop.set()
    flooder.join(10)
    sock.close()
    end = node.stats()
    grown = (peak - base["memory"]["VmRSS"]) * 1024
    print(
        "\nACK flood: %d bytes sent, %d frames read by the node, RSS %.1f -> peak %.1f MiB "
        "(+%.1f MiB), good client served in %.3f s, node closed the flooder after %s s "
        "(timeouts %d)"
        % (
            sent[0],
            end["taken"],
            base["memory"]["VmRSS"] / 1024,
            peak / 1024,
            grown / MiB,
            good if good is not None else -1,
            "%.1f" % (closed[0] - t0) if closed else "-",
            end["totals"]["timeouts"],
        )
    )
    assert good is not None, "the good client was not tried"
    assert grown < ACK_FLOOD_RSS_BOUND, "RSS grew by %.1f MiB: %r" % (grown / MiB, samples)
    # The flooder's connection is closed: once its ACKs stall for TIMEOUT (a
    # timeout), or when the write fails after the flooder closed its socket.
    deadline = time.monotonic() + 10 * TIMEOUT_SCALE
    while node.stats()["connections"] > 0:
        assert time.monotonic() < deadline, "the flooder's connection was not closed"
        time.sleep(0.2)
    good_roundtrip(node.port, bytes([0x52]) * 16)


# --------------------------------------------------------------------------------------------
# Connection limits.


def open_attackers(port, count, source="127.0.0.1", hs_base=6000):
    """count connections that complete the handshake; returns (open sockets, refused).

    A refused connection is accepted by the kernel and closed by the node before
    it sends its handshake (EOF or reset while we wait for it)."""
    socks, refused = [], 0
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((source, 0))
        s.settimeout(5 * TIMEOUT_SCALE)
        s.connect(("127.0.0.1", port))
        try:
            hs = b""
            while len(hs) < rawpeer.HANDSHAKE_LEN:
                chunk = s.recv(rawpeer.HANDSHAKE_LEN - len(hs))
                if not chunk:
                    break
                hs += chunk
        except (ConnectionResetError, socket.timeout):
            hs = b""
        if len(hs) < rawpeer.HANDSHAKE_LEN:
            refused += 1
            s.close()
            continue
        s.sendall(rawpeer.pack_handshake(hs_base + i, bytes([0x70]) * 16))
        socks.append(s)
    return socks, refused


class NoopSender:
    """Sends a NOOP on every socket every interval seconds (keep-alives only)."""

    def __init__(self, socks, interval=0.5):
        self.socks = list(socks)
        self.interval = interval
        self.closed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        noop = rawpeer.pack_noop()
        while not self._stop.wait(self.interval):
            for s in list(self.socks):
                try:
                    s.setblocking(False)
                    s.send(noop)
                    while s.recv(65536):  # drain, and notice a close
                        pass
                    self.socks.remove(s)  # recv returned b"": closed by the node
                    self.closed += 1
                    s.close()
                except BlockingIOError:
                    pass
                except OSError:
                    self.socks.remove(s)
                    self.closed += 1
                    s.close()

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        for s in self.socks:
            s.close()


@pytest.mark.timeout(120)
def test_connection_cap_with_low_fd_limit(node_process):
    """fd limit 128: the automatic MAX_CONNECTIONS is 96. 130 connections that
    only send NOOPs fill it; the rest are refused at once; a good client that
    comes a little later takes the place of the one idle the longest."""
    node = node_process("--nofile", 128)
    t0 = time.monotonic()
    socks, refused = open_attackers(node.port, 130)
    opened = time.monotonic() - t0
    noops = NoopSender(socks)
    try:
        st = node.stats()
        assert st["connections"] <= 96, st["connections"]
        assert refused >= 130 - 96, refused
        assert st["totals"]["connections_refused"] == refused
        time.sleep(1.5)  # the attackers' last data frame (none) is now more than 1 s old
        took = [good_roundtrip(node.port, bytes([0x61 + i]) * 16) for i in range(3)]
        st = node.stats()
        print(
            "\nfd limit 128: %d of 130 NOOP-only connections held, %d refused at once "
            "(opening all took %.2f s); good clients served in %s s; evicted %d, refused %d"
            % (
                len(socks),
                refused,
                opened,
                ", ".join("%.3f" % t for t in took),
                st["totals"]["connections_evicted"],
                st["totals"]["connections_refused"],
            )
        )
        assert st["totals"]["connections_evicted"] >= 1
    finally:
        noops.stop()
    assert node.close() == 0


@pytest.mark.timeout(60)
def test_connection_cap_per_address(node_process):
    node = node_process("--max-connections", 50, "--per-address", 8)
    socks, refused = open_attackers(node.port, 12, source="127.0.0.1")
    noops = NoopSender(socks)
    try:
        assert (len(socks), refused) == (8, 4)
        # Another address is not affected by the limit of 127.0.0.1.
        other, other_refused = open_attackers(node.port, 3, source="127.0.0.2", hs_base=7000)
        assert (len(other), other_refused) == (3, 0)
        noops.socks.extend(other)
        time.sleep(1.5)
        good_roundtrip(node.port, bytes([0x44]) * 16)  # evicts the oldest of 127.0.0.1
        st = node.stats()
        assert st["totals"]["connections_refused"] == 4
        assert st["totals"]["connections_evicted"] == 1
    finally:
        noops.stop()


@pytest.mark.timeout(90)
def test_emfile_on_accept_does_not_stall(node_process):
    """The node's process runs out of descriptors (not its connection limit): the
    loop must not spin on EMFILE, established connections are served, and new
    ones get in once descriptors are free again."""
    node = node_process("--nofile", 256, "--hog-leave", 6)
    keep = rawpeer.connect(node.port, name="established client")
    keep.recv_handshake(timeout=5 * TIMEOUT_SCALE)
    keep.send_handshake(4444, bytes([0x33]) * 16)
    cpu0, t0 = node.cpu_seconds(), time.monotonic()
    attempts = failed = 0
    while time.monotonic() - t0 < 2.0:  # 200 attempts a second
        socks, refused = open_attackers(node.port, 20, hs_base=8000)
        attempts += 20
        failed += refused
        for s in socks:
            s.close()
        time.sleep(0.1)
    busy_cpu, busy = node.cpu_seconds() - cpu0, time.monotonic() - t0
    # Then nothing comes: a node spinning on EMFILE would burn a core now.
    cpu1 = node.cpu_seconds()
    time.sleep(1.5)
    idle_cpu = node.cpu_seconds() - cpu1
    ident = bytes([0x34]) * 16
    keep.send_frame(ident, 1, rawpeer.REQ_ACK, b"", b"still there")
    ack, _ = keep.recv_frame_skip_noops(timeout=5 * TIMEOUT_SCALE)
    assert ack.type & rawpeer.ACK and ack.identity == ident
    keep.close()
    st = node.stats()
    print(
        "\nEMFILE: %d of %d connection attempts in %.1f s dropped (%d counted as refused), "
        "node CPU %.2f s meanwhile, %.2f s in the 1.5 s after"
        % (failed, attempts, busy, st["totals"]["connections_refused"], busy_cpu, idle_cpu)
    )
    assert failed > 0, "the descriptors were not used up"
    assert idle_cpu < 0.3 * TIMEOUT_SCALE, "the node spun: %.2f s CPU in 1.5 s" % idle_cpu
    node.proc.stdin.write("UNHOG\n")
    node.proc.stdin.flush()
    node.expect("UNHOGGED", 10)
    good_roundtrip(node.port, bytes([0x35]) * 16)


def test_connection_limit_config_is_validated(make_node):
    with pytest.raises(ValueError, match=r"MAX_CONNECTIONS = 2000000"):
        make_node(MAX_CONNECTIONS=2_000_000)
    with pytest.raises(ValueError, match=r"MAX_CONNECTIONS_PER_ADDRESS = 11.*|.*\(10\)"):
        make_node(MAX_CONNECTIONS=10, MAX_CONNECTIONS_PER_ADDRESS=11)
    node = make_node(MAX_CONNECTIONS=10, MAX_CONNECTIONS_PER_ADDRESS=10)
    assert node.statistics()["totals"]["connections_refused"] == 0


# --------------------------------------------------------------------------------------------
# Frames that announce far more than they send.


@pytest.mark.timeout(90)
def test_stalled_large_announcements_under_address_space_limit(node_process):
    """100 connections each announce a 100 MiB message, send 1000 bytes of it and
    stall. Under RLIMIT_AS = (virtual size after start) + 256 MiB the node keeps
    them all (no allocation failure) and serves a good client."""
    node = node_process("--as-extra", 256)
    base = node.stats()
    peers = []
    for i in range(100):
        p = rawpeer.connect(node.port, name="stalled %d" % i)
        p.recv_handshake(timeout=5 * TIMEOUT_SCALE)
        p.send_handshake(9000 + i, bytes([0x20 + i]) * 16)
        header = rawpeer.pack_header(bytes([i]) * 16, 1, 100 * MiB - 16, 16, rawpeer.REQ_ACK)
        p.send(header + b"h" * 16 + b"d" * 1000)
        peers.append(p)
    try:
        deadline = time.monotonic() + 10 * TIMEOUT_SCALE
        while True:
            st = node.stats()
            if st["connections"] >= 100:
                break
            assert time.monotonic() < deadline, (
                "%d of 100 stalled connections open, %d closed for a protocol error "
                "(allocation failure), VmPeak %d MiB of %d MiB"
                % (
                    st["connections"],
                    st["totals"]["protocol_errors"],
                    st["memory"]["VmPeak"] // 1024,
                    node.as_limit // MiB,
                )
            )
            time.sleep(0.1)
        time.sleep(0.5)
        took = good_roundtrip(node.port, bytes([0x55]) * 16)
        st = node.stats()
        mem = st["memory"]
        print(
            "\n100 stalled 100 MiB announcements: VmSize %.0f -> %.0f MiB (peak %.0f MiB, "
            "RLIMIT_AS %.0f MiB), RSS %.1f -> %.1f MiB, good client served in %.3f s"
            % (
                base["memory"]["VmSize"] / 1024,
                mem["VmSize"] / 1024,
                mem["VmPeak"] / 1024,
                node.as_limit / MiB,
                base["memory"]["VmRSS"] / 1024,
                mem["VmRSS"] / 1024,
                took,
            )
        )
        assert st["connections"] >= 100
        assert st["totals"]["protocol_errors"] == 0
        assert mem["VmPeak"] * 1024 <= node.as_limit
        # Each stalled message holds its first 64 KiB at most.
        assert (mem["VmRSS"] - base["memory"]["VmRSS"]) * 1024 < 100 * 64 * 1024 + 16 * MiB
        for p in peers:  # all still open
            p.assert_silent(0.01, "while stalled")
    finally:
        for p in peers:
            p.close()
