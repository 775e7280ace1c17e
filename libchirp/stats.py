"""The shape of ``Chirp.statistics()`` (node statistics).

Theory of operation
-------------------
``statistics()`` asks the C core for a snapshot (``ch_node_stats``); the thread
running the loop fills it in one go, so the numbers of one snapshot are consistent with
each other. The thread handling the events copies it into the plain dictionaries typed
below (and frees the C snapshot); nothing in them refers to C memory.

Counters of a remote start when the core creates the remote record (first send
to it or first connection from it) and end when the record is garbage-collected
after REUSE_TIME of idleness; the node's ``totals`` keep counting for the node's
whole life. Error counters count connection closes by reason.

Remote keys are ``"address:port"`` for IPv4 (``"127.0.0.1:2998"``) and
``"[address]:port"`` for IPv6 (``"[::1]:2998"``); ``port`` is the peer's public
port from its handshake (docs/protocol.md#nodes-remotes-and-connections), not the TCP source port.

This module is pure Python and does not need the compiled core.
"""

from __future__ import annotations

from typing import Dict, TypedDict

__all__ = ["CounterStats", "RemoteStats", "NodeStats", "remote_key"]


class CounterStats(TypedDict):
    """Traffic and error counters (of one remote, or the node's totals)."""

    #: Data messages received.
    messages_in: int
    #: Header + data bytes of the received messages.
    bytes_in: int
    #: Data messages sent successfully.
    messages_out: int
    #: Header + data bytes of the messages sent successfully.
    bytes_out: int
    #: Sends that failed (any reason).
    send_failures: int
    #: Connections closed because of a timeout (connect, handshake, ACK).
    timeouts: int
    #: Connections closed because of a protocol error (bad frame, peer closed).
    protocol_errors: int
    #: Connections closed because of a TLS failure.
    tls_errors: int
    #: Connections opened (outgoing) or accepted.
    connects: int
    #: Incoming connections closed at once because MAX_CONNECTIONS or
    #: MAX_CONNECTIONS_PER_ADDRESS was reached with no idle connection to close,
    #: or because no file descriptor was left (docs/reliability.md). Refused
    #: connections never belong to a remote: only the node's totals count them.
    connections_refused: int
    #: Idle connections closed to make room for a new one at a connection limit.
    connections_evicted: int


class RemoteStats(TypedDict):
    """One remote (peer address and public port) as the node sees it."""

    #: Peer IP address, compressed text form.
    address: str
    #: Peer's public port (from its handshake).
    port: int
    #: Open connections filed under this remote.
    connections: int
    #: Received messages from this remote not yet released.
    slots_in_use: int
    #: Data messages waiting to be written to this remote.
    send_queue: int
    #: Messages written and waiting for their ACK.
    in_flight: int
    #: Seconds since the last activity.
    idle: float
    #: The remote's counters.
    counters: CounterStats


class NodeStats(TypedDict):
    """A snapshot of one node, as returned by ``statistics()``."""

    #: The node's listening port.
    port: int
    #: The node's identity as 32 hex digits.
    identity: str
    #: All open connections (including those still in their handshake).
    connections: int
    #: Counters of the node as a whole.
    totals: CounterStats
    #: Replies that arrived after their request timed out; they are dropped.
    late_replies: int
    #: Requests waiting for their reply.
    pending_requests: int
    #: Sends not yet completed.
    pending_sends: int
    #: Received messages handed to the application and not yet released.
    held_messages: int
    #: Remotes by key (see :func:`remote_key`).
    remotes: Dict[str, RemoteStats]


def remote_key(address: str, port: int) -> str:
    """The key of a remote in ``NodeStats["remotes"]``: ``a.b.c.d:port`` or ``[v6]:port``."""
    if ":" in address:
        return "[%s]:%d" % (address, port)
    return "%s:%d" % (address, port)
