"""Checkpoint and resume: a resumed run continues exactly as the uninterrupted one."""

import os

import pytest
import torch

from rl import checkpoint
from rl.grpo import GRPO, GRPOConfig
from rl.hf import CausalLMPolicy, reference_policy
from rl.logging import MetricsLogger, read_metrics
from rl.ppo import PPO, PPOConfig
from rl.rollout import SerialRollout
from rl.train import Callback, Trainer
from rl_helpers import LetterEnv, echo_tokenizer, tiny_policy
from rl.errors import CheckpointNotFound


@pytest.fixture(scope="module")
def tokenizer():
    return echo_tokenizer()


def deterministic(history):
    return [{k: v for k, v in m.items() if not k.startswith("time/") and "per_second" not in k} for m in history]


def make_trainer(tokenizer, algorithm, directory):
    policy = tiny_policy(tokenizer, max_new_tokens=8)
    if algorithm == "grpo":
        algo, groups = GRPO(policy, reference_policy(policy), GRPOConfig(4, 4, kl_coef=0.05, minibatch_size=8, warmup_steps=5)), (4, 4)
    else:
        algo, groups = PPO(policy, reference_policy(policy), PPOConfig(8, kl_coef=0.05, minibatch_size=4)), (8, 1)
    rollout = SerialRollout(policy, lambda: LetterEnv(turns=2), 16)
    return Trainer(policy, algo, rollout, iterations=4, num_groups=groups[0], group_size=groups[1], seed=5,
                   checkpoint_dir=str(directory), checkpoint_every=2)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_resume_continues_exactly(tokenizer, tmp_path, algorithm):
    full = make_trainer(tokenizer, algorithm, tmp_path / "a")
    history = full.run()
    assert sorted(os.listdir(tmp_path / "a")) == ["iter_000002", "iter_000004"]
    resumed = make_trainer(tokenizer, algorithm, tmp_path / "b")
    resumed.resume(checkpoint.latest(str(tmp_path / "a")).replace("000004", "000002"))
    assert resumed.iteration == 2
    rest = resumed.run()
    assert deterministic(rest) == deterministic(history[2:])
    final, again = full.policy.get_weights(), resumed.policy.get_weights()
    assert all(torch.equal(final[k], again[k]) for k in final)
    # and the run did learn something between checkpoints, so the comparison is not vacuous
    start = make_trainer(tokenizer, algorithm, tmp_path / "c").policy.get_weights()
    assert any(not torch.equal(start[k], final[k]) for k in final)


def test_checkpoint_policy_folder_loads_as_a_plain_model(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, "grpo", tmp_path)
    trainer.iterations = 1
    trainer.run()
    path = checkpoint.latest(str(tmp_path))
    assert path.endswith("iter_000001")
    loaded = CausalLMPolicy.from_pretrained(os.path.join(path, "policy"), max_new_tokens=8)
    weights = trainer.policy.get_weights()
    assert all(torch.equal(weights[k], v) for k, v in loaded.get_weights().items())
    with pytest.raises(CheckpointNotFound, match="is not a checkpoint folder"):
        checkpoint.load(str(tmp_path), trainer.policy)
    assert checkpoint.latest(str(tmp_path / "nothing")) is None


def test_callbacks_and_metrics_log(tokenizer, tmp_path):
    calls = []

    class Spy(Callback):
        def on_start(self, trainer):
            calls.append("start")

        def on_rollout_end(self, iteration, episodes, stats):
            calls.append(("rollout", iteration, len(episodes)))

        def on_step(self, iteration, metrics):
            calls.append(("step", iteration))
            return iteration == 1

        def on_end(self, history):
            calls.append(("end", len(history)))

    trainer = make_trainer(tokenizer, "grpo", tmp_path / "ckpt")
    trainer.callbacks = [Spy()]
    trainer.logger = MetricsLogger(str(tmp_path / "logs"), tensorboard=True)
    trainer.run()
    trainer.logger.close()
    assert calls == ["start", ("rollout", 0, 16), ("step", 0), ("rollout", 1, 16), ("step", 1), ("end", 2)]
    records = read_metrics(str(tmp_path / "logs" / "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1]
    assert {"reward", "reward/letters", "kl", "entropy", "tokens_per_second", "env_steps_per_second",
            "time/generate", "time/env", "time/update"} <= set(records[0])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "logs"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["iter_000002"]  # stopping early saves too
