"""The tool cache: real tool outputs stored by call, and the exact-cache backend that serves them.

A cache is one directory::

    index.sqlite        the index (SQLite in WAL mode): entries, their outputs, blobs, counters
    blobs/ab/<sha256>.<ext>   content-addressed media (:class:`~visenv.media.BlobStore`)
    quarantine/         damaged files found by lookups or ``verify``, moved out of the way
    embeddings.sqlite   prompt embeddings of the nearest tier (:mod:`visenv.tools.nearest`)
    nearest/<model>/    the nearest tier's saved vector index (manifest.json + .npy / .faiss files)

Many processes (Ray actors, ``cache build`` workers) may read and write one cache at once. A write
first stores its media files (each written to a temporary name and renamed, so a file is either
whole or absent), then commits the entry, its outputs and its blob rows in one SQLite transaction.
A writer killed at any point therefore leaves no visible partial entry, at most an unreferenced
blob or temporary file, which :meth:`ToolCache.verify` reports. Two writers of the same key: the
first commit wins and both get the winner's entry back, so every process serves the same output.

What is served is checked: a lookup compares each file's size with the index, and its sha256
the first time a process serves it (and whenever the file's size, mtime or inode change). A
damaged entry (file missing, truncated or altered) is never served: the lookup misses, counts
``missing_file`` or ``corrupt_file``, logs a warning and quarantines it (the file is moved to
``quarantine/``, the entry to the ``quarantine`` table). Storing content whose file is damaged
writes the file afresh. A damaged index (a 0-byte or foreign file, SQLite pages that fail their
checks, a row that does not parse) raises :class:`~visenv.error.CacheCorruptError`, which names
``visenv cache verify``; :meth:`ToolCache.verify` finds all of these.

Keys are :class:`~visenv.tools.cache_key.CallKey` digests (tool, normalised arguments, seed, tool
version). Hit and miss counts are buffered in memory and added to the ``counters`` table every
few seconds, so lookups stay read-only and fast.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import operator
import os
import sqlite3
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from visenv.error import BackendError, CacheCorruptError, CacheSchemaError
from visenv.media import BlobStore, sha256_file
from visenv.tools.backends import BackendAnswer, MediaOutput, ToolRequest
from visenv.tools.cache_key import CallKey, canonical_json, nearest_eligible, query_text, shape_of
from visenv.tools.spec import ToolSpec

SCHEMA_VERSION = 1
INDEX_NAME = "index.sqlite"
EMBEDDINGS_NAME = "embeddings.sqlite"
FLUSH_SECONDS = 5.0
FLUSH_EVENTS = 1000
QUARANTINE_DIR = "quarantine"
CHECKED_MEMO = 65_536  # files whose hash a process remembers having checked
INDEX_RECOVERY = ("Its rows cannot be trusted. Restore CACHE/index.sqlite from a backup; or salvage the readable "
                  "rows with the sqlite3 shell: `sqlite3 CACHE/index.sqlite .dump | sed 's/^ROLLBACK; -- due to "
                  "errors$/COMMIT;/' | sqlite3 fixed.sqlite`, delete CACHE/index.sqlite-wal and "
                  "CACHE/index.sqlite-shm, move fixed.sqlite to CACHE/index.sqlite and run `visenv cache verify "
                  "CACHE` again; or move CACHE aside and rebuild it (`visenv cache import` or `visenv cache build`).")

logger = logging.getLogger(__name__)

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
       o.sha256, o.kind, o.attributes, o.prompt, b.suffix, b.size
FROM entries e LEFT JOIN outputs o ON o.entry_id = e.id LEFT JOIN blobs b ON b.sha256 = o.sha256
WHERE {where} ORDER BY e.id, o.position
"""
VERIFY_CHUNK = 1000  # entries whose rows verify reads at once


