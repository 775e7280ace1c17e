"""The public objects: Queue, SimpleQueue, attach, Connection and Pipe.

Part of :mod:`libchirp.mp` (its docstring has the overview; docs/mp.md the
interface). A handle is only a description of its boxes (:class:`_Spec`: box
ids, the host's advertised address and port, the mode, the TLS setting), and
that is all pickling it carries (:func:`_rebuild`). Which endpoint
(:mod:`.client`) a handle uses is decided on use, by comparing the process
id (``runtime.PID``, which the fork hook of :mod:`.runtime` keeps up to date:
``os.getpid()`` is a system call): in the process that created it, the box
is local; a handle inherited through fork notices the new pid and becomes a
client, as does an unpickled one. Items are pickled here and unpickled here, by the consumer.
"""

from __future__ import annotations

import pickle
from typing import Any, Dict, Iterable, List, Optional, Tuple, Type, TypedDict, TypeVar, Union

from .. import mp  # the settings (mp.ADDRESS, mp.CONFIG) are read from the package at use
from ..config import Config
from . import runtime as _rt
from .client import _Local, _Remote
from .host import _Host
from .runtime import _graveyard, _host, _runtime
from .wire import _TLS, PUT_LIMIT, SLACK, _name_qid, _tls_of


class _Spec(TypedDict):
    """What a handle is, and all that pickling it carries."""

    #: box ids: [the queue's] or [receiving, sending] for a Connection (0: none).
    qids: List[int]
    address: str
    port: int
    tls: _TLS
    mode: str
    maxsize: int


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


#: How a handle reaches one of its boxes.
_Endpoint = Union["_Local", "_Remote"]


class _Handle:
    """What queues and connections share: where the host is, and the pid check."""

    _spec: _Spec

    def _setup(self, spec: _Spec, host: Optional[_Host]) -> None:
        self._spec = spec
        self._pid = _rt.PID
        self._host_obj = host
        self._eps: Dict[int, _Endpoint] = {}
        self._closed = False

    def _ep(self, qid: int) -> _Endpoint:
        if self._pid != _rt.PID:  # inherited through fork: become a client
            _graveyard.append(self.__dict__.copy())
            self._pid = _rt.PID
            self._host_obj = None
            self._eps = {}
        ep = self._eps.get(qid)
        if ep is None:
            if self._closed:
                raise ValueError("%s is closed" % type(self).__name__)
            spec = self._spec
            if self._host_obj is not None:
                ep = _Local(self._host_obj, qid)
            else:
                rt = _runtime(_tls_of(mp.CONFIG) if mp.CONFIG is not None else spec["tls"])
                ep = _Remote(rt, (spec["address"], spec["port"]), qid, spec["mode"] == "push")
            self._eps[qid] = ep
        return ep

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return (_rebuild, (type(self), self._spec))

    def __getstate__(self) -> _Spec:
        return self._spec


_H = TypeVar("_H", bound=_Handle)


def _new_handle(cls: Type[_H], spec: _Spec, host: Optional[_Host]) -> _H:
    obj = cls.__new__(cls)
    obj._setup(spec, host)
    return obj


def _rebuild(cls: Type[_H], spec: _Spec) -> _H:
    """Unpickle (or copy) a handle; it reaches its box as a client, in any process."""
    return _new_handle(cls, spec.copy(), None)


def _make_spec(
    qids: List[int], address: str, port: int, tls: _TLS, mode: str, maxsize: int
) -> _Spec:
    return _Spec(
        qids=qids,
        address=address,
        port=port,
        tls=tls,
        mode=_check_mode(mode),
        maxsize=maxsize,
    )


def _check_mode(mode: str) -> str:
    if mode not in ("pull", "push"):
        raise ValueError("mode must be 'pull' or 'push', not %r" % (mode,))
    return mode


