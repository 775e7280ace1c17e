"""The safe default codec of libchirp.kiwi (docs/kiwi.md, "Encoding")."""

from __future__ import annotations

import base64
import json
from typing import (
    Any,
    Dict,
)

__all__ = ["encode", "decode"]

# ---------------------------------------------------------------------------
# The safe codec: JSON plus tagged bytes, tuples, sets and non-string keys.
# ---------------------------------------------------------------------------

_TAG = "__chirp__"
_SCALARS = (str, int, float, bool, type(None))


def _pack(obj: Any) -> Any:
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, list):
        return [_pack(x) for x in obj]
    if isinstance(obj, dict):
        if all(type(k) is str for k in obj) and _TAG not in obj:
            return {k: _pack(v) for k, v in obj.items()}
        return {_TAG: "d", "v": [[_pack(k), _pack(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TAG: "t", "v": [_pack(x) for x in obj]}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {_TAG: "b", "v": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, (set, frozenset)):
        return {_TAG: "s", "v": [_pack(x) for x in obj]}
    raise TypeError(
        "libchirp.kiwi.encode cannot encode %s (allowed: None, bool, int, float, str, bytes, "
        "list, tuple, set, dict; pass encoder=/decoder= for more)" % type(obj).__name__
    )


def _hook(obj: Dict[str, Any]) -> Any:
    tag = obj.get(_TAG)
    if tag is None:
        return obj
    value = obj["v"]
    if tag == "b":
        return base64.b64decode(value)
    if tag == "t":
        return tuple(value)
    if tag == "s":
        return set(value)
    if tag == "d":
        return {_freeze(k): v for k, v in value}
    raise ValueError("unknown tag %r" % tag)


def _freeze(key: Any) -> Any:
    return tuple(_freeze(x) for x in key) if isinstance(key, list) else key


def encode(obj: Any) -> bytes:
    """Encode a message body (the default ``encoder``; the type set is in docs/kiwi.md)."""
    return json.dumps(_pack(obj), separators=(",", ":"), allow_nan=True).encode()


def decode(data: bytes) -> Any:
    """Decode what :func:`encode` made; never runs code from the message."""
    return json.loads(data, object_hook=_hook)
