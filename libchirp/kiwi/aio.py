"""The asyncio flavour of libchirp.kiwi (docs/kiwi.md)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Optional,
    Sequence,
    Tuple,
)

import kiwipy

from .communicator import ChirpCommunicator, _Deferred

__all__ = ["AsyncChirpCommunicator"]

# ---------------------------------------------------------------------------
# The asyncio flavour.
# ---------------------------------------------------------------------------


def _wrap(
    future: concurrent.futures.Future[Any], loop: asyncio.AbstractEventLoop
) -> asyncio.Future[Any]:
    """An asyncio future of ``loop`` following a kiwipy future (results that are futures too)."""
    out = loop.create_future()

    def copy(f: concurrent.futures.Future[Any]) -> None:
        if out.done():
            return
        if f.cancelled():
            out.cancel()
            return
        exc = f.exception()
        if exc is not None:
            out.set_exception(exc)
            return
        result = f.result()
        if isinstance(result, concurrent.futures.Future):
            result = _wrap(result, loop)
        out.set_result(result)

    future.add_done_callback(lambda f: loop.call_soon_threadsafe(copy, f))
    return out


class AsyncChirpCommunicator:
    """The coroutine flavour (kiwiPy's ``RmqCommunicator`` is the model).

    Methods are coroutines to be awaited on the asyncio loop that created the
    communicator; ``rpc_send`` and ``task_send`` return asyncio futures.
    Subscribers may be plain functions or coroutine functions (run on that
    loop). The mesh and its guarantees are those of :class:`ChirpCommunicator`,
    which does the work on its own threads.
    """

    def __init__(self, port: int = 0, peers: Iterable[Tuple[str, int]] = (), **kwargs: Any) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = asyncio.get_event_loop()
        self._comm = ChirpCommunicator(port, peers, **kwargs)
        self.port = self._comm.port

    @property
    def threaded(self) -> ChirpCommunicator:
        """The threaded communicator underneath."""
        return self._comm

    def is_closed(self) -> bool:
        return self._comm.is_closed()

    async def close(self) -> None:
        await self._loop.run_in_executor(None, self._comm.close)

    async def __aenter__(self) -> "AsyncChirpCommunicator":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _adapt(self, subscriber: Callable[..., Any]) -> Callable[..., Any]:
        if not _is_coroutine(subscriber):

            def plain(*args: Any, **kwargs: Any) -> Any:
                return asyncio.run_coroutine_threadsafe(
                    _call(subscriber, args, kwargs), self._loop
                ).result()

            return plain

        def coro(*args: Any, **kwargs: Any) -> Any:
            return _Deferred(
                asyncio.run_coroutine_threadsafe(subscriber(*args, **kwargs), self._loop)
            )

        return coro

    async def add_rpc_subscriber(
        self, subscriber: Callable[..., Any], identifier: Any = None
    ) -> Any:
        return self._comm.add_rpc_subscriber(self._adapt(subscriber), identifier)

    async def remove_rpc_subscriber(self, identifier: Any) -> None:
        self._comm.remove_rpc_subscriber(identifier)

    async def add_task_subscriber(
        self, subscriber: Callable[..., Any], identifier: Any = None
    ) -> Any:
        return self._comm.add_task_subscriber(self._adapt(subscriber), identifier)

    async def remove_task_subscriber(self, identifier: Any) -> None:
        self._comm.remove_task_subscriber(identifier)

    async def add_broadcast_subscriber(
        self, subscriber: Callable[..., Any], identifier: Any = None
    ) -> Any:
        if isinstance(subscriber, kiwipy.BroadcastFilter):
            # the filters stay visible to the mesh; what they pass runs on the loop
            adapted: Any = kiwipy.BroadcastFilter(self._adapt(subscriber._subscriber))
            adapted._subject_filters = subscriber._subject_filters
            adapted._sender_filters = subscriber._sender_filters
        else:
            adapted = self._adapt(subscriber)
        return self._comm.add_broadcast_subscriber(adapted, identifier)

    async def remove_broadcast_subscriber(self, identifier: Any) -> None:
        self._comm.remove_broadcast_subscriber(identifier)

    async def rpc_send(self, recipient_id: Any, msg: Any) -> asyncio.Future[Any]:
        return _wrap(self._comm.rpc_send(recipient_id, msg), self._loop)

    async def task_send(self, task: Any, no_reply: bool = False) -> Optional[asyncio.Future[Any]]:
        future = self._comm.task_send(task, no_reply)
        return None if future is None else _wrap(future, self._loop)

    async def broadcast_send(
        self, body: Any, sender: Any = None, subject: Any = None, correlation_id: Any = None
    ) -> bool:
        return self._comm.broadcast_send(body, sender, subject, correlation_id)


def _is_coroutine(func: Any) -> bool:
    call = type(func).__call__ if callable(func) else None
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(call)


async def _call(func: Callable[..., Any], args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
    return func(*args, **kwargs)
