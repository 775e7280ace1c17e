"""Shared fixtures for the Python tests.

* ``loop``: a started ``libchirp.Loop``; stopped at teardown (bounded wait).
* ``free_port``: a TCP port that is free on IPv4 and IPv6 right now;
  ``free_ports()`` returns a new one on every call.
* ``make_node``: factory for started ``libchirp.queue.Chirp`` nodes on ``loop``.
  Every node it makes is stopped at teardown; a stop that hangs fails the test
  with a clear message instead of hanging the run.
* ``h``: a ``rawpeer.Harness`` for wire-level tests (raw peers), closed at teardown.
* ``bounded``: run a blocking call in a helper thread and fail the test if it
  does not return in time (used for ``stop()`` and other calls that must not
  hang).
* ``TIMEOUT_SCALE``: the environment's CHIRP_TEST_TIMEOUT_SCALE (default 1).
  Slow runs (``make asan``) set it; the time limits here (``wait_for``,
  ``call_bounded``, the fixtures' limits) and every test's pytest-timeout are
  multiplied by it, so slowness alone does not fail a test. Lower bounds
  ("not before the timeout") are never scaled.
* ``SANITIZER``: "asan" or "tsan" under ``make asan`` / ``make tsan``, else "".

Nodes are configured with DISABLE_ENCRYPTION=True: the tests talk over loopback
(where chirp never uses TLS anyway) and the node start-up would otherwise ask
for CERT_CHAIN_PEM and DH_PARAMS_PEM (docs/config.md).
"""

import errno
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import rawpeer  # noqa: E402

import libchirp  # noqa: E402
import libchirp.queue  # noqa: E402

#: Factor for the tests' time limits (CHIRP_TEST_TIMEOUT_SCALE; slow sanitizer runs).
TIMEOUT_SCALE = float(os.environ.get("CHIRP_TEST_TIMEOUT_SCALE") or 1)
if not TIMEOUT_SCALE > 0:
    raise ValueError("CHIRP_TEST_TIMEOUT_SCALE must be positive")
#: "asan" or "tsan" when the extension is a sanitizer build (make asan, make tsan), else "".
#: Figures a sanitizer distorts beyond TIMEOUT_SCALE (RSS: ASan's allocator keeps
#: freed memory in quarantine) are not meaningful then.
SANITIZER = os.environ.get("CHIRP_SANITIZER", "")

#: Upper bound for one node's stop() in teardown (seconds).
NODE_STOP_LIMIT = 20.0
#: Upper bound for starting a node (seconds).
NODE_START_LIMIT = 30.0
#: Upper bound for stopping the loop once its nodes are stopped (seconds).
LOOP_STOP_LIMIT = 20.0

_ports_given = set()
_ports_lock = threading.Lock()


HAS_IPV6 = rawpeer.ipv6_available()


def wait_for(pred, limit, what):
    """Poll pred() until it is true; fail the test after limit seconds (scaled)."""
    limit *= TIMEOUT_SCALE
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail("%s not reached within %.0f s" % (what, limit), pytrace=False)
        time.sleep(0.02)


def make_config(**fields):
    """A Config for a test node: a free port and plaintext (the tests talk over loopback),
    then the given fields (Config attribute names) on top."""
    cfg = libchirp.Config()
    cfg.PORT = find_free_port()
    cfg.DISABLE_ENCRYPTION = True
    for name, value in fields.items():
        setattr(cfg, name, value)
    return cfg


def require_ipv6():
    """IPv6 is part of what libchirp promises, so a test that needs the IPv6
    loopback fails (rather than skips) on a machine without it."""
    if not HAS_IPV6:
        pytest.fail("this test needs the IPv6 loopback ::1, which this machine lacks", False)


@pytest.fixture
def ipv6():
    require_ipv6()


def find_free_port():
    """Return a port nobody listens on, on 0.0.0.0 and on :: (IPv6 only).

    A chirp node binds both families with the same port
    (docs/protocol.md#nodes-remotes-and-connections), so the port must be free on both.
    Ports are never handed out twice in one test session, so two nodes of one
    test cannot collide with each other.
    """
    # A rejected candidate keeps its IPv4 socket bound until we return, so that
    # the system cannot offer the same port again (it may prefer recent ones).
    held = []
    try:
        for _ in range(400):
            s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s4)
            s4.bind(("0.0.0.0", 0))
            port = s4.getsockname()[1]
            if port <= 1024:
                continue
            if HAS_IPV6:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    try:
                        s6.bind(("::", port))
                    except OSError:
                        continue
            with _ports_lock:
                if port in _ports_given:
                    continue
                _ports_given.add(port)
            return port
    finally:
        for sock in held:
            sock.close()
    raise RuntimeError("could not find a free port")


