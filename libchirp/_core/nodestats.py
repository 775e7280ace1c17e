"""Statistics of a node: asking the core for a snapshot and copying it into plain dicts.

``ch_node_stats()`` is answered by a STATS event carrying a C snapshot; the
dispatcher copies it into the dicts of ``libchirp.stats`` (:class:`NodeStats`)
together with the node's own Python counters, and frees it with
``ch_stats_free()`` whatever happens (``events.handle_batch``).

A mixin of :class:`~libchirp._core.node.NodeCore` (state made by
:meth:`Statistics._init_stats`).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable, Dict

from ..stats import CounterStats, NodeStats, RemoteStats, remote_key
from .capi import _NULL, _string, _text, lib
from .outcomes import _error, _set_exception, _set_result, _shutdown_error


class Statistics:
    """Statistics snapshots (mixin of NodeCore, see the module docstring)."""

    def _init_stats(self) -> None:
        self.stats_pending: Dict[int, Future] = {}

    def stats(self) -> Future:
        """Ask the core for a snapshot; the future resolves to a :class:`NodeStats` dict.

        Fails with ChirpShutdown once the node is stopping for good.
        """
        fut: Future = self._future()
        with self.lock:
            if self.stop_sent or self.c is None:
                fut.set_exception(_shutdown_error("node is stopped"))
                return fut
            token = next(self.loop.tokens)
            self.stats_pending[token] = fut
            rc = lib.ch_node_stats(self.c, token)
            if rc != 0:
                del self.stats_pending[token]
        if rc != 0:
            fut.set_exception(_error(rc, "cannot ask for statistics"))
        else:
            self.loop.poke()
        return fut

    def on_stats(self, token: int, status: int, text: Any, st: Any) -> None:
        """Dispatcher: copy the snapshot ``st`` (the caller frees it) and resolve."""
        with self.lock:
            fut = self.stats_pending.pop(token, None)
        if fut is None:
            return
        if status != 0 or st == _NULL:
            _set_exception(fut, _error(status or lib.CH_ENOMEM, _text(text)))
            return
        remotes: Dict[str, RemoteStats] = {}
        for i in range(st.nremotes):
            r = st.remotes[i]
            address = _string(r.address).decode("ascii")
            remotes[remote_key(address, r.port)] = RemoteStats(
                address=address,
                port=r.port,
                connections=r.connections,
                slots_in_use=r.slots_in_use,
                send_queue=r.send_queue,
                in_flight=r.in_flight,
                idle=r.idle,
                counters=_counters(r.counters),
            )
        result = NodeStats(
            port=self.port,
            identity=self.identity.hex(),
            connections=st.connections,
            totals=_counters(st.totals),
            late_replies=self.late_replies,
            pending_requests=len(self.requests),
            pending_sends=len(self.sends),
            held_messages=len(self.held),
            remotes=remotes,
        )
        _set_result(fut, result)

    def _fail_stats(self, exc: Callable[[], BaseException]) -> None:
        """Fail every pending snapshot with ``exc()`` (after the node stopped)."""
        with self.lock:
            stats, self.stats_pending = self.stats_pending, {}
        for fut in stats.values():
            _set_exception(fut, exc())


def _counters(c: Any) -> CounterStats:
    """Copy a ``ch_counters_t`` into a dict."""
    return CounterStats(
        messages_in=c.msgs_in,
        bytes_in=c.bytes_in,
        messages_out=c.msgs_out,
        bytes_out=c.bytes_out,
        send_failures=c.send_failures,
        timeouts=c.timeouts,
        protocol_errors=c.protocol_errors,
        tls_errors=c.tls_errors,
        connects=c.connects,
        connections_refused=c.conns_refused,
        connections_evicted=c.conns_evicted,
    )
