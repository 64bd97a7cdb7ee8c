"""CLIP rewards on a tiny random open_clip model: shapes, ranges, determinism, batching, the memo."""

import dataclasses
import json
import logging
import multiprocessing
import pickle
import threading
import time

import numpy as np
import pytest
import torch

from reward_episodes import episode, media, task
from visenv.error import ConfigError
from visenv.rewards.cache import MemoCache
from visenv.rewards.clip import (TINY_CLIP_CONFIG, ClipAlignment, ClipConsistency, ClipScorer, tiny_clip_model,
                                 video_frames)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An open_clip local-dir folder with a tiny config and no weights."""
    return tiny_clip_model(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-media")
    return {"images": [media(folder, "image", seed) for seed in range(5)],
            "video": media(folder, "video", 7), "folder": folder}


def scorer(model, **options):
    return ClipScorer(model=model, pretrained=None, **options)


class ForwardCounter:
    """Counts forward passes of the image and text towers via hooks on the loaded model."""

    def __init__(self, clip):
        clip._load()
        self.images = self.texts = 0
        clip._net.visual.register_forward_hook(lambda *_: self._add("images"))
        clip._net.transformer.register_forward_hook(lambda *_: self._add("texts"))

    def _add(self, name):
        setattr(self, name, getattr(self, name) + 1)


def test_tiny_model_loads_in_under_five_seconds(tiny_model):
    clip = scorer(tiny_model)
    start = time.perf_counter()
    clip._load()
    assert time.perf_counter() - start < 5.0 and clip.loaded


def test_tiny_scorer_is_the_tiny_config_with_seeded_random_weights(tiny_model, files, tmp_path):
    clip = ClipScorer.tiny(tmp_path / "new" / "folder", seed=2, cache_path=str(tmp_path / "memo.sqlite"))
    assert json.loads((tmp_path / "new" / "folder" / "open_clip_config.json").read_text()) == TINY_CLIP_CONFIG
    assert (clip.model, clip.pretrained, clip.seed) == (f"local-dir:{tmp_path / 'new' / 'folder'}", None, 2)
    assert clip.model_id == scorer(tiny_model, seed=2).model_id  # the id names the config's content and the seed
    image = files["images"][0]
    np.testing.assert_array_equal(clip.picture_embeddings([image])[0],
                                  scorer(tiny_model, seed=2).picture_embeddings([image])[0])
    assert clip.cache.path == str(tmp_path / "memo.sqlite") and len(clip.cache) == 1


def test_embeddings_are_unit_vectors_with_a_row_per_picture(tiny_model, files):
    clip = scorer(tiny_model, video_frames=3)
    image, video = files["images"][0], files["video"]
    embeddings = clip.picture_embeddings([image, video])
    assert [e.shape for e in embeddings] == [(1, 16), (3, 16)]
    texts = clip.text_embeddings(["a red bicycle", "a canal"])
    assert texts.shape == (2, 16)
    for rows in (*embeddings, texts):
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert clip.images_encoded == 4 and clip.texts_encoded == 2
    # The three sampled frames differ: the box and disc move across the clip.
    assert not np.allclose(embeddings[1][0], embeddings[1][2])


def test_video_frames_are_evenly_spaced_and_distinct(files):
    frames = video_frames(files["video"].path, 4)
    assert len(frames) == 4 and all(f.size == (64, 64) for f in frames)
    assert len({f.tobytes() for f in frames}) == 4


def test_alignment_is_the_mean_cosine_over_frames(tiny_model, files):
    clip = scorer(tiny_model)
    image, video = files["images"][1], files["video"]
    values = clip.alignment([image, video], ["a bicycle", "a bicycle"])
    pictures = clip.picture_embeddings([image, video])
    text = clip.text_embeddings(["a bicycle"])[0]
    assert values == pytest.approx([float(pictures[0][0] @ text), float((pictures[1] @ text).mean())], abs=1e-6)
    assert all(-1.0 <= v <= 1.0 for v in values)


def test_same_seed_same_weights_other_seed_other_weights(tiny_model, files):
    image = files["images"][0]
    first = scorer(tiny_model).picture_embeddings([image])[0]
    again = scorer(tiny_model).picture_embeddings([image])[0]
    other = scorer(tiny_model, seed=1).picture_embeddings([image])[0]
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert scorer(tiny_model).model_id != scorer(tiny_model, seed=1).model_id


def test_batching_equals_one_by_one(tiny_model, files):
    artifacts = [*files["images"], files["video"]]
    texts = [f"picture number {i}" for i in range(len(artifacts))]
    batched = scorer(tiny_model, batch_size=4).alignment(artifacts, texts)
    single = scorer(tiny_model, batch_size=1)
    one_by_one = [single.alignment([a], [t])[0] for a, t in zip(artifacts, texts)]
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_memo_hits_skip_the_model_and_persist_across_processes(tiny_model, files, tmp_path):
    path = str(tmp_path / "clip.sqlite")
    clip = scorer(tiny_model, cache_path=path)
    counter = ForwardCounter(clip)
    artifacts = files["images"][:3]
    first = clip.alignment(artifacts, ["a", "b", "c"])
    assert counter.images == 1 and counter.texts == 1  # one batch each
    assert clip.alignment(artifacts, ["a", "b", "c"]) == first
    assert counter.images == 1 and counter.texts == 1
    clip.alignment(artifacts[:1], ["a new text"])  # the picture is memoised, the text is not
    assert counter.images == 1 and counter.texts == 2

    reopened = pickle.loads(pickle.dumps(clip))  # as a Ray worker gets it: settings only
    assert not reopened.loaded
    assert reopened.alignment(artifacts, ["a", "b", "c"]) == first
    assert not reopened.loaded and reopened.images_encoded == 0 and reopened.texts_encoded == 0

    other_weights = scorer(tiny_model, cache_path=path, seed=3)
    other_weights.alignment(artifacts, ["a", "b", "c"])
    assert other_weights.images_encoded == 3  # the model id is part of the key


def test_identical_pictures_are_perfectly_consistent(tiny_model, files):
    image = files["images"][0]
    twin = dataclasses.replace(image, id="img_00000000beef")
    clip = scorer(tiny_model)
    assert clip.consistency([image, twin]) == pytest.approx(1.0, abs=1e-5)
    assert clip.images_encoded == 1  # same content hash, one forward
    assert clip.consistency([image]) is None
    assert -1.0 <= clip.consistency(files["images"]) < 1.0


def test_alignment_component_scores_in_unit_range_and_none_when_nothing_visual(tiny_model, files):
    clip = scorer(tiny_model)
    component = ClipAlignment(clip)
    delivered = episode(task(amount=2), files["images"][:2])
    empty = episode(task(), [])
    undelivered = episode(task(), files["images"][:1], deliver=False)
    scores = component([delivered, empty, undelivered])
    assert scores[1] is None and scores[2] is None
    cosines = clip.alignment(files["images"][:2], [delivered.task.request] * 2)
    assert scores[0] == pytest.approx(np.mean([min(1, max(0, 2.5 * c)) for c in cosines]))
    assert 0.0 <= scores[0] <= 1.0
    detail = component.last_details[0]
    assert detail["judge_id"] == component.judge_id and detail["judge_id"].startswith(clip.model_id)
    assert detail["cosines"] == pytest.approx(cosines)
    assert component.failures == 0


def test_alignment_text_sources(tiny_model, files):
    clip = scorer(tiny_model)
    image = dataclasses.replace(files["images"][0], prompt="a bicycle on a bridge")
    unprompted = files["images"][1]
    record = episode(task(amount=2), [image, unprompted])
    by_prompt = ClipAlignment(clip, text="prompt", scale=1.0)([record])[0]
    assert by_prompt == pytest.approx(max(0.0, clip.alignment([image], ["a bicycle on a bridge"])[0]))
    by_keywords = ClipAlignment(clip, text="keywords", scale=1.0)([record])[0]
    expected = np.mean([max(0.0, c) for c in clip.alignment([image, unprompted], ["red bicycle, canal"] * 2)])
    assert by_keywords == pytest.approx(expected)


def test_consistency_component_applies_only_when_required(tiny_model, files):
    clip = scorer(tiny_model)
    component = ClipConsistency(clip)
    images = files["images"][:3]
    required = episode(task(amount=3, consistency=("object",)), images)
    not_required = episode(task(amount=3), images)
    single_video = episode(task(modality="video", consistency=("style",)), [files["video"]])
    scores = component([required, not_required, single_video])
    assert scores[1] is None
    assert scores[0] == pytest.approx(min(1.0, max(0.0, clip.consistency(images))))
    assert scores[2] == pytest.approx(min(1.0, max(0.0, clip.consistency([files["video"]]))))  # across frames
    assert all(0.0 <= s <= 1.0 for s in (scores[0], scores[2]))


def test_unreadable_media_gives_none_counted_and_logged(tiny_model, files, caplog, tmp_path):
    broken = dataclasses.replace(files["images"][0], id="img_0000000dead0", sha256="0" * 64,
                                 path=str(tmp_path / "missing.png"))
    component = ClipAlignment(scorer(tiny_model))
    good = episode(task(), files["images"][1:2])
    with caplog.at_level(logging.WARNING):
        scores = component([episode(task(), [broken]), good])
    assert scores[0] is None and scores[1] is not None
    assert component.failures == 1
    assert "img_0000000dead0" in caplog.text and "score None" in caplog.text


def test_components_pickle_with_their_scorer(tiny_model, files):
    component = ClipConsistency(scorer(tiny_model))
    record = episode(task(amount=2, consistency=("style",)), files["images"][:2])
    before = component([record])
    clone = pickle.loads(pickle.dumps(component))
    assert not clone.scorer.loaded
    assert clone([record]) == pytest.approx(before)


def test_local_dir_weights_load_exactly(tiny_model, files, tmp_path):
    source = scorer(tiny_model, seed=5)
    source._load()
    folder = tmp_path / "trained"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    torch.save(source._net.state_dict(), folder / "open_clip_pytorch_model.bin")
    loaded = ClipScorer(model=f"local-dir:{folder}", pretrained="local")
    image = files["images"][2]
    np.testing.assert_allclose(loaded.picture_embeddings([image])[0], source.picture_embeddings([image])[0], atol=1e-6)
    assert "/files:" in loaded.model_id


def test_config_errors_name_the_value_and_the_fix(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"\('ViT-Nope'\) is not an open_clip architecture.*list_models"):
        ClipScorer(model="ViT-Nope")
    with pytest.raises(ConfigError, match=r"\('nonsense-tag'\) is neither a pretrained tag of ViT-B-32 \(openai, "):
        ClipScorer(model="ViT-B-32", pretrained="nonsense-tag")
    with pytest.raises(ConfigError, match=r"must be 'local' .* or None"):
        ClipScorer(model=tiny_model, pretrained="laion2b_s34b_b79k")
    with pytest.raises(ConfigError, match=r"holds no checkpoint"):
        ClipScorer(model=tiny_model, pretrained="local")
    with pytest.raises(ConfigError, match=r"open_clip_config.json"):
        ClipScorer(model=f"local-dir:{tmp_path}", pretrained=None)
    with pytest.raises(ConfigError, match=r"batch_size \(0\) must be >= 1"):
        ClipScorer(model=tiny_model, pretrained=None, batch_size=0)
    with pytest.raises(ConfigError, match=r"text \('caption'\) must be one of"):
        ClipAlignment(scorer(tiny_model), text="caption")


def test_offline_missing_tag_fails_fast_and_says_how_to_supply_weights(monkeypatch, tmp_path, files):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    clip = ClipScorer(model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert clip.model_id.endswith("ViT-B-32/laion2b_s34b_b79k")  # known without any weights
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"HF_HUB_OFFLINE is set.*download once.*pretrained='/path/to/"
                                          r".*local-dir:"):
        clip.picture_embeddings(files["images"][:1])
    assert time.perf_counter() - start < 5.0


def _write_keys(path, start):
    memo = MemoCache(path)
    for i in range(start, start + 150, 10):
        memo.put_many({f"key-{j}": str(j).encode() for j in range(i, i + 10)})


def test_memo_file_is_shared_by_concurrent_processes_and_threads(tmp_path):
    path = str(tmp_path / "memo.sqlite")
    memo = MemoCache(path)
    memo.put_many({"key-0": b"first"})
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_keys, args=(path, start)) for start in (0, 100)]
    workers.append(threading.Thread(target=_write_keys, args=(path, 200)))
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert [getattr(w, "exitcode", 0) for w in workers] == [0, 0, 0]
    assert len(memo) == 350
    found = memo.get_many([f"key-{i}" for i in range(360)])
    assert len(found) == 350 and found["key-0"] == b"first" and found["key-349"] == b"349"
    assert memo.hits == 350 and memo.misses == 10
