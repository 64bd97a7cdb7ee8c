"""CLIP ViT-B-32 throughput on this machine: images/s and texts/s, batched vs one by one, and the
latency of a memo hit.

The model has random weights (``pretrained=None``): the compute is the same as with trained ones
and nothing is downloaded. Images are 512 x 512 procedural PNGs; a timing covers the whole
:meth:`~visenv.rewards.clip.ClipScorer.picture_embeddings` call (decode, preprocess, forward,
normalise, memo write), with the memo emptied before each timed pass; ``forward_only`` times the
image tower alone on already preprocessed batches, to show what decoding and resizing cost. Memo hits are read from a
warm SQLite memo by a fresh (unpickled) scorer, which never loads the model.

    python benchmarks/clip_throughput.py [--images 64] [--texts 256] [--batch 32] [--repeats 3]
        [--out benchmarks/results/clip_throughput.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from visenv.media import Artifact
from visenv.procedural_media import png_image
from visenv.rewards.cache import MemoCache
from visenv.rewards.clip import ClipScorer


def make_images(folder: Path, count: int) -> list[Artifact]:
    artifacts = []
    for seed in range(count):
        data = png_image(512, 512, seed)
        path = folder / f"{seed}.png"
        path.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        artifacts.append(Artifact(id=f"img_{digest[:12]}", kind="image", sha256=digest,
                                  attributes={"width": 512, "height": 512}, producer="bench", path=str(path)))
    return artifacts


def rate(scorer: ClipScorer, work, items: int, repeats: int) -> float:
    """Median items/s of ``work()`` over ``repeats`` passes, each on an empty in-process memo."""
    rates = []
    for _ in range(repeats):
        scorer.cache = MemoCache(None)
        start = time.perf_counter()
        work()
        rates.append(items / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/clip_throughput.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp), args.images)
        texts = [f"a product photo of item number {i} on a marble table, soft light" for i in range(args.texts)]
        batched = ClipScorer(model="ViT-B-32", pretrained=None, device="cpu", batch_size=args.batch)
        single = ClipScorer(model="ViT-B-32", pretrained=None, device="cpu", batch_size=1)
        batched.text_embeddings(["warm up"])
        single.text_embeddings(["warm up"])
        tensors = torch.stack([batched._preprocess(Image.open(a.path).convert("RGB")) for a in images])
        with torch.inference_mode():
            start = time.perf_counter()
            for first in range(0, len(tensors), args.batch):
                batched._net.encode_image(tensors[first:first + args.batch])
        results = {
            "forward_only_images_per_s_batched": len(tensors) / (time.perf_counter() - start),
            "images_per_s_batched": rate(batched, lambda: batched.picture_embeddings(images), len(images), args.repeats),
            "images_per_s_one_by_one": rate(single, lambda: [single.picture_embeddings([a]) for a in images],
                                            len(images), args.repeats),
            "texts_per_s_batched": rate(batched, lambda: batched.text_embeddings(texts), len(texts), args.repeats),
            "texts_per_s_one_by_one": rate(single, lambda: [single.text_embeddings([t]) for t in texts],
                                           len(texts), args.repeats),
        }
        memo = ClipScorer(model="ViT-B-32", pretrained=None, device="cpu", batch_size=args.batch,
                          cache_path=str(Path(tmp) / "clip.sqlite"))
        memo.alignment(images, texts[:len(images)])
        fresh = pickle.loads(pickle.dumps(memo))
        start = time.perf_counter()
        fresh.alignment(images, texts[:len(images)])
        batch_hit = (time.perf_counter() - start) / len(images)
        hits = []
        for image, text in zip(images, texts):
            start = time.perf_counter()
            fresh.alignment([image], [text])
            hits.append(time.perf_counter() - start)
        assert not fresh.loaded, "memo hits must not load the model"
        results |= {"memo_hit_ms_per_pair_in_batch": batch_hit * 1e3,
                    "memo_hit_ms_single_pair_median": statistics.median(hits) * 1e3}
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"torch threads {torch.get_num_threads()}, shared with other jobs",
              "python": platform.python_version(), "torch": torch.__version__, "model": "ViT-B-32 (random weights)",
              "images": args.images, "texts": args.texts, "batch_size": args.batch, "repeats": args.repeats,
              **results}
    print(f"{'metric':<36}{'value':>12}")
    for key, value in results.items():
        print(f"{key:<36}{value:>12.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
