"""libchirp against pyzmq at the Python level: the worker processes of ``make bench``.

``benchmarks/run.py`` (the driver) starts, per system, one *server* process and
one *client* process and drives them over their stdin/stdout (one JSON object
per line), so every measurement runs between two processes:

* ``pybench.py server --system chirp``: two ``libchirp.queue.Chirp`` nodes on
  one Loop, an asynchronous one (default slots) and a synchronous one with
  ``MAX_SLOTS = 32``. Both answer by header: ``P`` is echoed (the reply goes to
  ``msg.address``/``msg.port``), ``W`` is taken and dropped (warm-up), ``S`` is
  counted (a stream) and ``E`` ends the stream: the server prints
  ``STREAM {"count": n, "secs": s}`` with the time between the first and the
  last ``S`` *at the receiver*.
* ``pybench.py server --system zmq``: a ROUTER echo socket (``copy=True``), a
  second ROUTER echo socket for large messages (``copy=False``) and a PULL sink
  that counts like the chirp server (the first byte of a frame is its marker).
* ``pybench.py server --system plain``: the floor, no messaging library at
  all: a listening TCP socket, one thread per connection echoing
  length-prefixed frames (4 bytes little-endian length, then the payload) with
  blocking ``recv()`` and ``sendall()``, ``TCP_NODELAY`` on.
* ``pybench.py client --system chirp|zmq|plain``: reads commands
  (``{"op": "rt", ...}`` roundtrips for a fixed time with a window in flight,
  ``{"op": "lat", ...}`` one roundtrip at a time with a pause between a reply
  and the next request, latency percentiles; ``{"op": "stream", ...}`` a
  one-way stream of a fixed count) and prints ``RESULT {...}``.

CPU and context switches (``"usage": true`` in an ``rt`` command, 1 in flight):
at the start of the timed phase the client sends one marker (``U``: the chirp
header, a first zmq frame, the first byte of a plain frame); the server takes a
``getrusage(RUSAGE_SELF)`` snapshot and echoes it, and on the echo the client
takes its own. At the end of the timed phase the client takes its second
snapshot and sends a ``V`` marker, on which the server prints
``USAGE {"cpu_s": ..., "ctx": ...}``, its delta; the client's delta comes with
its ``RESULT``. Both cover all threads of their process.

With ``--aio`` both roles run on an asyncio event loop instead (shape 8):
``libchirp.asyncio.Chirp`` nodes, each on a Loop of its own (so the asyncio
loop runs the chirp loop itself, docs/architecture.md#embedding-in-asyncio),
the server an echo handler, the client ``await node.request(msg)``; against
``zmq.asyncio`` ROUTER echo and DEALER ``await send()``/``await recv()``; with
``--uvloop`` both systems run on uvloop instead of the default event loop.

Servers print ``READY {ports}`` once they listen and stop at EOF on stdin.
With ``--cert/--dh`` (chirp) or ``--curve-*`` keys (zmq) they run TLS/CURVE
(shape 6, between two network namespaces).

The libchirp side of every shape is one small function (``chirp_*``); sending
and taking go through :func:`chirp_send_all` and :func:`chirp_take`, which use
the batch forms ``send_many``/``get_many`` when the node has them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import resource
import socket
import statistics
import struct
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: Upper bound for any single wait inside a worker (seconds).
LIMIT = 30.0
#: zmq echo sockets switch to zero-copy frames at this size (pyzmq's own advice).
ZMQ_NOCOPY_SIZE = 16384

perf_counter = time.perf_counter
_Message: Any = None  # libchirp.queue.Message, imported by chirp_node()
#: Length prefix of a plain-socket frame.
_LEN = struct.Struct("<I")


def free_port() -> int:
    """A port > 1024 that is free on IPv4 and (if present) IPv6 right now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s4:
            s4.bind(("0.0.0.0", 0))
            port = s4.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s6.bind(("::", port))
            except OSError as exc:
                if exc.errno != 97:  # 97: no IPv6 here, the IPv4 port is enough
                    continue
            if port > 1024:
                return port


def say(kind: str, **fields: Any) -> None:
    sys.stdout.write("%s %s\n" % (kind, json.dumps(fields)))
    sys.stdout.flush()


