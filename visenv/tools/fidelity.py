"""Fidelity and cost, measured: which tier served each call, what it saved, how close it came.

:class:`TierCounter` counts the calls each tier served (per tool), the hit rates, and the real
cost that the virtual tiers avoided, from the environment's call records (``info["tool_result"]``
at each step, or an episode's :class:`~visenv.episode.EpisodeRecord`). Counters from many workers
merge.

:func:`fidelity_report` measures the paper's C_tool as a number: given held-out calls with the
real tool's outputs, it asks each tier for its answer and compares the answer's media with the real
media with a picture similarity: :class:`ClipImageSimilarity` (CLIP image-image cosine, the
issue's definition of C_tool; needs the ``clip`` extra and weights) or, by default, a clearly
named proxy that needs no model, :data:`PROXY_METRIC` = ``"phash_similarity"``: one minus the
Hamming distance of 64-bit DCT perceptual hashes over 64 (1.0 identical pictures; near 0.5 for
unrelated ones; video on its middle frame). The report also gives the chance level: the same metric between the real
outputs of *different* held-out calls of one tool, so that a tier's score can be read against it.
"""

from __future__ import annotations

import collections
import statistics
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from visenv.media import Artifact, sha256_file
from visenv.mediadb import thumbnail
from visenv.tools.backends import Backend, BackendAnswer, ToolFailure
from visenv.tools.cache_io import CallLine

REAL_TIER = "real"
PROXY_METRIC = "phash_similarity"
PROXY_NOTE = ("Proxy for CLIP image-image similarity: 1 - Hamming(pHash_a, pHash_b) / 64 over 64-bit DCT "
              "perceptual hashes (video: middle frame). Unrelated pictures score about 0.5.")
_HASH_SIDE = 32


class TierCounter:
    """Calls served per tier and tool, with the real GPU-seconds and latency the other tiers avoided.

    Feed it call records (a :class:`~visenv.episode.CallRecord` or its ``to_dict()``, as found in
    ``info["tool_result"]``) with :meth:`add_call`, whole episodes with :meth:`add_episode`, and
    combine workers' counters with :meth:`merge`.
    """

    def __init__(self) -> None:
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self.refused: collections.Counter[str] = collections.Counter()
        self.gpu_seconds: collections.Counter[str] = collections.Counter()
        self.latency_seconds: collections.Counter[str] = collections.Counter()
        self.similarities: list[float] = []

    def add_call(self, call: Any) -> None:
        """Count one call record (object or dict); calls refused before or by a tool count as refused."""
        record = call if isinstance(call, Mapping) else call.to_dict()
        if record["status"] != "ok":
            self.refused[record["tool"]] += 1
            return
        tier = record["backend"]
        self.calls[(tier, record["tool"])] += 1
        self.gpu_seconds[tier] += float(record["gpu_seconds"])
        self.latency_seconds[tier] += float(record["latency_seconds"])
        if record.get("similarity") is not None:
            self.similarities.append(float(record["similarity"]))

    def add_episode(self, episode: Any) -> None:
        """Count every call of an :class:`~visenv.episode.EpisodeRecord`."""
        for call in episode.calls:
            self.add_call(call)

    def merge(self, other: TierCounter) -> TierCounter:
        """Add another counter's counts into this one (returns self)."""
        self.calls.update(other.calls)
        self.refused.update(other.refused)
        self.gpu_seconds.update(other.gpu_seconds)
        self.latency_seconds.update(other.latency_seconds)
        self.similarities.extend(other.similarities)
        return self

    def summary(self) -> dict[str, Any]:
        """Counts, shares, avoided cost and the mean neighbour similarity, as plain data.

        Returns:
            ``{"calls", "refused", "tiers": {tier: {"calls", "share", "gpu_seconds",
            "latency_seconds"}}, "gpu_seconds_avoided", "latency_seconds_avoided",
            "mean_similarity", "tools": {tool: {tier: calls}}}``; a tier's GPU-seconds are what
            its calls would have cost on the real tools.
        """
        total = sum(self.calls.values())
        per_tier = collections.Counter()
        tools: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for (tier, tool), n in sorted(self.calls.items()):
            per_tier[tier] += n
            tools[tool][tier] = n
        tiers = {tier: {"calls": n, "share": n / total, "gpu_seconds": round(self.gpu_seconds[tier], 3),
                        "latency_seconds": round(self.latency_seconds[tier], 3)}
                 for tier, n in sorted(per_tier.items())}
        virtual = [tier for tier in per_tier if tier != REAL_TIER]
        return {"calls": total, "refused": sum(self.refused.values()), "tiers": tiers,
                "gpu_seconds_avoided": round(sum(self.gpu_seconds[t] for t in virtual), 3),
                "latency_seconds_avoided": round(sum(self.latency_seconds[t] for t in virtual), 3),
                "mean_similarity": statistics.fmean(self.similarities) if self.similarities else None,
                "tools": dict(tools)}


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    matrix = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n))
    matrix[0] *= 1 / np.sqrt(2)
    return matrix * np.sqrt(2 / n)


