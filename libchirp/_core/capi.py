"""The compiled core: ``libchirp._ffi`` imported and checked, and what every module uses of it.

The only module that imports ``libchirp._ffi``; the others take ``ffi``, ``lib``
and the C types and helpers below from here. Importing fails with a clear
message when the extension is missing or was built from other sources (the
version stamp, ``CH_VERSION_STAMP``).
"""

from __future__ import annotations

from typing import Any

try:
    from .._ffi import ffi, lib
except ImportError as _exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "libchirp: the compiled core libchirp._ffi cannot be imported (%s); "
        "build it with `make build`" % (_exc,)
    ) from _exc

#: The C API version this Python code was written against (CH_VERSION_STAMP).
_EXPECTED_STAMP = 10011

_stamp = lib.ch_version_stamp()
if _stamp != _EXPECTED_STAMP:  # pragma: no cover - depends on the build
    raise ImportError(
        "libchirp: the compiled core is stale (stamp %d, expected %d); rebuild with `make build`"
        % (_stamp, _EXPECTED_STAMP)
    )

_NULL = ffi.NULL
_cast = ffi.cast
_buffer = ffi.buffer
_string = ffi.string
_MSG_P = ffi.typeof("ch_message_t *")
_MSG_PP = ffi.typeof("ch_message_t **")
_CHAR_P = ffi.typeof("char *")


def _text(raw: Any) -> str:
    """A NUL-terminated C string (a ``char[]`` field of an event) as text."""
    return _string(raw).decode("utf-8", "replace")
