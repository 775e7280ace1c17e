"""Node configuration (docs/config.md).

Theory of operation
-------------------
A :class:`Config` is a plain Python object with one attribute per field of the C
``ch_config_t`` (same names as libchirp 1.x) plus the Python-only
``AUTO_RELEASE``. :data:`LIMITS` is the one table of every field: its default,
its limits and what 0 means where 0 is special; docs/config.md and
``chirp --help`` show it. Values are checked in two stages:

* **When an attribute is set**, it is converted to its Python type and checked
  against the limits of :data:`LIMITS` (the same limits the C core applies at
  node start): ``TypeError`` for a wrong type; for a value out of range
  :class:`~libchirp.errors.ChirpConfigRangeError`, which is both a
  ``ValueError`` and an ``OverflowError`` (what libchirp 1.x raised); its text
  keeps the 1.x wording ("Config: port must be > 1024.") and adds the field, the
  value and the limits. A bad IP text or identity is a ``ValueError``. Unknown
  attribute names raise ``AttributeError`` so typos do not go unnoticed.
* **When a node starts**, the rules that involve several fields or files are
  checked (``Config._check_start``): TLS needs CERT_CHAIN_PEM, then
  DH_PARAMS_PEM, both readable files, unless DISABLE_ENCRYPTION; the effective
  reuse time max(REUSE_TIME, 3 x TIMEOUT) must be at least 0.5 s. Then the C
  function ``ch_config_check`` checks everything again (defence in depth).

A node seals the Config it starts with: setting an attribute afterwards raises
``RuntimeError``. Filling the C struct is done by ``libchirp._core.cconfig``; this module
is pure Python and does not need the compiled core.
"""

from __future__ import annotations

import math
import os
import socket
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

from .errors import ChirpConfigRangeError, ChirpValueError

__all__ = ["Config", "LIMITS", "Limit"]

_U32 = 0xFFFFFFFF


class Limit(NamedTuple):
    """One row of :data:`LIMITS`: a field's default, limits and meaning.

    ``low``/``high`` bound numeric fields (None: not numeric). ``zero`` says
    what 0 means when 0 is allowed besides ``low..high`` (None: it is not).
    ``too_low``/``too_high`` are the libchirp 1.x wording of the violated rule,
    kept as the start of error texts. ``text`` shows the limits to people.
    """

    default: Any
    low: Optional[float]
    high: Optional[float]
    zero: Optional[str]
    text: str
    meaning: str
    too_low: str = ""
    too_high: str = ""


