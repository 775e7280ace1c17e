"""The public API as users write it, checked with ``mypy --strict`` (``make typecheck``).

Nothing here runs under pytest (the name does not start with ``test_``); the
functions are only type-checked. ``assert_type`` fails the check when an
expression's static type is not the documented one.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, List, Optional

import libchirp
import libchirp.asyncio
import libchirp.pool
import libchirp.queue
from libchirp import mp
from libchirp.config import LIMITS, Limit
from libchirp.stats import NodeStats

if TYPE_CHECKING:
    from typing_extensions import assert_type
else:

    def assert_type(value, _type):  # pragma: no cover - type checkers only
        return value


def config() -> libchirp.Config:
    cfg = libchirp.Config()
    cfg.PORT = 0
    cfg.TIMEOUT = 2.5
    cfg.SYNCHRONOUS = False
    cfg.MAX_SLOTS = 8
    cfg.DISABLE_ENCRYPTION = True
    assert_type(cfg.PORT, int)
    assert_type(cfg.TIMEOUT, float)
    assert_type(cfg.CERT_CHAIN_PEM, Optional[str])
    cfg.CERT_CHAIN_PEM = None
    assert_type(cfg.IDENTITY, bytes)
    return cfg


def limits_table() -> List[str]:
    rows: List[str] = []
    for name, lim in LIMITS.items():
        assert_type(lim, Limit)
        rows.append("%s: %s (default %r)" % (name, lim.text, lim.default))
    return rows


def message(port: int) -> libchirp.queue.Message:
    msg = libchirp.queue.Message()
    msg.address = "127.0.0.1"
    msg.port = port
    msg.header = b"kind"
    msg.data = b"payload"
    assert_type(msg.identity, bytes)
    assert_type(msg.has_slot, bool)
    return msg


def queue_interface() -> None:
    with libchirp.Loop() as loop, libchirp.queue.Chirp(loop, config()) as node:
        assert_type(loop, libchirp.Loop)
        assert_type(node, libchirp.queue.Chirp)
        assert_type(node.port, int)
        assert_type(node.identity(), bytes)
        sent = node.send(message(node.port))
        assert_type(sent, "Future[libchirp.queue.Message]")
        assert_type(sent.result(timeout=5), libchirp.queue.Message)
        futures = node.send_many([message(node.port), message(node.port)])
        assert_type(futures, "List[Future[libchirp.queue.Message]]")
        got = node.get(timeout=5)
        assert_type(got, libchirp.queue.Message)
        assert_type(got.data, bytes)
        got.data = b"answer"
        node.send(got).result(5)
        batch = node.get_many(16, timeout=5)
        assert_type(batch, List[libchirp.queue.Message])
        reply_future = node.request(message(node.port))
        reply = reply_future.result(timeout=5)
        assert_type(reply, libchirp.queue.Message)
        sent_request = reply_future.send_result(5)
        assert_type(sent_request, libchirp.queue.Message)
        released = got.release_slot()
        assert_type(released.result(), "Optional[tuple[bytes, int]]")
        stats = node.statistics()
        assert_type(stats, NodeStats)
        print(stats["remotes"], node.late_replies)


class Echo(libchirp.pool.Chirp):
    def handler(self, msg: libchirp.pool.Message) -> None:
        msg.data = msg.data.upper()
        self.send(msg).add_done_callback(lambda fut: print(fut.result().data))


def pool_interface() -> None:
    with libchirp.Loop() as loop, Echo(loop, config(), max_workers=2) as node:
        assert_type(node, Echo)


class AsyncEcho(libchirp.asyncio.Chirp):
    async def handler(self, msg: libchirp.asyncio.Message) -> None:
        msg.data = b"pong"
        sent = await self.send(msg)
        assert_type(sent, libchirp.asyncio.Message)


async def asyncio_interface(loop: libchirp.Loop) -> bytes:
    aloop = asyncio.get_running_loop()
    async with AsyncEcho(loop, config(), aloop) as node:
        assert_type(node, AsyncEcho)
        msg = libchirp.asyncio.Message()
        msg.address, msg.port = "::1", node.port
        fut = node.send(msg)
        assert_type(fut, "asyncio.Future[libchirp.asyncio.Message]")
        reply = await node.request(msg)
        assert_type(reply, libchirp.asyncio.Message)
        await reply.release_slot()
        stats = await node.statistics()
        assert_type(stats, NodeStats)
        return reply.data


def errors(fut: Future[libchirp.queue.Message]) -> str:
    try:
        fut.result(5)
    except libchirp.ChirpSendQueueFull as exc:
        return "retry later: %s" % exc
    except libchirp.ChirpError as exc:
        assert_type(exc.ecode, Optional[int])
        return "failed (%s): %s" % (exc.ecode, exc)
    except TimeoutError:
        return "timed out"
    return "ok"


def mp_interface() -> None:
    mp.CONFIG = config()
    mp.TIMEOUT = 60.0
    mp.ADDRESS = "127.0.0.1"
    q = mp.Queue(maxsize=10, mode="push", port=0, name="tasks")
    assert_type(q.address, "tuple[str, int]")
    q.put({"task": 1}, timeout=1.0)
    q.put_many(range(3))
    assert_type(q.get_many(10, timeout=1.0), List[Any])
    assert_type(q.qsize(), int)
    other = mp.attach("127.0.0.1", 7000, "tasks", config=config())
    assert_type(other, mp.Queue)
    simple = mp.SimpleQueue()
    assert_type(simple, mp.SimpleQueue)
    reader, writer = mp.Pipe(duplex=False)
    assert_type(reader, mp.Connection)
    writer.send_bytes(b"data", 1, 2)
    assert_type(reader.recv_bytes(), bytes)
    assert_type(reader.poll(0.5), bool)
    try:
        q.get_nowait()
    except mp.Empty:
        pass
    for c in (reader, writer, q, other, simple):
        c.close()
