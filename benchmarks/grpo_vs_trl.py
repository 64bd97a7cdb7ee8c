"""GRPO iteration throughput: rl's GRPO against TRL's GRPOTrainer, side by side in one run.

Both train the same tiny policy (a Llama of hidden 128 x 2 layers on a BPE trained in code,
warm-started by a few seconds of SFT so completions have realistic lengths, or with ``--init random``
left at its random initialisation, so that nearly every completion runs to ``--max-new-tokens``) on
the same prompts (ToolEcho's, or LetterEnv's with ``--env letter``), with the same group size,
prompts per step, completion budget, temperature, learning rate, KL weight (k3 estimator, reference =
the starting weights) and token-level loss. One iteration = sample ``prompts x group`` completions,
score them with the environment's reward, one optimizer step. Each side
runs ``--iterations`` timed iterations after ``--warmup`` untimed ones; blocks alternate so that
load drift on a shared machine hits both. rl samples through the rollout loop's ``--mode``: ``async``
(the default) runs the in-process engine (:class:`rl.engine.hf.HFEngine`, continuous batching),
``sync`` one batched ``policy.generate`` per turn. Needs TRL (benchmark-only): ``pip install -e ".[bench]"``.

    python benchmarks/grpo_vs_trl.py [--iterations 10] [--blocks 2] [--threads 2] [--max-new-tokens 16]
        [--init warm|random] [--mode async|sync] [--overlap] [--out benchmarks/results/grpo_vs_trl.json]

The issue-14 workload: ``--init random --env letter --max-new-tokens 64``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from rl.grpo import GRPO, GRPOConfig  # noqa: E402
from rl.hf import reference_policy, tiny_causal_lm  # noqa: E402
from rl.hf import CausalLMPolicy  # noqa: E402
from rl.rollout import SerialRollout  # noqa: E402
from rl.sft import train_sft  # noqa: E402
from rl.train import Callback, Trainer  # noqa: E402
from rl_helpers import ECHO, LetterEnv, echo_examples, echo_tokenizer  # noqa: E402

ENVS = {"echo": ECHO.make, "letter": functools.partial(LetterEnv, 1)}
"""``--env``: ToolEcho (a random policy scores 0 on every completion, so rl's GRPO skips every group
and runs no update) or the one-turn LetterEnv (the share of a word's letters the completion holds:
varied rewards from any policy, so both trainers update every iteration)."""


def start_policy(max_new_tokens: int, init: str) -> CausalLMPolicy:
    tokenizer = echo_tokenizer()
    policy = CausalLMPolicy(tiny_causal_lm(len(tokenizer)), tokenizer, max_new_tokens=max_new_tokens)
    if init == "random":
        return policy
    train_sft(policy, echo_examples(1600, correct_share=0.5), epochs=1, batch_size=32, learning_rate=3e-3, seed=0)
    return policy


class Timer(Callback):
    def __init__(self):
        self.times, self.tokens, self.shares, self.waits = [], [], [], []
        self._last = time.perf_counter()

    def on_step(self, iteration, metrics):
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now
        self.tokens.append(metrics["policy_tokens"])
        self.shares.append((metrics["time/generate"], metrics["time/env"], metrics["time/update"]))
        self.waits.append(metrics.get("time/rollout_wait", 0.0))
        return False


def run_ours(policy, weights, args, iterations, seed):
    policy.set_weights(weights)
    config = GRPOConfig(tasks_per_iteration=args.prompts, group_size=args.group, learning_rate=args.lr,
                        kl_coef=args.beta, kl_estimator="k3", loss_aggregation="token", off_policy=args.overlap)
    timer = Timer()
    # with --overlap the rollout samples with its own copy, one update behind (Trainer's overlap)
    sampler = copy.deepcopy(policy) if args.overlap else policy
    trainer = Trainer(policy, GRPO(policy, reference_policy(policy), config),
                      SerialRollout(sampler, ENVS[args.env], args.prompts * args.group, mode=args.mode),
                      iterations=iterations, num_groups=args.prompts, group_size=args.group, seed=seed,
                      overlap=args.overlap, callbacks=[timer])
    trainer.run()
    return timer


def run_trl(policy, weights, args, iterations, seed):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    policy.set_weights(weights)
    env = ENVS[args.env]()
    rows = []
    for i in range(args.prompts * (iterations + 2)):
        observation, _ = env.reset(seed=seed * 100_000 + i)
        rows.append({"prompt": policy.chat.render(observation["text"], True, None), "task_seed": seed * 100_000 + i})

    def env_reward(prompts, completions, task_seed, **kwargs):
        rewards = []
        for completion, task in zip(completions, task_seed):
            env.reset(seed=task)  # the prompt's own task
            rewards.append(env.step(completion.replace(policy.chat.stop, ""))[1])
        return rewards

    class TRLTimer(TrainerCallback):
        def __init__(self):
            self.times, self._last = [], None

        def on_step_begin(self, a, state, control, **kw):
            if self._last is None:
                self._last = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            self.times.append(now - self._last)
            self._last = now

    # TRL loads the policy and its reference from a folder: the starting weights
    folder = os.path.join(args.scratch, "warm")
    policy.model.generation_config.eos_token_id = policy.stop_id
    policy.model.generation_config.pad_token_id = policy.pad_id
    policy.tokenizer.eos_token = policy.chat.stop  # TRL stops generation at the tokenizer's eos
    policy.save(folder)
    config = TRLConfig(output_dir=os.path.join(args.scratch, "trl"),
                       per_device_train_batch_size=args.prompts * args.group,
                       num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0,
                       learning_rate=args.lr, beta=args.beta, loss_type="dapo", num_iterations=1,
                       steps_per_generation=1, gradient_accumulation_steps=1, max_steps=iterations,
                       use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
                       disable_dropout=True, shuffle_dataset=False, seed=seed, lr_scheduler_type="constant",
                       weight_decay=0.0, max_grad_norm=1.0, adam_beta2=0.999, dataloader_num_workers=0)
    timer = TRLTimer()
    trainer = GRPOTrainer(model=folder, reward_funcs=[env_reward], args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=policy.tokenizer, callbacks=[timer])
    trainer.train()
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history
               if "completions/mean_length" in entry]
    return timer, lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per block and side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations at the start of each block")
    parser.add_argument("--blocks", type=int, default=2, help="alternating blocks per side")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--env", choices=sorted(ENVS), default="echo", help="the prompts and reward (see ENVS)")
    parser.add_argument("--init", choices=("warm", "random"), default="warm",
                        help="warm: a short SFT warm start; random: the random initialisation")
    parser.add_argument("--mode", choices=("async", "sync"), default="async",
                        help="rl's rollout mode: async runs the in-process engine")
    parser.add_argument("--overlap", action="store_true",
                        help="rl samples iteration it + 1 while update it runs (Trainer(overlap=True): one update "
                             "behind, GRPO off_policy); TRL has no such mode, so this is no longer the same algorithm")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scratch", default="/tmp/grpo_vs_trl")
    parser.add_argument("--out", default="benchmarks/results/grpo_vs_trl.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import transformers
    import trl

    policy = start_policy(args.max_new_tokens, args.init)
    weights = policy.get_weights()
    samples = args.prompts * args.group
    ours, theirs, our_tokens, their_tokens, shares, waits = [], [], [], [], [], []
    for block in range(args.blocks):
        timer = run_ours(policy, weights, args, args.warmup + args.iterations, seed=block)
        ours += timer.times[args.warmup:]
        our_tokens += timer.tokens[args.warmup:]
        shares += timer.shares[args.warmup:]
        waits += timer.waits[args.warmup:]
        trl_timer, lengths = run_trl(policy, weights, args, args.warmup + args.iterations, seed=block)
        theirs += trl_timer.times[args.warmup:]
        their_tokens += lengths[args.warmup:]
    ours_rate = samples / statistics.median(ours)
    trl_rate = samples / statistics.median(theirs)
    generate, env, update = (sum(s[i] for s in shares) for i in range(3))
    total = sum(ours)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch threads {args.threads}",
        "command": shlex.join(["python", *sys.argv]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "setup": {"prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens,
                  "env": args.env, "init": args.init, "mode": args.mode, "overlap": args.overlap,
                  "model": "Llama hidden 128 x 2 layers, tied, vocab %d" % len(policy.tokenizer)},
        "ours_samples_per_s": round(ours_rate, 1), "trl_samples_per_s": round(trl_rate, 1),
        "speedup": round(ours_rate / trl_rate, 2),
        "ours_seconds_per_iteration": round(statistics.median(ours), 3),
        "trl_seconds_per_iteration": round(statistics.median(theirs), 3),
        "ours_mean_completion_tokens": round(statistics.mean(our_tokens), 2),
        "trl_mean_completion_tokens": round(statistics.mean(their_tokens), 2),
        # with --overlap generation runs beside the update on the rollout thread: what is left of it on
        # the learner's clock is its wait for the next rollout after each update
        "ours_time_shares": {"update": round(update / total, 3),
                             "learner_waits_for_rollout": round(sum(waits) / total, 3),
                             "rollout_thread_busy": round((generate + env) / total, 3)} if args.overlap else
                            {"generate": round(generate / total, 3), "env": round(env / total, 3),
                             "update": round(update / total, 3),
                             "other": round(1 - (generate + env + update) / total, 3)},
    }
    print(f"{'':24}{'rl GRPO':>12}{'TRL GRPOTrainer':>18}")
    print(f"{'samples/s':24}{ours_rate:12.1f}{trl_rate:18.1f}")
    print(f"{'s/iteration (median)':24}{statistics.median(ours):12.3f}{statistics.median(theirs):18.3f}")
    print(f"{'completion tokens':24}{statistics.mean(our_tokens):12.2f}{statistics.mean(their_tokens):18.2f}")
    print(f"speedup {result['speedup']}x; ours: {result['ours_time_shares']}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
