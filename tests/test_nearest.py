"""The nearest tier: MiniLM embeddings (offline), the vector index, and the backend."""

import os
import pickle
import sys
import zlib

import numpy as np
import pytest

from cache_fixtures import image_output, request, write_png
from visenv.error import DependencyNotInstalled
from visenv.tools.cache import ToolCache
from visenv.tools.cache_key import CallKey
from visenv.tools.nearest import MiniLMEmbedder, NearestBackend, VectorIndex
from visenv.tools.specs import get_tool

T2I = get_tool("tool_text2image_qwen")


@pytest.fixture(scope="module")
def embedder():
    return MiniLMEmbedder()


class CountingEmbedder:
    """MiniLM, counting the texts it embeds."""

    def __init__(self, inner):
        self.inner, self.name, self.dim, self.texts = inner, inner.name, inner.dim, 0

    def encode(self, texts):
        self.texts += len(texts)
        return self.inner.encode(texts)


def put(cache, folder, prompt, seed=0, image_seed=None, **arguments):
    name = zlib.crc32(f"{prompt}|{seed}|{sorted(arguments.items())}".encode())
    path = write_png(folder, f"{name}.png", image_seed or name)
    return cache.put(T2I, CallKey.of(T2I, {"prompt": prompt, **arguments}, seed=seed), [image_output(path, prompt)])


@pytest.fixture
def cache(tmp_path):
    cache = ToolCache(tmp_path / "cache")
    for prompt in ("a red fox sleeping in the snow", "a bowl of ramen with chopsticks",
                   "a lighthouse on a cliff at sunset", "a cyberpunk city street at night in the rain"):
        put(cache, tmp_path, prompt)
    return cache