_DCT = _dct_matrix(_HASH_SIDE)


def perceptual_hash(path: str, kind: str) -> int:
    """The 64-bit DCT perceptual hash (pHash) of an image, or of a video's middle frame.

    The picture is reduced to 32x32 grey levels; the hash has one bit per low-frequency DCT
    coefficient (the top-left 8x8 block), set when it exceeds the block's median.
    """
    if kind == "image":
        with Image.open(path) as image:
            grey = image.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.LANCZOS)
    elif kind == "video":
        grey = Image.fromarray(thumbnail(path, "video", 128)).convert("L").resize(
            (_HASH_SIDE, _HASH_SIDE), Image.Resampling.LANCZOS)
    else:
        raise ValueError(f"perceptual_hash compares images and video, not {kind!r}")
    pixels = np.asarray(grey, np.float64)
    block = (_DCT @ pixels @ _DCT.T)[:8, :8].reshape(-1)
    bits = block > np.median(block[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def phash_similarity(a: int, b: int) -> float:
    """1 - (Hamming distance of two 64-bit hashes) / 64."""
    return 1.0 - bin(a ^ b).count("1") / 64.0


class PerceptualHashSimilarity:
    """The proxy metric: pHash similarity (cheap, no model; see :data:`PROXY_NOTE`)."""

    name = PROXY_METRIC
    note = PROXY_NOTE

    def embed(self, path: str, kind: str) -> int:
        return perceptual_hash(path, kind)

    def similarity(self, a: int, b: int) -> float:
        return phash_similarity(a, b)


class ColourHistogramSimilarity:
    """A second model-free proxy: histogram intersection of 4x4x4-bin RGB colour histograms
    (1.0 same colour mix; video on its middle frame). Sensitive to what colours a picture shows,
    blind to where: it tells prompt-following renderings from random pictures where pHash, which
    reads layout, cannot."""

    name = "colour_histogram_similarity"
    note = ("Histogram intersection of 64-bin RGB colour histograms (video: middle frame); 1.0 for the same "
            "colour mix.")

    def embed(self, path: str, kind: str) -> np.ndarray:
        if kind == "image":
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB").resize((64, 64)))
        else:
            pixels = thumbnail(path, "video", 64)
        bins = (pixels // 64).reshape(-1, 3).astype(int)
        counts = np.bincount(bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], minlength=64)
        return counts / counts.sum()

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(np.minimum(a, b).sum())


class ClipImageSimilarity:
    """CLIP image-image cosine similarity (a video: the mean over its sampled frames).

    Args:
        scorer: a :class:`visenv.rewards.clip.ClipScorer`; its memo cache makes reruns cheap.
    """

    name = "clip_image_similarity"

    def __init__(self, scorer: Any):
        self.scorer = scorer
        self.note = f"CLIP image-image cosine similarity with {scorer.model_id}."

    def embed(self, path: str, kind: str) -> np.ndarray | None:
        artifact = Artifact(id="img_000000000000", kind=kind, sha256=sha256_file(path), attributes={},
                            producer="", path=path)
        rows = self.scorer.picture_embeddings([artifact])[0]
        return None if rows is None else rows.mean(axis=0)

    def similarity(self, a: np.ndarray | None, b: np.ndarray | None) -> float:
        if a is None or b is None:
            raise ValueError("CLIP could not read one of the pictures (see the log).")
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def fidelity_report(calls: Sequence[CallLine], tiers: Mapping[str, Backend], metric: Any = None) -> dict[str, Any]:
    """How close each tier's outputs come to the real ones, per tier and per tool (C_tool).

    Args:
        calls: held-out calls with the real tool's output files (:func:`~visenv.tools.cache_io.read_calls`);
            they must not be in the cache that the tiers read, or the exact tier scores them as seen.
        tiers: name -> backend to evaluate, e.g. ``{"nearest": NearestBackend(cache),
            "attribute": AttributeBackend()}``.
        metric: :class:`ClipImageSimilarity` (C_tool as CLIP sees it), :class:`ColourHistogramSimilarity`
            or, by default, :class:`PerceptualHashSimilarity` (proxies that need no model).

    Returns:
        ``{"metric", "note", "chance", "tiers": {name: {"served", "passed", "failed", "c_tool",
        "as_asked", "tools": {tool: {"n", "mean"}}}}}``; ``c_tool`` is the mean similarity over the
        calls the tier served (None if it served none); ``chance`` is the similarity of two real
        outputs of different calls of the same tool; ``as_asked`` is, for a content-aware tier (the
        semantic tier, whose outputs carry their truth), the share of its outputs that show what
        the call asked (no defect), and None for a tier whose outputs carry no truth (the attribute,
        cache and real tiers). Calls of text and audio tools are skipped.
    """
    metric = metric or PerceptualHashSimilarity()
    calls = [c for c in calls if c.spec.output.kind in ("image", "video") and c.files]
    real = [[metric.embed(str(f), c.spec.output.kind) for f in c.files] for c in calls]
    by_tool: dict[str, list[int]] = collections.defaultdict(list)
    for i, call in enumerate(calls):
        by_tool[call.spec.name].append(i)
    chance = [metric.similarity(real[a][0], real[b][0])
              for indices in by_tool.values() for a, b in zip(indices, indices[1:])]
    report: dict[str, Any] = {"metric": metric.name, "note": metric.note,
                              "chance": statistics.fmean(chance) if chance else None, "tiers": {}}
    for name, backend in tiers.items():
        scores: dict[str, list[float]] = collections.defaultdict(list)
        passed = failed = 0
        truths: list[bool] = []
        for call, references in zip(calls, real):
            answer = backend.answer(call.request())
            if answer is None:
                passed += 1
            elif isinstance(answer, ToolFailure) or not isinstance(answer, BackendAnswer) or not answer.outputs:
                failed += 1
            else:
                truths += [not out.content["defects"] for out in answer.outputs if out.content is not None]
                pairs = zip(answer.outputs, references)
                scores[call.spec.name].append(statistics.fmean(
                    metric.similarity(metric.embed(out.path, out.kind), ref) for out, ref in pairs))
        served = [s for values in scores.values() for s in values]
        report["tiers"][name] = {
            "served": len(served), "passed": passed, "failed": failed,
            "c_tool": statistics.fmean(served) if served else None,
            "as_asked": statistics.fmean(truths) if truths else None,
            "tools": {tool: {"n": len(v), "mean": statistics.fmean(v)} for tool, v in sorted(scores.items())}}
    return report