@dataclass(frozen=True)
class CachedOutput:
    """One media file of a cache entry.

    Attributes:
        kind: "image", "video" or "audio".
        sha256: the file's content hash.
        path: where the file lies in the cache's blob store.
        attributes: the attributes recorded with it (measured, or given by the tool).
        prompt: the prompt that made it.
        size: the file's size in bytes, as the index records it.
    """

    kind: str
    sha256: str
    path: str
    attributes: Mapping[str, Any]
    prompt: str
    size: int

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
        quarantined_entries: entries removed from the index because they used a bad file or had a bad row.
        orphans: files in the blob store that no entry uses (harmless: a writer stopped early).
        temporary_removed: stale temporary files of interrupted writers that were deleted.
        bad_rows: ids of entries whose index rows did not parse (quarantined).
        embeddings_problems: what SQLite's integrity check found wrong with ``embeddings.sqlite``
            (then moved to ``quarantine/``; the nearest tier embeds the prompts again).
        index_problems: what SQLite's integrity check (or opening the index) reported; when any, the
            index cannot be trusted, nothing else was checked, and ``recovery`` says what to do.
    """

    checked: int
    missing: tuple[str, ...]
    corrupt: tuple[str, ...]
    quarantined_entries: int
    orphans: int
    temporary_removed: int
    bad_rows: tuple[int, ...] = ()
    embeddings_problems: tuple[str, ...] = ()
    index_problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the index is sound and every indexed file is present and intact."""
        return not (self.missing or self.corrupt or self.bad_rows or self.embeddings_problems or self.index_problems)

    @property
    def recovery(self) -> str | None:
        """How to recover a damaged index, or None when the index is sound."""
        return INDEX_RECOVERY if self.index_problems else None


@contextlib.contextmanager
def index_errors(root: str | os.PathLike, files: str = INDEX_NAME) -> Iterator[None]:
    """Turn SQLite's signs of a damaged database into one :class:`~visenv.error.CacheCorruptError`.

    Connections read text with ``text_factory = bytes.decode``, so text that is not UTF-8 surfaces
    here as UnicodeDecodeError. Other SQLite errors (locked, busy) pass unchanged.

    Args:
        root: the cache directory (named in the message).
        files: the database file(s) the block reads.
    """
    try:
        yield
    except UnicodeDecodeError as exc:
        raise CacheCorruptError(root, f"{files} holds text that is not UTF-8 ({exc})") from None
    except sqlite3.DatabaseError as exc:
        if type(exc) is not sqlite3.DatabaseError:  # OperationalError (locked, busy), ProgrammingError...: no damage
            raise
        raise CacheCorruptError(root, f"{files}: {exc}") from None


def index_guard(root_of: Callable[[Any], Path], files: str = INDEX_NAME) -> Callable[[Callable], Callable]:
    """A method decorator: run the method under :func:`index_errors` for the cache ``root_of(self)``."""
    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            with index_errors(root_of(self), files):
                return method(self, *args, **kwargs)
        return wrapper
    return decorate


_guarded = index_guard(operator.attrgetter("root"))


def _integrity_problems(conn: sqlite3.Connection, limit: int = 20) -> tuple[str, ...]:
    """What SQLite's ``integrity_check`` finds wrong with the database of ``conn`` (empty when sound)."""
    try:
        rows = conn.execute(f"PRAGMA integrity_check({limit})").fetchall()
    except UnicodeDecodeError as exc:
        return (f"not UTF-8: {exc}",)
    except sqlite3.DatabaseError as exc:
        if type(exc) is not sqlite3.DatabaseError:
            raise
        return (str(exc),)
    return tuple(row[0] for row in rows if row[0] != "ok")


def _json_object(text: str, what: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"{what} is {type(value).__name__} JSON, not an object")
    return value


def _loose_text(raw: bytes | None) -> str:
    """A quarantined row's text column (undecodable bytes replaced)."""
    return "" if raw is None else raw.decode("utf-8", "replace")


def _loose_json(raw: bytes | None) -> Any:
    """A quarantined row's JSON column: its value, else its text."""
    text = _loose_text(raw)
    try:
        return json.loads(text)
    except ValueError:
        return text


class _WriteLock:
    """Serialises writers: a thread lock, then an flock that the OS releases if the process dies.

    SQLite alone would also serialise them, but its busy handler polls with growing sleeps; a
    blocked flock wakes as soon as the holder lets go. Not reentrant.
    """

    def __init__(self, path: Path):
        self.path = path
        self._thread_lock = threading.Lock()

    def __reduce__(self):  # pickles as its path (a copy still excludes other processes and copies: flock)
        return _WriteLock, (self.path,)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock


