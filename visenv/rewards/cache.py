"""A persistent memo for rewards that look: CLIP embeddings and judge answers.

A :class:`MemoCache` maps string keys (hex digests built by its users) to bytes, in one SQLite file
that any number of threads and processes may share: every thread opens its own connection, the
database runs in WAL mode so readers never wait for the writer, and writers wait up to
``busy_timeout_s`` for each other. Entries are never updated in place: a key names its inputs
exactly (model or judge id included), so a value, once written, stays right.

With ``path=None`` the memo lives in the process only (a dictionary), for tests and one-off runs.
A cache pickles as its path alone; each process reopens the file on first use.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Mapping

_SCHEMA = "CREATE TABLE IF NOT EXISTS memo (key TEXT PRIMARY KEY, value BLOB NOT NULL)"
_CHUNK = 500  # keys per SELECT, well under SQLite's bound-parameter limit


class MemoCache:
    """Key -> bytes, persistent in SQLite (or in memory when ``path`` is None).

    Args:
        path: the SQLite file; its folder is created. None keeps entries in this process only.
        busy_timeout_s: how long a writer waits for another process's write before failing.

    Attributes:
        hits: keys found so far (this process).
        misses: keys looked up and not found (this process).
    """

    def __init__(self, path: str | os.PathLike | None = None, busy_timeout_s: float = 30.0):
        self.path = None if path is None else str(path)
        self.busy_timeout_s = busy_timeout_s
        self.hits = 0
        self.misses = 0
        self._setup()

    def _setup(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._memory: dict[str, bytes] = {}
        if self.path is not None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._connection().execute(_SCHEMA)

    def __getstate__(self) -> dict:
        return {"path": self.path, "busy_timeout_s": self.busy_timeout_s, "hits": 0, "misses": 0}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup()

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None or self._local.pid != os.getpid():
            connection = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection, self._local.pid = connection, os.getpid()
        return connection

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The stored values of those ``keys`` that are present (absent keys are left out)."""
        keys = list(dict.fromkeys(keys))
        if self.path is None:
            with self._lock:
                found = {k: self._memory[k] for k in keys if k in self._memory}
        else:
            found = {}
            connection = self._connection()
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start:start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update(connection.execute(f"SELECT key, value FROM memo WHERE key IN ({marks})", chunk))
        with self._lock:
            self.hits += len(found)
            self.misses += len(keys) - len(found)
        return found

    def put_many(self, items: Mapping[str, bytes]) -> None:
        """Store every item (a key already present keeps its first value)."""
        if not items:
            return
        if self.path is None:
            with self._lock:
                for key, value in items.items():
                    self._memory.setdefault(key, bytes(value))
            return
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")  # one transaction, one fsync
        try:
            connection.executemany("INSERT OR IGNORE INTO memo (key, value) VALUES (?, ?)",
                                   [(k, bytes(v)) for k, v in items.items()])
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def __len__(self) -> int:
        if self.path is None:
            return len(self._memory)
        return self._connection().execute("SELECT COUNT(*) FROM memo").fetchone()[0]

    def __repr__(self) -> str:
        return f"MemoCache({self.path!r})"
