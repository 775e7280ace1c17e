"""Exceptions of libchirp and the one function that maps C error codes to them.

Theory of operation
-------------------
The C core reports every failure as a ``ch_error_t`` code (docs/protocol.md#errors) plus,
where it has something to say, a text taken from the failing connection or
node. :func:`chirp_error_to_exception` is the only place that turns such a pair
into a Python exception; every other module calls it.

Every exception class derives from :class:`ChirpError` (so ``except ChirpError``
catches anything the core reports) *and* from the builtin users already catch:
``ValueError``, ``ConnectionError``, ``TimeoutError``, ``MemoryError``, ``OSError``
or ``RuntimeError``. Each instance carries the numeric code in ``ecode``.

Deviations from libchirp 1.x (docs/protocol.md#compatibility-with-libchirp-1x): SHUTDOWN is a
``ConnectionError`` (1.x: plain ``Exception``), PROTOCOL_ERROR and TLS_ERROR are
both ``RuntimeError`` (as in 1.x) and ``ConnectionError``, and the text comes
from the failing connection instead of "the last error logged on the loop".

This module is pure Python and does not need the compiled core.
"""

from __future__ import annotations

import errno as _errno
from typing import Dict, Optional, Type

__all__ = [
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
    "ERROR_NAMES",
    "chirp_error_to_exception",
]

#: Code -> name, as in ``enum ch_error`` of csrc/chirp_ffi.h (docs/protocol.md#errors).
ERROR_NAMES: Dict[int, str] = {
    0: "SUCCESS",
    1: "VALUE_ERROR",
    2: "UV_ERROR",
    3: "PROTOCOL_ERROR",
    4: "EADDRINUSE",
    5: "FATAL",
    6: "TLS_ERROR",
    7: "NOT_INITIALIZED",
    8: "IN_PRORESS",  # sic, the 1.x spelling
    9: "TIMEOUT",
    10: "ENOMEM",
    11: "SHUTDOWN",
    12: "CANNOT_CONNECT",
    13: "QUEUED",
    14: "USED",
    15: "MORE",
    16: "BUSY",
    17: "EMPTY",
    18: "WRITE_ERROR",
    19: "INIT_FAIL",
    20: "SEND_QUEUE_FULL",
}


class ChirpError(Exception):
    """Base of every exception the chirp core reports; ``ecode`` is the C code."""

    ecode: Optional[int] = None


class ChirpValueError(ChirpError, ValueError):
    """VALUE_ERROR (1): a bad value, e.g. a configuration rejected at node start."""

    ecode = 1


class ChirpUVError(ChirpError, RuntimeError):
    """UV_ERROR (2): the event-loop library failed."""

    ecode = 2


class ChirpProtocolError(ChirpError, RuntimeError, ConnectionError):
    """PROTOCOL_ERROR (3): bad data from the peer, or the peer closed or died."""

    ecode = 3


class ChirpAddressInUseError(ChirpError, OSError):
    """EADDRINUSE (4): cannot bind or listen. ``errno`` is ``errno.EADDRINUSE``."""

    ecode = 4


class ChirpFatalError(ChirpError, RuntimeError):
    """FATAL (5): should not happen (no entropy, accept or socket option failure)."""

    ecode = 5


class ChirpTLSError(ChirpError, RuntimeError, ConnectionError):
    """TLS_ERROR (6): TLS setup or session error."""

    ecode = 6


class ChirpNotInitializedError(ChirpError):
    """NOT_INITIALIZED (7): object not initialized."""

    ecode = 7


class ChirpInProgressError(ChirpError):
    """IN_PRORESS (8): the action is already in progress."""

    ecode = 8


class ChirpTimeoutError(ChirpError, TimeoutError):
    """TIMEOUT (9): connect, send or request timeout."""

    ecode = 9


class ChirpMemoryError(ChirpError, MemoryError):
    """ENOMEM (10): out of memory, or a frame over MAX_MSG_SIZE."""

    ecode = 10