def _file_problem(path: str | os.PathLike, sha256: str, size: int, check_hash: bool) -> tuple[str, str] | None:
    """("missing" | "corrupt", why) when the file at ``path`` is not the blob ``sha256`` of ``size`` bytes, else None."""
    try:
        found = os.stat(path).st_size
        if found != size:
            return "corrupt", f"{os.path.basename(path)} has {found} bytes, not the {size} the index records"
        if check_hash and sha256_file(path) != sha256:
            return "corrupt", f"{os.path.basename(path)} does not hash to its name"
    except FileNotFoundError:
        return "missing", f"{os.path.basename(path)} is missing"
    except OSError as exc:
        return "corrupt", f"{os.path.basename(path)} cannot be read ({exc})"
    return None


class CacheBlobStore(BlobStore):
    """The cache's blob store: storing content whose file is damaged writes the file afresh.

    The damaged file is moved to ``quarantine/`` first; both happen under the cache's write lock,
    so a lookup quarantining the same file waits and then finds it repaired.
    """

    def __init__(self, root: Path, quarantine: Path, lock: _WriteLock):
        super().__init__(root)
        self.quarantine = quarantine
        self._lock = lock

    @contextlib.contextmanager
    def _repairing(self, target: Path, sha256: str, size: int) -> Iterator[None]:
        if not target.exists() or _file_problem(target, sha256, size, check_hash=True) is None:
            yield  # absent (the store writes it) or intact (the store keeps it)
            return
        with self._lock.held():
            problem = _file_problem(target, sha256, size, check_hash=True)
            if problem is not None and problem[0] == "corrupt":
                self.quarantine.mkdir(exist_ok=True)
                os.replace(target, self.quarantine / target.name)
                logger.warning("blob store %s: %s; moved it to %s and stored it afresh", self.root, problem[1],
                               self.quarantine)
            yield

    def put_bytes(self, data: bytes, suffix: str = "") -> tuple[str, Path]:
        """Store ``data`` (repairing its file when damaged); returns (sha256, path)."""
        sha = hashlib.sha256(data).hexdigest()
        with self._repairing(self.path(sha, suffix), sha, len(data)):
            return super().put_bytes(data, suffix)

    def put_file(self, source: str | os.PathLike) -> tuple[str, Path]:
        """Copy a file into the store (repairing its copy there when damaged); returns (sha256, path)."""
        sha = sha256_file(source)
        with self._repairing(self.path(sha, Path(source).suffix.lower()), sha, os.path.getsize(source)):
            return super().put_file(source)


def _flush_counts(index_path: str, pending: collections.Counter) -> None:
    """Add the buffered counts to the index (also run by a finaliser at exit)."""
    if not pending or not os.path.exists(index_path):
        return
    rows = [(tool, event, n) for (tool, event), n in pending.items()]
    pending.clear()
    with index_errors(os.path.dirname(index_path)):
        with sqlite3.connect(index_path, timeout=60.0) as conn:
            conn.executemany("INSERT INTO counters (tool, event, count) VALUES (?, ?, ?) ON CONFLICT (tool, event) "
                             "DO UPDATE SET count = count + excluded.count", rows)
        conn.close()


def _flush_at_exit(index_path: str, pending: collections.Counter) -> None:
    """The finaliser's flush: with a damaged index the counts are lost (logged) rather than raised at exit."""
    try:
        _flush_counts(index_path, pending)
    except CacheCorruptError as exc:
        logger.warning("%s The last lookup counts were not saved.", exc)