#: Every field of a :class:`Config`, in C struct order: default and limits
#: (docs/config.md). The set-time checks, the node start and ``chirp --help``
#: all read this table.
LIMITS: Dict[str, Limit] = {
    "REUSE_TIME": Limit(
        30.0,
        0.0,
        3600.0,
        None,
        "0 to 3600 s; the effective max(REUSE_TIME, 3 x TIMEOUT) must be at least 0.5 s",
        "seconds an idle connection is kept (R = max(REUSE_TIME, 3 x TIMEOUT))",
        "reuse time must be >= 0",
        "reuse time must be <= 3600",
    ),
    "TIMEOUT": Limit(
        5.0,
        0.1,
        1200.0,
        None,
        "0.1 to 1200 s",
        "seconds per send and for request() answers; connecting may take min(2 x TIMEOUT, 60)",
        "timeout must be >= 0.1",
        "timeout must be <= 1200",
    ),
    "PORT": Limit(
        2998,
        1025,
        65535,
        "a free port picked by the system, which node.port reports",
        "1025 to 65535, or 0",
        "listening port (IPv4 and IPv6), announced to peers",
        "port must be > 1024",
        "port must be <= 65535",
    ),
    "BACKLOG": Limit(
        100,
        0,
        127,
        None,
        "0 to 127",
        "listen backlog",
        "backlog must be >= 0",
        "backlog must be < 128",
    ),
    "MAX_SLOTS": Limit(
        0,
        1,
        32,
        "the default: 1 in synchronous, 16 in asynchronous mode",
        "1 to 32, or 0",
        "unreleased received messages per connection",
        "max slots must be >= 0",
        "max slots must be <= 32",
    ),
    "SYNCHRONOUS": Limit(
        True,
        None,
        None,
        None,
        "True or False",
        "a send completes when the receiver released the message (else when written)",
    ),
    "DISABLE_SIGNALS": Limit(
        False, None, None, None, "True or False", "no effect (kept for libchirp 1.x)"
    ),
    "BUFFER_SIZE": Limit(
        0,
        1024,
        _U32,
        "the default, 65536",
        "1024 to 2^32 - 1, or 0",
        "socket read buffer in bytes",
        "buffer size must be >= 1024 or 0 for the default",
        "buffer size must be < 2^32",
    ),
    "MAX_MSG_SIZE": Limit(
        104857600,
        1,
        _U32,
        None,
        "1 to 2^32 - 1",
        "largest header + data accepted from a peer, in bytes",
        "max message size must be > 0",
        "max message size must be < 2^32",
    ),
    "BIND_V6": Limit("::", None, None, None, "an IPv6 address", "IPv6 listening address"),
    "BIND_V4": Limit("0.0.0.0", None, None, None, "an IPv4 address", "IPv4 listening address"),
    "IDENTITY": Limit(
        bytes(16),
        None,
        None,
        None,
        "exactly 16 bytes",
        "the node's identity; all zero means a random one",
    ),
    "CERT_CHAIN_PEM": Limit(
        None,
        None,
        None,
        None,
        "a readable file",
        "private key, node and CA certificate for TLS (chirp pki makes one)",
    ),
    "DH_PARAMS_PEM": Limit(
        None, None, None, None, "a readable file", "DH parameters (PKCS#3) for TLS"
    ),
    "DISABLE_ENCRYPTION": Limit(False, None, None, None, "True or False", "never use TLS"),
    "MAX_SEND_QUEUE": Limit(
        0,
        1,
        _U32,
        "no limit",
        "1 to 2^32 - 1, or 0",
        "messages waiting to be written per peer before send() fails at once",
        "max send queue must be >= 0",
        "max send queue must be < 2^32",
    ),
    "AUTO_RELEASE": Limit(
        True,
        None,
        None,
        None,
        "True or False",
        "the interface releases received messages itself (Python only)",
    ),
    "MAX_CONNECTIONS": Limit(
        0,
        1,
        1000000,
        "the file descriptor limit at start less a reserve (a quarter of it, at most 64)",
        "1 to 1,000,000, or 0",
        "open connections of the node, incoming and outgoing",
        "max connections must be >= 0",
        "max connections must be <= 1000000",
    ),
    "MAX_CONNECTIONS_PER_ADDRESS": Limit(
        0,
        1,
        1000000,
        "no limit of its own",
        "1 to MAX_CONNECTIONS, or 0",
        "open connections with one peer IP address",
        "max connections per address must be >= 0",
        "max connections per address must be <= 1000000",
    ),
}


def _range_error(name: str, value: Union[int, float], too_high: bool) -> ChirpConfigRangeError:
    lim = LIMITS[name]
    rule = lim.too_high if too_high else lim.too_low
    limits = lim.text if lim.zero is None else "%s = %s" % (lim.text, lim.zero)
    exc = ChirpConfigRangeError(
        "Config: %s. (Config.%s = %r; limits: %s)" % (rule, name, value, limits)
    )
    return exc


def _check_range(name: str, value: Union[int, float]) -> None:
    lim = LIMITS[name]
    if value == 0 and lim.zero is not None:
        return
    assert lim.low is not None and lim.high is not None
    if value < lim.low:
        raise _range_error(name, value, False)
    if value > lim.high:
        raise _range_error(name, value, True)


def _to_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("Config.%s must be a number, not %s" % (name, type(value).__name__))
    number = float(value)
    if math.isnan(number):
        raise ValueError("Config.%s must be a number (%r)" % (name, number))
    _check_range(name, number)
    return number


def _to_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("Config.%s must be an int, not %s" % (name, type(value).__name__))
    number = int(value)
    _check_range(name, number)
    return number


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
    identity = bytes(value)
    if len(identity) != 16:
        raise ValueError("Config.%s must be exactly 16 bytes (got %d)" % (name, len(identity)))
    return identity


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


#: Field name -> converter; the order and the defaults are those of LIMITS.
_CONVERTERS: Dict[str, Callable[[str, Any], Any]] = {
    "REUSE_TIME": _to_float,
    "TIMEOUT": _to_float,
    "PORT": _to_int,
    "BACKLOG": _to_int,
    "MAX_SLOTS": _to_int,
    "SYNCHRONOUS": _to_bool,
    "DISABLE_SIGNALS": _to_bool,
    "BUFFER_SIZE": _to_int,
    "MAX_MSG_SIZE": _to_int,
    "BIND_V6": _ip_converter(socket.AF_INET6),
    "BIND_V4": _ip_converter(socket.AF_INET),
    "IDENTITY": _to_identity,
    "CERT_CHAIN_PEM": _to_path,
    "DH_PARAMS_PEM": _to_path,
    "DISABLE_ENCRYPTION": _to_bool,
    "MAX_SEND_QUEUE": _to_int,
    "AUTO_RELEASE": _to_bool,
    "MAX_CONNECTIONS": _to_int,
    "MAX_CONNECTIONS_PER_ADDRESS": _to_int,
}

