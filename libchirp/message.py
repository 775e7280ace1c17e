"""Chirp messages (docs/interfaces.md#common-to-all-interfaces).

Theory of operation
-------------------
A message is a plain Python object: identity, serial, header and data bytes,
the peer's address and port, and the peer's identity. A *new* message gets a
random identity from the operating system's CSPRNG (``os.urandom``, read 4 KiB
at a time and cut into identities, since one system call per message is a
measurable share of a stream's cost; a forked child starts a fresh pool), serial 0,
empty header/data, address ``0.0.0.0``, port 0 and an all-zero remote identity.
Its address counts as *unset*: sending it raises ``ValueError`` until
``address`` is assigned (libchirp 1.x sent it to 0.0.0.0, i.e. the local
machine).

A *received* message is built by the node, on the thread handling the loop's
events, from the C
record (header and data are copied into ``bytes``). It keeps the C pointer in
``_c`` and the receiving node's internal state in ``_node`` while it occupies a
slot (``has_slot``). ``release_slot()`` hands the pointer back to the node, which
submits the release to the core and drops the pointer at once, so the
C record is never touched after its release was submitted. Release is
thread-safe: the node's lock guards the hand-over, so a double release gets a
``None`` future for the second call.

Sending hands ``header`` and ``data`` to the core without copying; they are
``bytes`` (immutable), kept alive by the node until the send completed. A message
that is being sent cannot be sent again or released (``RuntimeError``).

The IP address is validated and packed when it is set (``socket.inet_pton``) so
that sending needs no parsing; received messages come with their sender's
address packed (remembered per address by the node), or pack it lazily, only
when they are sent back. Parsed addresses are remembered (a small bounded
table), since a program usually talks to a handful of peers.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .errors import ChirpMessageValueError, ChirpTypeError

if TYPE_CHECKING:  # pragma: no cover
    from ._core import NodeCore

__all__ = ["MessageBase", "MessageThread", "Message"]

_MAX_HEADER = 0xFFFF
_MAX_DATA = 0xFFFFFFFF
_ZERO_ID = bytes(16)
#: ``_family`` of a new message whose address was never set.
_UNSET = -1


def _as_bytes(name: str, value: Any, limit: int) -> bytes:
    if type(value) is not bytes:
        if isinstance(value, str):
            raise ChirpTypeError("Message.%s must be bytes, not str" % name)
        try:
            value = bytes(memoryview(value))
        except TypeError:
            raise ChirpTypeError(
                "Message.%s must be bytes, not %s" % (name, type(value).__name__)
            ) from None
    if len(value) > limit:
        raise ValueError("Message.%s is too long (%d bytes, limit %d)" % (name, len(value), limit))
    result: bytes = value
    return result


#: Identities not handed out yet (list.pop() is atomic, so threads need no lock).
_id_pool: List[bytes] = []
_ID_CHUNK = 4096


def _new_identity() -> bytes:
    """16 random bytes from the pool, refilled from os.urandom() when empty."""
    try:
        return _id_pool.pop()
    except IndexError:
        raw = os.urandom(_ID_CHUNK)
        _id_pool.extend([raw[i : i + 16] for i in range(16, _ID_CHUNK, 16)])
        return raw[:16]


if hasattr(os, "register_at_fork"):  # a child must never reuse its parent's identities
    os.register_at_fork(after_in_child=_id_pool.clear)

#: Parsed addresses: text -> (family, packed, compressed text); bounded.
_addresses: Dict[str, Tuple[int, bytes, str]] = {}
_ADDRESS_MEMORY = 1024


def _parse_address(value: str) -> Tuple[int, bytes, str]:
    """(family, packed, compressed text) of an IP literal, or ValueError."""
    known = _addresses.get(value)
    if known is not None:
        return known
    family, packed = _pack_address(value)
    text = socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, packed)
    if len(_addresses) >= _ADDRESS_MEMORY:
        _addresses.clear()
    _addresses[value] = known = (family, packed, text)
    return known


def _pack_address(value: str) -> Tuple[int, bytes]:
    """Return (family 4 or 6, packed address) or raise ValueError."""
    try:
        return 4, socket.inet_pton(socket.AF_INET, value)
    except (OSError, ValueError):
        pass
    try:
        return 6, socket.inet_pton(socket.AF_INET6, value)
    except (OSError, ValueError):
        raise ValueError("Message.address: %r is not an IPv4 or IPv6 address" % (value,)) from None


class MessageBase:
    """A chirp message; see the module documentation.

    Attributes: ``identity`` (bytes(16), read-only), ``serial`` (int, read-only),
    ``header`` and ``data`` (bytes), ``address`` (IP text), ``port`` (int),
    ``remote_identity`` (bytes(16), read-only), ``has_slot`` (bool, read-only).
    """

    __slots__ = (
        "_identity",
        "_serial",
        "_header",
        "_data",
        "_address",
        "_family",
        "_packed",
        "_port",
        "_remote_identity",
        "_c",
        "_node",
        "_sending",
        "__weakref__",
    )

    def __init__(self) -> None:
        try:
            identity = _id_pool.pop()
        except IndexError:
            identity = _new_identity()
        self._identity: bytes = identity
        self._serial: int = 0
        self._header: bytes = b""
        self._data: bytes = b""
        self._address: str = "0.0.0.0"
        self._family: int = _UNSET
        self._packed: Optional[bytes] = None
        self._port: int = 0
        self._remote_identity: bytes = _ZERO_ID
        self._c: Any = None
        self._node: Optional[NodeCore] = None
        self._sending: bool = False

    @classmethod
    def _received(
        cls,
        identity: bytes,
        serial: int,
        header: bytes,
        data: bytes,
        address: str,
        port: int,
        remote_identity: bytes,
        cmsg: Any,
        node: NodeCore,
    ) -> MessageBase:
        """Build a received message (dispatcher thread); no validation, no urandom.

        ``Receives.on_recvs`` (libchirp/_core/receives.py) does the same inline
        for a batch: a new slot must be set there too.
        """
        self = cls.__new__(cls)
        self._identity = identity
        self._serial = serial
        self._header = header
        self._data = data
        self._address = address
        self._family = 0
        self._packed = None  # packed on demand (when sent back)
        self._port = port
        self._remote_identity = remote_identity
        self._c = cmsg
        self._node = node
        self._sending = False
        return self

    # -- read-only attributes ------------------------------------------------------------------

    @property
    def identity(self) -> bytes:
        """16 bytes identifying the message; a reply carries the request's identity."""
        return self._identity

    @property
    def serial(self) -> int:
        """The wire serial of a received message, else 0."""
        return self._serial

    @property
    def remote_identity(self) -> bytes:
        """Identity of the node the message came from (16 zero bytes for new messages)."""
        return self._remote_identity

    @property
    def has_slot(self) -> bool:
        """True while the (received) message occupies a slot, i.e. until release_slot()."""
        return self._c is not None

    # -- read/write attributes -----------------------------------------------------------------

    @property
    def header(self) -> bytes:
        """Header bytes (at most 65535)."""
        return self._header

    @header.setter
    def header(self, value: bytes) -> None:
        if type(value) is bytes and len(value) <= _MAX_HEADER:
            self._header = value
        else:
            self._header = _as_bytes("header", value, _MAX_HEADER)

    @property
    def data(self) -> bytes:
        """Data bytes."""
        return self._data

    @data.setter
    def data(self, value: bytes) -> None:
        if type(value) is bytes and len(value) <= _MAX_DATA:
            self._data = value
        else:
            self._data = _as_bytes("data", value, _MAX_DATA)

    @property
    def address(self) -> str:
        """Peer IP address: IPv4 or IPv6 literal, read back in compressed form."""
        return self._address

    @address.setter
    def address(self, value: str) -> None:
        known = _addresses.get(value) if type(value) is str else None
        if known is None:
            if not isinstance(value, str):
                raise ChirpTypeError("Message.address must be a str, not %s" % type(value).__name__)
            known = _parse_address(value)
        self._family, self._packed, self._address = known

    @property
    def port(self) -> int:
        """Peer port, 0..65535."""
        return self._port

    @port.setter
    def port(self, value: int) -> None:
        if type(value) is int and 0 <= value <= 0xFFFF:
            self._port = value
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise ChirpTypeError("Message.port must be an int, not %s" % type(value).__name__)
        if not 0 <= value <= 0xFFFF:
            raise ChirpMessageValueError("Message.port must be in 0..65535 (got %d)" % value)
        self._port = int(value)

    # -- internals -----------------------------------------------------------------------------

    def _target(self) -> Tuple[int, bytes]:
        """(family, packed address) for sending; packs lazily for received messages.

        Raises ``ValueError`` if the address or the port of a new message was never set.
        """
        packed = self._packed
        if packed is None:
            if self._family == _UNSET:
                raise ValueError(
                    "Message.address was never set: assign the peer's IP address "
                    "(msg.address = '127.0.0.1') before sending"
                )
            self._family, packed, _ = _parse_address(self._address)
            self._packed = packed
        return self._family, packed

    # -- slot ----------------------------------------------------------------------------------

    def release_slot(self) -> "Future[Optional[Tuple[bytes, int]]]":
        """Release the message's slot (sends the owed ACK, docs/protocol.md#wire-format).

        Returns a ``concurrent.futures.Future`` resolving to ``(identity, serial)``
        once the release is done, or resolved to ``None`` at once if the message
        has no slot (never received, or already released). Thread-safe.
        Raises ``RuntimeError`` if the message is still being sent.
        """
        node = self._node
        if node is None or self._c is None:
            if self._sending:
                raise RuntimeError("Message is still being sent; release it when the send is done")
            fut: Future[Optional[Tuple[bytes, int]]] = Future()
            fut.set_result(None)
            return fut
        return node.release(self)

    def release(self) -> "Future[Optional[Tuple[bytes, int]]]":
        """Alias of :meth:`release_slot`."""
        return self.release_slot()

    def __repr__(self) -> str:
        return "<%s identity=%s serial=%d %s port=%d header=%d bytes data=%d bytes%s>" % (
            type(self).__name__,
            self._identity.hex(),
            self._serial,
            self._address,
            self._port,
            len(self._header),
            len(self._data),
            " has_slot" if self._c is not None else "",
        )


class Message(MessageBase):
    """A message whose ``release_slot()`` returns a ``concurrent.futures.Future``.

    This is the message class of the thread-based interfaces (``libchirp.queue``,
    ``libchirp.pool``), documented as ``Message``.
    """

    __slots__ = ()


#: The former name of :class:`Message` (the same class).
MessageThread = Message


def release_when_sent(msg: MessageBase) -> None:
    """Release ``msg``'s slot now, or once its pending send is done; nothing without a slot.

    For the interfaces of this package (AUTO_RELEASE after a handler, a reply
    nobody will see), which discard the release's future; not part of the API.
    """
    node = msg._node
    if node is not None and msg._c is not None:
        node.release_when_sent(msg)
