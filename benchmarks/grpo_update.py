"""GRPO update time against ``micro_batch_tokens`` (length-sorted chunks with accumulated gradients).

One GRPO update (reference forward, policy forward + backward, one AdamW step) on episodes shaped like
the main job's: the main job's tiny Llama (hidden 128, 2 layers, 4 heads, vocabulary 1,000), episodes
whose token lengths follow the main job's measured spread (mean ~390, a long tail to ~950; 45% of the
tokens sampled by the policy). The lengths are drawn, the tokens random: the update's cost depends on
the shapes only. ``micro_batch_tokens=0`` pads the whole iteration to its longest episode in one pass.

    python benchmarks/grpo_update.py [--episodes 32] [--repeats 5] [--threads 2]
        [--sizes 0,8192,4096,2048,1024] [--out benchmarks/results/grpo_update.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np
import torch

from rl.grpo import GRPO, GRPOConfig
from rl.hf import CausalLMPolicy, reference_policy, tiny_causal_lm
from rl.policy import ENV, POLICY, Segment
from rl.rollout import Episode, EpisodeSpec
from rl.tokenizer import train_tokenizer


def make_episodes(count: int, group_size: int, vocab: int, seed: int) -> list[Episode]:
    """Episodes of three env + policy turn pairs whose total lengths follow the main job's spread."""
    rng = np.random.default_rng(seed)
    totals = np.clip(rng.lognormal(np.log(360), 0.35, count), 150, 950).astype(int)
    episodes = []
    for i, total in enumerate(totals):
        segments, left = [], int(total)
        for turn in range(3):
            env_len = max(1, int(left * 0.55 / (3 - turn)))
            pol_len = max(1, int(left * 0.45 / (3 - turn)))
            left -= env_len + pol_len
            segments.append(Segment(ENV, "", rng.integers(0, vocab, env_len).tolist()))
            segments.append(Segment(POLICY, "", rng.integers(0, vocab, pol_len).tolist(),
                                    logprobs=(-rng.random(pol_len)).tolist()))
        episodes.append(Episode(EpisodeSpec(i, i // group_size, i, i // group_size), segments,
                                rewards=[float(rng.random())], components={}, terminated=True, truncated=False))
    return episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="0,8192,4096,2048,1024")
    parser.add_argument("--out", default="benchmarks/results/grpo_update.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocab = 1000
    episodes = make_episodes(args.episodes, args.group_size, vocab, seed=0)
    model = tiny_causal_lm(vocab, 128, 2, 4, 352, seed=0)
    tokenizer = train_tokenizer(["a b c d e f g h"], 300)  # only pad/eos ids are read
    policy = CausalLMPolicy(model, tokenizer, chat="plain")
    reference = reference_policy(policy)
    lengths = [sum(len(s.token_ids) for s in e.segments) for e in episodes]
    results = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        algorithm = GRPO(policy, reference, GRPOConfig(tasks_per_iteration=args.episodes // args.group_size,
                                                       group_size=args.group_size, micro_batch_tokens=size))
        algorithm.update(episodes, 0)  # warm-up
        times = []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            algorithm.update(episodes, repeat + 1)
            times.append(time.perf_counter() - start)
        results[str(size)] = {"median_s": statistics.median(times), "min_s": min(times)}
        print(f"micro_batch_tokens={size:>5}: median {statistics.median(times):.3f} s, min {min(times):.3f} s")
    report = {"command": "python " + shlex.join(sys.argv), "machine": platform.platform(), "cpus": os.cpu_count(),
              "load_average": list(os.getloadavg()), "threads": args.threads, "episodes": args.episodes,
              "tokens": sum(lengths), "longest": max(lengths), "padded_one_pass": max(lengths) * len(lengths),
              "results": results}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    print(f"{sum(lengths)} tokens in {len(lengths)} episodes (longest {max(lengths)}); wrote {args.out}")


if __name__ == "__main__":
    main()
