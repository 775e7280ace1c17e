"""Tests for the ``chirp`` command (libchirp/cli.py), run as a user runs it.

Every command runs in a subprocess as ``python -m libchirp ...``, which is what
the console script ``chirp`` (setup.py entry point ``libchirp.cli:main``) runs
too; the entry point itself is checked to be declared. Checked:

* ``--help`` on every command and subcommand;
* ``chirp listen`` in the background and ``chirp send`` to it, in synchronous
  and asynchronous mode, over IPv4 and IPv6, with ``--echo``/``--request``;
* failures: bad addresses and arguments give one line on stderr and status 2,
  a failed send status 1, a port in use status 1, never a traceback;
* ``chirp bench`` with a small count (plain progress lines when stderr is not a
  terminal, a progress bar when it is);
* ``chirp stats`` against ``chirp listen --serve-stats``, and ``--stats-every``;
* ``chirp pki`` round trip: the files it writes start a TLS node, and two
  private hosts (tests/netns.py) exchange a message over TLS with them, while a
  node of a foreign CA is refused.
"""

import ast
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import netns  # noqa: E402
from conftest import find_free_port  # noqa: E402

from libchirp import cli  # noqa: E402
from libchirp.config import LIMITS as CONFIG_LIMITS  # noqa: E402

pytestmark = pytest.mark.timeout(90)

CHIRP = [sys.executable, "-m", "libchirp"]
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
ENV.pop("PYTHONWARNINGS", None)
#: Upper bound for one short command (seconds).
RUN_LIMIT = 60


def chirp(*args, timeout=RUN_LIMIT, **kwargs):
    """Run ``chirp ARGS`` to completion; return the CompletedProcess (text)."""
    return subprocess.run(
        CHIRP + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=ENV,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


class Background:
    """A ``chirp`` command running in the background; its output is collected by threads."""

    def __init__(self, *args, popen=None):
        self.proc = (popen or subprocess.Popen)(
            CHIRP + [str(a) for a in args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=ENV,
        )
        self.out = []
        self.err = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream, lines):
        for line in stream:
            with self._cond:
                lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, lines, pattern, timeout=30):
        """Wait until a line of ``lines`` matches ``pattern``; return the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in lines:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._alive()):
                    pytest.fail(
                        "no line matching %r within %.0f s; stdout=%r stderr=%r"
                        % (pattern, timeout, self.out, self.err)
                    )
                self._cond.wait(min(left, 0.2))

    def _alive(self):
        return any(t.is_alive() for t in self._threads)

    def ready(self):
        """Wait for ``chirp listen``'s "listening on port" line; return the port."""
        return int(self.wait_for(self.err, r"listening on port (\d+)").group(1))

    def finish(self, timeout=30):
        """Wait for the exit (kill after ``timeout``); return the status."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("chirp did not exit within %.0f s; stderr=%r" % (timeout, self.err))
        for t in self._threads:
            t.join(10)
        self._close()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for t in self._threads:
            t.join(10)
        self._close()

    def _close(self):
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def background():
    """Factory for Background commands; whatever still runs at teardown is killed."""
    started = []

    def start(*args, **kwargs):
        bg = Background(*args, **kwargs)
        started.append(bg)
        return bg

    yield start
    for bg in started:
        bg.kill()


def assert_one_line_error(res, status, command, text=None):
    assert res.returncode == status, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("chirp %s: error: " % command) if command else lines[0]
    assert "Traceback" not in res.stderr
    if text is not None:
        assert re.search(text, lines[0]), lines[0]


# -- the command itself ----------------------------------------------------------------------------


def test_console_script_declared():
    """setup.py declares ``chirp = libchirp.cli:main``, and that is the function run here."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    entry_points = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for kw in node.keywords:
                if kw.arg == "entry_points":
                    entry_points = ast.literal_eval(kw.value)
    assert entry_points is not None, "setup() has no entry_points"
    scripts = [s.replace(" ", "") for s in entry_points["console_scripts"]]
    assert "chirp=libchirp.cli:main" in scripts

    from libchirp import __main__ as dunder_main  # noqa: F401  (python -m libchirp)
    from libchirp.cli import main

    assert main(["--version"]) == 0


