"""The nearest tier: MiniLM embeddings (offline), the vector index, and the backend."""

import argparse
import logging
import multiprocessing
import os
import pickle
import re
import shutil
import sqlite3
import sys
import threading
import zlib

import numpy as np
import pytest

from cache_fixtures import image_output, request, write_png
from visenv.cache_cli import add_cache_commands
from visenv.error import CacheCorruptError, DependencyNotInstalled
from visenv.tools.cache import ToolCache
from visenv.tools.cache_key import CallKey
from visenv.tools.nearest import IndexLoad, MiniLMEmbedder, NearestBackend, SavedIndex, VectorIndex
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
    fresh = NearestBackend(cache, embedder=second)
    fresh.refresh()
    assert second.texts == 0  # four entries from the saved index, the owl's embedding from embeddings.sqlite
    assert (fresh.index_load.loaded, fresh.index_load.added, fresh.index_load.embedded) == (4, 1, 0)


def test_ties_are_broken_by_the_call_seed(tmp_path, embedder):
    cache = ToolCache(tmp_path / "cache")
    shas = {put(cache, tmp_path, "a red fox", seed=s, image_seed=100 + s).outputs[0].sha256 for s in range(3)}
    backend = NearestBackend(cache, threshold=0.9, embedder=embedder)
    served = [backend.answer(request(T2I.name, {"prompt": "a red fox."}, seed=s)).outputs[0].sha256
              for s in range(6)]
    assert set(served) == shas
    assert served[:3] == served[3:]


