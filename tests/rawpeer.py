"""A raw chirp peer for black-box tests: speaks the wire format by hand.

Everything here follows docs/protocol.md#wire-format and is written with
struct.pack only; it never imports the package under test, except in the small
"node harness" at the bottom, which starts real nodes for the tests to talk to.

Every receive has a deadline, so a misbehaving node makes a test fail with a
clear message instead of hanging.
"""

import collections
import concurrent.futures
import contextlib
import errno
import queue
import select
import socket
import struct
import threading
import time

# --------------------------------------------------------------------------------------------
# Wire format (docs/protocol.md#wire-format)

HANDSHAKE_LEN = 18
HEADER_LEN = 27

REQ_ACK = 0x01
ACK = 0x02
NOOP = 0x04

MAX_MSG_SIZE_DEFAULT = 104857600

_HS = struct.Struct("!H16s")
_HDR = struct.Struct("!16sIIHB")
assert _HS.size == HANDSHAKE_LEN and _HDR.size == HEADER_LEN

Handshake = collections.namedtuple("Handshake", "port identity")
Frame = collections.namedtuple("Frame", "identity serial data_len header_len type header data raw")

# Our capability NOOP (docs/protocol.md): NOOP | EXT, identity "chx1" + flags + window.
EXT = 0x40
CAPS_MAGIC = b"chx1"


def is_caps(frame):
    return bool(frame.type & NOOP) and bool(frame.type & EXT) and frame.identity[:4] == CAPS_MAGIC


def pack_caps(serial, window=32, flags=0x01):
    """A capability announcement as our nodes send it."""
    identity = CAPS_MAGIC + bytes([flags, window]) + bytes(10)
    return pack_header(identity, serial, 0, 0, NOOP | EXT)


ZERO_ID = bytes(16)
CLIENT_ID = bytes(range(0xA0, 0xB0))  # a0 a1 .. af, the 9.1 client identity


def pack_handshake(port, identity):
    assert len(identity) == 16
    return _HS.pack(port, identity)


def unpack_handshake(buf):
    assert len(buf) == HANDSHAKE_LEN, "handshake must be 18 bytes, got %d" % len(buf)
    return Handshake(*_HS.unpack(buf))


def pack_header(identity, serial, data_len, header_len, type_):
    """27-byte frame header; note data_len comes before header_len."""
    assert len(identity) == 16
    return _HDR.pack(identity, serial & 0xFFFFFFFF, data_len, header_len, type_)


def pack_frame(identity, serial, type_, header=b"", data=b""):
    return pack_header(identity, serial, len(data), len(header), type_) + header + data


def pack_ack(identity, serial=0):
    return pack_header(identity, serial, 0, 0, ACK)


def pack_noop(serial=0):
    return pack_header(ZERO_ID, serial, 0, 0, NOOP)


def unpack_header(buf):
    assert len(buf) == HEADER_LEN
    return _HDR.unpack(buf)


# --------------------------------------------------------------------------------------------
# Sockets


class PeerClosed(AssertionError):
    """The node closed the connection (EOF or reset) while we expected bytes."""


class PeerTimeout(AssertionError):
    """Bytes we expected did not arrive before the deadline."""


_CLOSED_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ENOTCONN)


