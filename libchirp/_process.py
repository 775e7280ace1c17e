"""This process's id, without a system call per use.

Loops and nodes check on every call that they are used in the process that
made them (docs/reliability.md: a forked child must not touch its parent's
loop). ``os.getpid()`` is a system call, twice per roundtrip in a ping-pong;
:data:`PID` is a plain read, kept up to date by a fork hook
(``os.register_at_fork``), which runs in children made by ``os.fork()``,
``multiprocessing`` and every other fork that goes through the interpreter.
"""

from __future__ import annotations

import os

#: The id of the process running now.
PID = os.getpid()


def _after_fork_in_child() -> None:
    global PID
    PID = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)
