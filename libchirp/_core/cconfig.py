"""The C configuration of a node (``ch_config_t``), filled from a :class:`~libchirp.Config`.

``check_config`` runs the core's own validation (``ch_config_check``,
docs/config.md) and raises the mapped exception with its text.
"""

from __future__ import annotations

import os
import socket
from typing import Any, List, Tuple

from ..config import Config
from .capi import _text, ffi, lib
from .outcomes import _error


def fill_config(config: Config) -> Tuple[Any, List[Any]]:
    """Return a ``ch_config_t *`` filled from ``config`` and the objects it points into.

    The second element keeps the path strings alive; ``ch_node_new`` copies them.
    """
    c = ffi.new("ch_config_t *")
    c.reuse_time = config.REUSE_TIME
    c.timeout = config.TIMEOUT
    c.port = config.PORT
    c.backlog = config.BACKLOG
    c.max_slots = config.MAX_SLOTS
    c.synchronous = 1 if config.SYNCHRONOUS else 0
    c.disable_signals = 1 if config.DISABLE_SIGNALS else 0
    c.buffer_size = config.BUFFER_SIZE
    c.max_msg_size = config.MAX_MSG_SIZE
    ffi.memmove(c.bind_v6, socket.inet_pton(socket.AF_INET6, config.BIND_V6), 16)
    ffi.memmove(c.bind_v4, socket.inet_pton(socket.AF_INET, config.BIND_V4), 4)
    ffi.memmove(c.identity, config.IDENTITY, 16)
    keep: List[Any] = []
    if config.CERT_CHAIN_PEM is not None:
        s = ffi.new("char[]", os.fsencode(config.CERT_CHAIN_PEM))
        keep.append(s)
        c.cert_chain_pem = s
    if config.DH_PARAMS_PEM is not None:
        s = ffi.new("char[]", os.fsencode(config.DH_PARAMS_PEM))
        keep.append(s)
        c.dh_params_pem = s
    c.disable_encryption = 1 if config.DISABLE_ENCRYPTION else 0
    c.max_send_queue = config.MAX_SEND_QUEUE
    c.max_connections = config.MAX_CONNECTIONS
    c.max_connections_per_address = config.MAX_CONNECTIONS_PER_ADDRESS
    return c, keep


def check_config(ccfg: Any) -> None:
    """Run ``ch_config_check`` (docs/config.md); raise ValueError with its text."""
    err = ffi.new("char[]", 512)
    rc = lib.ch_config_check(ccfg, err, 512)
    if rc != lib.CH_SUCCESS:
        raise _error(rc, _text(err))
