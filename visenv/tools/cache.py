"""The tool cache: real tool outputs stored by call, and the exact-cache backend that serves them.

A cache is one directory::

    index.sqlite        the index (SQLite in WAL mode): entries, their outputs, blobs, counters
    blobs/ab/<sha256>.<ext>   content-addressed media (:class:`~visenv.media.BlobStore`)
    quarantine/         files that ``verify`` found corrupt, moved out of the way
    embeddings.sqlite   prompt embeddings of the nearest tier (:mod:`visenv.tools.nearest`)
    nearest/<model>/    the nearest tier's saved vector index (manifest.json + .npy / .faiss files)

Many processes (Ray actors, ``cache build`` workers) may read and write one cache at once. A write
first stores its media files (each written to a temporary name and renamed, so a file is either
whole or absent), then commits the entry, its outputs and its blob rows in one SQLite transaction.
A writer killed at any point therefore leaves no visible partial entry, at most an unreferenced
blob or temporary file, which :meth:`ToolCache.verify` reports. Two writers of the same key: the
first commit wins and both get the winner's entry back, so every process serves the same output.

Keys are :class:`~visenv.tools.cache_key.CallKey` digests (tool, normalised arguments, seed, tool
version). Hit and miss counts are buffered in memory and added to the ``counters`` table every
few seconds, so lookups stay read-only and fast.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from visenv.error import BackendError, CacheSchemaError
from visenv.media import BlobStore, sha256_file
from visenv.tools.backends import BackendAnswer, MediaOutput, ToolRequest
from visenv.tools.cache_key import CallKey, canonical_json, nearest_eligible, query_text, shape_of
from visenv.tools.spec import ToolSpec

SCHEMA_VERSION = 1
INDEX_NAME = "index.sqlite"
FLUSH_SECONDS = 5.0
FLUSH_EVENTS = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key BLOB NOT NULL UNIQUE, tool TEXT NOT NULL,
    tool_version INTEGER NOT NULL, seed INTEGER, arguments TEXT NOT NULL, shape TEXT,
    prompt TEXT NOT NULL, text TEXT NOT NULL, source TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS entries_tool ON entries (tool);
CREATE TABLE IF NOT EXISTS outputs (
    entry_id INTEGER NOT NULL, position INTEGER NOT NULL, sha256 TEXT NOT NULL, kind TEXT NOT NULL,
    attributes TEXT NOT NULL, prompt TEXT NOT NULL, PRIMARY KEY (entry_id, position)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outputs_sha256 ON outputs (sha256);
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY, suffix TEXT NOT NULL, kind TEXT NOT NULL, size INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    tool TEXT NOT NULL, event TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (tool, event)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY, key BLOB NOT NULL, tool TEXT NOT NULL, record TEXT NOT NULL,
    reason TEXT NOT NULL, at REAL NOT NULL);
"""

_SELECT_ENTRY = """
SELECT e.id, e.key, e.tool, e.tool_version, e.seed, e.arguments, e.prompt, e.text, e.source, e.created,
       o.sha256, o.kind, o.attributes, o.prompt, b.suffix
FROM entries e LEFT JOIN outputs o ON o.entry_id = e.id LEFT JOIN blobs b ON b.sha256 = o.sha256
WHERE e.{column} = ? ORDER BY o.position
"""


@dataclass(frozen=True)
class CachedOutput:
    """One media file of a cache entry.

    Attributes:
        kind: "image", "video" or "audio".
        sha256: the file's content hash.
        path: where the file lies in the cache's blob store.
        attributes: the attributes recorded with it (measured, or given by the tool).
        prompt: the prompt that made it.
    """

    kind: str
    sha256: str
    path: str
    attributes: Mapping[str, Any]
    prompt: str

    def to_media(self) -> MediaOutput:
        """As a backend's :class:`~visenv.tools.backends.MediaOutput`."""
        return MediaOutput(self.kind, self.sha256, self.path, dict(self.attributes), self.prompt)


