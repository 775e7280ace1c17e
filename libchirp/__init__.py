"""libchirp: message-passing between nodes over TCP/TLS, compatible with libchirp 1.x.

A small C core on libuv does all networking on a background thread; this
package drives it through CFFI (``libchirp._ffi``, wrapped by the package ``libchirp._core``).
Interfaces (each exports ``Chirp``, ``Config``, ``Loop`` and ``Message``):

* :mod:`libchirp.queue`: ``get()`` received messages (a ``queue.Queue``);
* :mod:`libchirp.pool`: override ``handler(msg)``, run on a thread pool;
* :mod:`libchirp.asyncio`: override ``async def handler(msg)``; awaitable
  ``send()``, ``request()`` and ``release_slot()``.

Every node offers ``statistics()`` (see :mod:`libchirp.stats`). See docs/protocol.md
for the wire protocol and docs/architecture.md for the threads.

Importing this package fails with ``ImportError`` if the compiled core is
missing or stale (rebuild with ``make build``).
"""

import logging as _logging

from .chirp import ChirpBase, ChirpFuture
from .config import Config
from .errors import (
    ChirpAddressInUseError,
    ChirpCannotConnectError,
    ChirpConfigRangeError,
    ChirpError,
    ChirpFatalError,
    ChirpInitFailError,
    ChirpInProgressError,
    ChirpInternalError,
    ChirpMemoryError,
    ChirpMessageValueError,
    ChirpNotInitializedError,
    ChirpProtocolError,
    ChirpSendQueueFull,
    ChirpShutdown,
    ChirpTimeoutError,
    ChirpTLSError,
    ChirpTypeError,
    ChirpUsedError,
    ChirpUVError,
    ChirpValueError,
    ChirpWriteError,
    chirp_error_to_exception,
)
from .loop import Loop
from .message import Message, MessageBase, MessageThread
from .stats import CounterStats, NodeStats, RemoteStats

__version__ = "2.0.0.dev0"

__all__ = [
    "__version__",
    "Config",
    "Loop",
    "ChirpBase",
    "ChirpFuture",
    "Message",
    "MessageBase",
    "MessageThread",
    "NodeStats",
    "RemoteStats",
    "CounterStats",
    "chirp_error_to_exception",
    "ChirpError",
    "ChirpValueError",
    "ChirpUVError",
    "ChirpProtocolError",
    "ChirpAddressInUseError",
    "ChirpFatalError",
    "ChirpTLSError",
    "ChirpNotInitializedError",
    "ChirpInProgressError",
    "ChirpTimeoutError",
    "ChirpMemoryError",
    "ChirpSendQueueFull",
    "ChirpConfigRangeError",
    "ChirpMessageValueError",
    "ChirpShutdown",
    "ChirpCannotConnectError",
    "ChirpInternalError",
    "ChirpUsedError",
    "ChirpWriteError",
    "ChirpInitFailError",
    "ChirpTypeError",
]

_logging.getLogger("libchirp").addHandler(_logging.NullHandler())
