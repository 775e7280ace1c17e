"""Queues and pipes that span processes and machines, with the ``multiprocessing`` interface.

See docs/mp.md for the interface, the guarantees and the security note.

Theory of operation
-------------------
The process that creates a :class:`Queue`, :class:`SimpleQueue` or :func:`Pipe`
*hosts* it: a per-process host runs one chirp node (``Config.PORT = 0``, a
free port) and a thread that serves every object hosted there. Each queue is
one *box* (a deque of pickled items, keyed by a random 64-bit id); a pipe is
two boxes, one per direction. The object itself is only a description (box
ids, the host's advertised address and port, the mode, TLS settings):
pickling it (to a ``multiprocessing.Process``, or through another queue or
pipe) gives the receiver a handle of the same box. Whether a handle talks to
the box directly (it lives in the hosting process) or as a client is decided
on use, by comparing ``os.getpid()``: a child made by ``fork`` inherits the
object, notices the new pid and becomes a client with a Loop of its own (the
parent's loop threads do not exist there; the inherited chirp objects are
kept referenced for ever, never stopped, so their finalizers never run).
Clients (one client node per process and TLS setting) talk to the host with
chirp messages in SYNCHRONOUS mode: an acknowledged batch is in the host's
memory, and of a batch that a consumer did not acknowledge, what it had not
handed out (its lease counter says how much) goes back into its box. Nodes
are read by the threads that wait for what they bring (no hop through a
reader thread); the host's thread serves while none does.

Where what is:

* :mod:`.wire`: the messages between handles and hosts (header, kinds,
  batches), the limits (windows, batch sizes) and the nodes' configuration;
* :mod:`.host`: the boxes and the host that serves them (its thread, the
  order of sends);
* :mod:`.runtime`: what exists once per process: the client node, the
  registry of hosts and client nodes, what fork and exit do to them;
* :mod:`.client`: a handle's way to its box, local or remote (producer
  batching, pull requests and their credit, push subscriptions, giving items
  back);
* :mod:`.lease`: the counters through which a host learns how many items of
  a batch a dead consumer had handed out;
* :mod:`.handles`: the public objects, what pickling them carries, the pid
  check.

The settings below are read from this module when a node or handle is made,
so ``mp.CONFIG = config`` (etc.) applies to what is made afterwards.
"""

from __future__ import annotations

from queue import Empty, Full
from typing import Optional

from ..config import Config
from .handles import Connection, Pipe, Queue, SimpleQueue, attach
from .wire import CHUNK as CHUNK
from .wire import PUSH_BATCH as PUSH_BATCH
from .wire import PUSH_BATCH_BYTES as PUSH_BATCH_BYTES
from .wire import PUSH_WINDOW as PUSH_WINDOW
from .wire import PUT_BATCH as PUT_BATCH
from .wire import PUT_BATCH_BYTES as PUT_BATCH_BYTES
from .wire import PUT_LIMIT as PUT_LIMIT
from .wire import PUT_WINDOW as PUT_WINDOW
from .wire import SLACK as SLACK
from .wire import SLOTS as SLOTS

__all__ = [
    "ADDRESS",
    "CONFIG",
    "TIMEOUT",
    "Queue",
    "SimpleQueue",
    "Pipe",
    "Connection",
    "attach",
    "Empty",
    "Full",
]

#: The address a host advertises when none is given (use the machine's address
#: that other hosts reach, for queues that span machines).
ADDRESS: str = "127.0.0.1"
#: A Config whose TLS and bind fields the nodes of this module copy (None:
#: plaintext on loopback, ``DISABLE_ENCRYPTION`` left False so that any
#: non-loopback peer would need TLS and fail).
CONFIG: Optional[Config] = None
#: Config.TIMEOUT of this module's nodes: bounds the acknowledgement of a batch
#: held by a full queue or by a consumer that has not taken it yet. A peer that
#: dies is noticed at once (the connection closes), not after TIMEOUT.
TIMEOUT: float = 1200.0
