"""Rollout throughput: the serial backend, and the Ray backend with 1 and 2 workers.

Each configuration samples the same ``--episodes`` episodes (same specs, so the same samples) with a
tiny random policy (Llama hidden 128 x 2 layers, a BPE trained on the environment's observations)
after one untimed warm-up round; Ray workers reserve one CPU
and one torch thread each. Reported: episodes/s, policy tokens/s, env steps/s, the scaling efficiency
of 2 workers over 1, and where the workers' time went (generation vs environment).

    python benchmarks/rollout_scaling.py [--env visenv/ToolEcho-v0] [--episodes 256] [--envs-per-worker 32]
        [--repeats 3] [--mode sync|async] [--out benchmarks/results/rollout_scaling.json]

``--mode async`` runs every runner's async loop (the in-process engine: continuous batching, KV caches
kept between turns) instead of one batched ``generate`` per turn.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings

import torch

from rl.config import EnvConfig
from rl.hf import CausalLMPolicy, tiny_causal_lm
from rl.rollout import RayRollout, SerialRollout, make_specs
from rl.tokenizer import train_tokenizer


def measure(rollout, policy, specs, repeats):
    rollout.set_weights(policy, 0)
    rollout.sample(specs)  # warm-up: first generate calls are slower
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        episodes, stats = rollout.sample(specs)
        runs.append((time.perf_counter() - start, episodes, stats))
    wall, episodes, stats = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    tokens = sum(e.policy_tokens for e in episodes)
    busy = stats.generate_seconds + stats.env_seconds
    return {"episodes_per_s": round(len(episodes) / wall, 1), "tokens_per_s": round(tokens / wall, 1),
            "env_steps_per_s": round(stats.env_steps / wall, 1), "wall_s": round(wall, 3),
            "generate_share": round(stats.generate_seconds / busy, 3), "env_share": round(stats.env_seconds / busy, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="visenv/ToolEcho-v0")
    parser.add_argument("--env-options", default="{}", help="JSON options of the environment")
    parser.add_argument("--episodes", type=int, default=256)
    parser.add_argument("--envs-per-worker", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=("sync", "async"), default="sync", help="the rollout loop's mode")
    parser.add_argument("--out", default="benchmarks/results/rollout_scaling.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import ray

    env = EnvConfig(args.env, json.loads(args.env_options))
    probe = env.make()  # a BPE trained on the environment's own observations keeps prompts short
    tokenizer = train_tokenizer([probe.reset(seed=i)[0]["text"] for i in range(200)], 2000)
    policy = CausalLMPolicy(tiny_causal_lm(len(tokenizer)), tokenizer, max_new_tokens=args.max_new_tokens)
    folder = tempfile.mkdtemp(prefix="rollout_scaling_")
    policy.save(folder)
    make_policy = functools.partial(CausalLMPolicy.from_pretrained, folder, max_new_tokens=args.max_new_tokens)
    specs = make_specs(0, 0, args.episodes, 1)
    torch.set_num_threads(1)
    results = {"serial (1 thread)": measure(SerialRollout(policy, env.make, args.envs_per_worker, mode=args.mode), policy, specs,
                                            args.repeats)}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    for workers in (1, 2):
        rollout = RayRollout(make_policy, env.make, workers, args.envs_per_worker, num_cpus=1.0, mode=args.mode)
        results[f"ray, {workers} worker(s)"] = measure(rollout, policy, specs, args.repeats)
        rollout.close()
    ray.shutdown()
    one, two = results["ray, 1 worker(s)"], results["ray, 2 worker(s)"]
    efficiency = two["episodes_per_s"] / (2 * one["episodes_per_s"])
    print(f"{'':22}{'episodes/s':>12}{'tokens/s':>10}{'steps/s':>9}{'gen share':>10}{'env share':>10}")
    for name, r in results.items():
        print(f"{name:22}{r['episodes_per_s']:12.1f}{r['tokens_per_s']:10.0f}{r['env_steps_per_s']:9.1f}"
              f"{r['generate_share']:10.2f}{r['env_share']:10.2f}")
    print(f"scaling efficiency 2 workers vs 1: {efficiency:.2f}")
    output = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
              "command": shlex.join(["python", *sys.argv]), "env": args.env, "episodes": args.episodes,
              "mode": args.mode, "load_average": [round(x, 2) for x in os.getloadavg()],
              "results": results, "scaling_efficiency": round(efficiency, 3)}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(output, handle, indent=2)


if __name__ == "__main__":
    main()