class RawPeer:
    """One TCP connection to or from a node, with bounded receives."""

    def __init__(self, sock, name="raw peer"):
        self.sock = sock
        self.name = name
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)
        self.closed_by_us = False
        self.caps = []  # capability NOOPs skipped by recv_frame

    # -- sending

    def send(self, data):
        self.sock.sendall(data)

    def send_slowly(self, data, pause=0.005):
        """Send one byte per write (TCP_NODELAY is on, so one segment each)."""
        for i in range(len(data)):
            self.sock.sendall(data[i : i + 1])
            time.sleep(pause)

    def send_handshake(self, port, identity=CLIENT_ID):
        self.send(pack_handshake(port, identity))

    def send_frame(self, identity, serial, type_, header=b"", data=b""):
        self.send(pack_frame(identity, serial, type_, header, data))

    # -- receiving

    def _recv_some(self, n, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout()
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv(n)
        except OSError as e:
            if isinstance(e, socket.timeout):
                raise
            if e.errno in _CLOSED_ERRNOS:
                return b""
            raise
        finally:
            self.sock.settimeout(None)

    def recv_exact(self, n, timeout=5.0, what="bytes"):
        deadline = time.monotonic() + timeout
        buf = b""
        while len(buf) < n:
            try:
                chunk = self._recv_some(n - len(buf), deadline)
            except socket.timeout:
                raise PeerTimeout(
                    "%s: expected %d %s within %.1f s, got %d: %r"
                    % (self.name, n, what, timeout, len(buf), buf)
                ) from None
            if not chunk:
                raise PeerClosed(
                    "%s: connection closed by node while waiting for %d %s (got %d: %r)"
                    % (self.name, n, what, len(buf), buf)
                )
            buf += chunk
        return buf

    def recv_handshake(self, timeout=5.0):
        return unpack_handshake(self.recv_exact(HANDSHAKE_LEN, timeout, "handshake bytes"))

    def recv_frame(self, timeout=5.0, skip_caps=True):
        """The next frame. Like a libchirp 1.x node, which takes it for a plain
        NOOP, this skips our capability announcement (docs/protocol.md,
        "Pipelined acknowledgements") unless skip_caps is False; skipped ones
        are kept in self.caps."""
        deadline = time.monotonic() + timeout
        while True:
            f = self._recv_frame_any(max(0.1, deadline - time.monotonic()))
            if skip_caps and is_caps(f):
                self.caps.append(f)
                continue
            return f

    def _recv_frame_any(self, timeout):
        deadline = time.monotonic() + timeout
        raw = self.recv_exact(HEADER_LEN, timeout, "frame header bytes")
        identity, serial, data_len, header_len, type_ = unpack_header(raw)
        rest = max(0.1, deadline - time.monotonic())
        header = self.recv_exact(header_len, rest, "header bytes") if header_len else b""
        data = self.recv_exact(data_len, rest, "data bytes") if data_len else b""
        return Frame(identity, serial, data_len, header_len, type_, header, data, raw)

    def recv_frame_skip_noops(self, timeout=5.0):
        """Next non-NOOP frame plus the NOOP frames seen before it."""
        deadline = time.monotonic() + timeout
        noops = []
        while True:
            f = self.recv_frame(max(0.1, deadline - time.monotonic()))
            if f.type & NOOP:
                noops.append(f)
                continue
            return f, noops

    def read_for(self, duration):
        """Everything that arrives within duration. Returns (bytes, closed)."""
        deadline = time.monotonic() + duration
        buf = b""
        while True:
            try:
                chunk = self._recv_some(65536, deadline)
            except socket.timeout:
                return buf, False
            if not chunk:
                return buf, True
            buf += chunk

    def assert_silent(self, duration, why=""):
        """Nothing arrives and the connection stays open for duration seconds."""
        data, closed = self.read_for(duration)
        assert not data, "%s: node sent %d unexpected bytes %s: %s" % (
            self.name,
            len(data),
            why,
            data.hex(),
        )
        assert not closed, "%s: node closed the connection unexpectedly %s" % (self.name, why)

    def wait_closed(self, timeout=5.0):
        """True if the node closes the connection within timeout (data is discarded)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                chunk = self._recv_some(65536, deadline)
            except socket.timeout:
                return False
            if not chunk:
                return True

    # -- closing

    def close(self):
        self.closed_by_us = True
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self):
        """Close with a TCP reset (SO_LINGER 0)."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()


def connect(port, host="127.0.0.1", timeout=5.0, name=None):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return RawPeer(s, name or "raw client to %s:%d" % (host, port))


class RawServer:
    """A listening socket the node connects to."""

    def __init__(self, host="127.0.0.1", port=0, name="raw server"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.name = name

    def accept(self, timeout=5.0):
        self.sock.settimeout(timeout)
        try:
            s, addr = self.sock.accept()
        except socket.timeout:
            raise PeerTimeout(
                "%s: node did not connect to %s:%d within %.1f s"
                % (self.name, self.host, self.port, timeout)
            ) from None
        finally:
            self.sock.settimeout(None)
        return RawPeer(s, "%s conn from %s" % (self.name, addr[:2]))

    def assert_no_connection(self, duration):
        self.sock.settimeout(duration)
        try:
            s, addr = self.sock.accept()
        except socket.timeout:
            return
        finally:
            self.sock.settimeout(None)
        s.close()
        raise AssertionError("%s: unexpected connection from %s" % (self.name, addr))

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()


_ports_given = set()
_ports_lock = threading.Lock()


def free_port():
    """A port > 1024 free on 0.0.0.0 and on [::] (IPv6-only), like a node binds it.

    A port is never handed out twice in one session, so a port used as "nothing listens
    here" in one place cannot become a node's PORT elsewhere in the same test.
    """
    for _ in range(200):
        s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s4.bind(("0.0.0.0", 0))
            port = s4.getsockname()[1]
            if port <= 1024:
                continue
            with _ports_lock:
                if port in _ports_given:
                    continue
            if ipv6_available():
                s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                try:
                    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s6.bind(("::", port))
                except OSError:
                    continue
                finally:
                    s6.close()
            with _ports_lock:
                _ports_given.add(port)
            return port
        finally:
            s4.close()
    raise RuntimeError("no free port found")


def ipv6_available():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            s.bind(("::1", 0))
        finally:
            s.close()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Futures


def wait_future(fut, timeout, what="future"):
    """Wait until fut is done (bounded); never confuses our timeout with a chirp TimeoutError."""
    done, _ = concurrent.futures.wait([fut], timeout=timeout)
    assert done, "%s did not complete within %.1f s" % (what, timeout)
    return fut


def future_error(fut, timeout, what="future"):
    """The exception fut completed with (asserts it did complete with one)."""
    wait_future(fut, timeout, what)
    exc = fut.exception()
    assert exc is not None, "%s succeeded (%r) but was expected to fail" % (what, fut.result())
    return exc


def future_result(fut, timeout, what="future"):
    wait_future(fut, timeout, what)
    exc = fut.exception()
    assert exc is None, "%s failed with %r (ecode=%r)" % (what, exc, getattr(exc, "ecode", None))
    return fut.result()


def run_bounded(func, timeout, what):
    """Run func in a daemon thread; fail if it does not return within timeout."""
    box = {}

    def target():
        try:
            box["result"] = func()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, name="bounded " + what, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "%s did not return within %.1f s" % (what, timeout)
    box["elapsed"] = time.monotonic() - start
    return box


# --------------------------------------------------------------------------------------------
# Node harness: start real nodes, track everything, tear down with bounded waits.


class Harness:
    """Creates one Loop, nodes on it, raw peers and servers; cleans all of them up."""

    STOP_TIMEOUT = 20.0

    def __init__(self):
        self.loop = None
        self.nodes = []
        self.peers = []
        self.servers = []

    def node(self, **settings):
        """Start a libchirp.queue.Chirp; settings are Config attribute names (PORT, ...).

        Returns (node, port). DISABLE_ENCRYPTION defaults to True here because a node with
        encryption on needs certificate files (docs/config.md).
        """
        import libchirp
        import libchirp.queue

        if self.loop is None:
            self.loop = libchirp.Loop()
        config = libchirp.Config()
        settings.setdefault("DISABLE_ENCRYPTION", True)
        if "PORT" not in settings:
            settings["PORT"] = free_port()
        for key, value in settings.items():
            setattr(config, key, value)
        node = libchirp.queue.Chirp(self.loop, config)
        self.nodes.append(node)
        return node, settings["PORT"]

    def connect(self, port, host="127.0.0.1", name=None):
        p = connect(port, host, name=name)
        self.peers.append(p)
        return p

    def server(self, host="127.0.0.1", port=0, name="raw server"):
        s = RawServer(host, port, name)
        self.servers.append(s)
        return s

    def track(self, peer):
        self.peers.append(peer)
        return peer

    def client(self, node_port, hs_port=4000, identity=CLIENT_ID, host="127.0.0.1", name=None):
        """Connect, read the node's handshake, send ours. Returns (peer, node_handshake)."""
        p = self.connect(node_port, host, name=name)
        hs = p.recv_handshake(timeout=5.0)
        p.send_handshake(hs_port, identity)
        return p, hs

    @staticmethod
    def drain(node):
        while True:
            try:
                m = node.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(Exception):
                if m.has_slot:
                    m.release_slot()

    def close(self):
        errors = []
        for p in self.peers:
            p.close()
        for s in self.servers:
            s.close()
        for node in self.nodes:
            with contextlib.suppress(Exception):
                self.drain(node)
            try:
                box = run_bounded(node.stop, self.STOP_TIMEOUT, "node.stop() in teardown")
            except AssertionError as e:
                errors.append(e)
                continue
            err = box.get("error")
            if err is not None and not (isinstance(err, RuntimeError) and "released" in str(err)):
                errors.append(err)
        if self.loop is not None:
            try:
                run_bounded(self.loop.stop, self.STOP_TIMEOUT, "loop.stop() in teardown")
            except AssertionError as e:
                errors.append(e)
        if errors:
            raise AssertionError("errors while stopping nodes: %r" % errors)


def _libchirp_queue():
    import libchirp.queue

    return libchirp.queue


def make_msg(port, header=b"", data=b"", address="127.0.0.1"):
    msg = _libchirp_queue().Message()
    msg.address = address
    msg.port = port
    msg.header = header
    msg.data = data
    return msg


def get_msg(node, timeout=5.0, what="message"):
    try:
        return node.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(
            "node did not deliver the %s within %.1f s" % (what, timeout)
        ) from None


def assert_no_msg(node, duration, why=""):
    try:
        m = node.get(timeout=duration)
    except queue.Empty:
        return
    raise AssertionError("node delivered an unexpected message %s: %r" % (why, m.data))


def serial_diff(a, b):
    return (b - a) & 0xFFFFFFFF


def assert_node_serves(h, node, port, what="node"):
    """A fresh raw client can still hand the node a message (node survived)."""
    c, _ = h.client(port, name="fresh client")
    ident = bytes([0x77]) * 16
    c.send_frame(ident, 1, 0x00, b"again", b"still serving")
    m = get_msg(node, what="message on a fresh connection (%s must keep serving)" % what)
    assert m.identity == ident and m.data == b"still serving"
    if m.has_slot:
        future_result(m.release_slot(), 5, "release of the fresh message")
    return c


class SilentServer:
    """A raw TCP server on 127.0.0.1 that accepts and never answers.

    With ``handshake=True`` it sends a valid 18-byte chirp handshake on every
    accepted connection and then reads and discards everything (so it never
    acknowledges anything); otherwise it does not even read. With
    ``read=False`` it never reads, handshake or not, so the node's writes fill
    the socket buffers and stall.
    """

    def __init__(self, handshake=False, read=True):
        self.handshake = handshake
        self.read = read
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.accepted = 0
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="silent-server", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        for c in self.conns:
            c.close()
        self.sock.close()

    def _run(self):
        while not self._stop.is_set():
            watch = [self.sock] + (self.conns if self.handshake and self.read else [])
            readable, _, _ = select.select(watch, [], [], 0.05)
            for s in readable:
                if s is self.sock:
                    conn, _ = self.sock.accept()
                    self.conns.append(conn)
                    self.accepted += 1
                    if self.handshake:
                        conn.sendall(struct.pack(">H", self.port) + b"\x5a" * 16)
                else:
                    try:
                        chunk = s.recv(65536)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        self.conns.remove(s)
                        s.close()
                    self.received += len(chunk)