HELP_COMMANDS = [
    [],
    ["listen"],
    ["send"],
    ["stats"],
    ["bench"],
    ["pki"],
    ["pki", "ca"],
    ["pki", "node"],
    ["pki", "dh"],
]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "chirp")
def test_help(command):
    res = chirp(*command, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: chirp" + "".join(" " + c for c in command))
    assert res.stderr == ""


def test_no_command():
    assert_one_line_error(chirp(), 2, "", text=r"^chirp: error: .*COMMAND")


def test_version():
    res = chirp("--version")
    assert res.returncode == 0
    assert re.match(r"libchirp \d+\.\d+", res.stdout)


# -- listen and send -------------------------------------------------------------------------------


def listen_lines(bg):
    return [line for line in bg.out if "header=" in line]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_listen_and_send(background, mode):
    port = find_free_port()
    listener = background("listen", "--port", port, "--count", 5, "--" + mode)
    assert listener.ready() == port
    res = chirp(
        "send",
        "127.0.0.1:%d" % port,
        "hello {n}",
        "--header",
        "greeting",
        "--count",
        5,
        "--" + mode,
    )
    assert res.returncode == 0, res.stderr
    sent = res.stdout.splitlines()
    assert len(sent) == 5
    for i, line in enumerate(sent):
        assert re.match(r"sent %d/5 to 127\.0\.0\.1:%d in [\d.]+ ms$" % (i + 1, port), line)
    assert "5 of 5 sends to 127.0.0.1:%d succeeded, 0 failed" % port in res.stderr
    assert listener.finish() == 0, listener.err
    got = listen_lines(listener)
    assert len(got) == 5, listener.out
    for i, line in enumerate(got):
        assert re.match(r"127\.0\.0\.1:\d+ header=b'greeting' data=b'hello %d'$" % i, line)
    assert any(
        ("synchronous" if mode == "sync" else "asynchronous") in line for line in listener.err
    )
    assert "5 messages received" in listener.err[-1]


def test_sync_send_completes_after_the_listener_printed(background):
    """A synchronous send completes only after ``listen`` printed (and released) it."""
    port = find_free_port()
    listener = background("listen", "--port", port, "--count", 1)
    listener.ready()
    res = chirp("send", "127.0.0.1:%d" % port, "x")
    assert res.returncode == 0, res.stderr
    # The line was flushed before the release, so it is already there.
    listener.wait_for(listener.out, r"data=b'x'", timeout=5)
    assert listener.finish() == 0


@pytest.mark.usefixtures("ipv6")
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_request_echo_ipv6(background, mode):
    port = find_free_port()
    listener = background("listen", "--port", port, "--echo", "--count", 3, "--" + mode)
    listener.ready()
    res = chirp("send", "[::1]:%d" % port, "ping {n}", "--request", "--count", 3, "--" + mode)
    assert res.returncode == 0, res.stderr
    replies = res.stdout.splitlines()
    assert len(replies) == 3
    for i, line in enumerate(replies):
        assert re.match(
            r"reply %d/3 in [\d.]+ ms: \[::1\]:%d header=b'' data=b'ping %d'$" % (i + 1, port, i),
            line,
        )
    assert listener.finish() == 0
    assert [re.sub(r":\d+ ", ": ", line) for line in listen_lines(listener)] == [
        "[::1]: header=b'' data=b'ping %d'" % i for i in range(3)
    ]


def test_listen_prints_bytes_escaped(background):
    port = find_free_port()
    listener = background("listen", "--port", port, "--count", 1, "--verbose")
    listener.ready()
    res = subprocess.run(
        CHIRP + ["send", "127.0.0.1:%d" % port, "-", "--header", "h\tx"],
        input=b"\x00\xffline\n",
        capture_output=True,
        timeout=RUN_LIMIT,
        cwd=ROOT,
        env=ENV,
    )
    assert res.returncode == 0, res.stderr
    assert listener.finish() == 0
    (line,) = listen_lines(listener)
    assert "header=b'h\\tx' data=b'\\x00\\xffline\\n' identity=" in line
    assert re.search(r"serial=\d+ remote=[0-9a-f]{32}$", line)


def test_listen_stops_on_sigterm(background):
    listener = background("listen", "--port", find_free_port(), "--plaintext")
    listener.ready()
    assert not any("note:" in line for line in listener.err)  # --plaintext: no note
    listener.proc.send_signal(signal.SIGTERM)
    assert listener.finish() == 0
    assert "0 messages received" in listener.err[-1]
    assert "Traceback" not in "\n".join(listener.err)


def test_listen_notes_plaintext_once(background):
    listener = background("listen", "--port", find_free_port())
    listener.ready()
    notes = [line for line in listener.err if "note:" in line]
    assert len(notes) == 1 and "DISABLE_ENCRYPTION" in notes[0]
    listener.proc.send_signal(signal.SIGINT)
    assert listener.finish() == 0


# -- failures --------------------------------------------------------------------------------------


def test_send_to_nobody_fails():
    port = find_free_port()
    res = chirp("send", "127.0.0.1:%d" % port, "hello", "--timeout", "1")
    assert res.returncode == 1
    assert re.match(r"FAILED 1/1 to 127\.0\.0\.1:%d after [\d.]+ ms: \w+" % port, res.stdout)
    assert "CANNOT_CONNECT" in res.stdout or "refused" in res.stdout
    assert res.stderr.count("\n") == 1 and "0 of 1 send to" in res.stderr
    assert "Traceback" not in res.stderr


BAD_ADDRESSES = [
    ("localhost:2998", r"not an IP address .*host names"),
    ("example.org:2998", r"not an IP address"),
    ("127.0.0.1", r"expected ADDRESS:PORT"),
    ("::1:2998", r"brackets"),
    ("[::1]2998", r"\[ADDRESS\]:PORT"),
    ("[127.0.0.1]:2998", r"not an IP address"),
    ("127.0.0.1:0", r"1\.\.65535"),
    ("127.0.0.1:65536", r"1\.\.65535"),
    ("127.0.0.1:http", r"not a number"),
]


@pytest.mark.parametrize("address,text", BAD_ADDRESSES, ids=[a for a, _ in BAD_ADDRESSES])
def test_bad_address(address, text):
    assert_one_line_error(chirp("send", address, "x"), 2, "send", text)


BAD_ARGS = [
    (["send", "127.0.0.1:2998"], 2, "send", r"exactly one of DATA, --file FILE or --lines"),
    (["send", "127.0.0.1:2998", "x", "--lines"], 2, "send", r"exactly one of"),
    (["send", "127.0.0.1:2998", "--port", "-1", "x"], 2, "send", r"must be 0 \(a free port\)"),
    (["send", "127.0.0.1:2998", "x", "--interval", "-1"], 2, "send", r"0\.\.86400"),
    (["listen", "--format", "json"], 2, "listen", r"invalid choice: 'json'"),
    (["listen", "--bind", "127.0.0.1", "--bind", "127.0.0.2"], 2, "listen", r"at most one IPv4"),
    (["send", "127.0.0.1:2998", "x", "--count", "0"], 2, "send", r"at least 1"),
    (["send", "127.0.0.1:2998", "x", "--sync", "--async"], 2, "send", r"not allowed"),
    (["send", "127.0.0.1:2998", "x", "--timeout", "0"], 2, "send", r"0\.1\.\.1200"),
    (["listen", "--port", "80"], 2, "listen", r"1025\.\.65535"),
    (["listen", "--bind", "localhost"], 2, "listen", r"not an IPv4 or IPv6"),
    (["listen", "--frobnicate"], 2, "listen", r"unrecognized"),
    (["bench", "--count", "x"], 2, "bench", r"not an integer"),
    (["stats"], 2, "stats", r"required"),
    (["listen", "--cert", "a.pem"], 2, "listen", r"--cert and --dh go together"),
    (["listen", "--cert", "a.pem", "--dh", "b.pem", "--plaintext"], 2, "listen", r"exclude"),
    (["listen", "--cert", "/nonexistent.pem", "--dh", "/x.pem"], 1, "listen", r"no such file"),
    (["frobnicate"], 2, "", r"invalid choice"),
    (["pki", "ca"], 2, "pki ca", r"--out"),
    (["send", "127.0.0.1:2998", "x", "y"], 2, "send", r"unrecognized arguments: y"),
]


@pytest.mark.parametrize(
    "args,status,command,text", BAD_ARGS, ids=[" ".join(a[0]) for a in BAD_ARGS]
)
def test_bad_arguments(args, status, command, text):
    assert_one_line_error(chirp(*args), status, command, text)


def test_port_in_use():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        if port <= 1024:
            pytest.fail("the kernel gave a privileged port: %d" % port)
        res = chirp("listen", "--port", port, "--plaintext")
    assert_one_line_error(res, 1, "listen", r"port %d: address already in use" % port)


def test_bad_certificate_file(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    res = chirp("listen", "--port", find_free_port(), "--cert", junk, "--dh", junk)
    assert_one_line_error(res, 1, "listen", r"did not start: .*junk\.pem")


# -- statistics ------------------------------------------------------------------------------------


def test_stats_of_a_running_node(background):
    port = find_free_port()
    listener = background("listen", "--port", port, "--serve-stats", "--count", 2)
    listener.ready()
    assert chirp("send", "127.0.0.1:%d" % port, "one").returncode == 0
    res = chirp("stats", "127.0.0.1:%d" % port)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert re.match(r"node [0-9a-f]{32} port %d: \d+ connections?, \d+ remotes?, " % port, lines[0])
    assert re.match(r"totals: in 2 msgs", lines[1]), lines[1]  # "one" and this request
    assert lines[2].split()[:2] == ["remote", "conns"]
    res = chirp("stats", "127.0.0.1:%d" % port, "--json")
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout)
    assert stats["port"] == port and stats["totals"]["messages_in"] == 3
    assert all(re.match(r"127\.0\.0\.1:\d+$", key) for key in stats["remotes"])
    # Statistics requests are not printed and do not count.
    assert chirp("send", "127.0.0.1:%d" % port, "two").returncode == 0
    assert listener.finish() == 0
    assert [line.split(" ", 1)[1] for line in listen_lines(listener)] == [
        "header=b'' data=b'one'",
        "header=b'' data=b'two'",
    ]


@pytest.mark.parametrize(
    "listen_args,text",
    [
        (["--echo"], r"answered, but does not serve statistics"),
        ([], r"did not answer within 1 s; is it a 'chirp listen --serve-stats' node\?"),
    ],
    ids=["echo", "silent"],
)
def test_stats_of_a_node_that_does_not_serve_them(background, listen_args, text):
    port = find_free_port()
    listener = background("listen", "--port", port, "--count", 1, *listen_args)
    listener.ready()
    res = chirp("stats", "127.0.0.1:%d" % port, "--timeout", 1)
    assert_one_line_error(res, 1, "stats", text)
    assert listener.finish() == 0


def test_stats_of_nobody():
    res = chirp("stats", "127.0.0.1:%d" % find_free_port(), "--timeout", 1)
    assert_one_line_error(res, 1, "stats", r"asking 127\.0\.0\.1:\d+ failed: .*CANNOT_CONNECT")


def test_stats_every(background):
    listener = background("listen", "--port", find_free_port(), "--stats-every", "0.2")
    listener.ready()
    listener.wait_for(listener.err, r"stats: node [0-9a-f]{32} port \d+: 0 connections")
    listener.wait_for(listener.err, r"stats: totals: in 0 msgs")
    listener.proc.send_signal(signal.SIGTERM)
    assert listener.finish() == 0


# -- bench -----------------------------------------------------------------------------------------


def check_bench_table(stdout, count):
    lines = stdout.splitlines()
    assert lines[0].startswith("chirp bench: %d messages per shape" % count)
    assert lines[1].split() == [
        "shape", "mode", "messages", "seconds", "roundtrips/s", "messages/s", "MiB/s",
    ]  # fmt: skip
    rows = lines[2:]
    assert len(rows) == 5, stdout
    shapes = [re.split(r"\s{2,}", row)[:2] for row in rows]
    assert shapes == [
        ["roundtrips, 1 in flight", "async"],
        ["roundtrips, 16 in flight", "async"],
        ["roundtrips, 1 in flight", "sync"],
        ["one-way stream", "async"],
        ["one-way stream", "sync"],
    ]
    for row in rows:
        cells = re.split(r"\s{2,}", row)
        assert float(cells[5]) > 0  # messages/s


def test_bench_small():
    res = chirp("bench", "--count", 40, "--size", 100)
    assert res.returncode == 0, res.stderr
    check_bench_table(res.stdout, 40)
    # stderr is not a terminal: one plain line per shape, no bar.
    assert "\r" not in res.stderr
    assert len(re.findall(r"^chirp bench: .* \.\.\.$", res.stderr, re.M)) == 5
    assert "warning" not in res.stderr


def test_bench_progress_bar_on_a_terminal():
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            CHIRP + ["bench", "--count", "300"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            cwd=ROOT,
            env=ENV,
            text=True,
        )
        os.close(slave)
        slave = None
        chunks = []

        def drain():
            while True:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the terminal's last writer is gone
                    return
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        stdout, _ = proc.communicate(timeout=RUN_LIMIT)
        reader.join(10)
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    check_bench_table(stdout, 300)
    tty = b"".join(chunks).decode()
    assert re.search(r"\r\x1b\[K\[[#.]{30}\] +\d+%  roundtrips, 1 in flight \(async\)", tty)
    assert "one-way stream (sync)" in tty


# -- pki and TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """``chirp pki``: a CA, two nodes of it, one node of a foreign CA, DH parameters."""
    base = tmp_path_factory.mktemp("cli-pki")
    steps = [
        ("ca", "--out", base / "ca"),
        ("node", "--ca", base / "ca", "--out", base / "a.pem", "--name", "node a"),
        ("node", "--ca", base / "ca", "--out", base / "b.pem", "--name", "node b"),
        ("ca", "--out", base / "foreign-ca"),
        ("node", "--ca", base / "foreign-ca", "--out", base / "foreign.pem"),
        ("dh", "--out", base / "dh.pem"),
    ]
    for step in steps:
        res = chirp("pki", *step)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip(), "chirp pki prints the files it wrote"
    return base


def test_pki_files(certs):
    for name in ("ca/ca.pem", "ca/ca.key", "a.pem", "b.pem", "dh.pem"):
        assert (certs / name).is_file(), name
    chain = (certs / "a.pem").read_text()
    assert chain.index("PRIVATE KEY") < chain.index("BEGIN CERTIFICATE")
    assert chain.count("BEGIN CERTIFICATE") == 2  # leaf, then the CA
    assert "BEGIN DH PARAMETERS" in (certs / "dh.pem").read_text()


def test_pki_files_start_a_tls_node(background, certs):
    """A node started with the files runs TLS; over 127.0.0.1 it still talks plain TCP."""
    port = find_free_port()
    listener = background(
        "listen", "--port", port, "--cert", certs / "a.pem", "--dh", certs / "dh.pem",
        "--count", 1,
    )  # fmt: skip
    assert listener.ready() == port
    assert any(re.search(r"listening on port \d+ .*, TLS;", line) for line in listener.err)
    assert not any("note:" in line for line in listener.err)
    res = chirp("send", "127.0.0.1:%d" % port, "over loopback")
    assert res.returncode == 0, res.stderr
    assert listener.finish() == 0
    assert listen_lines(listener)[0].endswith("data=b'over loopback'")


@pytest.mark.multiprocess
def test_pki_tls_between_hosts(certs):
    """Two private hosts: TLS with the CA's files works; a foreign CA and plaintext fail."""
    with netns.Hosts(2) as hosts:
        port = find_free_port()
        listener = Background(
            "listen", "--port", port, "--cert", certs / "a.pem", "--dh", certs / "dh.pem",
            "--echo", "--count", 1,
            popen=lambda argv, **kw: hosts.popen(0, argv, **kw),
        )  # fmt: skip
        try:
            listener.ready()
            target = "%s:%d" % (hosts.addr(0), port)

            def send(*args):
                return hosts.run(
                    1, CHIRP + ["send", target, *map(str, args)], timeout=RUN_LIMIT, env=ENV,
                    cwd=ROOT, stdin=subprocess.DEVNULL,
                )  # fmt: skip

            res = send(
                "refused", "--timeout", 2, "--cert", certs / "foreign.pem", "--dh", certs / "dh.pem"
            )
            assert res.returncode == 1, res.stdout
            assert res.stdout.startswith("FAILED 1/1")
            res = send("refused", "--timeout", 2, "--plaintext")
            assert res.returncode == 1, res.stdout
            res = send("over TLS", "--request", "--cert", certs / "b.pem", "--dh", certs / "dh.pem")
            assert res.returncode == 0, res.stdout + res.stderr
            assert re.match(
                r"reply 1/1 in [\d.]+ ms: %s header=b'' data=b'over TLS'$" % re.escape(target),
                res.stdout,
            )
            assert listener.finish() == 0
            # Only the good message arrived, from the other host.
            (line,) = listen_lines(listener)
            assert line.startswith(hosts.addr(1) + ":") and line.endswith("data=b'over TLS'")
        finally:
            listener.kill()


# -- what a new user trips over --------------------------------------------------------------------


def test_help_shows_the_limits_and_exit_statuses():
    res = chirp("--help")
    assert res.returncode == 0
    for option, (field, low, high, _) in cli.LIMITS.items():
        assert re.search(r"^  %s .*%g\.\.%g" % (re.escape(option), low, high), res.stdout, re.M)
        if field:
            assert "Config.%s" % field in res.stdout
    assert "2 bad arguments" in res.stdout and "130 Ctrl-C" in res.stdout
    for option in ("--port", "--timeout", "--max-slots"):
        field, low, high, _ = cli.LIMITS[option]
        lim = CONFIG_LIMITS[field]
        assert (low in (lim.low, 0), high) == (True, lim.high), "one table of limits"


def test_plural():
    assert cli.plural(0, "message") == "0 messages"
    assert cli.plural(1, "message") == "1 message"
    assert cli.plural(2, "reply", "replies") == "2 replies"


def test_one_message_is_singular(background):
    listener = background("listen", "--port", 0, "--count", 1, "--plaintext")
    port = listener.ready()
    res = chirp("send", "127.0.0.1:%d" % port, "x", "--count", 1)
    assert res.returncode == 0, res.stderr
    assert listener.finish() == 0
    assert listener.err[-1] == "chirp listen: 1 message received"


def test_sigint_ends_a_request_at_once(background):
    """Ctrl-C ends ``send --request`` at once, not after the request's timeout."""
    listener = background("listen", "--port", 0, "--plaintext")  # takes it, never answers
    port = listener.ready()
    sender = background("send", "127.0.0.1:%d" % port, "anyone?", "--request", "--timeout", 60)
    listener.wait_for(listener.out, r"data=b'anyone\?'")
    start = time.monotonic()
    sender.proc.send_signal(signal.SIGINT)
    assert sender.finish(timeout=20) == 130
    took = time.monotonic() - start
    assert took < 10, took  # in practice well under a second; the request would wait 60 s
    assert sender.err[-1] == "chirp send: interrupted, 1 request unfinished", sender.err
    assert "Traceback" not in "\n".join(sender.err)
    assert sender.out == []


@pytest.mark.parametrize(
    "fmt,expected",
    [
        ("repr", r"^127\.0\.0\.1:\d+ header=b'h' data=b'a\\tb\\x00'$"),
        ("hex", r"^127\.0\.0\.1:\d+ header=68 data=61096200$"),
        ("raw", r"^a\tb\x00$"),
    ],
)
def test_listen_format(background, fmt, expected):
    listener = background("listen", "--port", 0, "--count", 1, "--format", fmt, "--plaintext")
    port = listener.ready()
    res = subprocess.run(
        CHIRP + ["send", "127.0.0.1:%d" % port, "-", "--header", "h"],
        input=b"a\tb\x00",
        capture_output=True,
        timeout=RUN_LIMIT,
        cwd=ROOT,
        env=ENV,
    )
    assert res.returncode == 0, res.stderr
    assert listener.finish() == 0
    assert len(listener.out) == 1 and re.match(expected, listener.out[0]), listener.out


def test_send_lines_as_they_come(background):
    listener = background("listen", "--port", 0, "--count", 3, "--format", "raw", "--plaintext")
    port = listener.ready()
    sender = subprocess.Popen(
        CHIRP + ["send", "127.0.0.1:%d" % port, "--lines"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=ENV,
    )
    try:
        # Each line goes out when it is written, long before stdin ends.
        for line in (b"first", b"second"):
            sender.stdin.write(line + b"\n")
            sender.stdin.flush()
            listener.wait_for(listener.out, "^%s$" % line.decode(), timeout=20)
        # The last line may lack its newline.
        out, err = sender.communicate(b"third", timeout=RUN_LIMIT)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    assert sender.returncode == 0, err
    assert listener.finish() == 0
    assert listener.out == ["first", "second", "third"]
    assert re.match(r"sent 1 to 127\.0\.0\.1:\d+ in [\d.]+ ms$", out.decode().splitlines()[0])
    assert "3 of 3 sends to 127.0.0.1:%d succeeded, 0 failed" % port in err.decode()


def test_send_lines_count_stops_early(background):
    listener = background("listen", "--port", 0, "--count", 2, "--plaintext")
    port = listener.ready()
    res = subprocess.run(
        CHIRP + ["send", "127.0.0.1:%d" % port, "--lines", "--count", "2"],
        input=b"a\nb\nc\n",
        capture_output=True,
        timeout=RUN_LIMIT,
        cwd=ROOT,
        env=ENV,
    )
    assert res.returncode == 0, res.stderr
    assert b"2 of 2 sends" in res.stderr
    assert listener.finish() == 0


def test_send_file(background, tmp_path):
    payload = bytes(range(256)) * 40
    (tmp_path / "blob").write_bytes(payload)
    listener = background("listen", "--port", 0, "--count", 1, "--format", "hex", "--max-bytes", 0)
    port = listener.ready()
    res = chirp("send", "127.0.0.1:%d" % port, "--file", tmp_path / "blob")
    assert res.returncode == 0, res.stderr
    assert listener.finish() == 0
    assert listener.out[0].endswith(" data=" + payload.hex())
    res = chirp("send", "127.0.0.1:%d" % port, "--file", tmp_path / "missing")
    assert_one_line_error(res, 1, "send", r"--file .*missing: No such file")


def test_send_count_and_interval(background):
    listener = background("listen", "--port", 0, "--count", 4, "--plaintext")
    port = listener.ready()
    start = time.monotonic()
    res = chirp("send", "127.0.0.1:%d" % port, "tick {n}", "--count", 4, "--interval", 0.25)
    took = time.monotonic() - start
    assert res.returncode == 0, res.stderr
    assert took >= 0.75, took  # four sends, 0.25 s apart
    assert len(res.stdout.splitlines()) == 4
    assert listener.finish() == 0
    assert [line.split(" ", 1)[1] for line in listen_lines(listener)] == [
        "header=b'' data=b'tick %d'" % i for i in range(4)
    ]


def test_port_zero_and_bind_on_every_node_command(background):
    """``--port 0`` takes a free port and says which; ``--bind`` works for send and stats."""
    listener = background(
        "listen", "--port", 0, "--bind", "127.0.0.1", "--serve-stats", "--echo"
    )  # fmt: skip
    port = listener.ready()
    assert port > 0
    assert any("listening on port %d (IPv4 127.0.0.1, IPv6 ::)" % port in e for e in listener.err)
    res = chirp("send", "127.0.0.1:%d" % port, "x", "--request", "--port", 0, "--bind", "127.0.0.1")
    assert res.returncode == 0, res.stderr
    m = re.search(r"this node listens on port (\d+) \(IPv4 127\.0\.0\.1, IPv6 ::\)", res.stderr)
    assert m and int(m.group(1)) > 0, res.stderr
    res = chirp("stats", "127.0.0.1:%d" % port, "--port", 0, "--json")
    assert res.returncode == 0, res.stderr
    m = re.search(r"this node listens on port (\d+) \(IPv4 0\.0\.0\.0", res.stderr)
    assert m, res.stderr
    assert "127.0.0.1:%s" % m.group(1) in json.loads(res.stdout)["remotes"]
    listener.proc.send_signal(signal.SIGTERM)
    assert listener.finish() == 0


def test_stats_every_prints_only_what_changed(background):
    listener = background("listen", "--port", 0, "--stats-every", "0.2", "--plaintext")
    port = listener.ready()
    listener.wait_for(listener.err, r"stats: totals: in 0 msgs")
    time.sleep(1.0)  # five more periods in which nothing happens
    quiet = [line for line in listener.err if "stats:" in line]
    assert len(quiet) == 2, quiet  # the first snapshot only: node line and totals
    assert chirp("send", "127.0.0.1:%d" % port, "x").returncode == 0
    listener.wait_for(listener.err, r"stats: totals: in 1 msg \(1 B\)")
    time.sleep(0.6)
    listener.proc.send_signal(signal.SIGTERM)
    assert listener.finish() == 0
    stats = [line.split("stats: ", 1)[1] for line in listener.err if "stats:" in line]
    assert sum(line.startswith("totals: in 1 msg ") for line in stats) == 2  # change, and exit
    rows = [line for line in stats if line.startswith("127.0.0.1:")]
    assert 1 <= len(rows) <= 4, stats  # the sender's row when it changed, and at exit


def test_pki_refuses_to_overwrite(tmp_path):
    assert chirp("pki", "ca", "--out", tmp_path / "ca").returncode == 0
    for command, args in (
        ("node", ["--ca", tmp_path / "ca", "--out", tmp_path / "n.pem"]),
        ("dh", ["--out", tmp_path / "dh.pem"]),
    ):
        assert chirp("pki", command, *args).returncode == 0
        before = (tmp_path / args[-1]).read_bytes()
        res = chirp("pki", command, *args)
        assert_one_line_error(res, 1, "pki", r"exists already \(use --force to replace it\)")
        assert (tmp_path / args[-1]).read_bytes() == before
        assert chirp("pki", command, *args, "--force").returncode == 0
    res = chirp("pki", "ca", "--out", tmp_path / "ca")
    assert_one_line_error(res, 1, "pki", r"use --force")


def test_pki_without_cryptography_names_the_extra(tmp_path):
    block = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from libchirp.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", block, "pki", "ca", "--out", str(tmp_path / "ca")],
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT,
        cwd=ROOT,
        env=ENV,
    )
    assert_one_line_error(res, 1, "pki", r"pip install 'libchirp\[tls\]'")
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert '"tls": ["cryptography' in f.read()  # the extra named exists
