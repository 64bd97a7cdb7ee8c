"""Tier counters and the fidelity report (perceptual-hash proxy for C_tool)."""

import json

import numpy as np
import pytest
from PIL import Image

from visenv.tools.attribute import AttributeBackend
from visenv.tools.cache import ExactCacheBackend, ToolCache
from visenv.tools.cache_io import import_calls, read_calls
from visenv.tools.fidelity import PROXY_METRIC, TierCounter, fidelity_report, perceptual_hash, phash_similarity
from visenv.tools.nearest import MiniLMEmbedder, NearestBackend

T2I = "tool_text2image_qwen"
SUBJECTS = [("a red fox sleeping in the snow", "a fox asleep in deep snow"),
            ("a bowl of ramen with chopsticks", "noodle soup in a bowl, chopsticks on the side"),
            ("a lighthouse on a cliff at sunset", "a lighthouse standing on cliffs in the evening"),
            ("a sailboat on a calm lake", "a small sailing boat on a still lake"),
            ("a snowy owl on a branch at night", "an owl perched on a branch in the dark"),
            ("a bicycle leaning against a brick wall", "a bike parked by a red brick wall")]


def scene(i: int, noise: float = 0.0, size: int = 96) -> Image.Image:
    """A distinct picture per subject: a gradient at its own angle with a bright disc at its own place."""
    y, x = np.mgrid[0:size, 0:size] / size
    angle = i * np.pi / len(SUBJECTS)
    picture = 200 * (np.cos(angle) * x + np.sin(angle) * y)
    cx, cy = 0.2 + 0.6 * ((i * 37) % 10) / 10, 0.2 + 0.6 * ((i * 53) % 10) / 10
    picture[(x - cx) ** 2 + (y - cy) ** 2 < 0.03] = 255
    picture = picture + noise * np.random.default_rng(i).standard_normal(picture.shape)
    return Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).convert("RGB")


def test_phash_similarity_separates_same_and_different_pictures(tmp_path):
    scene(0).save(tmp_path / "a.png")
    scene(0).resize((64, 64)).save(tmp_path / "a_small.jpg", quality=70)
    scene(3).save(tmp_path / "b.png")
    a = perceptual_hash(str(tmp_path / "a.png"), "image")
    assert phash_similarity(a, a) == 1.0
    assert phash_similarity(a, perceptual_hash(str(tmp_path / "a_small.jpg"), "image")) >= 0.9
    assert phash_similarity(a, perceptual_hash(str(tmp_path / "b.png"), "image")) < 0.75
    with pytest.raises(ValueError, match="not 'audio'"):
        perceptual_hash(str(tmp_path / "a.png"), "audio")


def test_phash_reads_the_middle_frame_of_videos(media_db):
    video = media_db.entries("video")[0]
    assert 0 <= perceptual_hash(video.path, "video") < 2**64


def call(tool, backend, gpu, latency, status="ok", similarity=None):
    return {"tool": tool, "backend": backend, "status": status, "gpu_seconds": gpu, "latency_seconds": latency,
            "similarity": similarity}


def test_tier_counter_counts_shares_and_avoided_cost():
    counter = TierCounter()
    for record in [call(T2I, "exact_cache", 9.0, 11.0), call(T2I, "nearest", 9.0, 11.0, similarity=0.9),
                   call(T2I, "real", 9.0, 11.0), call("tool_text2video_veo", "attribute", 240.0, 32.0),
                   call(T2I, "", 0.0, 0.0, status="error")]:
        counter.add_call(record)
    other = TierCounter()
    other.add_call(call(T2I, "nearest", 9.0, 11.0, similarity=0.7))
    summary = counter.merge(other).summary()
    assert summary["calls"] == 5 and summary["refused"] == 1
    assert summary["tiers"]["nearest"] == {"calls": 2, "share": 0.4, "gpu_seconds": 18.0, "latency_seconds": 22.0}
    assert summary["gpu_seconds_avoided"] == 9.0 + 18.0 + 240.0  # everything but the real call
    assert summary["latency_seconds_avoided"] == 11.0 + 22.0 + 32.0
    assert summary["mean_similarity"] == pytest.approx(0.8)
    assert summary["tools"][T2I] == {"exact_cache": 1, "nearest": 2, "real": 1}


def write_pairs(folder, index_of_prompt, noise):
    """A calls file whose outputs are the scenes (with noise) of the given prompts."""
    lines = []
    for prompt, i in index_of_prompt:
        scene(i, noise).save(folder / f"{i}.png")
        lines.append({"tool": T2I, "arguments": {"prompt": prompt}, "file": f"{i}.png", "seed": 1})
    (folder / "calls.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder / "calls.jsonl"


def test_fidelity_report_ranks_the_tiers(tmp_path, media_db):
    (tmp_path / "cached").mkdir()
    (tmp_path / "heldout").mkdir()
    cache = ToolCache(tmp_path / "cache")
    import_calls(cache, write_pairs(tmp_path / "cached", [(a, i) for i, (a, _) in enumerate(SUBJECTS)], noise=8.0),
                 progress=False)
    heldout = read_calls(write_pairs(tmp_path / "heldout", [(b, i) for i, (_, b) in enumerate(SUBJECTS)], noise=0.0))
    tiers = {"exact_cache": ExactCacheBackend(cache),
             "nearest": NearestBackend(cache, threshold=0.5, embedder=MiniLMEmbedder()),
             "attribute": AttributeBackend(media_db)}
    report = fidelity_report(heldout, tiers)
    assert report["metric"] == PROXY_METRIC and "Proxy for CLIP" in report["note"]
    assert report["tiers"]["exact_cache"] == {"served": 0, "passed": 6, "failed": 0, "c_tool": None,
                                               "as_asked": None, "tools": {}}
    nearest, attribute = report["tiers"]["nearest"], report["tiers"]["attribute"]
    assert nearest["served"] == 6 and attribute["served"] == 6
    assert nearest["c_tool"] > 0.9
    assert nearest["c_tool"] > attribute["c_tool"] + 0.2
    assert report["chance"] < 0.8
    assert nearest["tools"][T2I]["n"] == 6


def test_fidelity_report_with_clip_image_similarity(tmp_path, media_db):
    from reward_episodes import tiny_clip

    from visenv.rewards.clip import ClipScorer
    from visenv.tools.fidelity import ClipImageSimilarity

    (tmp_path / "heldout").mkdir()
    (tmp_path / "clip").mkdir()
    heldout = read_calls(write_pairs(tmp_path / "heldout", [(b, i) for i, (_, b) in enumerate(SUBJECTS)], noise=0.0))
    metric = ClipImageSimilarity(ClipScorer(model=tiny_clip(tmp_path / "clip"), pretrained=None))
    same = str(heldout[0].files[0])
    assert metric.similarity(metric.embed(same, "image"), metric.embed(same, "image")) == pytest.approx(1.0)
    report = fidelity_report(heldout, {"attribute": AttributeBackend(media_db)}, metric)
    assert report["metric"] == "clip_image_similarity" and "CLIP" in report["note"]
    attribute = report["tiers"]["attribute"]
    assert attribute["served"] == len(heldout) and -1.0 <= attribute["c_tool"] <= 1.0
