"""Node configuration (docs/config.md).

Theory of operation
-------------------
A :class:`Config` is a plain Python object with one attribute per field of the C
``ch_config_t`` (same names as libchirp 1.x) plus the Python-only
``AUTO_RELEASE``. Values are checked in two stages:

* **When an attribute is set**, it is converted to its Python type and checked
  against the range of its C type: ``TypeError`` for a wrong type, ``ValueError``
  naming the field and the limit for an out-of-range value or a bad IP text.
  Unknown attribute names raise ``AttributeError`` so typos do not go unnoticed.
* **When a node starts**, the C function ``ch_config_check`` applies the
  semantic rules of docs/config.md (PORT > 1024, TIMEOUT in [0.1, 1200], ...)
  and the node raises ``ValueError`` with its text.

A node seals the Config it starts with: setting an attribute afterwards raises
``RuntimeError``. Filling the C struct is done by ``libchirp._core``; this module
is pure Python and does not need the compiled core.
"""

from __future__ import annotations

import math
import os
import socket
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["Config"]

_U8 = 0xFF
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF


def _to_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("Config.%s must be a number, not %s" % (name, type(value).__name__))
    value = float(value)
    if not math.isfinite(value):
        raise ValueError("Config.%s must be a finite number (%r)" % (name, value))
    return value


def _int_converter(limit: int) -> Callable[[str, Any], int]:
    def convert(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("Config.%s must be an int, not %s" % (name, type(value).__name__))
        if not 0 <= value <= limit:
            raise ValueError("Config.%s must be in 0..%d (%d)" % (name, limit, value))
        return int(value)

    return convert


def _to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise TypeError("Config.%s must be a bool, not %r" % (name, value))


def _ip_converter(family: int) -> Callable[[str, Any], str]:
    version = "IPv4" if family == socket.AF_INET else "IPv6"

    def convert(name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(
                "Config.%s must be an %s address string, not %s"
                % (name, version, type(value).__name__)
            )
        try:
            packed = socket.inet_pton(family, value)
        except (OSError, ValueError):
            raise ValueError(
                "Config.%s: %r is not an %s address" % (name, value, version)
            ) from None
        return socket.inet_ntop(family, packed)

    return convert


def _to_identity(name: str, value: Any) -> bytes:
    if isinstance(value, str) or not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError("Config.%s must be bytes, not %s" % (name, type(value).__name__))
    value = bytes(value)
    if len(value) != 16:
        raise ValueError("Config.%s must be exactly 16 bytes (got %d)" % (name, len(value)))
    return value


def _to_path(name: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, str):
        raise TypeError("Config.%s must be a path string, not %s" % (name, type(value).__name__))
    if "\0" in value:
        raise ValueError("Config.%s must not contain NUL characters" % name)
    return value


#: Field name -> (default, converter), in C struct order (docs/config.md).
_FIELDS: Dict[str, Tuple[Any, Callable[[str, Any], Any]]] = {
    "REUSE_TIME": (30.0, _to_float),
    "TIMEOUT": (5.0, _to_float),
    "PORT": (2998, _int_converter(_U16)),
    "BACKLOG": (100, _int_converter(_U8)),
    "MAX_SLOTS": (0, _int_converter(_U8)),
    "SYNCHRONOUS": (True, _to_bool),
    "DISABLE_SIGNALS": (False, _to_bool),
    "BUFFER_SIZE": (0, _int_converter(_U32)),
    "MAX_MSG_SIZE": (104857600, _int_converter(_U32)),
    "BIND_V6": ("::", _ip_converter(socket.AF_INET6)),
    "BIND_V4": ("0.0.0.0", _ip_converter(socket.AF_INET)),
    "IDENTITY": (bytes(16), _to_identity),
    "CERT_CHAIN_PEM": (None, _to_path),
    "DH_PARAMS_PEM": (None, _to_path),
    "DISABLE_ENCRYPTION": (False, _to_bool),
    "MAX_SEND_QUEUE": (0, _int_converter(_U32)),
    "AUTO_RELEASE": (True, _to_bool),
}


class Config:
    """Configuration of a chirp node; see docs/config.md for every field.

    Fields (defaults): REUSE_TIME (30.0), TIMEOUT (5.0), PORT (2998), BACKLOG
    (100), MAX_SLOTS (0), SYNCHRONOUS (True), DISABLE_SIGNALS (False),
    BUFFER_SIZE (0), MAX_MSG_SIZE (100 MiB), BIND_V6 ("::"), BIND_V4
    ("0.0.0.0"), IDENTITY (16 zero bytes = random), CERT_CHAIN_PEM (None),
    DH_PARAMS_PEM (None), DISABLE_ENCRYPTION (False), MAX_SEND_QUEUE (0 =
    unbounded), AUTO_RELEASE (True).

    MAX_SEND_QUEUE = N bounds the messages waiting to be written to one peer.
    Policy when full: the next ``send()``/``request()`` to that peer fails at
    once with :class:`~libchirp.errors.ChirpSendQueueFull` (a ``MemoryError``,
    code ENOMEM) naming the peer and the limit; it never blocks and never drops
    a queued message, which are all still sent. New sends are accepted again as
    soon as the queue has room (docs/config.md#bounded-send-queue).
    """

    __slots__ = tuple(_FIELDS) + ("_sealed",)

    REUSE_TIME: float
    TIMEOUT: float
    PORT: int
    BACKLOG: int
    MAX_SLOTS: int
    SYNCHRONOUS: bool
    DISABLE_SIGNALS: bool
    BUFFER_SIZE: int
    MAX_MSG_SIZE: int
    BIND_V6: str
    BIND_V4: str
    IDENTITY: bytes
    CERT_CHAIN_PEM: Optional[str]
    DH_PARAMS_PEM: Optional[str]
    DISABLE_ENCRYPTION: bool
    MAX_SEND_QUEUE: int
    AUTO_RELEASE: bool
    _sealed: bool

    def __init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "_sealed", False)
        for name, (default, _) in _FIELDS.items():
            set_(self, name, default)

    def __setattr__(self, name: str, value: Any) -> None:
        field = _FIELDS.get(name)
        if field is None:
            raise AttributeError("Config has no field %r" % name)
        if self._sealed:
            raise RuntimeError("Config is read-only once a node uses it (tried to set %s)" % name)
        object.__setattr__(self, name, field[1](name, value))

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Config fields cannot be deleted (%s)" % name)

    def _seal(self) -> None:
        """Make the config read-only (called by a node at start)."""
        object.__setattr__(self, "_sealed", True)

    @property
    def sealed(self) -> bool:
        """True once a node used this config (it is read-only then)."""
        return self._sealed

    def _asdict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    def __repr__(self) -> str:
        fields = ", ".join("%s=%r" % item for item in self._asdict().items())
        return "Config(%s)" % fields
