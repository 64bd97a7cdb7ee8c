"""End to end through the ``rl`` command on VisGen: teacher data (rl record), PST then GRPO (rl train)
serially and on Ray, resume from a checkpoint, and evaluation of the trained checkpoint."""

import json
import os

import pytest
import yaml

from rl.cli import main
from rl.logging import read_metrics


@pytest.fixture(scope="module")
def teacher_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["record", "--env.id", "visenv/VisGen-v0", "--agent", "baselines.workflow_agent:WorkflowAgent",
                 "--episodes", "16", "--num_envs", "8", "--output_dir", str(out), "--min_reward", "0.5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    lines = (out / "trajectories.jsonl").read_text().splitlines()
    assert summary["episodes"] == 16 and summary["reward"] > 0.5 and len(lines) >= 8
    assert all(json.loads(line)["reward"] >= 0.5 for line in lines)
    return out / "trajectories.jsonl"


def write_config(path, teacher, output_dir, **extra):
    config = {
        "algorithm": "grpo",
        "env": {"id": "visenv/VisGen-v0", "options": {"max_turns": 2}},
        "sft": {"model": "tiny", "tiny": {"vocab_size": 800, "hidden_size": 64, "num_heads": 4,
                                          "intermediate_size": 128},
                "output_dir": str(output_dir / "sft"),
                "stages": [{"visual": str(teacher), "epochs": 1, "batch_size": 8},
                           {"visual": str(teacher), "visual_weight": 2.0, "batch_size": 8}]},
        "policy": {"max_new_tokens": 24},
        "rollout": {"num_envs": 4},
        "grpo": {"tasks_per_iteration": 2, "group_size": 2, "kl_coef": 0.02},
        "iterations": 2, "checkpoint_every": 1, "output_dir": str(output_dir),
        "tensorboard": False, "progress": False, **extra}
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
def test_pst_then_grpo_on_visgen_resumes_and_evaluates(teacher_data, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", teacher_data, run)
    assert main(["train", "--config", config]) == 0
    assert sorted(os.listdir(run / "checkpoints")) == ["iter_000001", "iter_000002"]
    sft_stamp = os.path.getmtime(run / "sft" / "policy" / "config.json")
    # resume: one more iteration, continuing from iter_000002; PST is not run again
    assert main(["train", "--config", config, "--iterations", "3"]) == 0
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl"))] == [0, 1, 2]
    assert os.path.getmtime(run / "sft" / "policy" / "config.json") == sft_stamp
    record = read_metrics(str(run / "metrics.jsonl"))[-1]
    assert {"reward", "reward/R_format", "reward/R_plan", "gpu_seconds_avoided", "groups_skipped"} <= set(record)
    assert "kl" in record or record["groups_skipped"] == 1.0  # no KL to report when every group was skipped
    checkpoint = run / "checkpoints" / "iter_000003" / "policy"
    out = tmp_path / "eval"
    assert main(["record", "--env.id", "visenv/VisGen-v0", "--env.options", "{max_turns: 2}", "--policy.model",
                 str(checkpoint), "--policy.max_new_tokens", "24", "--episodes", "4", "--output_dir", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["episodes"] == 4


@pytest.mark.slow
def test_grpo_on_visgen_with_ray_workers(ray_session, teacher_data, tmp_path):
    run = tmp_path / "ray"
    config = write_config(tmp_path / "ray.yaml", teacher_data, run, iterations=1,
                          rollout={"backend": "ray", "num_workers": 2, "num_envs": 2, "worker_num_cpus": 0.25})
    assert main(["train", "--config", config]) == 0
    record = read_metrics(str(run / "metrics.jsonl"))[0]
    assert record["worker_restarts"] == 0 and record["rollout/staleness_max"] == 0


@pytest.mark.slow
def test_grpo_with_overlapped_rollouts_through_the_command(teacher_data, tmp_path):
    run = tmp_path / "overlap"
    config = write_config(tmp_path / "overlap.yaml", teacher_data, run, iterations=3,
                          rollout={"num_envs": 4, "mode": "async"})
    assert main(["train", "--config", config, "--set", "rollout.overlap=true"]) == 2  # needs the correction
    assert main(["train", "--config", config, "--set", "rollout.overlap=true", "--set", "grpo.off_policy=true"]) == 0
    records = read_metrics(str(run / "metrics.jsonl"))
    assert [r["rollout/staleness_max"] for r in records] == [0.0, 1.0, 1.0]
    assert os.path.exists(run / "checkpoints" / "iter_000003" / "sampler.pt")
