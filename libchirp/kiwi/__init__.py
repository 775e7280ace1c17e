"""kiwiPy without a broker: a chirp ``kiwipy.Communicator`` (docs/kiwi.md).

``communicator`` holds the mesh, RPC, tasks and broadcasts (its docstring has
the theory of operation), ``codec`` the safe default encoding, ``outbox`` the
durable outbox and ``aio`` the asyncio flavour.
"""

from .aio import AsyncChirpCommunicator
from .codec import decode, encode
from .communicator import (
    DEFAULT_TASK_QUEUE,
    ChirpCommunicator,
    ChirpIncomingTask,
    ChirpTaskQueue,
)
from .outbox import Outbox

__all__ = [
    "ChirpCommunicator",
    "AsyncChirpCommunicator",
    "ChirpTaskQueue",
    "ChirpIncomingTask",
    "Outbox",
    "encode",
    "decode",
    "DEFAULT_TASK_QUEUE",
]
