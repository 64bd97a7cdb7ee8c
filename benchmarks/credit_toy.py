"""Episode-level against turn-level credit (GiGPO) of GRPO on a three-turn toy, side by side in one run.

The toy is the tests' LetterEnv (``tests/rl_helpers.py``): each of three turns asks for a word and pays
the share of its letters the turn contains (return 0-3), so every turn has its own reward and a
random tiny policy already gets varied returns. A fresh tiny Llama (hidden 64, the tests' BPE) is
trained by GRPO from scratch with each credit, on the same seeds: 4 tasks x 8 samples per iteration,
lr 1e-3, no KL, 1 torch thread. Printed per credit and seed: the first iteration at which the
5-iteration mean reward reached ``--threshold``, and the mean reward of the last 5 iterations.

    python benchmarks/credit_toy.py [--seeds 0 1 2] [--iterations 100] [--out benchmarks/results/credit_toy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from rl.grpo import GRPO, GRPOConfig  # noqa: E402
from rl.rollout import SerialRollout  # noqa: E402
from rl.train import Trainer  # noqa: E402
from rl_helpers import LetterEnv, echo_tokenizer, tiny_policy  # noqa: E402

CREDITS = [("episode", "history"), ("turn", "turn"), ("turn", "history")]


def run(credit: str, anchor: str, seed: int, iterations: int, tokenizer) -> dict:
    policy = tiny_policy(tokenizer, max_new_tokens=8, seed=seed)
    config = GRPOConfig(tasks_per_iteration=4, group_size=8, learning_rate=1e-3, kl_coef=0.0, credit=credit,
                        anchor=anchor, seed=seed)
    start = time.perf_counter()
    history = Trainer(policy, GRPO(policy, None, config), SerialRollout(policy, lambda: LetterEnv(turns=3), 32),
                      iterations=iterations, num_groups=4, group_size=8, seed=seed).run()
    return {"credit": credit, "anchor": anchor, "seed": seed, "seconds": time.perf_counter() - start,
            "rewards": [m["reward"] for m in history],
            "step_groups_shared": history[-1].get("step_groups_shared")}


def first_reaching(rewards: list[float], threshold: float) -> int | None:
    for i in range(4, len(rewards)):
        if sum(rewards[i - 4:i + 1]) / 5 >= threshold:
            return i
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--threshold", type=float, default=2.2)
    parser.add_argument("--out", default="benchmarks/results/credit_toy.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = echo_tokenizer()
    runs = [run(credit, anchor, seed, args.iterations, tokenizer) for seed in args.seeds for credit, anchor in CREDITS]
    print(f"{'credit':<10}{'anchor':<9}{'seed':>5}{'reached ' + str(args.threshold):>13}{'first 5':>9}{'last 5':>8}"
          f"{'seconds':>9}")
    for r in runs:
        r["reached_at"] = first_reaching(r["rewards"], args.threshold)
        head, tail = sum(r["rewards"][:5]) / 5, sum(r["rewards"][-5:]) / 5
        print(f"{r['credit']:<10}{r['anchor']:<9}{r['seed']:>5}{str(r['reached_at']):>13}{head:>9.3f}{tail:>8.3f}"
              f"{r['seconds']:>9.0f}")
    report = {"command": "python " + shlex.join(sys.argv), "machine": platform.platform(), "cpus": os.cpu_count(),
              "load_average": list(os.getloadavg()), "threshold": args.threshold, "runs": runs}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