def test_minilm_loads_offline_and_ranks_paraphrases_first(embedder):
    vectors = embedder.encode(["a red fox in the snow", "a fox lying in snow, red fur", "a bowl of noodle soup"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > 0.75 > 0.3 > vectors[0] @ vectors[2]
    again = embedder.encode(["a red fox in the snow"])[0]
    assert np.allclose(again, vectors[0], atol=1e-5)


def test_nearest_serves_the_closest_prompt_with_its_similarity(cache, embedder):
    backend = NearestBackend(cache, threshold=0.6, embedder=embedder)
    answer = backend.answer(request(T2I.name, {"prompt": "a fox asleep in snow"}, seed=3))
    assert answer.backend == "nearest" and 0.6 <= answer.similarity < 1.0
    assert answer.outputs[0].prompt == "a red fox sleeping in the snow"
    assert backend.answer(request(T2I.name, {"prompt": "a spreadsheet of quarterly tax figures"})) is None
    counts = cache.counters()[T2I.name]
    assert (counts["nearest_hit"], counts["nearest_miss"]) == (1, 1)


def test_nearest_only_serves_calls_of_the_same_shape_and_tool(cache, tmp_path, embedder):
    backend = NearestBackend(cache, threshold=0.6, embedder=embedder)
    assert backend.answer(request(T2I.name, {"prompt": "a fox asleep in snow", "aspect_ratio": "16:9"})) is None
    assert backend.answer(request(T2I.name, {"prompt": "a fox asleep in snow", "n": 2})) is None
    assert backend.answer(request("tool_text2image_gpt", {"prompt": "a fox asleep in snow"})) is None
    wide = put(cache, tmp_path, "a red fox in deep snow, wide shot", aspect_ratio="16:9")
    backend.refresh()
    answer = backend.answer(request(T2I.name, {"prompt": "a fox asleep in snow", "aspect_ratio": "16:9"}))
    assert answer.outputs[0].sha256 == wide.outputs[0].sha256


def test_nearest_passes_calls_that_depend_on_artifacts(cache, embedder):
    backend = NearestBackend(cache, threshold=0.0, embedder=embedder)
    with_refs = request(T2I.name, {"prompt": "a red fox sleeping in the snow", "reference_images": ["img_1"]})
    assert backend.answer(with_refs) is None
    assert backend.answer(request("tool_image_edit_qwen", {"image": "img_1", "prompt": "a red fox"})) is None
    assert backend.answer(request("tool_task_manager", {"action": "list"})) is None
    assert "nearest_miss" not in cache.counters().get(T2I.name, {})


def test_nearest_picks_up_new_entries_and_reuses_stored_embeddings(cache, tmp_path, embedder):
    counting = CountingEmbedder(embedder)
    backend = NearestBackend(cache, threshold=0.6, embedder=counting, refresh_seconds=0.0)
    assert backend.answer(request(T2I.name, {"prompt": "an owl on a branch at night"})) is None
    assert counting.texts == 4 + 1  # the four entries, then the query
    put(ToolCache(cache.root), tmp_path, "a snowy owl perched on a branch in the dark")  # another writer
    answer = backend.answer(request(T2I.name, {"prompt": "an owl on a branch at night"}))
    assert answer is not None and "owl" in answer.outputs[0].prompt
    second = CountingEmbedder(embedder)
    NearestBackend(cache, embedder=second).refresh()
    assert second.texts == 0  # every entry's embedding was kept in embeddings.sqlite


def test_ties_are_broken_by_the_call_seed(tmp_path, embedder):
    cache = ToolCache(tmp_path / "cache")
    shas = {put(cache, tmp_path, "a red fox", seed=s, image_seed=100 + s).outputs[0].sha256 for s in range(3)}
    backend = NearestBackend(cache, threshold=0.9, embedder=embedder)
    served = [backend.answer(request(T2I.name, {"prompt": "a red fox."}, seed=s)).outputs[0].sha256
              for s in range(6)]
    assert set(served) == shas
    assert served[:3] == served[3:]


def test_quarantined_neighbours_are_skipped(cache, tmp_path, embedder):
    backend = NearestBackend(cache, threshold=0.6, embedder=embedder)
    fox = request(T2I.name, {"prompt": "a fox asleep in snow"})
    first = backend.answer(fox).outputs[0]
    os.remove(first.path)
    assert backend.answer(fox) is None  # file gone: not served
    assert cache.verify().quarantined_entries == 1
    assert backend.answer(fox) is None  # entry gone from the index: skipped


def test_nearest_backend_pickles_and_rebuilds_its_index(cache, embedder):
    backend = NearestBackend(cache, threshold=0.6, embedder=embedder)
    backend.refresh()
    clone = pickle.loads(pickle.dumps(backend))
    answer = clone.answer(request(T2I.name, {"prompt": "a lighthouse at dusk on the cliffs"}))
    assert answer.outputs[0].prompt == "a lighthouse on a cliff at sunset"


def clustered(n, dim=32, clusters=50, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    points = centres[rng.integers(clusters, size=n)] + 0.3 * rng.standard_normal((n, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def test_vector_index_switches_to_ivf_and_keeps_recall():
    vectors = clustered(6000)
    exact, ann = VectorIndex(32, ann_threshold=10**9), VectorIndex(32, ann_threshold=1000, nprobe=8)
    for index in (exact, ann):
        index.add(np.arange(6000), vectors)
    rng = np.random.default_rng(1)
    queries = vectors[rng.integers(6000, size=200)] + 0.05 * rng.standard_normal((200, 32)).astype(np.float32)
    agree = sum(exact.search(q, 1)[0][0] == ann.search(q, 1)[0][0] for q in queries)
    assert ann.approximate and not exact.approximate
    assert agree >= 190
    ids, sims = exact.search(vectors[17], 3)
    assert ids[0] == 17 and np.isclose(sims[0], 1.0, atol=1e-5) and sims[0] >= sims[1] >= sims[2]


def test_vector_index_grows_past_its_training_size():
    vectors = clustered(9000, seed=2)
    index = VectorIndex(32, ann_threshold=1000)
    index.add(np.arange(1000), vectors[:1000])
    index.search(vectors[0], 1)  # builds the IVF index on 1000 vectors
    index.add(np.arange(1000, 3000), vectors[1000:3000])  # within 4x: added to the IVF index
    index.add(np.arange(3000, 9000), vectors[3000:])  # past 4x: rebuilt from everything
    assert len(index) == 9000
    for i in (5, 2500, 8999):
        assert index.search(vectors[i], 1)[0][0] == i


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    index = VectorIndex(8, ann_threshold=10)
    index.add(np.arange(20), clustered(20, dim=8))
    with pytest.raises(DependencyNotInstalled, match=r"pip install 'visenv\[nearest\]'"):
        index.search(clustered(1, dim=8)[0], 1)


def test_threshold_is_checked(cache):
    with pytest.raises(ValueError, match="threshold"):
        NearestBackend(cache, threshold=1.5)