@dataclass(frozen=True)
class CacheEntry:
    """A cached answer to one call.

    Attributes:
        id: the entry's row id (stable; never reused).
        key: the 32-byte key digest.
        tool: the tool name.
        tool_version: the tool's version when recorded.
        seed: the call's seed, or None when the entry answers any seed.
        arguments: the normalised arguments.
        prompt: the call's free-text arguments, as embedded by the nearest tier.
        text: the text answer.
        source: who produced it ("real", "import", or a backend name).
        created: when it was stored (Unix time).
        outputs: the media files, in order.
    """

    id: int
    key: bytes
    tool: str
    tool_version: int
    seed: int | None
    arguments: Mapping[str, Any]
    prompt: str
    text: str
    source: str
    created: float
    outputs: tuple[CachedOutput, ...]


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`ToolCache.verify` found and did.

    Attributes:
        checked: blob files checked.
        missing: hashes whose file is missing.
        corrupt: hashes whose file does not hash to its name (or has the wrong size).
        quarantined_entries: entries removed from the index because they used a bad file.
        orphans: files in the blob store that no entry uses (harmless: a writer stopped early).
        temporary_removed: stale temporary files of interrupted writers that were deleted.
    """

    checked: int
    missing: tuple[str, ...]
    corrupt: tuple[str, ...]
    quarantined_entries: int
    orphans: int
    temporary_removed: int

    @property
    def ok(self) -> bool:
        """True when every indexed file is present and intact."""
        return not self.missing and not self.corrupt


def _flush_counts(index_path: str, pending: collections.Counter) -> None:
    """Add the buffered counts to the index (also run by a finaliser at exit)."""
    if not pending or not os.path.exists(index_path):
        return
    rows = [(tool, event, n) for (tool, event), n in pending.items()]
    pending.clear()
    with sqlite3.connect(index_path, timeout=60.0) as conn:
        conn.executemany("INSERT INTO counters (tool, event, count) VALUES (?, ?, ?) ON CONFLICT (tool, event) "
                         "DO UPDATE SET count = count + excluded.count", rows)
    conn.close()


class ToolCache:
    """A directory of cached tool outputs, safe for concurrent readers and writers.

    Args:
        root: the cache directory (created when missing).
        timeout: seconds a writer waits for another writer's lock before failing.

    Connections are per thread and per process, so one object may be used from a thread pool and
    is rebuilt after ``fork`` or unpickling (it pickles as its path).
    """

    def __init__(self, root: str | os.PathLike, timeout: float = 60.0):
        self.root = Path(root)
        self.timeout = timeout
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root / "blobs")
        self.index_path = self.root / INDEX_NAME
        self._local = threading.local()
        self._pid = os.getpid()
        self._pending: collections.Counter = collections.Counter()
        self._pending_lock = threading.Lock()
        self._thread_write_lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._finalizer = weakref.finalize(self, _flush_counts, str(self.index_path), self._pending)
        self._create_schema()

    def __getstate__(self) -> dict[str, Any]:
        return {"root": str(self.root), "timeout": self.timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["timeout"])

    def __repr__(self) -> str:
        return f"ToolCache({str(self.root)!r})"

    # ---- connections -------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:  # forked: the parent's connections and counts are not ours
            self._local = threading.local()
            self._pid = os.getpid()
            self._pending.clear()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.index_path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=True)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def _create_schema(self) -> None:
        conn = self._conn()
        deadline = time.monotonic() + self.timeout
        while True:  # switching to WAL needs a moment alone with the file; other openers retry
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            found = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            if found is None:
                conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(found[0]) != SCHEMA_VERSION:
                raise CacheSchemaError(f"The cache {str(self.root)!r} has schema version {found[0]}, but this "
                                   f"visenv reads version {SCHEMA_VERSION}; export it with the visenv that "
                                   "wrote it and import the export here.")
            conn.execute("INSERT INTO meta VALUES ('cache_id', ?) ON CONFLICT (name) DO NOTHING", (uuid.uuid4().hex,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @property
    def cache_id(self) -> str:
        """A random id given to the index when it was created: tells a rebuilt cache from the old one at its path."""
        return self._conn().execute("SELECT value FROM meta WHERE name = 'cache_id'").fetchone()[0]

    def close(self) -> None:
        """Flush the counters and close this thread's connection."""
        self.flush()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ---- reading -----------------------------------------------------------------------------

    def _entry(self, column: str, value: Any) -> CacheEntry | None:
        rows = self._conn().execute(_SELECT_ENTRY.format(column=column), (value,)).fetchall()
        if not rows:
            return None
        first = rows[0]
        outputs = tuple(CachedOutput(kind, sha, str(self.blobs.path(sha, suffix)), json.loads(attrs), prompt)
                        for *_, sha, kind, attrs, prompt, suffix in rows if sha is not None)
        return CacheEntry(id=first[0], key=first[1], tool=first[2], tool_version=first[3], seed=first[4],
                          arguments=json.loads(first[5]), prompt=first[6], text=first[7], source=first[8],
                          created=first[9], outputs=outputs)

    def get(self, key: CallKey | bytes) -> CacheEntry | None:
        """The entry stored under ``key``, or None."""
        return self._entry("key", key.digest if isinstance(key, CallKey) else key)

    def get_by_id(self, entry_id: int) -> CacheEntry | None:
        """The entry with this row id, or None (e.g. quarantined since)."""
        return self._entry("id", int(entry_id))

    def blob_path(self, sha256: str) -> Path | None:
        """Where the indexed file with this hash lies, or None when the cache does not hold it."""
        row = self._conn().execute("SELECT suffix FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else self.blobs.path(sha256, row[0])

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def entries(self, tool: str | None = None) -> Iterator[CacheEntry]:
        """Every entry (of ``tool``), oldest first."""
        query = "SELECT id FROM entries" + (" WHERE tool = ?" if tool else "") + " ORDER BY id"
        ids = [row[0] for row in self._conn().execute(query, (tool,) if tool else ())]
        for entry_id in ids:
            entry = self.get_by_id(entry_id)
            if entry is not None:
                yield entry

    # ---- writing -----------------------------------------------------------------------------

    def store_media(self, outputs: Sequence[MediaOutput]) -> tuple[MediaOutput, ...]:
        """Copy media files into the blob store (atomically); returns them with their store paths.

        Raises:
            BackendError: a file's content does not hash to the ``sha256`` its producer claimed.
        """
        stored = []
        for out in outputs:
            suffix = Path(out.path).suffix.lower()
            target = self.blobs.path(out.sha256, suffix)
            if Path(out.path) != target or not target.exists():
                sha, target = self.blobs.put_file(out.path)
                if sha != out.sha256:
                    raise BackendError(f"The file {out.path!r} hashes to {sha}, but its producer said "
                                       f"{out.sha256}; a backend must report the file's real hash.")
            stored.append(MediaOutput(out.kind, out.sha256, str(target), out.attributes, out.prompt))
        return tuple(stored)

    def put(self, spec: ToolSpec, key: CallKey, outputs: Sequence[MediaOutput], text: str = "",
            source: str = "real") -> CacheEntry:
        """Store an answer under ``key``; returns the stored entry (another writer's if it was first).

        Args:
            spec: the tool (its name and version must match the key).
            key: the call's key.
            outputs: the media produced; their files are copied into the store.
            text: the text answer.
            source: who produced the answer ("real", "import", ...).
        """
        return self.put_many([(spec, key, outputs, text, source)])[0]

    def put_many(self, items: Sequence[tuple[ToolSpec, CallKey, Sequence[MediaOutput], str, str]]) -> list[CacheEntry]:
        """Store many answers in one transaction; returns each key's stored entry (see :meth:`put`)."""
        rows = []
        for spec, key, outputs, text, source in items:
            if (spec.name, spec.version) != (key.tool, key.version):
                raise ValueError(f"Key for {key.tool} v{key.version} cannot store a {spec.name} v{spec.version} answer.")
            if spec.stateful:
                raise ValueError(f"{spec.name} answers from episode state and cannot be cached.")
            rows.append((spec, key, self.store_media(outputs), text, source))
        conn = self._conn()
        now = time.time()
        with self._writing():
            conn.execute("BEGIN IMMEDIATE")
            try:
                stored = [self._insert(conn, *row, now) for row in rows]
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return [entry if entry is not None else self.get(key) for entry, (_, key, *_) in zip(stored, rows)]

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Serialise writers: a thread lock, then an flock that the OS releases if the process dies.

        SQLite alone would also serialise them, but its busy handler polls with growing sleeps;
        a blocked flock wakes as soon as the holder lets go.
        """
        with self._thread_write_lock:
            fd = os.open(self.root / "write.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def _insert(self, conn: sqlite3.Connection, spec: ToolSpec, key: CallKey, outputs: Sequence[MediaOutput],
                text: str, source: str, now: float) -> CacheEntry | None:
        """Insert one entry; returns it, or None when another writer stored the key first."""
        args = key.arguments
        shape = shape_of(spec, args) if nearest_eligible(spec, args) else None
        prompt = query_text(spec, args)
        cursor = conn.execute(
            "INSERT INTO entries (key, tool, tool_version, seed, arguments, shape, prompt, text, source, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
            (key.digest, key.tool, key.version, key.seed, canonical_json(args), shape, prompt, text, source, now))
        if cursor.rowcount == 0:  # another writer stored this key first: theirs stands
            return None
        entry_id = cursor.lastrowid
        cached = []
        for position, out in enumerate(outputs):
            attributes = canonical_json(dict(out.attributes))
            conn.execute("INSERT INTO blobs (sha256, suffix, kind, size) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (sha256) DO NOTHING",
                         (out.sha256, os.path.splitext(out.path)[1], out.kind, os.path.getsize(out.path)))
            conn.execute("INSERT INTO outputs VALUES (?, ?, ?, ?, ?, ?)",
                         (entry_id, position, out.sha256, out.kind, attributes, out.prompt))
            cached.append(CachedOutput(out.kind, out.sha256, out.path, json.loads(attributes), out.prompt))
        return CacheEntry(id=entry_id, key=key.digest, tool=key.tool, tool_version=key.version, seed=key.seed,
                          arguments=args, prompt=prompt, text=text, source=source, created=now,
                          outputs=tuple(cached))

    # ---- counters ----------------------------------------------------------------------------

    def count(self, tool: str, event: str, n: int = 1) -> None:
        """Count an event ("exact_hit", "nearest_miss", ...) for ``tool``; flushed every few seconds."""
        self._conn()  # resets the buffer after a fork
        with self._pending_lock:
            self._pending[(tool, event)] += n
            due = (sum(self._pending.values()) >= FLUSH_EVENTS
                   or time.monotonic() - self._last_flush > FLUSH_SECONDS)
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the buffered counts to the index now."""
        with self._pending_lock:
            snapshot = collections.Counter(self._pending)
            self._pending.clear()
            self._last_flush = time.monotonic()
        _flush_counts(str(self.index_path), snapshot)

    def counters(self) -> dict[str, dict[str, int]]:
        """tool -> event -> count, including counts not yet flushed by this process."""
        result: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for tool, event, n in self._conn().execute("SELECT tool, event, count FROM counters"):
            result[tool][event] = n
        with self._pending_lock:
            for (tool, event), n in self._pending.items():
                result[tool][event] = result[tool].get(event, 0) + n
        return dict(result)

    # ---- maintenance -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Entries per tool, media size, and hit rates of the cache tiers.

        Returns:
            ``{"entries", "blobs", "bytes", "tools": {tool: {"entries", "exact_hit", "exact_miss",
            "exact_hit_rate", "nearest_hit", "nearest_miss", "nearest_hit_rate", ...}}}``; a rate is
            None before any lookup.
        """
        conn = self._conn()
        blobs, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs").fetchone()
        tools: dict[str, dict[str, Any]] = {tool: {"entries": n} for tool, n in
                                             conn.execute("SELECT tool, COUNT(*) FROM entries GROUP BY tool")}
        for tool, events in self.counters().items():
            tools.setdefault(tool, {"entries": 0}).update(events)
        for row in tools.values():
            for tier in ("exact", "nearest"):
                hits, misses = row.get(f"{tier}_hit", 0), row.get(f"{tier}_miss", 0)
                row[f"{tier}_hit_rate"] = hits / (hits + misses) if hits + misses else None
        return {"entries": sum(row["entries"] for row in tools.values()), "blobs": blobs, "bytes": size,
                "tools": dict(sorted(tools.items()))}

    def verify(self, check_hashes: bool = True, stale_seconds: float = 3600.0, progress: bool = False) -> VerifyReport:
        """Check every indexed file; quarantine the bad ones and the entries that use them.

        A missing file, or one whose size or hash is wrong, is moved to ``quarantine/`` (when
        present); every entry that uses it is removed from the index and kept, as JSON, in the
        ``quarantine`` table, so lookups miss and a later write can record the call afresh.

        Args:
            check_hashes: re-hash every file (slow on large caches); False checks presence and size.
            stale_seconds: temporary files of interrupted writers older than this are deleted.
            progress: show a progress bar.
        """
        from tqdm import tqdm

        conn = self._conn()
        rows = conn.execute("SELECT sha256, suffix, size FROM blobs").fetchall()
        missing, corrupt = [], []
        for sha, suffix, size in tqdm(rows, desc="verify", unit="file", disable=not progress):
            path = self.blobs.path(sha, suffix)
            if not path.exists():
                missing.append(sha)
            elif path.stat().st_size != size or (check_hashes and sha256_file(path) != sha):
                corrupt.append(sha)
        quarantined = self._quarantine(missing, "missing file") + self._quarantine(corrupt, "corrupt file")
        known = {f"{sha}{suffix}" for sha, suffix, _ in rows}
        orphans = removed = 0
        now = time.time()
        for path in self.blobs.root.glob("*/*"):
            if path.name.startswith(".tmp-"):
                if now - path.stat().st_mtime > stale_seconds:
                    path.unlink(missing_ok=True)
                    removed += 1
            elif path.name not in known:
                orphans += 1
        return VerifyReport(len(rows), tuple(missing), tuple(corrupt), quarantined, orphans, removed)

    def _quarantine(self, hashes: Sequence[str], reason: str) -> int:
        if not hashes:
            return 0
        (self.root / "quarantine").mkdir(exist_ok=True)
        conn = self._conn()
        removed = 0
        for sha in hashes:
            suffix = conn.execute("SELECT suffix FROM blobs WHERE sha256 = ?", (sha,)).fetchone()[0]
            path = self.blobs.path(sha, suffix)
            if path.exists():
                os.replace(path, self.root / "quarantine" / path.name)
            entry_ids = [r[0] for r in conn.execute("SELECT DISTINCT entry_id FROM outputs WHERE sha256 = ?", (sha,))]
            entries = [e for e in map(self.get_by_id, entry_ids) if e is not None]
            with self._writing():
                self._remove(conn, sha, entries, reason)
            removed += len(entries)
        return removed

    def _remove(self, conn: sqlite3.Connection, sha: str, entries: Sequence[CacheEntry], reason: str) -> None:
        """Move ``entries`` to the quarantine table and forget the blob ``sha``, in one transaction."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            for entry in entries:
                record = {"seed": entry.seed, "arguments": entry.arguments, "text": entry.text,
                          "source": entry.source, "version": entry.tool_version,
                          "outputs": [{"kind": o.kind, "sha256": o.sha256, "attributes": o.attributes}
                                      for o in entry.outputs]}
                conn.execute("INSERT INTO quarantine (key, tool, record, reason, at) VALUES (?, ?, ?, ?, ?)",
                             (entry.key, entry.tool, canonical_json(record), f"{reason} {sha}", time.time()))
                conn.execute("DELETE FROM outputs WHERE entry_id = ?", (entry.id,))
                conn.execute("DELETE FROM entries WHERE id = ?", (entry.id,))
            conn.execute("DELETE FROM blobs WHERE sha256 = ?", (sha,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def open_cache(cache: ToolCache | str | os.PathLike) -> ToolCache:
    """``cache`` itself, or the cache in the directory ``cache``."""
    return cache if isinstance(cache, ToolCache) else ToolCache(cache)


class ExactCacheBackend:
    """Answers a call from the cache when the same call (tool, arguments, seed, version) was stored.

    A call is looked up under its own seed first, then, when ``any_seed`` is True, under the
    seedless entry (imported outputs and seedless builds answer every seed). Misses pass to the
    next backend; so does an entry whose media file has gone missing (``cache verify`` will
    quarantine it). Stateful tools (the to-do list) always pass.

    Args:
        cache: the cache, or its directory.
        any_seed: also serve seedless entries.

    Example:
        >>> chain = BackendChain([ExactCacheBackend("runs/cache")], strict=True)  # doctest: +SKIP
    """

    name = "exact_cache"

    def __init__(self, cache: ToolCache | str | os.PathLike, any_seed: bool = True):
        self.cache = open_cache(cache)
        self.any_seed = any_seed

    def lookup(self, request: ToolRequest) -> CacheEntry | None:
        """The entry that answers ``request``, or None (counts nothing)."""
        if request.spec.stateful:
            return None
        key = CallKey.of(request.spec, request.arguments, request.inputs, request.seed)
        entry = self.cache.get(key)
        if entry is None and self.any_seed:
            entry = self.cache.get(key.with_seed(None))
        return entry

    def answer(self, request: ToolRequest) -> BackendAnswer | None:
        """The cached answer, or None to pass."""
        tool = request.spec.name
        entry = self.lookup(request)
        if entry is None:
            self.cache.count(tool, "exact_miss")
            return None
        if not all(os.path.exists(out.path) for out in entry.outputs):
            self.cache.count(tool, "missing_file")
            self.cache.count(tool, "exact_miss")
            return None
        self.cache.count(tool, "exact_hit")
        return BackendAnswer(outputs=tuple(out.to_media() for out in entry.outputs), text=entry.text,
                             backend=self.name)
