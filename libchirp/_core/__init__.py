"""The internal package that talks to the compiled core (``libchirp._ffi``).

Theory of operation
-------------------
Everything that touches ``ffi``/``lib`` lives here; the public modules
(``loop``, ``chirp``, ``queue``, ...) are thin shells over two classes:
:class:`LoopCore` (a ``ch_loop_t``, its ownership token and the threads that
drive it, see docs/architecture.md) and :class:`NodeCore` (a ``ch_node_t`` and
the Python state of its pending operations). Whichever thread holds the loop's
token drives it and handles the events it produced, in batches; each event goes
to the ``on_*`` method of the node it names.

One concern per module:

=================  ==========================================================
``capi``           imports ``libchirp._ffi``, checks its version stamp; C types
``log``            the ``libchirp`` logger
``outcomes``       completing futures; exceptions of the core's failure codes
``cconfig``        ``ch_config_t`` filled from a Config, and its validation
``events``         the event array and arena of a drive; decoding a batch and
                   dispatching its events to the nodes (``handle_batch``)
``timers``         the loop's Python timers (request deadlines): ``Timer``,
                   ``TimerHeap``
``loopcore``       ``LoopCore``: life cycle, background thread, waiting
                   threads that drive (``lead_until``), embedding in another
                   event loop, ``call_soon``, end-of-batch hooks, shared objects
``node``           ``NodeCore``: start, stop, abandon; made of the mixins below
``sends``          sends, ``send_many`` batches, ``PendingSend``, SEND_DONE
``requests``       the request table, expiry, remembered expired identities
``receives``       received messages, delivery, releases of their slots
``nodestats``      statistics snapshots (STATS events into ``libchirp.stats``)
=================  ==========================================================

Requests (docs/protocol.md#answering, a change from libchirp 1.x): a reply that
arrives after its request timed out is counted (``late_replies``) and dropped:
its slot is released at once (so the peer still gets its ACK) and it is never
delivered as an ordinary message (``requests.DROP_LATE_REPLIES``).

Threads: every ``on_*`` method runs on the thread holding the loop's token
(the background thread, a waiting application thread or the embedding event
loop's thread, see ``LoopCore.in_dispatcher()``); everything else may run on
any thread.
"""

from __future__ import annotations

from .capi import _EXPECTED_STAMP, ffi, lib
from .cconfig import check_config, fill_config
from .log import logger
from .loopcore import LoopCore
from .node import START_LIMIT, NodeCore
from .sends import SEND_COPY_LIMIT
from .timers import Timer

__all__ = [
    "ffi",
    "lib",
    "LoopCore",
    "NodeCore",
    "fill_config",
    "check_config",
    "logger",
    "START_LIMIT",
    "SEND_COPY_LIMIT",
    "Timer",
    "_EXPECTED_STAMP",
]
