"""Helpers shared by the asyncio tests (tests/test_asyncio.py, tests/test_asyncio_embed.py).

* ``CountingLoop`` / ``CountingUVLoop``: the default event loop and uvloop, counting
  their ``call_soon_threadsafe()`` calls (the hand-over of a thread to the loop).
* ``AioThread``: one of them running forever in a daemon thread; ``run(coro)``
  runs a coroutine on it with a bound.
* ``message()``, ``Inbox``: a message to a local port; a node that puts what its
  handler receives into a thread-safe queue and records where the handler ran.
"""

import asyncio
import concurrent.futures
import queue
import threading
import time

import pytest

import libchirp.asyncio

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in requirements-dev.txt
    uvloop = None

WAIT = 10.0
#: The event loop kinds every asyncio test runs on.
KINDS = ["default"] + (["uvloop"] if uvloop is not None else [])


class CountingLoop(asyncio.SelectorEventLoop):
    """The default event loop, counting call_soon_threadsafe() calls."""

    threadsafe_calls = 0

    def call_soon_threadsafe(self, *args, **kwargs):
        self.threadsafe_calls += 1
        return super().call_soon_threadsafe(*args, **kwargs)


if uvloop is not None:

    class CountingUVLoop(uvloop.Loop):
        """uvloop, counting call_soon_threadsafe() calls."""

        threadsafe_calls = 0

        def call_soon_threadsafe(self, *args, **kwargs):
            self.threadsafe_calls += 1
            return super().call_soon_threadsafe(*args, **kwargs)


class AioThread:
    """An asyncio loop running forever in a daemon thread."""

    def __init__(self, kind):
        self.kind = kind
        self.loop = CountingUVLoop() if kind == "uvloop" else CountingLoop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="aio", daemon=True)
        self.thread.start()

    def run(self, coro, limit=30.0, what="test coroutine"):
        cf = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return cf.result(limit)
        except concurrent.futures.TimeoutError:
            pytest.fail("%s did not finish within %.0f s" % (what, limit), pytrace=False)

    def stop(self):
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def close(self):
        self.stop()
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


def message(port, data=b"", cls=libchirp.asyncio.Message):
    msg = cls()
    msg.address = "127.0.0.1"
    msg.port = port
    msg.data = data
    return msg


class Inbox(libchirp.asyncio.Chirp):
    """Puts every received message (with the running loop) into a thread-safe queue."""

    def __init__(self, *args, **kwargs):
        self.inbox = queue.Queue()
        self.where = []  # (running asyncio loop, thread ident) per handler call
        super().__init__(*args, **kwargs)

    async def handler(self, msg):
        self.where.append((asyncio.get_running_loop(), threading.get_ident()))
        self.inbox.put(msg)

    async def next(self, limit=WAIT):
        deadline = time.monotonic() + limit
        while True:
            try:
                return self.inbox.get_nowait()
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise AssertionError("no message within %.0f s" % limit) from None
                await asyncio.sleep(0.01)