def test_damaged_neighbours_are_quarantined_and_skipped(cache, tmp_path, embedder, caplog):
    backend = NearestBackend(cache, threshold=0.6, embedder=embedder)
    fox = request(T2I.name, {"prompt": "a fox asleep in snow"})
    first = backend.answer(fox)
    os.remove(first.outputs[0].path)
    assert backend.answer(fox) is None  # file gone: not served
    [entry_id] = [i for i, _ in backend.neighbours(fox)][:1]
    assert cache.get_by_id(entry_id) is None  # quarantined by the lookup
    assert cache.verify().ok
    assert backend.answer(fox) is None and cache.counters()[T2I.name]["missing_file"] == 1
    city = request(T2I.name, {"prompt": "a rainy cyberpunk street at night"})
    served = backend.answer(city).outputs[0]
    raw = bytearray(open(served.path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(served.path, "wb").write(bytes(raw))
    os.utime(served.path, ns=(1, 1))  # a later write: the served file's signature changes
    with caplog.at_level(logging.WARNING, logger="visenv.tools.cache"):
        assert backend.answer(city) is None
    assert "does not hash to its name" in caplog.text and cache.counters()[T2I.name]["corrupt_file"] == 1
    assert (cache.root / "quarantine" / os.path.basename(served.path)).exists()


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


# ---- the saved index ---------------------------------------------------------------------------

SUBJECTS = ("a red fox", "an owl", "a lighthouse", "a bowl of ramen", "a cyberpunk street", "a sailing boat",
            "a castle", "a robot")
SETTINGS = ("in the snow", "at sunset", "in the rain", "at night", "as a watercolour")
QUERIES = ("a fox asleep in snow", "ramen noodles at night", "a lighthouse in a storm", "an owl painted in watercolour")
IVF = 16  # an ann_threshold that makes the 40-entry group a faiss IVF index (16 lists)


class WordHashEmbedder:
    """Another embedding model: hashed bag of words, 64-d, cheap enough for other processes."""

    name, dim = "test-word-hash", 64

    def encode(self, texts):
        vectors = np.zeros((len(texts), self.dim), np.float32)
        for row, text in zip(vectors, texts):
            for word in re.findall(r"\w+", text.lower()):
                row[zlib.crc32(word.encode()) % self.dim] += 1.0
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


@pytest.fixture
def big_cache(tmp_path):
    cache = ToolCache(tmp_path / "cache")
    for subject in SUBJECTS:
        for setting in SETTINGS:
            put(cache, tmp_path, f"{subject} {setting}")
    return cache


def neighbours_of(backend, prompts=QUERIES):
    return {prompt: backend.neighbours(request(T2I.name, {"prompt": prompt})) for prompt in prompts}


def forget_embeddings(cache):
    """Empty embeddings.sqlite: whatever is not in the saved index would have to be embedded again."""
    with sqlite3.connect(cache.root / "embeddings.sqlite") as conn:
        conn.execute("DELETE FROM vectors")
    conn.close()


@pytest.mark.parametrize("ann_threshold", [20_000, IVF], ids=["exact", "ivf"])
def test_a_second_backend_loads_the_saved_index_instead_of_rebuilding(big_cache, embedder, monkeypatch, ann_threshold):
    first = NearestBackend(big_cache, embedder=embedder, ann_threshold=ann_threshold)
    assert first.refresh() == 40
    assert first.index_load == IndexLoad(0, 40, 40, 0, saved=True, problem="no saved index")
    expected = neighbours_of(first)
    forget_embeddings(big_cache)
    trainings = []
    monkeypatch.setattr(VectorIndex, "_build_ivf", lambda index: trainings.append(index))
    counting = CountingEmbedder(embedder)
    second = NearestBackend(ToolCache(big_cache.root), embedder=counting, ann_threshold=ann_threshold)
    assert second.refresh() == 40
    assert counting.texts == 0 and trainings == []
    assert second.index_load == IndexLoad(40, 0, 0, 0, saved=False, problem=None)
    assert neighbours_of(second) == expected
    assert [index.approximate for index in second._groups.values()] == [ann_threshold == IVF]


def test_the_saved_index_is_updated_with_new_entries_and_without_quarantined_ones(cache, tmp_path, embedder):
    NearestBackend(cache, embedder=embedder).refresh()
    fox = cache.get(CallKey.of(T2I, {"prompt": "a red fox sleeping in the snow"}, seed=0))
    owl = put(cache, tmp_path, "a snowy owl perched on a branch in the dark")
    wide = put(cache, tmp_path, "a red fox in deep snow, wide shot", aspect_ratio="16:9")
    os.remove(fox.outputs[0].path)
    assert cache.verify().quarantined_entries == 1
    counting = CountingEmbedder(embedder)
    second = NearestBackend(ToolCache(cache.root), threshold=0.6, embedder=counting)
    assert second.refresh() == 5
    assert counting.texts == 2  # only the two new entries
    assert second.index_load == IndexLoad(4, 2, 2, 1, saved=True, problem=None)
    served = {entry_id for entry_id, _ in second.neighbours(request(T2I.name, {"prompt": "a fox asleep in snow"}))}
    assert fox.id not in served and owl.id in served and len(served) == 4
    night_owl = second.answer(request(T2I.name, {"prompt": "an owl on a branch at night"}))
    assert night_owl.outputs[0].sha256 == owl.outputs[0].sha256
    wide_fox = second.answer(request(T2I.name, {"prompt": "a fox asleep in snow", "aspect_ratio": "16:9"}))
    assert wide_fox.outputs[0].sha256 == wide.outputs[0].sha256
    third = NearestBackend(ToolCache(cache.root), embedder=CountingEmbedder(embedder))
    third.refresh()
    assert third.index_load == IndexLoad(5, 0, 0, 0, saved=False, problem=None)


def test_a_saved_index_a_little_behind_is_updated_in_memory_only(cache, tmp_path, embedder, monkeypatch):
    NearestBackend(cache, embedder=embedder).refresh()
    manifest = (cache.root / "nearest" / embedder.name / "manifest.json").read_text()
    put(cache, tmp_path, "a snowy owl perched on a branch in the dark")
    monkeypatch.setattr("visenv.tools.nearest.RESAVE_FRACTION", 0.5)  # 1 new entry of 4 is under half
    for embedded in (1, 0):  # the first process embeds the owl into embeddings.sqlite, the second reads it
        backend = NearestBackend(ToolCache(cache.root), embedder=embedder)
        backend.refresh()
        assert backend.index_load == IndexLoad(4, 1, embedded, 0, saved=False, problem=None)
    assert (cache.root / "nearest" / embedder.name / "manifest.json").read_text() == manifest


def damage(folder, how):
    data = max((p for p in folder.iterdir() if p.suffix in (".npy", ".faiss")), key=lambda p: p.stat().st_size)
    if how == "truncate":
        os.truncate(data, data.stat().st_size // 2)
    elif how == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif how == "delete":
        data.unlink()
    else:
        manifest = folder / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"last_id": 40', '"last_id": 39'))
        return "manifest.json"
    return data.name


@pytest.mark.parametrize("how", ["truncate", "flip", "delete", "manifest"])
@pytest.mark.parametrize("ann_threshold", [20_000, IVF], ids=["exact", "ivf"])
def test_a_corrupt_saved_index_is_rebuilt_with_a_warning(big_cache, embedder, caplog, how, ann_threshold):
    first = NearestBackend(big_cache, embedder=embedder, ann_threshold=ann_threshold)
    first.refresh()
    expected = neighbours_of(first)
    damaged = damage(big_cache.root / "nearest" / embedder.name, how)
    with caplog.at_level(logging.INFO, logger="visenv.tools.nearest"):
        second = NearestBackend(ToolCache(big_cache.root), embedder=embedder, ann_threshold=ann_threshold)
        second.refresh()
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert damaged in record.getMessage() and "rebuilt from the cache" in record.getMessage()
    assert second.index_load.problem == record.getMessage()
    assert (second.index_load.loaded, second.index_load.added, second.index_load.saved) == (0, 40, True)
    assert neighbours_of(second) == expected
    caplog.clear()
    third = NearestBackend(ToolCache(big_cache.root), embedder=embedder, ann_threshold=ann_threshold)
    third.refresh()
    assert third.index_load == IndexLoad(40, 0, 0, 0, saved=False, problem=None) and not caplog.records


@pytest.mark.parametrize("content", [b"", b"\x89 not json \xff" * 50], ids=["empty", "garbage"])
def test_an_empty_or_garbage_manifest_is_rebuilt_with_a_warning(cache, embedder, caplog, content):
    NearestBackend(cache, embedder=embedder).refresh()
    (cache.root / "nearest" / embedder.name / "manifest.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="visenv.tools.nearest"):
        backend = NearestBackend(ToolCache(cache.root), threshold=0.6, embedder=embedder)
        answer = backend.answer(request(T2I.name, {"prompt": "a fox asleep in snow"}))
    assert answer.outputs[0].prompt == "a red fox sleeping in the snow"
    assert "manifest.json" in caplog.text and "rebuilt from the cache" in caplog.text
    assert (backend.index_load.loaded, backend.index_load.added, backend.index_load.saved) == (0, 4, True)


def test_a_damaged_embeddings_database_is_one_clear_error_until_verify_moves_it_aside(cache, embedder):
    first = NearestBackend(cache, embedder=embedder)
    first.refresh()
    del first  # closes its connection
    shutil.rmtree(cache.root / "nearest")  # the next backend must read embeddings.sqlite
    for suffix in ("-wal", "-shm"):
        (cache.root / f"embeddings.sqlite{suffix}").unlink(missing_ok=True)
    (cache.root / "embeddings.sqlite").write_bytes(b"not a database " * 500)
    fox = request(T2I.name, {"prompt": "a fox asleep in snow"})
    with pytest.raises(CacheCorruptError, match="embeddings.sqlite.*not a database.*`visenv cache verify"):
        NearestBackend(ToolCache(cache.root), threshold=0.6, embedder=embedder).answer(fox)
    report = ToolCache(cache.root).verify()
    assert not report.ok and report.embeddings_problems == ("file is not a database",)
    assert [p.name.startswith("embeddings.sqlite.") for p in (cache.root / "quarantine").iterdir()] == [True]
    counting = CountingEmbedder(embedder)
    again = NearestBackend(ToolCache(cache.root), threshold=0.6, embedder=counting)
    assert again.answer(fox).outputs[0].prompt == "a red fox sleeping in the snow"
    assert counting.texts == 4 + 1  # the entries embedded again, and the query
    assert ToolCache(cache.root).verify().ok


def test_another_embedding_model_or_ann_threshold_rebuilds(cache, embedder, caplog):
    NearestBackend(cache, embedder=embedder).refresh()
    words = CountingEmbedder(WordHashEmbedder())
    other = NearestBackend(ToolCache(cache.root), threshold=0.5, embedder=words)
    other.refresh()
    assert words.texts == 4 and other.index_load == IndexLoad(0, 4, 4, 0, saved=True, problem="no saved index")
    answer = other.answer(request(T2I.name, {"prompt": "lighthouse, cliff, sunset"}))
    assert answer.outputs[0].prompt == "a lighthouse on a cliff at sunset"
    counting = CountingEmbedder(embedder)
    minilm = NearestBackend(ToolCache(cache.root), embedder=counting)  # each model keeps its own saved index
    minilm.refresh()
    assert minilm.index_load == IndexLoad(4, 0, 0, 0, saved=False, problem=None)
    with caplog.at_level(logging.INFO, logger="visenv.tools.nearest"):
        wider = NearestBackend(ToolCache(cache.root), embedder=counting, ann_threshold=100_000)
        wider.refresh()
    assert "ann_threshold 20000, not 100000" in wider.index_load.problem and "ann_threshold 20000" in caplog.text
    assert (wider.index_load.loaded, wider.index_load.added, wider.index_load.saved) == (0, 4, True)
    assert counting.texts == 0  # rebuilt from the stored embeddings


def test_an_index_saved_for_another_cache_is_not_used(tmp_path, embedder):
    prompts = ["a red fox sleeping in the snow", "a bowl of ramen with chopsticks"]
    old = ToolCache(tmp_path / "old")
    for prompt in prompts:
        put(old, tmp_path, prompt)
    NearestBackend(old, embedder=embedder).refresh()
    new = ToolCache(tmp_path / "new")  # the same entry ids, for other prompts
    for prompt in reversed(prompts):
        put(new, tmp_path, prompt)
    shutil.copytree(old.root / "nearest", new.root / "nearest")
    backend = NearestBackend(new, threshold=0.6, embedder=embedder)
    answer = backend.answer(request(T2I.name, {"prompt": "a fox asleep in snow"}))
    assert "cache_id" in backend.index_load.problem
    assert answer.outputs[0].prompt == "a red fox sleeping in the snow"


def test_a_writer_waits_for_readers_before_replacing_the_saved_index(cache, tmp_path, embedder):
    backend = NearestBackend(cache, embedder=embedder)
    backend.refresh()
    saved = SavedIndex(cache, embedder.name, embedder.dim, backend.ann_threshold, backend.nprobe)
    files = sorted(saved.folder.iterdir())
    put(cache, tmp_path, "a snowy owl perched on a branch in the dark")
    backend.refresh()
    with saved.locked(exclusive=False):  # a reader in the middle of reading
        writer = threading.Thread(target=backend.save_index)
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and sorted(saved.folder.iterdir()) == files
        assert saved.read().size == 4
    writer.join()
    assert saved.read().size == 5 and sorted(saved.folder.iterdir()) != files


def test_cache_index_command_prebuilds_and_updates_the_saved_index(cache, tmp_path, embedder, capsys, monkeypatch):
    NearestBackend(cache, embedder=embedder).refresh()  # embeds the prompts, so the command needs no model
    shutil.rmtree(cache.root / "nearest")
    parser = argparse.ArgumentParser(prog="visenv")
    add_cache_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cache", "index", str(cache.root), "--quiet"])
    assert args.func(args) == 0
    assert "4 entries (0 loaded from the saved index, 4 added" in capsys.readouterr().out
    put(cache, tmp_path, "a snowy owl perched on a branch in the dark")
    monkeypatch.setattr("visenv.tools.nearest.RESAVE_FRACTION", 0.5)  # a backend would not save 1 new entry of 4
    NearestBackend(ToolCache(cache.root), embedder=embedder).refresh()  # embeds the owl, saves nothing
    assert args.func(args) == 0  # the command saves whatever is new
    assert "5 entries (4 loaded from the saved index, 1 added of which 0 embedded" in capsys.readouterr().out
    backend = NearestBackend(ToolCache(cache.root), embedder=embedder)
    backend.refresh()
    assert backend.index_load == IndexLoad(5, 0, 0, 0, saved=False, problem=None)


SPAWN = multiprocessing.get_context("spawn")


def load_and_save(root: str, folder: str, worker: int, rounds: int) -> list:
    """Load the saved index, check it against the cache, store an entry and save the index; ``rounds`` times."""
    problems = []
    for n in range(rounds):
        cache = ToolCache(root)
        backend = NearestBackend(cache, embedder=WordHashEmbedder())
        backend.refresh()
        problems.append(backend.index_load.problem)
        indexed = sorted(i for index in backend._groups.values() for i in index.search(np.ones(64) / 8, 10**6)[0])
        assert indexed == sorted(e.id for e in cache.entries() if e.id <= backend._last_id)
        put(cache, folder, f"worker {worker} adds a lantern number {n}")
        backend.refresh()
        backend.save_index()
    return problems


def test_concurrent_loads_and_saves_never_see_a_partial_index(cache, tmp_path):
    rounds = 4
    with SPAWN.Pool(3) as pool:
        results = pool.starmap(load_and_save, [(str(cache.root), str(tmp_path / f"w{w}"), w, rounds) for w in range(3)])
    problems = [problem for result in results for problem in result]
    assert set(problems) <= {None, "no saved index"}  # never a corrupt or partial index
    final = NearestBackend(ToolCache(cache.root), embedder=WordHashEmbedder())
    assert final.refresh() == 4 + 3 * rounds and final.index_load.problem is None
