"""CPU cost of a Ray worker's chunking: the same episodes played as chunks of ``--envs`` episodes
(the environments drain at the end of each chunk) or as one chunk refilling the environments as
episodes end, in sync and async mode, measured in process CPU seconds (robust to other jobs on a
shared machine, unlike wall time). Same tiny random policy and VisGen setup as
``benchmarks/rollout_scaling.py``.

    python benchmarks/rollout_chunking.py [--episodes 32] [--envs 16] [--repeats 2]
        [--out benchmarks/results/rollout_chunking.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import warnings

import torch

from rl.config import EnvConfig
from rl.hf import CausalLMPolicy, tiny_causal_lm
from rl.rollout import make_specs, run_episodes
from rl.tokenizer import train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/rollout_chunking.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    env = EnvConfig("visenv/VisGen-v0", {"max_turns": 4})
    probe = env.make()
    tokenizer = train_tokenizer([probe.reset(seed=i)[0]["text"] for i in range(200)], 2000)
    policy = CausalLMPolicy(tiny_causal_lm(len(tokenizer)), tokenizer, max_new_tokens=32)
    envs = [env.make() for _ in range(args.envs)]
    specs = make_specs(0, 0, args.episodes, 1)
    chunks = [specs[i:i + args.envs] for i in range(0, len(specs), args.envs)]
    results = {}
    for mode in ("sync", "async"):
        run_episodes(policy, envs, specs[:args.envs], mode=mode)  # warm-up
        chunked, refilled = [], []
        for _ in range(args.repeats):
            start = time.process_time()
            for chunk in chunks:
                run_episodes(policy, envs, chunk, mode=mode)
            chunked.append(time.process_time() - start)
            start = time.process_time()
            run_episodes(policy, envs, specs, mode=mode)
            refilled.append(time.process_time() - start)
        results[mode] = {"chunks_cpu_s": round(min(chunked), 2), "one_refilled_chunk_cpu_s": round(min(refilled), 2),
                         "refilled_over_chunks": round(min(refilled) / min(chunked), 3)}
    print(f"{'mode':8}{'chunks of envs':>16}{'one refilled':>14}{'ratio':>8}   (CPU s, best of {args.repeats})")
    for mode, r in results.items():
        print(f"{mode:8}{r['chunks_cpu_s']:16.2f}{r['one_refilled_chunk_cpu_s']:14.2f}{r['refilled_over_chunks']:8.3f}")
    output = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
              "command": shlex.join(["python", *sys.argv]), "episodes": args.episodes, "envs": args.envs,
              "load_average": [round(x, 2) for x in os.getloadavg()], "results": results}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(output, handle, indent=2)


if __name__ == "__main__":
    main()