#: Field name -> (default, converter), in C struct order.
_FIELDS: Dict[str, Tuple[Any, Callable[[str, Any], Any]]] = {
    name: (lim.default, _CONVERTERS[name]) for name, lim in LIMITS.items()
}


class Config:
    """Configuration of a chirp node; :data:`LIMITS` and docs/config.md list every field.

    Fields (defaults): REUSE_TIME (30.0), TIMEOUT (5.0), PORT (2998), BACKLOG
    (100), MAX_SLOTS (0), SYNCHRONOUS (True), DISABLE_SIGNALS (False),
    BUFFER_SIZE (0), MAX_MSG_SIZE (100 MiB), BIND_V6 ("::"), BIND_V4
    ("0.0.0.0"), IDENTITY (16 zero bytes = random), CERT_CHAIN_PEM (None),
    DH_PARAMS_PEM (None), DISABLE_ENCRYPTION (False), MAX_SEND_QUEUE (0 =
    unbounded), AUTO_RELEASE (True), MAX_CONNECTIONS (0 = the file descriptor
    limit less a reserve), MAX_CONNECTIONS_PER_ADDRESS (0 = no limit of its own).

    MAX_SEND_QUEUE = N bounds the messages waiting to be written to one peer.
    Policy when full: the next ``send()``/``request()`` to that peer fails at
    once with :class:`~libchirp.errors.ChirpSendQueueFull` (a ``MemoryError``,
    code ENOMEM) naming the peer and the limit; it never blocks and never drops
    a queued message, which are all still sent. New sends are accepted again as
    soon as the queue has room (docs/config.md#bounded-send-queue).

    MAX_CONNECTIONS and MAX_CONNECTIONS_PER_ADDRESS bound the open connections
    (all of them, and the incoming ones from one IP address). When a new
    connection would exceed a limit the node first closes the connection idle
    the longest (no data frame for a second; NOOPs do not count), and refuses
    the new one if none is idle (docs/config.md#connection-limits).
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
    MAX_CONNECTIONS: int
    MAX_CONNECTIONS_PER_ADDRESS: int
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

    def _unseal(self) -> None:
        """Undo _seal() of a node that failed to start (the Config was not sealed before)."""
        object.__setattr__(self, "_sealed", False)

    def _seal(self) -> None:
        """Make the config read-only (called by a node at start)."""
        object.__setattr__(self, "_sealed", True)

    @property
    def sealed(self) -> bool:
        """True once a node used this config (it is read-only then)."""
        return self._sealed

    def _check_start(self) -> None:
        """The start-time rules that involve several fields or files (docs/config.md).

        Raises :class:`~libchirp.errors.ChirpValueError` naming the field: TLS
        needs a certificate first (CERT_CHAIN_PEM), then DH_PARAMS_PEM, both
        readable, unless DISABLE_ENCRYPTION; the effective reuse time
        max(REUSE_TIME, 3 x TIMEOUT) must be at least 0.5 s.
        """
        if not self.DISABLE_ENCRYPTION:
            hint = "(or set DISABLE_ENCRYPTION = True; `chirp pki` makes both files, docs/tls.md)"
            for name, what in (
                ("CERT_CHAIN_PEM", "a certificate chain (key, node and CA certificate)"),
                ("DH_PARAMS_PEM", "DH parameters"),
            ):
                path = getattr(self, name)
                if not path:
                    raise ChirpValueError(
                        "Config: %s must be set. A node uses TLS and needs %s in "
                        "Config.%s %s" % (name, what, name, hint)
                    )
                if not os.access(path, os.R_OK):
                    raise ChirpValueError(
                        "Config: %s %s does not exist or is not readable. (%s) %s"
                        % ("cert" if name == "CERT_CHAIN_PEM" else "DH params", path, name, hint)
                    )
        reuse = max(self.REUSE_TIME, 3 * self.TIMEOUT)
        if reuse < 0.5:
            raise ChirpConfigRangeError(
                "Config: reuse time must be >= 0.5. (Config.REUSE_TIME = %r, Config.TIMEOUT = %r: "
                "the effective max(REUSE_TIME, 3 x TIMEOUT) = %g must be at least 0.5 s)"
                % (self.REUSE_TIME, self.TIMEOUT, reuse)
            )

    def _asdict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    def __repr__(self) -> str:
        fields = ", ".join("%s=%r" % item for item in self._asdict().items())
        return "Config(%s)" % fields