def stdin_closed() -> threading.Event:
    """An event set when stdin reaches EOF (the driver's signal to stop)."""
    ev = threading.Event()

    def watch() -> None:
        while sys.stdin.readline():
            pass
        ev.set()

    threading.Thread(target=watch, daemon=True).start()
    return ev


def rusage_now() -> Tuple[float, int]:
    """CPU seconds (user + system) and context switches (voluntary + involuntary) so far.

    ``getrusage(RUSAGE_SELF)``: the whole process, all its threads together.
    """
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_nvcsw + ru.ru_nivcsw


def usage_since(start: Tuple[float, int]) -> Dict[str, float]:
    """``{"cpu_s", "ctx"}``: what this process used since the snapshot ``start``."""
    cpu, ctx = rusage_now()
    return {"cpu_s": cpu - start[0], "ctx": ctx - start[1]}


class ServerUsage:
    """The server's side of a usage measurement: ``U`` marker begins it, ``V`` ends it.

    At ``V`` the server prints ``USAGE {"cpu_s": ..., "ctx": ...}`` (its delta).
    """

    def __init__(self) -> None:
        self.start = rusage_now()

    def begin(self) -> None:
        self.start = rusage_now()

    def end(self) -> None:
        say("USAGE", **usage_since(self.start))


class ClientUsage:
    """The client's side: the ``U`` roundtrip, then a snapshot; a snapshot; the ``V`` marker.

    ``marker()`` sends ``U`` and waits for its echo (the server's interval has
    begun); ``end_marker()`` sends ``V`` (not echoed).
    """

    def __init__(self, marker: Callable[[], Any], end_marker: Callable[[], Any]) -> None:
        self.marker, self.end_marker = marker, end_marker
        self.start = (0.0, 0)
        self.delta: Dict[str, float] = {}

    def begin(self) -> None:
        self.marker()
        self.start = rusage_now()

    def end(self) -> None:
        self.delta = usage_since(self.start)

    def report(self) -> Dict[str, float]:
        self.end_marker()
        return self.delta


class StreamCounter:
    """Counts a stream at the receiver: ``S`` counted, ``E`` reports and resets."""

    def __init__(self) -> None:
        self.count = 0
        self.first = self.last = 0.0

    def hit(self) -> None:
        self.last = perf_counter()
        if not self.count:
            self.first = self.last
        self.count += 1

    def end(self) -> None:
        say("STREAM", count=self.count, secs=self.last - self.first)
        self.count = 0


# ---------------------------------------------------------------------------------------------
# libchirp side
# ---------------------------------------------------------------------------------------------


def chirp_node(loop, port: int, sync: bool, cert: Optional[str], dh: Optional[str]):
    import libchirp
    import libchirp.queue

    global _Message
    _Message = libchirp.queue.Message  # no import in the hot path (chirp_message)
    cfg = libchirp.Config()
    cfg.PORT = port
    cfg.SYNCHRONOUS = sync
    # 32 slots, the most a connection may have: in sync mode that is the window
    # of pipelined ACKs (docs/extensions.md), in async mode how far the reader
    # may run ahead of the application (the default is 16).
    cfg.MAX_SLOTS = 32
    cfg.TIMEOUT = LIMIT
    if cert is None:
        cfg.DISABLE_ENCRYPTION = True
    else:
        cfg.CERT_CHAIN_PEM = cert
        cfg.DH_PARAMS_PEM = dh
    return libchirp.queue.Chirp(loop, cfg)


def chirp_message(addr: str, port: int, header: bytes, data: bytes):
    m = _Message()
    m.address = addr
    m.port = port
    m.header = header
    m.data = data
    return m


def chirp_send_all(node, msgs: list) -> list:
    """Send ``msgs``; return their futures (``send_many`` if the node has it)."""
    send_many = getattr(node, "send_many", None)
    if send_many is not None:
        return list(send_many(msgs))
    return [node.send(m) for m in msgs]


