"""Overlap of rollout and update: GRPO iterations with and without ``Trainer(overlap=True)``, side by side.

GRPO on the VisGen environment at simulated real latencies (``tool_latency_scale`` 0.01 over the cost
model, an episode-end judge with a fixed latency through :class:`~visenv.rewards.rubric.DelayedRubric`),
async rollout mode, the same seeds, the same starting weights, in one run: for each backend (``serial``:
the rollout on a thread of the learner's process, with its own policy copy; ``ray``: one rollout worker
actor of one CPU), first ``--iterations`` iterations with the rollout and the update alternating, then as
many with the next iteration's rollout running while the update runs (each iteration sampled one update
behind; ``grpo.off_policy`` in both runs, so that overlap is the only difference).

The policy is the one of ``benchmarks/async_rollout.py``: a tiny random Llama (hidden 128 x 2 layers, a
BPE trained on the env's observations) samples ``--max-new-tokens`` tokens per turn from the whole
conversation, and the turn's text is the random agent's, so that episodes call real tool specs. The
learner trains on the sampled token ids (a real GRPO update over the whole episodes, environment tokens
included in the forward pass); the rewards come from the agent's calls, so they are the same in both runs
whatever the weights (the script checks it), and the comparison is one of time only.

Both backends stream in async mode (``SerialRollout.submit``, ``RayRollout.submit``: iteration ``it + 1``
starts generating while the last episodes of iteration ``it`` are scored, on the Ray worker too); a third run
of each backend, ``overlap_threaded``, hides the stream behind the bare rollout protocol, so that the trainer
samples iteration ``it + 1`` on a thread only once iteration ``it`` returned (the overlap without the stream),
for the side-by-side gain of streaming.

On one machine the gain comes from what the rollout waits on (tool and judge latencies) while the update
computes. In the serial backend the rollout's Python (a tiny model's generation is Python-bound) and the
update's share one interpreter lock; a Ray worker is a process of its own.

    python benchmarks/overlap.py [--quick] [--backends serial,ray] [--iterations 5] [--out benchmarks/results/overlap.json]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from typing import Any

import torch

from async_rollout import PacedAgentPolicy  # the paced random agent of the async rollout benchmark
from baselines.random_agent import RandomAgent
from rl.grpo import GRPO, GRPOConfig
from rl.hf import CausalLMPolicy, tiny_causal_lm
from rl.policy import AgentPolicy
from rl.config import start_ray
from rl.rollout import RayRollout, SerialRollout, make_specs, run_episodes
from rl.tokenizer import train_tokenizer
from rl.train import Callback, Trainer
from visenv.envs.visgen import VisGenEnv
from visenv.rewards.rubric import DelayedRubric


def paced_policy(folder: str, max_new_tokens: int) -> PacedAgentPolicy:
    """A Ray worker's sampler: the saved tiny LM (the learner's weights follow) paced by the random agent."""
    torch.set_num_threads(1)
    return PacedAgentPolicy.from_pretrained(folder, agent=AgentPolicy(RandomAgent), max_new_tokens=max_new_tokens)


class Rewards(Callback):
    """Every iteration's episode rewards (to check that both runs played the same episodes)."""

    def __init__(self):
        self.rewards: list[list[str]] = []

    def on_rollout_end(self, iteration, episodes, stats):
        self.rewards.append([str(e.reward) for e in episodes])


class Threaded:
    """A rollout behind the bare :class:`~rl.rollout.Rollout` protocol (no ``submit``): the trainer
    then overlaps on a thread, sampling iteration ``it + 1`` only once iteration ``it`` has returned, as
    every overlapping run did before the serial backend streamed."""

    def __init__(self, rollout: SerialRollout | RayRollout):
        self.rollout = rollout

    def set_weights(self, policy, version: int) -> None:
        self.rollout.set_weights(policy, version)

    def sample(self, specs):
        return self.rollout.sample(specs)

    def close(self) -> None:
        self.rollout.close()


