"""Train a tiny policy with GRPO, its episodes sampled in Ray actors: the trainer's Python API end to end.

    python examples/grpo_ray.py                                   # about a minute on 2 CPU cores
    python examples/grpo_ray.py --iterations 20 --json runs/grpo_ray.json
    python examples/grpo_ray.py --address auto --workers 8        # on a running Ray cluster

The environment is visenv/ToolEcho-v0: the prompt spells out a tool call ("Call tool_text2image_qwen
with prompt 'cat' and n=2.") and the reward (0 to 1) is for making exactly that call. The steps:

1. a byte-level BPE tokenizer and a tiny Llama are built from scratch (rl.tokenizer, rl.hf);
2. a short SFT warm start (rl.sft.train_sft) imitates a noisy teacher that copies the request only
   half the time: the policy writes well-formed calls but often with the wrong subject (about 0.7);
3. GRPO (rl.grpo.GRPO, run by rl.train.Trainer, with a KL penalty to the warm start) with rollouts in
   RayRollout worker actors, each with a copy of the policy that receives the learner's weights
   before every iteration;
4. the warm start and the trained policy play the same held-out episodes (task and sampling seeds
   never used in training; temperature 1) in the same workers. ToolEcho has only 32 distinct
   requests, so this measures learning, not generalisation to unseen requests.

The last checkpoint (policy folder and trainer state) goes to ``--out``/checkpoints; ``rl record
--env.id visenv/ToolEcho-v0 --policy.model OUT/checkpoints/iter_.../policy`` evaluates it again.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from rl import GRPO, Callback, GRPOConfig, RayRollout, Trainer, make_specs  # noqa: E402
from rl.config import EnvConfig  # noqa: E402
from rl.hf import CausalLMPolicy, reference_policy, tiny_causal_lm  # noqa: E402
from rl.sft import train_sft  # noqa: E402
from rl.tokenizer import train_tokenizer  # noqa: E402

ENV = EnvConfig("visenv/ToolEcho-v0")


def teacher_examples(count: int, seed: int) -> list[list[dict[str, str]]]:
    """Chat trajectories of a teacher that makes the requested call half the time, a random one otherwise."""
    env, rng, examples = ENV.make(), random.Random(seed), []
    config = env.unwrapped.config
    for i in range(count):
        observation, info = env.reset(seed=seed * 100_000 + i)
        call = info["target"] if rng.random() < 0.5 else {
            "name": rng.choice(config.tools),
            "arguments": {"prompt": rng.choice(config.subjects), "n": rng.randint(1, config.max_n)}}
        examples.append([{"role": "user", "content": observation["text"]},
                         {"role": "assistant", "content": f"<tool_call>{json.dumps(call)}</tool_call>"}])
    return examples


def tiny_policy(tokenizer, seed: int = 0) -> CausalLMPolicy:
    """A Llama of hidden size 64 (~0.1M parameters); rollout workers build one too, then get the learner's weights."""
    model = tiny_causal_lm(len(tokenizer), hidden_size=64, intermediate_size=128, seed=seed)
    return CausalLMPolicy(model, tokenizer, max_new_tokens=16)  # a call takes ~8 tokens of this tokenizer


def held_out_reward(rollout: RayRollout, policy: CausalLMPolicy, episodes: int, seed: int) -> float:
    """Mean reward of ``episodes`` fresh tasks (one sample each), played in the rollout workers."""
    rollout.set_weights(policy, version=0)
    played, _ = rollout.sample(make_specs(seed + 1_000_003, 0, episodes, 1))  # training uses (seed, iteration)
    return sum(e.reward for e in played) / len(played)


class PrintRewards(Callback):
    """Prints each iteration's mean reward and the share of groups GRPO skipped (all samples scored alike)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def on_step(self, iteration: int, metrics: dict[str, float]) -> bool:
        print(f"iteration {iteration + 1:3d}  reward {metrics['reward']:.3f}  groups skipped "
              f"{metrics['groups_skipped']:.2f}  ({time.perf_counter() - self.start:.0f} s)", flush=True)
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=60, help="GRPO iterations (default 60)")
    parser.add_argument("--workers", type=int, default=2, help="Ray rollout worker actors (default 2)")
    parser.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs each worker reserves (default 1)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="join this Ray cluster ('auto' or host:port); default: $RAY_ADDRESS, else a local Ray")
    parser.add_argument("--eval-episodes", type=int, default=256, help="held-out episodes per policy (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seeds data, model, tasks and sampling (default 0)")
    parser.add_argument("--out", default="runs/grpo_ray", help="folder of the checkpoint (default runs/grpo_ray)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    torch.set_num_threads(1)  # a tiny model gains nothing from threads that fight the workers for cores
    start = time.perf_counter()
    examples = teacher_examples(9600, args.seed)
    tokenizer = train_tokenizer([m["content"] for example in examples for m in example], vocab_size=1000)
    policy = tiny_policy(tokenizer, args.seed)
    sft = train_sft(policy, examples, epochs=1, batch_size=32, learning_rate=3e-3, seed=args.seed)
    print(f"SFT warm start: loss {sft['loss']:.3f} after {sft['steps']:.0f} steps "
          f"({time.perf_counter() - start:.0f} s)")

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(num_cpus=max(2, math.ceil(args.workers * args.worker_cpus)), include_dashboard=False,
                 log_to_driver=False)
    rollout = None
    try:
        # Workers build their policy copy with make_policy (pickled to them) and envs with ENV.make.
        rollout = RayRollout(functools.partial(tiny_policy, tokenizer), ENV.make, num_workers=args.workers,
                             envs_per_worker=32, num_cpus=args.worker_cpus)
        before = held_out_reward(rollout, policy, args.eval_episodes, args.seed)
        print(f"held-out reward before GRPO: {before:.3f} ({args.workers} Ray workers, pids {rollout.worker_pids()})")
        config = GRPOConfig(tasks_per_iteration=8, group_size=8, learning_rate=1e-3, kl_coef=0.02, seed=args.seed)
        algorithm = GRPO(policy, reference_policy(policy), config)  # the KL reference: a frozen copy of the warm start
        trainer = Trainer(policy, algorithm, rollout, iterations=args.iterations,
                          num_groups=config.tasks_per_iteration, group_size=config.group_size, seed=args.seed,
                          checkpoint_dir=os.path.join(args.out, "checkpoints"), callbacks=[PrintRewards()])
        history = trainer.run()
        after = held_out_reward(rollout, policy, args.eval_episodes, args.seed)
        worker_pids = rollout.worker_pids()
    finally:
        if rollout is not None:
            rollout.close()
        ray.shutdown()
    seconds = time.perf_counter() - start
    print(f"held-out reward over {args.eval_episodes} episodes: before {before:.3f}, after {after:.3f} "
          f"({after - before:+.3f}); checkpoint in {os.path.join(args.out, 'checkpoints')} ({seconds:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "before": before, "after": after, "iterations": len(history), "episodes": args.eval_episodes,
            "rewards": [m["reward"] for m in history], "worker_pids": worker_pids, "driver_pid": os.getpid(),
            "seconds": round(seconds, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