def chirp_take(node, most: int, timeout: float) -> list:
    """At least one received message, at most ``most`` (``get_many`` if the node has it).

    Raises ``queue.Empty`` after ``timeout`` seconds without a message.
    """
    get_many = getattr(node, "get_many", None)
    if get_many is not None:
        msgs = list(get_many(most, timeout=timeout))
        if not msgs:
            raise queue.Empty
        return msgs
    return [node.get(timeout=timeout)]


def chirp_serve(node, stop: threading.Event, usage: ServerUsage) -> None:
    """Server loop of one node: echo P, drop W, count S, report at E; U and V: usage marks."""
    counter = StreamCounter()
    while not stop.is_set():
        try:
            msgs = chirp_take(node, 256, 0.5)
        except queue.Empty:
            continue
        echo = []
        for m in msgs:
            kind = m.header
            if kind == b"P":
                echo.append(m)
            elif kind == b"S":
                counter.hit()
            elif kind == b"E":
                counter.end()
            elif kind == b"U":
                usage.begin()
                echo.append(m)
            elif kind == b"V":
                usage.end()
        if echo:
            chirp_send_all(node, echo)


def chirp_roundtrips(
    node,
    addr: str,
    port: int,
    window: int,
    size: int,
    duration: float,
    warmup: float,
    usage: bool = False,
) -> dict:
    """``window`` messages ping-pong with the echo server; roundtrips/s over ``duration``.

    With ``usage`` also this process's CPU and context switches over the timed phase.
    """
    payload = os.urandom(size)
    marks = None
    if usage:
        marks = ClientUsage(
            lambda: (chirp_send_all(node, [chirp_message(addr, port, b"U", b"")]),
                     chirp_take(node, 1, LIMIT)),
            lambda: chirp_send_all(node, [chirp_message(addr, port, b"V", b"")]),
        )  # fmt: skip
    chirp_send_all(node, [chirp_message(addr, port, b"P", payload) for _ in range(window)])
    return _pingpong(
        lambda: chirp_take(node, window, LIMIT),
        lambda msgs: chirp_send_all(node, msgs),
        window,
        duration,
        warmup,
        marks,
    )


def chirp_latency(
    node, addr: str, port: int, size: int, pause: float, duration: float, warmup: float
) -> dict:
    """One message in flight, ``pause`` s between a reply and the next request."""
    box = [chirp_message(addr, port, b"P", os.urandom(size))]

    def roundtrip() -> None:
        chirp_send_all(node, box)
        box[:] = chirp_take(node, 1, LIMIT)

    return _latency(roundtrip, pause, duration, warmup)