class Queue(_Handle):
    """A queue hosted by the creating process, usable from any process that can reach it.

    ``maxsize`` bounds the items in the queue (0: no bound). ``mode="pull"``:
    a consumer gets an item only when it asks; ``mode="push"``: the host sends
    items to consumers ahead of demand. ``address`` is what other processes
    connect to (default ``mp.ADDRESS``); ``config`` supplies the TLS files
    (default ``mp.CONFIG``). ``port`` fixes the port of the hosting node (0:
    a free one) and ``name`` makes the queue reachable with :func:`attach`
    from processes that were not handed it. See docs/mp.md.
    """

    def __init__(
        self,
        maxsize: int = 0,
        mode: str = "pull",
        *,
        address: Optional[str] = None,
        config: Optional[Config] = None,
        port: int = 0,
        name: Optional[str] = None,
    ) -> None:
        if maxsize < 0:
            maxsize = 0
        host = _host(_tls_of(config), port)
        qid = host.new_box(maxsize, _name_qid(name) if name else 0)
        spec = _make_spec([qid], address or mp.ADDRESS, host.port, host.tls, mode, maxsize)
        self._setup(spec, host)

    @property
    def _qid(self) -> int:
        return self._spec["qids"][0]

    @property
    def address(self) -> Tuple[str, int]:
        """The host's advertised address and port."""
        return self._spec["address"], self._spec["port"]

    def _limit(self) -> int:
        m = self._spec["maxsize"]
        return min(PUT_LIMIT, m) if m else PUT_LIMIT

    def put(self, obj: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Put ``obj`` (pickled) into the queue; ``queue.Full`` as ``multiprocessing``.

        In another process than the host, the item is sent in the background;
        :meth:`join_thread` (also run at :meth:`close` and at exit) waits until
        the host confirmed every item, and a failure is raised by the next call.
        """
        if self._closed:
            raise ValueError("Queue is closed")
        ep = self._ep(self._spec["qids"][0])
        data = _dumps(obj)
        if isinstance(ep, _Remote):
            ep.put(data, block, timeout, self._limit())
        else:
            ep.put(data, block, timeout)

    def put_nowait(self, obj: Any) -> None:
        self.put(obj, False)

    def put_many(self, objs: Iterable[Any]) -> None:
        """Put several objects (blocking while the queue is full); in the hosting
        process they enter the queue at once."""
        self._check_open()
        ep = self._ep(self._qid)
        if isinstance(ep, _Local):
            ep.put_many([_dumps(o) for o in objs])
            return
        for obj in objs:
            self.put(obj)

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """Remove and return an item; ``queue.Empty`` when none comes in time."""
        if self._closed:
            raise ValueError("Queue is closed")
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        return pickle.loads(self._ep(self._spec["qids"][0]).get(1, block, timeout)[0])

    def get_nowait(self) -> Any:
        return self.get(False)

    def get_many(
        self, max_count: int = 1024, block: bool = True, timeout: Optional[float] = None
    ) -> List[Any]:
        """Remove and return up to ``max_count`` items, at least one (waits like get())."""
        self._check_open()
        if max_count < 1:
            raise ValueError("max_count must be at least 1")
        return [pickle.loads(b) for b in self._ep(self._qid).get(max_count, block, timeout)]

    def qsize(self) -> int:
        """Items in the host's queue (not counting items on their way)."""
        return self._ep(self._qid).size()[0]

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        m = self._spec["maxsize"]
        return bool(m) and self.qsize() >= m

    def join_thread(self, timeout: Optional[float] = None) -> None:
        """Wait until the host confirmed every item this process put (raises a failure)."""
        ep = self._eps.get(self._qid)
        if ep is not None and self._pid == _rt.PID:
            ep.flush(timeout)

    def cancel_join_thread(self) -> None:
        """Do not wait at close or exit for the host to confirm this process's puts
        (unconfirmed items may then be lost, as with ``multiprocessing``)."""
        if self._pid == _rt.PID:
            ep = self._ep(self._qid)
            if isinstance(ep, _Remote):
                ep.no_flush = True

    def close(self) -> None:
        """This process will use the queue no more: flush puts, give back unread items."""
        if self._closed:
            return
        try:
            for ep in self._eps.values():
                if self._pid == _rt.PID:
                    ep.close()
        finally:
            self._closed = True
            self._eps = {}

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("Queue is closed")

    def __repr__(self) -> str:
        s = self._spec
        return "<libchirp.mp.%s %s:%d %s>" % (
            type(self).__name__,
            s["address"],
            s["port"],
            s["mode"],
        )


def attach(
    address: str,
    port: int,
    name: str,
    *,
    mode: str = "pull",
    maxsize: int = 0,
    config: Optional[Config] = None,
    simple: bool = False,
) -> Queue:
    """A handle of the queue called ``name`` hosted at ``address``:``port``.

    For processes that were not handed the queue (for example on another
    machine, started on their own). ``maxsize`` only bounds this handle's
    unconfirmed puts; the host enforces its own. ``config`` supplies the TLS
    files (default ``mp.CONFIG``).
    """
    cls = SimpleQueue if simple else Queue
    spec = _make_spec([_name_qid(name)], address, int(port), _tls_of(config), mode, maxsize)
    return _new_handle(cls, spec, None)


class SimpleQueue(Queue):
    """An unbounded queue (``multiprocessing.SimpleQueue``'s interface)."""

    def __init__(
        self,
        mode: str = "pull",
        *,
        address: Optional[str] = None,
        config: Optional[Config] = None,
        port: int = 0,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(0, mode, address=address, config=config, port=port, name=name)


class Connection(_Handle):
    """One end of a :func:`Pipe` (``multiprocessing.connection.Connection``'s interface)."""

    @property
    def _rq(self) -> int:
        return self._spec["qids"][0]

    @property
    def _sq(self) -> int:
        return self._spec["qids"][1]

    @property
    def readable(self) -> bool:
        return bool(self._rq)

    @property
    def writable(self) -> bool:
        return bool(self._sq)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check(self, readable: bool) -> None:
        if self._closed:
            raise OSError("handle is closed")
        if readable and not self._rq:
            raise OSError("connection is write-only")
        if not readable and not self._sq:
            raise OSError("connection is read-only")

    def send_bytes(self, buf: Any, offset: int = 0, size: Optional[int] = None) -> None:
        """Send a bytes-like object (or a part of it)."""
        self._check(False)
        m = memoryview(buf).cast("B")
        if offset < 0 or offset > len(m):
            raise ValueError("offset out of range")
        if size is None:
            size = len(m) - offset
        if size < 0 or offset + size > len(m):
            raise ValueError("size out of range")
        self._put(bytes(m[offset : offset + size]))

    def send(self, obj: Any) -> None:
        """Send a picklable object."""
        self._check(False)
        self._put(_dumps(obj))

    def _put(self, data: bytes) -> None:
        ep = self._ep(self._sq)
        if isinstance(ep, _Remote):
            if self._rq:
                # a reader that pulls (no lease, see _Remote._open_pipe): the
                # request for the next item goes first, the host has it when the
                # other end answers this send
                reader = self._eps.get(self._rq)
                if isinstance(reader, _Remote) and reader.want_ahead:
                    reader.ask_ahead()
            ep.put(data, True, None, PUT_LIMIT)
        else:
            ep.put(data, True, None)

    def _reader(self) -> _Endpoint:
        ep = self._ep(self._rq)
        if isinstance(ep, _Remote):
            ep.read_ahead = True
        return ep

    def recv_bytes(self, maxlength: Optional[int] = None) -> bytes:
        """Receive the bytes of one send; ``EOFError`` once the other end closed."""
        self._check(True)
        data = self._reader().get(1, True, None)[0]
        if maxlength is not None and len(data) > maxlength:
            raise OSError("bad message length")
        return data if type(data) is bytes else bytes(data)

    def recv(self) -> Any:
        """Receive one object; ``EOFError`` once the other end closed and all was read."""
        self._check(True)
        return pickle.loads(self._reader().get(1, True, None)[0])

    def poll(self, timeout: Optional[float] = 0.0) -> bool:
        """Whether there is something to receive (or end of file), waiting up to ``timeout``."""
        self._check(True)
        return self._reader().poll(timeout)

    def close(self) -> None:
        """Close this end: the other end's recv raises ``EOFError`` after the rest."""
        if self._closed:
            return
        try:
            if self._pid == _rt.PID and self._sq:
                ep = self._ep(self._sq)
                ep.flush(SLACK)
                ep.close_writer()
            for ep in self._eps.values():
                if self._pid == _rt.PID:
                    ep.close()
        finally:
            self._closed = True
            self._eps = {}

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self._spec
        return "<libchirp.mp.Connection %s:%d>" % (s["address"], s["port"])


def Pipe(
    duplex: bool = True, *, address: Optional[str] = None, config: Optional[Config] = None
) -> Tuple[Connection, Connection]:
    """Two connected :class:`Connection` objects, hosted by this process.

    ``duplex=False`` gives ``(reader, writer)`` as ``multiprocessing.Pipe``.
    """
    host = _host(_tls_of(config))
    a = host.new_box(0)
    b = host.new_box(0) if duplex else 0

    def end(rq: int, sq: int) -> Connection:
        spec = _make_spec([rq, sq], address or mp.ADDRESS, host.port, host.tls, "pull", 0)
        return _new_handle(Connection, spec, host)

    if duplex:
        return end(a, b), end(b, a)
    return end(a, 0), end(0, a)