class ChirpSendQueueFull(ChirpMemoryError):
    """SEND_QUEUE_FULL (20): ``Config.MAX_SEND_QUEUE`` messages already wait for
    that peer, so this one was not queued (and will not be sent).

    The policy is to fail the send at once, never to block and never to drop a
    queued message; the sends already queued are unaffected. Retry when some of
    them completed. A ``MemoryError`` (as in earlier releases, which reported
    ENOMEM), so handlers written for the documented ``MemoryError`` keep working.
    """

    ecode = 20


class ChirpShutdown(ChirpError, ConnectionError):
    """SHUTDOWN (11): closed by garbage collection or by node stop."""

    ecode = 11


class ChirpCannotConnectError(ChirpError, ConnectionError):
    """CANNOT_CONNECT (12): connect refused or failed."""

    ecode = 12


class ChirpInternalError(ChirpError):
    """QUEUED, MORE, BUSY, EMPTY (13, 15-17): internal codes that should never surface."""


class ChirpUsedError(ChirpError):
    """USED (14): the message is already being sent."""

    ecode = 14


class ChirpWriteError(ChirpError, ConnectionError):
    """WRITE_ERROR (18): writing the chirp handshake failed."""

    ecode = 18


class ChirpInitFailError(ChirpError, RuntimeError):
    """INIT_FAIL (19): a resource could not be initialized."""

    ecode = 19


class ChirpConfigRangeError(ChirpValueError, OverflowError):
    """A ``Config`` value out of its range (docs/config.md, ``libchirp.config.LIMITS``).

    Both a ``ValueError`` and an ``OverflowError``: libchirp 1.x raised
    ``OverflowError`` when a value did not fit its C field, so handlers written
    for either keep working. The text names the field, the value and the limits.
    """

    ecode = 1


class ChirpMessageValueError(ValueError, AssertionError):
    """A value out of range assigned to a message attribute (``Message.port``).

    libchirp 1.x checked these with ``assert``; this class is both a
    ``ValueError`` and an ``AssertionError`` so old and new handlers work.
    """


class ChirpTypeError(TypeError, AssertionError):
    """A value of the wrong type was assigned to a message attribute.

    libchirp 1.x checked these with ``assert`` (AssertionError); this class is
    both a ``TypeError`` and an ``AssertionError`` so old and new handlers work.
    """


_CLASSES: Dict[int, Type[ChirpError]] = {
    1: ChirpValueError,
    2: ChirpUVError,
    3: ChirpProtocolError,
    4: ChirpAddressInUseError,
    5: ChirpFatalError,
    6: ChirpTLSError,
    7: ChirpNotInitializedError,
    8: ChirpInProgressError,
    9: ChirpTimeoutError,
    10: ChirpMemoryError,
    11: ChirpShutdown,
    12: ChirpCannotConnectError,
    13: ChirpInternalError,
    14: ChirpUsedError,
    15: ChirpInternalError,
    16: ChirpInternalError,
    17: ChirpInternalError,
    18: ChirpWriteError,
    19: ChirpInitFailError,
    20: ChirpSendQueueFull,
}


def error_text(code: int, text: Optional[str] = None) -> str:
    """The message for ``code``: ``text`` if given, else ``CH_<NAME>``, else "Unknown error"."""
    if text:
        return text
    name = ERROR_NAMES.get(code)
    if name is not None:
        return "CH_" + name
    return "Unknown error: %d" % code


def chirp_error_to_exception(code: int, text: Optional[str] = None) -> Optional[ChirpError]:
    """Map a C error code (and optional text) to an exception instance.

    Returns ``None`` for SUCCESS (0). ``code`` may have either sign: C functions
    return ``-CH_<NAME>``, events carry ``CH_<NAME>`` (csrc/error.h); the
    exception's ``ecode`` is the positive value. ``text`` may be ``str`` or
    ``bytes``; when it is empty the text is ``CH_<NAME>``, or ``Unknown error:
    <n>`` for codes that are not in docs/protocol.md#errors.
    """
    code = abs(int(code))
    if code == 0:
        return None
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "replace")
    message = error_text(code, text)
    cls = _CLASSES.get(code, ChirpError)
    exc: ChirpError
    if cls is ChirpAddressInUseError:
        exc = cls(_errno.EADDRINUSE, message)
    else:
        exc = cls(message)
    exc.ecode = code
    return exc