def chirp_stream(node, addr: str, port: int, count: int, size: int, window: int, warm: int) -> dict:
    """One-way stream of ``count`` messages, at most ``window`` sends unfinished.

    The rate is measured by the receiver (``STREAM`` line of the server).
    """
    payload = os.urandom(size)
    pending: collections.deque = collections.deque()
    # Batches of a quarter window: the next batch goes out while three quarters
    # are still in flight, so the window never drains (a whole window per batch
    # would stop and wait once per window).
    batch = max(1, min(64, window // 4)) if hasattr(node, "send_many") else 1

    def run(header: bytes, n: int) -> None:
        for i in range(0, n, batch):
            k = min(batch, n - i)
            while len(pending) > window - k:
                pending.popleft().result(LIMIT)
            if k == 1:
                pending.append(node.send(chirp_message(addr, port, header, payload)))
            else:
                msgs = [chirp_message(addr, port, header, payload) for _ in range(k)]
                pending.extend(chirp_send_all(node, msgs))
        while pending:
            pending.popleft().result(LIMIT)

    run(b"W", warm)
    t0 = perf_counter()
    run(b"S", count)
    secs = perf_counter() - t0
    run(b"E", 1)
    return {"sender_secs": secs}


class ChirpClient:
    def __init__(self, cert: Optional[str], dh: Optional[str]) -> None:
        import libchirp

        self.loop = libchirp.Loop()
        self.cert, self.dh = cert, dh
        self.nodes: Dict[bool, Any] = {}

    def node(self, sync: bool):
        if sync not in self.nodes:
            self.nodes[sync] = chirp_node(self.loop, free_port(), sync, self.cert, self.dh)
        return self.nodes[sync]

    def run(self, cmd: dict) -> dict:
        if cmd["op"] == "rt":
            return chirp_roundtrips(
                self.node(cmd.get("sync", False)), cmd["addr"], cmd["port"], cmd["window"],
                cmd["size"], cmd["duration"], cmd["warmup"], cmd.get("usage", False),
            )  # fmt: skip
        if cmd["op"] == "lat":
            return chirp_latency(
                self.node(False), cmd["addr"], cmd["port"], cmd["size"], cmd["pause"],
                cmd["duration"], cmd["warmup"],
            )  # fmt: skip
        return chirp_stream(
            self.node(cmd["sync"]), cmd["addr"], cmd["port"], cmd["count"], cmd["size"],
            cmd["window"], cmd["warm"],
        )  # fmt: skip

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.loop.stop()


def chirp_server(args: argparse.Namespace) -> None:
    import libchirp

    # One Loop per node: each serving thread then handles its own node's events
    # while it waits in get_many() (a thread waiting on one node of a shared
    # loop would also be woken by every batch of the other node).
    loops = {"async": libchirp.Loop(), "sync": libchirp.Loop()}
    nodes = {
        "async": chirp_node(loops["async"], free_port(), False, args.cert, args.dh),
        "sync": chirp_node(loops["sync"], free_port(), True, args.cert, args.dh),
    }
    stop = stdin_closed()
    usage = ServerUsage()
    threads = [threading.Thread(target=chirp_serve, args=(n, stop, usage)) for n in nodes.values()]
    for t in threads:
        t.start()
    say("READY", **{name: node.port for name, node in nodes.items()})
    for t in threads:
        t.join()
    for node in nodes.values():
        node.stop()
    for loop in loops.values():
        loop.stop()


# ---------------------------------------------------------------------------------------------
# pyzmq side
# ---------------------------------------------------------------------------------------------


def zmq_secure(sock, args: argparse.Namespace, server: bool) -> None:
    """CURVE keys on ``sock`` when the worker got them (shape 6)."""
    if not args.curve_secret:
        return
    sock.curve_publickey = args.curve_public.encode()
    sock.curve_secretkey = args.curve_secret.encode()
    if server:
        sock.curve_server = True
    else:
        sock.curve_serverkey = args.curve_server_public.encode()


def zmq_echo(sock, stop: threading.Event, copy: bool, usage: ServerUsage) -> None:
    """ROUTER echo: every [identity, payload] goes back as it came.

    Usage markers have a frame more, [identity, U or V, payload]: U is echoed, V is not.
    """
    import zmq

    while not stop.is_set():
        try:
            frames = sock.recv_multipart(copy=copy)
        except zmq.Again:
            continue
        if len(frames) != 2:
            mark = frames[1] if copy else frames[1].bytes
            if mark == b"V":
                usage.end()
                continue
            usage.begin()
        sock.send_multipart(frames, copy=copy)


def zmq_sink(sock, stop: threading.Event) -> None:
    """PULL sink: first byte W (drop), S (count) or E (report)."""
    import zmq

    counter = StreamCounter()
    while not stop.is_set():
        try:
            frame = sock.recv()
        except zmq.Again:
            continue
        kind = frame[:1]
        if kind == b"S":
            counter.hit()
        elif kind == b"E":
            counter.end()


def zmq_server(args: argparse.Namespace) -> None:
    import zmq

    ctx = zmq.Context()
    stop = stdin_closed()
    socks = {"router": ctx.socket(zmq.ROUTER), "router_big": ctx.socket(zmq.ROUTER),
             "pull": ctx.socket(zmq.PULL)}  # fmt: skip
    ports = {}
    for name, sock in socks.items():
        zmq_secure(sock, args, server=True)
        sock.rcvtimeo = 500  # to notice the stop
        sock.linger = 0
        ports[name] = sock.bind_to_random_port("tcp://%s" % args.bind)
    usage = ServerUsage()
    threads = [
        threading.Thread(target=zmq_echo, args=(socks["router"], stop, True, usage)),
        threading.Thread(target=zmq_echo, args=(socks["router_big"], stop, False, usage)),
        threading.Thread(target=zmq_sink, args=(socks["pull"], stop)),
    ]
    for t in threads:
        t.start()
    say("READY", **ports)
    for t in threads:
        t.join()
    for sock in socks.values():
        sock.close()
    ctx.term()


def zmq_roundtrips(
    sock, window: int, size: int, duration: float, warmup: float, usage: bool = False
) -> dict:
    """DEALER side: ``window`` frames ping-pong with the ROUTER echo."""
    copy = size < ZMQ_NOCOPY_SIZE
    payload = os.urandom(size)
    marks = None
    if usage:
        marks = ClientUsage(
            lambda: (sock.send_multipart([b"U", payload]), sock.recv_multipart()),
            lambda: sock.send_multipart([b"V", payload]),
        )
    for _ in range(window):
        sock.send(payload, copy=copy)

    def take() -> list:
        return [sock.recv(copy=copy)]

    def send(frames: list) -> None:
        for f in frames:
            sock.send(f, copy=copy)

    return _pingpong(take, send, window, duration, warmup, marks)


def zmq_latency(sock, size: int, pause: float, duration: float, warmup: float) -> dict:
    """One frame in flight, ``pause`` s between a reply and the next request."""
    payload = os.urandom(size)

    def roundtrip() -> None:
        sock.send(payload)
        sock.recv()

    return _latency(roundtrip, pause, duration, warmup)


def zmq_stream(sock, count: int, size: int, warm: int) -> dict:
    """PUSH side: a one-way stream (HWM is zmq's flow control); rate measured by the PULL."""
    body = os.urandom(size - 1) if size > 1 else b""
    for _ in range(warm):
        sock.send(b"W" + body)
    msg = b"S" + body
    t0 = perf_counter()
    for _ in range(count):
        sock.send(msg)
    secs = perf_counter() - t0
    sock.send(b"E")
    return {"sender_secs": secs}


class ZmqClient:
    def __init__(self, args: argparse.Namespace) -> None:
        import zmq

        self.zmq = zmq
        self.args = args
        self.ctx = zmq.Context()
        self.socks: Dict[tuple, Any] = {}

    def sock(self, kind: int, addr: str, port: int):
        key = (kind, addr, port)
        if key not in self.socks:
            s = self.ctx.socket(kind)
            zmq_secure(s, self.args, server=False)
            s.linger = 0
            s.rcvtimeo = int(LIMIT * 1000)
            s.connect("tcp://%s:%d" % (addr, port))
            self.socks[key] = s
        return self.socks[key]

    def run(self, cmd: dict) -> dict:
        zmq = self.zmq
        if cmd["op"] == "rt":
            s = self.sock(zmq.DEALER, cmd["addr"], cmd["port"])
            return zmq_roundtrips(s, cmd["window"], cmd["size"], cmd["duration"], cmd["warmup"],
                                  cmd.get("usage", False))  # fmt: skip
        if cmd["op"] == "lat":
            s = self.sock(zmq.DEALER, cmd["addr"], cmd["port"])
            return zmq_latency(s, cmd["size"], cmd["pause"], cmd["duration"], cmd["warmup"])
        s = self.sock(zmq.PUSH, cmd["addr"], cmd["port"])
        return zmq_stream(s, cmd["count"], cmd["size"], cmd["warm"])

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.ctx.term()


# ---------------------------------------------------------------------------------------------
# Plain blocking sockets (the floor of shape 1)
# ---------------------------------------------------------------------------------------------


def plain_send(sock: socket.socket, frames: List[bytes]) -> None:
    """Send ``frames``, each behind its 4-byte length, in one ``sendall()``."""
    sock.sendall(b"".join([_LEN.pack(len(f)) + f for f in frames]))


class FrameReader:
    """Length-prefixed frames from a blocking socket (4 bytes little-endian length, payload)."""

    def __init__(self, sock: socket.socket) -> None:
        self.recv = sock.recv
        self.buf = b""

    def frames(self) -> List[bytes]:
        """Every whole frame received so far; blocks in ``recv()`` until there is one."""
        buf = self.buf
        while True:
            out = []
            pos, have = 0, len(buf)
            while have - pos >= 4:
                end = pos + 4 + _LEN.unpack_from(buf, pos)[0]
                if end > have:
                    break
                out.append(buf[pos + 4 : end])
                pos = end
            if out:
                self.buf = buf[pos:]
                return out
            chunk = self.recv(262144)
            if not chunk:
                raise EOFError("the peer closed the connection")
            buf += chunk


def plain_connected(sock: socket.socket) -> socket.socket:
    """A connected socket made ready for ping-pong: blocking, ``TCP_NODELAY``."""
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def plain_serve(conn: socket.socket, usage: ServerUsage) -> None:
    """Echo every frame of one connection (first byte U: usage begins; V: ends, no echo)."""
    reader = FrameReader(conn)
    with conn:
        while True:
            try:
                frames = reader.frames()
            except (EOFError, OSError):
                return
            echo = []
            for f in frames:
                kind = f[:1]
                if kind == b"P":
                    echo.append(f)
                elif kind == b"U":
                    usage.begin()
                    echo.append(f)
                elif kind == b"V":
                    usage.end()
            if echo:
                plain_send(conn, echo)


def plain_server(args: argparse.Namespace) -> None:
    stop = stdin_closed()
    usage = ServerUsage()
    lsock = socket.create_server((args.bind, 0))
    lsock.settimeout(0.5)  # to notice the stop
    say("READY", echo=lsock.getsockname()[1])
    with lsock:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except socket.timeout:
                continue
            threading.Thread(
                target=plain_serve, args=(plain_connected(conn), usage), daemon=True
            ).start()


class PlainClient:
    """One connection per echo address; frames start with ``P`` (``U``/``V``: usage marks)."""

    def __init__(self) -> None:
        self.conns: Dict[tuple, Tuple[socket.socket, FrameReader]] = {}

    def conn(self, addr: str, port: int) -> Tuple[socket.socket, FrameReader]:
        key = (addr, port)
        if key not in self.conns:
            sock = plain_connected(socket.create_connection(key, timeout=LIMIT))
            self.conns[key] = (sock, FrameReader(sock))
        return self.conns[key]

    def run(self, cmd: dict) -> dict:
        sock, reader = self.conn(cmd["addr"], cmd["port"])
        payload = b"P" + os.urandom(cmd["size"] - 1)
        if cmd["op"] == "lat":

            def roundtrip() -> None:
                plain_send(sock, [payload])
                reader.frames()

            return _latency(roundtrip, cmd["pause"], cmd["duration"], cmd["warmup"])
        if cmd["op"] != "rt":
            raise ValueError("plain sockets: only rt and lat")
        marks = None
        if cmd.get("usage"):
            marks = ClientUsage(
                lambda: (plain_send(sock, [b"U"]), reader.frames()),
                lambda: plain_send(sock, [b"V"]),
            )
        plain_send(sock, [payload] * cmd["window"])
        return _pingpong(reader.frames, lambda frames: plain_send(sock, frames), cmd["window"],
                         cmd["duration"], cmd["warmup"], marks)  # fmt: skip

    def close(self) -> None:
        for sock, _ in self.conns.values():
            sock.close()


# ---------------------------------------------------------------------------------------------
# asyncio (shape 8): libchirp.asyncio against zmq.asyncio
# ---------------------------------------------------------------------------------------------


async def _apingpong(take: Callable[[], Any], send: Callable[[list], Any], window: int,
                     duration: float, warmup: float) -> dict:  # fmt: skip
    """_pingpong() with coroutines: ``await take()``, ``await send(msgs)``."""
    inflight = window
    timed = False
    mark = perf_counter() + warmup
    t0 = t1 = 0.0
    n = 0
    while inflight:
        msgs = await take()
        if t1:
            inflight -= len(msgs)
            continue
        now = perf_counter()
        if timed:
            n += len(msgs)
        if now >= mark:
            if not timed:
                timed, t0, mark = True, now, now + duration
            else:
                t1 = now
                inflight -= len(msgs)
                continue
        await send(msgs)
    return {"rate": n / (t1 - t0), "count": n}


def chirp_aio_config(port: int):
    import libchirp

    cfg = libchirp.Config()
    cfg.PORT = port
    cfg.SYNCHRONOUS = False
    cfg.MAX_SLOTS = 32
    cfg.TIMEOUT = LIMIT
    cfg.DISABLE_ENCRYPTION = True
    return cfg


def chirp_aio_server(args: argparse.Namespace) -> None:
    import asyncio

    import libchirp
    import libchirp.asyncio

    class Echo(libchirp.asyncio.Chirp):
        async def handler(self, msg: Any) -> None:
            if msg.header == b"P":
                await self.send(msg)  # released when the handler returns

    async def main() -> None:
        stop = stdin_closed()
        with libchirp.Loop() as loop:
            async with Echo(loop, chirp_aio_config(free_port())) as node:
                say("READY", **{"async": node.port})
                while not stop.is_set():
                    await asyncio.sleep(0.2)

    asyncio.run(main())


class ChirpAioClient:
    def __init__(self) -> None:
        import asyncio

        import libchirp
        import libchirp.asyncio

        self.aloop = asyncio.new_event_loop()
        self.loop = libchirp.Loop()
        self.node = libchirp.asyncio.Chirp(self.loop, chirp_aio_config(free_port()), self.aloop)
        self.Message = libchirp.asyncio.Message

    def run(self, cmd: dict) -> dict:
        return self.aloop.run_until_complete(self._rt(cmd))

    async def _rt(self, cmd: dict) -> dict:
        node = self.node
        payload = os.urandom(cmd["size"])
        pending: collections.deque = collections.deque()

        def request(msg: Any) -> None:
            pending.append(node.request(msg))  # the reply is released when awaited

        for _ in range(cmd["window"]):
            m = self.Message()
            m.address, m.port, m.header, m.data = cmd["addr"], cmd["port"], b"P", payload
            request(m)

        async def take() -> list:
            return [await pending.popleft()]

        async def send(msgs: list) -> None:
            for m in msgs:  # the reply goes back to the echo as the next request
                request(m)

        return await _apingpong(take, send, cmd["window"], cmd["duration"], cmd["warmup"])

    def close(self) -> None:
        self.aloop.run_until_complete(self.node.astop())
        self.loop.stop()
        self.aloop.close()


def zmq_aio_server(args: argparse.Namespace) -> None:
    import asyncio

    import zmq
    import zmq.asyncio

    async def main() -> None:
        stop = stdin_closed()
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        port = sock.bind_to_random_port("tcp://%s" % args.bind)
        say("READY", router=port)
        while not stop.is_set():
            try:
                frames = await asyncio.wait_for(sock.recv_multipart(), 0.5)
            except asyncio.TimeoutError:
                continue
            await sock.send_multipart(frames)
        sock.close()
        ctx.term()

    asyncio.run(main())


class ZmqAioClient:
    def __init__(self) -> None:
        import asyncio

        import zmq
        import zmq.asyncio

        self.zmq = zmq
        self.aloop = asyncio.new_event_loop()
        self.ctx = zmq.asyncio.Context()
        self.socks: Dict[tuple, Any] = {}

    def run(self, cmd: dict) -> dict:
        key = (cmd["addr"], cmd["port"])
        if key not in self.socks:
            s = self.ctx.socket(self.zmq.DEALER)
            s.linger = 0
            s.connect("tcp://%s:%d" % key)
            self.socks[key] = s
        return self.aloop.run_until_complete(self._rt(self.socks[key], cmd))

    async def _rt(self, sock: Any, cmd: dict) -> dict:
        payload = os.urandom(cmd["size"])
        for _ in range(cmd["window"]):
            await sock.send(payload)

        async def take() -> list:
            return [await sock.recv()]

        async def send(frames: list) -> None:
            for f in frames:
                await sock.send(f)

        return await _apingpong(take, send, cmd["window"], cmd["duration"], cmd["warmup"])

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.ctx.term()
        self.aloop.close()


# ---------------------------------------------------------------------------------------------
# Shared measuring loop and the worker entry point
# ---------------------------------------------------------------------------------------------


def _pingpong(
    take: Callable[[], list],
    send: Callable[[list], Any],
    window: int,
    duration: float,
    warmup: float,
    usage: Optional[ClientUsage] = None,
) -> dict:
    """Echo every reply back until ``duration`` seconds after ``warmup``; then drain.

    ``window`` messages must already be in flight. Counts the replies received
    in the timed phase; returns ``{"rate": roundtrips/s, "count": n}``. With
    ``usage`` (1 in flight only) the timed phase begins after its ``U`` marker
    roundtrip, and ``cpu_s``/``ctx`` of this process over the timed phase are added.
    """
    if usage is not None and window != 1:
        raise ValueError("usage is measured with 1 in flight only")
    inflight = window
    timed = False
    mark = perf_counter() + warmup
    t0 = t1 = 0.0
    n = 0
    while inflight:
        msgs = take()
        if t1:  # draining
            inflight -= len(msgs)
            continue
        now = perf_counter()
        if timed:
            n += len(msgs)
        if now >= mark:
            if not timed:
                if usage is not None:
                    usage.begin()
                    now = perf_counter()
                timed, t0, mark = True, now, now + duration
            else:
                t1 = now
                if usage is not None:
                    usage.end()
                inflight -= len(msgs)
                continue
        send(msgs)
    result = {"rate": n / (t1 - t0), "count": n}
    if usage is not None:
        result.update(usage.report())
    return result


def _latency(roundtrip: Callable[[], Any], pause: float, duration: float, warmup: float) -> dict:
    """Roundtrips one at a time, sleeping ``pause`` s between a reply and the next request.

    ``roundtrip()`` sends one request and returns with its reply; its time is the
    latency. Over ``duration`` s after ``warmup`` s; returns ``p50``/``p99`` (µs),
    ``count`` and ``rate`` (roundtrips/s including the pauses).
    """
    sleep = time.sleep
    lat: List[float] = []
    timed = perf_counter() + warmup
    end = timed + duration
    while True:
        t = perf_counter()
        if t >= end:
            break
        roundtrip()
        if t >= timed:
            lat.append(perf_counter() - t)
        if pause:
            sleep(pause)
    if len(lat) < 2:
        raise RuntimeError("only %d roundtrips in %.2f s" % (len(lat), duration))
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {"p50": q[49] * 1e6, "p99": q[98] * 1e6, "count": len(lat), "rate": len(lat) / duration}


def client_main(args: argparse.Namespace) -> None:
    client: Any
    if args.aio:
        client = ChirpAioClient() if args.system == "chirp" else ZmqAioClient()
    elif args.system == "plain":
        client = PlainClient()
    else:
        client = ChirpClient(args.cert, args.dh) if args.system == "chirp" else ZmqClient(args)
    say("READY")
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            try:
                say("RESULT", **client.run(cmd))
            except Exception as exc:  # report, the driver decides
                say("ERROR", error="%s: %s" % (type(exc).__name__, exc))
    finally:
        client.close()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("role", choices=["server", "client"])
    ap.add_argument("--system", choices=["chirp", "zmq", "plain"], required=True)
    ap.add_argument("--bind", default="127.0.0.1", help="zmq/plain server: address to bind")
    ap.add_argument("--cert", help="chirp: certificate chain (TLS)")
    ap.add_argument("--dh", help="chirp: DH parameters (TLS)")
    ap.add_argument("--curve-public", help="zmq: own CURVE public key (z85)")
    ap.add_argument("--curve-secret", help="zmq: own CURVE secret key (z85)")
    ap.add_argument("--curve-server-public", help="zmq: the server's CURVE public key (z85)")
    ap.add_argument("--aio", action="store_true", help="run on asyncio (shape 8)")
    ap.add_argument("--uvloop", action="store_true", help="with --aio: on uvloop")
    args = ap.parse_args(argv)
    if args.aio and args.system == "plain":
        ap.error("--aio: chirp or zmq only")
    if args.uvloop:
        import uvloop

        uvloop.install()
    if args.role == "client":
        client_main(args)
    elif args.aio:
        (chirp_aio_server if args.system == "chirp" else zmq_aio_server)(args)
    elif args.system == "chirp":
        chirp_server(args)
    elif args.system == "plain":
        plain_server(args)
    else:
        zmq_server(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
