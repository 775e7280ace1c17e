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
* ``pybench.py client --system chirp|zmq``: reads commands
  (``{"op": "rt", ...}`` roundtrips for a fixed time with a window in flight,
  ``{"op": "stream", ...}`` a one-way stream of a fixed count) and prints
  ``RESULT {...}``.

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
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

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


def chirp_serve(node, stop: threading.Event) -> None:
    """Server loop of one node: echo P, drop W, count S, report at E."""
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
        if echo:
            chirp_send_all(node, echo)


def chirp_roundtrips(
    node, addr: str, port: int, window: int, size: int, duration: float, warmup: float
) -> dict:
    """``window`` messages ping-pong with the echo server; roundtrips/s over ``duration``."""
    payload = os.urandom(size)
    chirp_send_all(node, [chirp_message(addr, port, b"P", payload) for _ in range(window)])
    return _pingpong(
        lambda: chirp_take(node, window, LIMIT),
        lambda msgs: chirp_send_all(node, msgs),
        window,
        duration,
        warmup,
    )


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
                cmd["size"], cmd["duration"], cmd["warmup"],
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
    threads = [threading.Thread(target=chirp_serve, args=(n, stop)) for n in nodes.values()]
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


def zmq_echo(sock, stop: threading.Event, copy: bool) -> None:
    """ROUTER echo: every [identity, payload] goes back as it came."""
    import zmq

    while not stop.is_set():
        try:
            frames = sock.recv_multipart(copy=copy)
        except zmq.Again:
            continue
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
    threads = [
        threading.Thread(target=zmq_echo, args=(socks["router"], stop, True)),
        threading.Thread(target=zmq_echo, args=(socks["router_big"], stop, False)),
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


def zmq_roundtrips(sock, window: int, size: int, duration: float, warmup: float) -> dict:
    """DEALER side: ``window`` frames ping-pong with the ROUTER echo."""
    copy = size < ZMQ_NOCOPY_SIZE
    payload = os.urandom(size)
    for _ in range(window):
        sock.send(payload, copy=copy)

    def take() -> list:
        return [sock.recv(copy=copy)]

    def send(frames: list) -> None:
        for f in frames:
            sock.send(f, copy=copy)

    return _pingpong(take, send, window, duration, warmup)


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
            return zmq_roundtrips(s, cmd["window"], cmd["size"], cmd["duration"], cmd["warmup"])
        s = self.sock(zmq.PUSH, cmd["addr"], cmd["port"])
        return zmq_stream(s, cmd["count"], cmd["size"], cmd["warm"])

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.ctx.term()


# ---------------------------------------------------------------------------------------------
# Shared measuring loop and the worker entry point
# ---------------------------------------------------------------------------------------------


def _pingpong(
    take: Callable[[], list],
    send: Callable[[list], Any],
    window: int,
    duration: float,
    warmup: float,
) -> dict:
    """Echo every reply back until ``duration`` seconds after ``warmup``; then drain.

    ``window`` messages must already be in flight. Counts the replies received
    in the timed phase; returns ``{"rate": roundtrips/s, "count": n}``.
    """
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
                timed, t0, mark = True, now, now + duration
            else:
                t1 = now
                inflight -= len(msgs)
                continue
        send(msgs)
    return {"rate": n / (t1 - t0), "count": n}


def client_main(args: argparse.Namespace) -> None:
    client: Any = ChirpClient(args.cert, args.dh) if args.system == "chirp" else ZmqClient(args)
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
    ap.add_argument("--system", choices=["chirp", "zmq"], required=True)
    ap.add_argument("--bind", default="127.0.0.1", help="zmq server: address to bind")
    ap.add_argument("--cert", help="chirp: certificate chain (TLS)")
    ap.add_argument("--dh", help="chirp: DH parameters (TLS)")
    ap.add_argument("--curve-public", help="zmq: own CURVE public key (z85)")
    ap.add_argument("--curve-secret", help="zmq: own CURVE secret key (z85)")
    ap.add_argument("--curve-server-public", help="zmq: the server's CURVE public key (z85)")
    args = ap.parse_args(argv)
    if args.role == "client":
        client_main(args)
    elif args.system == "chirp":
        chirp_server(args)
    else:
        zmq_server(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