def train(args, folder: str, make_env, backend: str, overlap: bool, stream: bool = True) -> dict[str, Any]:
    learner = CausalLMPolicy.from_pretrained(folder, max_new_tokens=args.max_new_tokens)
    if backend == "serial":
        sampler = PacedAgentPolicy(copy.deepcopy(learner.model), learner.tokenizer, AgentPolicy(RandomAgent),
                                   max_new_tokens=args.max_new_tokens)
        rollout = SerialRollout(sampler, make_env, args.envs, mode="async")
    else:
        rollout = RayRollout(functools.partial(paced_policy, folder, args.max_new_tokens), make_env, num_workers=1,
                             envs_per_worker=args.envs, num_cpus=1, mode="async")
    if not stream:
        rollout = Threaded(rollout)
    rollout.set_weights(learner, 0)
    rollout.sample(make_specs(args.seed + 1, 0, 1, 2))  # warm-up (a Ray worker starts, first forwards), untimed
    config = GRPOConfig(args.tasks, args.group_size, kl_coef=0.0, off_policy=True, learning_rate=1e-4)
    rewards = Rewards()
    trainer = Trainer(learner, GRPO(learner, None, config), rollout, iterations=args.iterations, num_groups=args.tasks,
                      group_size=args.group_size, seed=args.seed, overlap=overlap, callbacks=[rewards])
    start = time.perf_counter()
    try:
        history = trainer.run()
    finally:
        rollout.close()
    wall = time.perf_counter() - start

    def mean(key: str, rows=history) -> float:
        return round(sum(m[key] for m in rows) / len(rows), 4)

    return {"rewards": rewards.rewards, "wall_seconds": round(wall, 2),
            "iterations_per_second": round(len(history) / wall, 4),
            "rollout_seconds": mean("time/rollout"), "update_seconds": mean("time/update"),
            "rollout_wait_seconds": mean("time/rollout_wait"),
            "hidden_update_share": mean("time/update_hidden", history[:-1]),  # the last update has no next rollout
            "staleness_mean": mean("rollout/staleness_mean"),
            "staleness_max": max(m["rollout/staleness_max"] for m in history),
            "generator_idle_fraction": mean("time/generator_idle_fraction"),
            "groups_skipped": mean("groups_skipped")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 iterations of 2 tasks x 4 (within two minutes)")
    parser.add_argument("--backends", default="serial,ray", help="comma-separated: serial, ray")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=4, help="GRPO groups per iteration")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--envs", type=int, default=32, help="environments: episodes in flight at most")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--tool-latency-scale", type=float, default=0.01)
    parser.add_argument("--judge-seconds", type=float, default=0.5, help="the simulated judge's latency")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/overlap.json")
    if "--quick" in sys.argv:
        parser.set_defaults(iterations=3, tasks=2, group_size=4, envs=8, backends="serial")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.torch_threads)  # the update and the rollout thread share the cores

    make_env = functools.partial(VisGenEnv, tool_latency_scale=args.tool_latency_scale, max_turns=args.max_turns,
                                 rubric=DelayedRubric("ltr", args.judge_seconds))
    probe = VisGenEnv(max_turns=args.max_turns)
    tokenizer = train_tokenizer([probe.reset(seed=i)[0]["text"] for i in range(100)], 2000)
    lm = CausalLMPolicy(tiny_causal_lm(len(tokenizer)), tokenizer, max_new_tokens=args.max_new_tokens)
    run_episodes(PacedAgentPolicy(lm.model, tokenizer, AgentPolicy(RandomAgent), max_new_tokens=args.max_new_tokens),
                 [probe], make_specs(1, 0, 2, 1))  # warm-up
    folder = tempfile.mkdtemp(prefix="overlap-policy-")
    lm.save(folder)
    backends = args.backends.split(",")
    if "ray" in backends:
        os.environ["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                                    os.environ.get("PYTHONPATH", "")])  # workers import async_rollout
    started = "ray" in backends and start_ray(num_cpus=2, log_to_driver=False)
    runs, same, speedups = {}, True, {}
    try:
        for backend in backends:
            # streamed overlap, and the same overlap without the stream beside it
            variants = [("alternate", False, True), ("overlap", True, True), ("overlap_threaded", True, False)]
            for name, overlap, stream in variants:
                runs[f"{backend}/{name}"] = train(args, folder, make_env, backend, overlap, stream)
            rewards = [runs[f"{backend}/{name}"].pop("rewards") for name, _, _ in variants]
            same &= all(r == rewards[0] for r in rewards)
            for name, _, _ in variants[1:]:
                speedups[backend + name[len("overlap"):]] = round(
                    runs[f"{backend}/{name}"]["iterations_per_second"]
                    / runs[f"{backend}/alternate"]["iterations_per_second"], 2)
    finally:
        if started:
            import ray

            ray.shutdown()
    result = {
        "speedup": speedups,
        "hidden_update_share": {name.replace("/overlap", ""): run["hidden_update_share"]
                                for name, run in runs.items() if "/overlap" in name},
        "same_episode_rewards": same,
        "runs": runs,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_average_1min": round(os.getloadavg()[0], 2)},
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
    }
    print(f"{'run':<24} {'iterations/s':>12} {'rollout s':>9} {'update s':>8} {'learner waits s':>15} "
          f"{'update hidden':>13} {'staleness':>9} {'generator idle':>14}")
    for name, run in runs.items():
        print(f"{name:<24} {run['iterations_per_second']:>12.3f} {run['rollout_seconds']:>9.2f} "
              f"{run['update_seconds']:>8.2f} {run['rollout_wait_seconds']:>15.2f} "
              f"{run['hidden_update_share']:>13.1%} {run['staleness_mean']:>9.2f} "
              f"{run['generator_idle_fraction']:>14.1%}")
    print(f"speedup (overlap / alternate iterations per second): {speedups}; same episode rewards in all runs of "
          f"each backend: {same}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    if not same:
        raise SystemExit("The runs played other episodes: the rewards depend only on the seeds here; a bug.")


if __name__ == "__main__":
    main()
