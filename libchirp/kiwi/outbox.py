"""The durable outbox of libchirp.kiwi: undone tasks in SQLite (docs/kiwi.md)."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import (
    List,
    Tuple,
)

__all__ = ["Outbox"]

# ---------------------------------------------------------------------------
# The durable outbox.
# ---------------------------------------------------------------------------


class Outbox:
    """Tasks not yet done, in an SQLite file (WAL): they survive a crash of the sender.

    A task is written before it is first sent and deleted when its outcome
    arrives; a communicator started with the same file sends the rest again.
    One communicator at a time should use a file.
    """

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, queue TEXT NOT NULL,"
            " body BLOB NOT NULL, no_reply INTEGER NOT NULL, created REAL NOT NULL)"
        )

    def add(self, task_id: str, queue: str, body: bytes, no_reply: bool) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO tasks VALUES (?, ?, ?, ?, ?)",
                (task_id, queue, body, int(no_reply), time.time()),
            )

    def remove(self, task_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM tasks WHERE id = ?", (task_id,))

    def pending(self) -> List[Tuple[str, str, bytes, bool]]:
        """The tasks not done, oldest first: (id, queue, encoded body, no_reply)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, queue, body, no_reply FROM tasks ORDER BY created"
            ).fetchall()
        return [(r[0], r[1], bytes(r[2]), bool(r[3])) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