def end_process(proc):
    """Kill a test's child process if it still runs, reap it, close its pipes."""
    if proc.poll() is None:
        proc.kill()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def call_bounded(func, limit, what, *args, **kwargs):
    """Call ``func(*args, **kwargs)`` in a daemon thread and wait at most ``limit`` s.

    Returns the result or re-raises the exception. If the call has not returned
    in time the current test fails with a message naming ``what`` (the helper
    thread is left behind; it is a daemon and cannot block interpreter exit).
    ``limit`` is multiplied by TIMEOUT_SCALE.
    """
    limit *= TIMEOUT_SCALE
    box = {}

    def run():
        try:
            box["result"] = func(*args, **kwargs)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run, name="bounded:" + what, daemon=True)
    t.start()
    t.join(limit)
    if t.is_alive():
        pytest.fail("%s did not return within %.0f s (hang)" % (what, limit), pytrace=False)
    if "error" in box:
        raise box["error"]
    return box.get("result")


@pytest.fixture
def bounded():
    """The ``call_bounded(func, limit, what, *args, **kwargs)`` helper."""
    return call_bounded


@pytest.fixture
def free_port():
    return find_free_port()


@pytest.fixture
def free_ports():
    """A callable returning a new free port on every call."""
    return find_free_port


@pytest.fixture
def loop():
    lp = call_bounded(libchirp.Loop, 10.0, "Loop()")
    yield lp
    call_bounded(lp.stop, LOOP_STOP_LIMIT, "Loop.stop() in teardown")


class NodeFactory:
    """``make_node(**config_fields)`` returns a started ``queue.Chirp``.

    Fields are ``libchirp.Config`` attribute names (``SYNCHRONOUS=False``,
    ``AUTO_RELEASE=False``, ``TIMEOUT=1.0`` ...). PORT defaults to a free port
    and DISABLE_ENCRYPTION to True. ``make_node.port(node)`` gives a node's
    port, ``make_node.config(node)`` its Config, and ``make_node.message(node,
    data, header)`` a new message addressed to that node on 127.0.0.1.
    """

    def __init__(self, loop):
        self.loop = loop
        self.nodes = []
        self._info = {}

    def __call__(self, **fields):
        attempts = 1 if "PORT" in fields else 5
        for attempt in range(attempts):
            cfg = make_config(**fields)
            port = cfg.PORT
            try:
                node = call_bounded(
                    libchirp.queue.Chirp, NODE_START_LIMIT, "queue.Chirp() start", self.loop, cfg
                )
            except OSError as exc:
                # Someone else took the port between the check and the bind.
                in_use = exc.errno == errno.EADDRINUSE or getattr(exc, "ecode", None) == 4
                if attempt + 1 < attempts and in_use:
                    continue
                raise
            self.nodes.append(node)
            self._info[id(node)] = (port, cfg)
            return node
        raise AssertionError("unreachable")

    def port(self, node):
        return self._info[id(node)][0]

    def config(self, node):
        return self._info[id(node)][1]

    def message(self, node=None, data=b"", header=b"", address="127.0.0.1", port=None):
        msg = libchirp.queue.Message()
        msg.address = address
        msg.port = self.port(node) if port is None else port
        msg.header = header
        msg.data = data
        return msg

    def stop_all(self):
        problems = []
        for node in reversed(self.nodes):
            try:
                call_bounded(
                    node.stop,
                    NODE_STOP_LIMIT,
                    "node.stop() in teardown (port %d)" % self.port(node),
                )
            except RuntimeError as exc:
                # Documented (docs/interfaces.md#common-to-all-interfaces): stop()
                # complains about messages that were never released, after releasing them itself.
                if "releas" not in str(exc):
                    problems.append("port %d: %r" % (self.port(node), exc))
            except Exception as exc:
                problems.append("port %d: %r" % (self.port(node), exc))
        self.nodes.clear()
        if problems:
            pytest.fail("node.stop() failed in teardown: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def h():
    """A ``rawpeer.Harness`` (raw wire-level peers around real nodes), closed at teardown."""
    harness = rawpeer.Harness()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def make_node(loop):
    factory = NodeFactory(loop)
    yield factory
    factory.stop_all()


def pytest_collection_modifyitems(config, items):
    """Multiply every test's pytest-timeout (its mark, else the ini value) by TIMEOUT_SCALE."""
    if TIMEOUT_SCALE == 1:
        return
    default = float(config.getini("timeout") or 0)
    for item in items:
        mark = item.get_closest_marker("timeout")
        kwargs = dict(mark.kwargs) if mark else {}
        seconds = mark.args[0] if mark and mark.args else kwargs.pop("timeout", default)
        if seconds:
            item.add_marker(pytest.mark.timeout(float(seconds) * TIMEOUT_SCALE, **kwargs), False)
