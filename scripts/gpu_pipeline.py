"""The GPU check's pipeline: a tiny-but-real Qwen2.5-VL (the transformers class, random weights, built in
code) through SFT -> GRPO with Ray GPU actors: the learner workers (nccl; strategy ddp, then fsdp) and the
rollout workers hold their models on the GPUs; the driver keeps a CPU mirror and saves checkpoints.

    python scripts/gpu_pipeline.py                  # on a GPU machine (scripts/gpu_check.sh runs it)
    python scripts/gpu_pipeline.py --device cpu     # the same steps on the CPU with gloo: a dry run

GPUs: with one, a learner worker and a rollout worker share it (0.5 each); with two or more, two
learner workers (0.75 of a GPU each) and two rollout workers (0.25 each) share two GPUs. The SFT data is
the ToolEcho teacher's text trajectories (examples/grpo_ray.py); GRPO runs on the tests' LetterEnv with
a random image in every observation (tests/rl_helpers.py; varied rewards even for a random policy), so
the rollouts and the update carry images. Prints one PASS or FAIL line per step; exit status 0 when all passed, 1
when one failed, 3 when there is no CUDA device (nothing ran, unless --device cpu).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
import traceback

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "examples")]

import torch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run with gloo")
    parser.add_argument("--iterations", type=int, default=2, help="GRPO iterations per strategy (default 2)")
    args = parser.parse_args()
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda" and not gpus:
        print("SKIP pipeline: no CUDA device, so the SFT -> GRPO check with Ray GPU actors did not run")
        return 3

    import ray

    from grpo_ray import teacher_examples
    from rl.config import PolicyConfig
    from rl.grpo import GRPOConfig
    from rl.hf import CHATML_SPECIAL_TOKENS, QwenVLPolicy, tiny_qwen_vl
    from rl.learner import LearnerGroup
    from rl.rollout import RayRollout
    from rl.sft import SFTStage
    from rl.tokenizer import train_tokenizer
    from rl.train import Trainer
    from rl_helpers import LetterEnv

    work = tempfile.mkdtemp(prefix="gpu_pipeline_")
    examples = teacher_examples(64, seed=0)
    data = os.path.join(work, "teacher.jsonl")
    with open(data, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"messages": m}) + "\n" for m in examples)
    tokenizer = train_tokenizer([m["content"] for e in examples for m in e], 1000, CHATML_SPECIAL_TOKENS)
    model, processor = tiny_qwen_vl(tokenizer, "qwen2_5_vl", hidden_size=64, num_layers=2)
    folder = os.path.join(work, "tiny-qwen2.5-vl")
    QwenVLPolicy(model, tokenizer, processor, chat="chatml").save(folder)
    on_gpu = args.device == "cuda"
    workers = min(2, gpus) if on_gpu else 2
    learner_gpus = (0.75 if gpus >= 2 else 0.5) if on_gpu else 0.0
    rollout_gpus = (1.0 - learner_gpus) if on_gpu else 0.0
    config = PolicyConfig(model=folder, kind="vlm", chat="chatml", max_new_tokens=12, images_per_turn=2,
                          dtype="bfloat16" if on_gpu else "float32", device=args.device)
    mirror_config = dataclasses.replace(config, device="cpu")  # the driver's mirror of rank 0
    backend = "nccl" if on_gpu else "gloo"
    ray.init(num_cpus=max(4, os.cpu_count() or 1) if on_gpu else 2, num_gpus=gpus, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path[:3])}})
    print(f"pipeline: {gpus} GPU(s) ({args.device}); {workers} learner worker(s) x {learner_gpus:g} GPU ({backend}), "
          f"{workers} rollout worker(s) x {rollout_gpus:g} GPU; tiny Qwen2.5-VL in {folder}")
    results = []

    def step(name, run):
        began = time.perf_counter()
        try:
            detail = run()
            results.append(True)
            print(f"PASS {name}: {detail} ({time.perf_counter() - began:.0f} s)", flush=True)
        except Exception:  # a check reports every failure and goes on with the next step
            results.append(False)
            print(f"FAIL {name}:\n{traceback.format_exc()}", flush=True)

    def group(strategy):
        return LearnerGroup(mirror_config.build(), config.build, workers, num_cpus=0.25 if not on_gpu else 1.0,
                            num_gpus=learner_gpus, backend=backend, strategy=strategy)

    def changed(before, after):
        return max((before[k].float() - after[k].float()).abs().max().item() for k in before)

    def sft(strategy):
        learners = group(strategy)
        try:
            start = learners.policy.get_weights()
            losses = []
            stage = SFTStage(data, batch_size=16, learning_rate=3e-3, max_steps=4)
            learners.run_pst([stage], seed=0, on_step=lambda number, metrics: losses.append(metrics["sft_loss"]))
            moved = changed(start, learners.policy.get_weights())
        finally:
            learners.close()
        assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
        assert moved > 0, "the weights did not change"
        return f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in 4 steps, weights moved up to {moved:.2e}"

    def grpo(strategy):
        learners = group(strategy)
        rollout = RayRollout(config.build, functools.partial(LetterEnv, turns=2, pixels=True), workers, 4, num_cpus=0.25 if not on_gpu else 1.0,
                             num_gpus=rollout_gpus)
        try:
            start = learners.policy.get_weights()
            algorithm = learners.start_grpo(GRPOConfig(2, 4, learning_rate=1e-3, kl_coef=0.05, minibatch_size=4,
                                                       micro_batch_tokens=256))
            trainer = Trainer(learners.policy, algorithm, rollout, iterations=args.iterations, num_groups=2,
                              group_size=4, seed=0, checkpoint_dir=os.path.join(work, f"grpo_{strategy}"),
                              checkpoint_every=1)
            history = trainer.run()
            moved = changed(start, learners.policy.get_weights())
        finally:
            rollout.close()
            learners.close()
        assert len(history) == args.iterations
        assert all(math.isfinite(m[key]) for m in history for key in ("reward", "loss", "grad_norm")), history
        assert moved > 0, "the weights did not change"
        assert os.listdir(os.path.join(work, f"grpo_{strategy}")), "no checkpoint"
        return (f"{args.iterations} iterations, reward {history[-1]['reward']:.3f}, loss {history[-1]['loss']:.4f}, "
                f"weights moved up to {moved:.2e}, checkpoints saved")

    try:
        for strategy in ("ddp", "fsdp"):
            step(f"sft {strategy}", functools.partial(sft, strategy))
            step(f"grpo {strategy} (images in the rollouts)", functools.partial(grpo, strategy))
    finally:
        ray.shutdown()
    print(f"pipeline: {sum(results)} of {len(results)} steps passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