def _prepare_index(conn: sqlite3.Connection, root: Path, timeout: float) -> None:
    """Switch to WAL, create the tables, check the schema version and give the index its id."""
    deadline = time.monotonic() + timeout
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
            raise CacheSchemaError(f"The cache {str(root)!r} has schema version {found[0]}, but this "
                                   f"visenv reads version {SCHEMA_VERSION}; export it with the visenv that "
                                   "wrote it and import the export here.")
        conn.execute("INSERT INTO meta VALUES ('cache_id', ?) ON CONFLICT (name) DO NOTHING", (uuid.uuid4().hex,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


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
        self._write_lock = _WriteLock(self.root / "write.lock")
        self.blobs = CacheBlobStore(self.root / "blobs", self.root / QUARANTINE_DIR, self._write_lock)
        self.index_path = self.root / INDEX_NAME
        self._index_uri = f"{self.index_path.absolute().as_uri()}?mode=rw"  # opening never creates it
        self._local = threading.local()
        self._pid = os.getpid()
        self._pending: collections.Counter = collections.Counter()
        self._pending_lock = threading.Lock()
        self._checked: collections.OrderedDict[str, tuple[int, int, int]] = collections.OrderedDict()
        self._checked_lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._finalizer = weakref.finalize(self, _flush_at_exit, str(self.index_path), self._pending)
        self._open_index()

    def __getstate__(self) -> dict[str, Any]:
        return {"root": str(self.root), "timeout": self.timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["timeout"])

    def __repr__(self) -> str:
        return f"ToolCache({str(self.root)!r})"

    # ---- connections -------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:  # forked: the parent's connections, counts and checks are not ours
            self._local = threading.local()
            self._pid = os.getpid()
            self._pending.clear()
            self._checked.clear()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._index_uri, uri=True, timeout=self.timeout,
                                   isolation_level=None, check_same_thread=True)
            conn.text_factory = bytes.decode  # text that is not UTF-8 raises UnicodeDecodeError (see index_errors)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @_guarded
    def _open_index(self) -> None:
        """Open the index, refusing one that is empty or lost; a new cache's index appears fully formed."""
        if not self.index_path.exists():
            if next(self.blobs.root.glob("*/*"), None) is not None:
                raise CacheCorruptError(self.root, f"{INDEX_NAME} is missing, but blobs/ holds files")
            self._create_index()
        elif self.index_path.stat().st_size == 0:
            raise CacheCorruptError(self.root, f"{INDEX_NAME} is empty (0 bytes)")
        _prepare_index(self._conn(), self.root, self.timeout)

    def _create_index(self) -> None:
        """Build the index under a temporary name and link it into place: openers never see a half-made one."""
        tmp = self.root / f".tmp-index-{uuid.uuid4().hex}"
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            _prepare_index(conn, self.root, self.timeout)
            conn.close()
            with contextlib.suppress(FileExistsError):  # another process made it first: theirs stands
                os.link(tmp, self.index_path)
        finally:
            tmp.unlink(missing_ok=True)

    @property
    @_guarded
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

    def __enter__(self) -> "ToolCache":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Closed when the block ends: a command's counts and connection never outlive it."""
        self.close()

    # ---- reading -----------------------------------------------------------------------------

    @_guarded
    def _entry(self, column: str, value: Any) -> CacheEntry | None:
        try:
            rows = self._conn().execute(_SELECT_ENTRY.format(where=f"e.{column} = ?"), (value,)).fetchall()
        except UnicodeDecodeError as exc:
            which = f"entry {value}" if column == "id" else f"the entry with key {value.hex()[:16]}..."
            raise CacheCorruptError(self.root, f"the row of {which} is corrupt: text that is not UTF-8 ({exc})") from None
        return self._parse_entry(rows) if rows else None

    def _parse_entry(self, rows: Sequence[tuple]) -> CacheEntry:
        """The entry read by ``_SELECT_ENTRY`` as ``rows`` (one per output); CacheCorruptError when they do not parse."""
        first = rows[0]
        try:
            outputs = []
            for position, (*_, sha, kind, attrs, prompt, suffix, size) in enumerate(rows):
                if sha is None:
                    continue
                if suffix is None:
                    raise ValueError(f"output {position} names the file {sha}, which the blobs table lacks")
                outputs.append(CachedOutput(kind, sha, str(self.blobs.path(sha, suffix)),
                                            _json_object(attrs, f"output {position}'s attributes"), prompt, size))
            return CacheEntry(id=first[0], key=first[1], tool=first[2], tool_version=first[3], seed=first[4],
                              arguments=_json_object(first[5], "its arguments"), prompt=first[6], text=first[7],
                              source=first[8], created=first[9], outputs=tuple(outputs))
        except ValueError as exc:  # JSONDecodeError included
            raise CacheCorruptError(self.root, f"the row of entry {first[0]} ({first[2]}) is corrupt: {exc}") from None

    def _bad_rows(self, progress: bool) -> dict[int, str]:
        """Entries whose rows do not parse: id -> why."""
        from tqdm import tqdm

        conn = self._conn()
        ids = [row[0] for row in conn.execute("SELECT id FROM entries ORDER BY id")]
        bad = {}
        for start in tqdm(range(0, len(ids), VERIFY_CHUNK), desc="verify rows", unit="chunk", disable=not progress):
            chunk = ids[start:start + VERIFY_CHUNK]
            try:
                rows = conn.execute(_SELECT_ENTRY.format(where="e.id BETWEEN ? AND ?"), (chunk[0], chunk[-1])).fetchall()
            except UnicodeDecodeError:  # text that is not UTF-8 in the chunk: read it entry by entry
                readers = [(entry_id, functools.partial(self.get_by_id, entry_id)) for entry_id in chunk]
            else:
                readers = [(entry_id, functools.partial(self._parse_entry, list(group)))
                           for entry_id, group in itertools.groupby(rows, key=operator.itemgetter(0))]
            for entry_id, read in readers:
                try:
                    read()
                except CacheCorruptError as exc:
                    bad[entry_id] = exc.detail
        return bad

    def get(self, key: CallKey | bytes) -> CacheEntry | None:
        """The entry stored under ``key``, or None."""
        return self._entry("key", key.digest if isinstance(key, CallKey) else key)

    def get_intact(self, key: CallKey | bytes) -> CacheEntry | None:
        """The entry stored under ``key`` when its files are intact, else None (a damaged one is quarantined, see :meth:`servable`)."""
        entry = self.get(key)
        return entry if entry is not None and self.servable(entry) else None

    def get_by_id(self, entry_id: int) -> CacheEntry | None:
        """The entry with this row id, or None (e.g. quarantined since)."""
        return self._entry("id", int(entry_id))

    @_guarded
    def blob_path(self, sha256: str) -> Path | None:
        """Where the indexed file with this hash lies, or None when the cache does not hold it."""
        row = self._conn().execute("SELECT suffix FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else self.blobs.path(sha256, row[0])

    @_guarded
    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def entries(self, tool: str | None = None) -> Iterator[CacheEntry]:
        """Every entry (of ``tool``), oldest first."""
        query = "SELECT id FROM entries" + (" WHERE tool = ?" if tool else "") + " ORDER BY id"
        with index_errors(self.root):
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

    @_guarded
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
        with self._write_lock.held():
            conn.execute("BEGIN IMMEDIATE")
            try:
                stored = [self._insert(conn, *row, now) for row in rows]
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return [entry if entry is not None else self.get(key) for entry, (_, key, *_) in zip(stored, rows)]

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
            size = os.path.getsize(out.path)
            conn.execute("INSERT INTO blobs (sha256, suffix, kind, size) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (sha256) DO NOTHING",
                         (out.sha256, os.path.splitext(out.path)[1], out.kind, size))
            conn.execute("INSERT INTO outputs VALUES (?, ?, ?, ?, ?, ?)",
                         (entry_id, position, out.sha256, out.kind, attributes, out.prompt))
            cached.append(CachedOutput(out.kind, out.sha256, out.path, json.loads(attributes), out.prompt, size))
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

    @_guarded
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

    @_guarded
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

    def index_problems(self) -> tuple[str, ...]:
        """What SQLite's ``integrity_check`` finds wrong with the index (empty when sound)."""
        return _integrity_problems(self._conn())

    def _quarantine_embeddings(self) -> tuple[str, ...]:
        """Check ``embeddings.sqlite`` (the nearest tier's, derived data); move it to ``quarantine/`` when damaged."""
        path = self.root / EMBEDDINGS_NAME
        if not path.exists():
            return ()
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True, timeout=self.timeout)
        conn.text_factory = bytes.decode
        problems = _integrity_problems(conn)
        conn.close()
        if problems:
            (self.root / QUARANTINE_DIR).mkdir(exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{path}{suffix}", self.root / QUARANTINE_DIR / f"{EMBEDDINGS_NAME}.{stamp}{suffix}")
            logger.warning("tool cache %s: %s is damaged (%s); moved it to %s: the nearest tier embeds the "
                           "prompts again", self.root, EMBEDDINGS_NAME, "; ".join(problems), QUARANTINE_DIR)
        return problems

    @_guarded
    def verify(self, check_hashes: bool = True, stale_seconds: float = 3600.0, progress: bool = False) -> VerifyReport:
        """Check the index and every indexed file; quarantine what is damaged.

        First SQLite's integrity check: when it fails, the index cannot be trusted, nothing else is
        checked, and the report's ``recovery`` says what to do. Then every entry's rows: an entry
        whose rows do not parse (corrupt JSON, a file the blobs table lacks, text that is not
        UTF-8) is quarantined. Then every file: a missing one, or one whose size or hash is wrong,
        is moved to ``quarantine/`` (when present). A quarantined entry is removed from the index
        and kept, as JSON, in the ``quarantine`` table, so lookups miss and a later write can record
        the call afresh. Last, the nearest tier's ``embeddings.sqlite``: when damaged it is moved
        to ``quarantine/`` (it is derived data).

        Args:
            check_hashes: re-hash every file (slow on large caches); False checks presence and size.
            stale_seconds: temporary files of interrupted writers older than this are deleted.
            progress: show a progress bar.
        """
        from tqdm import tqdm

        problems = self.index_problems()
        if problems:
            return VerifyReport(0, (), (), 0, 0, 0, index_problems=problems)
        conn = self._conn()
        bad_rows = self._bad_rows(progress)
        if bad_rows:
            with self._write_lock.held():
                self._transaction(lambda: [self._quarantine_rows(conn, [i], f"corrupt row: {why}")
                                           for i, why in bad_rows.items()])
        rows = conn.execute("SELECT sha256, suffix, size FROM blobs").fetchall()
        missing, corrupt, quarantined = [], [], len(bad_rows)
        for sha, suffix, size in tqdm(rows, desc="verify files", unit="file", disable=not progress):
            path = self.blobs.path(sha, suffix)
            problem = _file_problem(path, sha, size, check_hashes)
            if problem is not None:
                (missing if problem[0] == "missing" else corrupt).append(sha)
                quarantined += self._quarantine_file(sha, path, size)
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
        return VerifyReport(len(rows), tuple(missing), tuple(corrupt), quarantined, orphans, removed,
                            bad_rows=tuple(bad_rows), embeddings_problems=self._quarantine_embeddings())

    # ---- integrity ---------------------------------------------------------------------------

    def servable(self, entry: CacheEntry) -> bool:
        """Whether every file of ``entry`` is intact, so that it may be served.

        Each file's size is compared with the index; its sha256 is checked the first time this
        process serves it and again whenever its size, mtime or inode change. A damaged entry is
        counted (``missing_file`` or ``corrupt_file``), logged and quarantined, and False is
        returned; when quarantining fails (e.g. a read-only cache) that is logged too.
        """
        for out in entry.outputs:
            problem = self._checked_file(out)
            if problem is None:
                continue
            kind, why = problem
            self.count(entry.tool, f"{kind}_file")
            try:
                moved = self._quarantine_file(out.sha256, out.path, out.size)
            except (OSError, sqlite3.OperationalError) as exc:
                logger.warning("tool cache %s: entry %d (%s) not served: %s; quarantining it failed (%s); "
                               "run `visenv cache verify %s`", self.root, entry.id, entry.tool, why, exc, self.root)
            else:
                logger.warning("tool cache %s: entry %d (%s) not served: %s; quarantined the %d entries using "
                               "the file", self.root, entry.id, entry.tool, why, moved)
            return False
        return True

    def _checked_file(self, out: CachedOutput) -> tuple[str, str] | None:
        """:func:`_file_problem` for a file about to be served, hashing it only when this process has not yet."""
        try:
            stat = os.stat(out.path)
        except OSError:
            return _file_problem(out.path, out.sha256, out.size, check_hash=False)
        signature = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        with self._checked_lock:
            if self._checked.get(out.path) == signature:
                self._checked.move_to_end(out.path)
                return None
        problem = _file_problem(out.path, out.sha256, out.size, check_hash=True)
        if problem is None:
            with self._checked_lock:
                self._checked[out.path] = signature
                if len(self._checked) > CHECKED_MEMO:
                    self._checked.popitem(last=False)
        return problem

    def _quarantine_file(self, sha: str, path: str | os.PathLike, size: int) -> int:
        """Move a damaged file to ``quarantine/`` and quarantine the entries using it; returns their number.

        Under the write lock the file is checked again: when a writer has repaired it meanwhile,
        nothing is done.
        """
        conn = self._conn()
        with self._write_lock.held():
            problem = _file_problem(path, sha, size, check_hash=True)
            if problem is None:
                return 0
            if problem[0] == "corrupt":
                (self.root / QUARANTINE_DIR).mkdir(exist_ok=True)
                os.replace(path, self.root / QUARANTINE_DIR / os.path.basename(path))
            entry_ids = [row[0] for row in conn.execute("SELECT DISTINCT entry_id FROM outputs WHERE sha256 = ?",
                                                        (sha,))]

            def remove() -> None:
                self._quarantine_rows(conn, entry_ids, f"{problem[0]} file: {problem[1]}")
                conn.execute("DELETE FROM blobs WHERE sha256 = ?", (sha,))
            self._transaction(remove)
        return len(entry_ids)

    @staticmethod
    def _quarantine_rows(conn: sqlite3.Connection, entry_ids: Sequence[int], reason: str) -> None:
        """Move entries to the quarantine table (inside a transaction); their rows need not parse."""
        for entry_id in entry_ids:
            row = conn.execute("SELECT key, CAST(tool AS BLOB), tool_version, seed, CAST(arguments AS BLOB), "
                               "CAST(text AS BLOB), CAST(source AS BLOB) FROM entries WHERE id = ?",
                               (entry_id,)).fetchone()
            if row is None:  # an output row left by an entry already gone
                continue
            key, tool, version, seed, arguments, text, source = row
            outputs = conn.execute("SELECT CAST(kind AS BLOB), CAST(sha256 AS BLOB), CAST(attributes AS BLOB) "
                                   "FROM outputs WHERE entry_id = ? ORDER BY position", (entry_id,)).fetchall()
            record = {"seed": seed, "arguments": _loose_json(arguments), "text": _loose_text(text),
                      "source": _loose_text(source), "version": version,
                      "outputs": [{"kind": _loose_text(kind), "sha256": _loose_text(sha),
                                   "attributes": _loose_json(attributes)} for kind, sha, attributes in outputs]}
            conn.execute("INSERT INTO quarantine (key, tool, record, reason, at) VALUES (?, ?, ?, ?, ?)",
                         (key, _loose_text(tool), canonical_json(record), reason, time.time()))
            conn.execute("DELETE FROM outputs WHERE entry_id = ?", (entry_id,))
            conn.execute("DELETE FROM entries WHERE id = ?", (entry_id,))

    def _transaction(self, body: Callable[[], Any]) -> None:
        """Run ``body`` in one write transaction of this thread's connection (hold the write lock)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            body()
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
    next backend; so does an entry whose media file is missing or damaged, which is quarantined
    (:meth:`ToolCache.servable`). Stateful tools (the to-do list) always pass. A damaged index
    raises :class:`~visenv.error.CacheCorruptError`.

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
        """The intact entry that answers ``request``, or None (counts only damaged entries, see :meth:`ToolCache.servable`)."""
        if request.spec.stateful:
            return None
        key = CallKey.of(request.spec, request.arguments, request.inputs, request.seed)
        entry = self.cache.get_intact(key)
        if entry is None and self.any_seed:
            entry = self.cache.get_intact(key.with_seed(None))
        return entry

    def answer(self, request: ToolRequest) -> BackendAnswer | None:
        """The cached answer, or None to pass."""
        tool = request.spec.name
        entry = self.lookup(request)
        if entry is None:
            self.cache.count(tool, "exact_miss")
            return None
        self.cache.count(tool, "exact_hit")
        return BackendAnswer(outputs=tuple(out.to_media() for out in entry.outputs), text=entry.text,
                             backend=self.name)
