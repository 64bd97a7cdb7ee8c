"""Configs: validation messages name the value and the fix; YAML, overrides and --help; the GPU presets."""

import glob
import os

import pytest

from rl.cli import build_parser, main
from rl.config import (EnvConfig, EvalConfig, PolicyConfig, RolloutConfig, SFTConfig, TinyModelConfig,
                       TrainConfig, load, overrides_from, to_dict)
from visenv.yamlio import load_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("make, message", [
    (lambda: RolloutConfig(backend="mpi"), r"rollout.backend \('mpi'\) must be 'serial' or 'ray'"),
    (lambda: RolloutConfig(max_staleness=2), r"max_staleness \(2\) needs backend 'ray'"),
    (lambda: PolicyConfig(dtype="int8"), r"policy.dtype \('int8'\) must be one of"),
    (lambda: TrainConfig(algorithm="dqn", policy=PolicyConfig(model="m")), r"algorithm \('dqn'\)"),
    (lambda: TrainConfig(), r"policy.model is empty and there is no sft section"),
    (lambda: TrainConfig(policy=PolicyConfig(model="m"), rollout=RolloutConfig(backend="ray", max_staleness=1)),
     r"needs grpo.off_policy: true"),
    (lambda: TinyModelConfig(hidden_size=100, num_heads=3), r"tiny.hidden_size \(100\) must be divisible"),
    (lambda: SFTConfig(), r"sft.stages is empty"),
    (lambda: EvalConfig(agent="baselines.random_agent"), r"must look like 'module:Class'"),
    (lambda: EnvConfig("Nope-v0"), r"env.id \('Nope-v0'\) is not a registered environment"),
])
def test_validation_messages(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_yaml_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm: ppo\npolicy: {model: m}\nppo: {epochs: 3}\n")
    config = load(TrainConfig, str(path), {"ppo.gamma": 0.9, "rollout.num_envs": 8})
    assert (config.algorithm, config.ppo.epochs, config.ppo.gamma, config.rollout.num_envs) == ("ppo", 3, 0.9, 8)
    assert config.groups == (64, 1)
    assert to_dict(config)["ppo"]["gamma"] == 0.9
    path.write_text("policy: {model: m, tempreature: 0.5}\n")
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['policy.tempreature'\]; the options of policy"):
        load(TrainConfig, str(path))
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="must hold a YAML mapping"):
        load(TrainConfig, str(path))


def test_exponent_numbers_are_floats_in_files_and_on_the_command_line(tmp_path):
    """PyYAML alone reads "3e-4" as a string (YAML 1.1 wants a dot); configs read it as the number."""
    path = tmp_path / "run.yaml"
    path.write_text("policy: {model: m}\ngrpo: {learning_rate: 3e-4, kl_coef: 1E-2}\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--grpo.clip", "2e-1", "--policy.model", "m2"])
    config = load(TrainConfig, str(path), overrides_from(args))
    assert (config.grpo.learning_rate, config.grpo.kl_coef, config.grpo.clip) == (3e-4, 1e-2, 0.2)
    assert config.policy.model == "m2"  # strings stay strings
    assert load_yaml("[1e3, -2E+5, 0.5, 12, e5, 1e, abc]") == [1000.0, -200000.0, 0.5, 12, "e5", "1e", "abc"]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_example_configs_load(path):
    name = os.path.basename(path)
    cls = EvalConfig if name.startswith(("eval", "teacher")) else SFTConfig if name.startswith("sft") else TrainConfig
    load(cls, path)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--grpo.kl_estimator VALUE" in text and '"k1", "k2" or "k3"' in text
    assert "--rollout.max_staleness VALUE" in text and "(default: 0)" in text
    assert "--sft.tiny.hidden_size" in text


def test_cli_reports_bad_values_without_a_traceback(capsys):
    assert main(["train", "--policy.model", "m", "--grpo.group_size", "1"]) == 2
    assert "group_size (1) must be at least 2" in capsys.readouterr().err


def test_gpu_qwen2vl_preset_builds_a_lora_qwen_vl_policy_that_sees_visgen_images(tmp_path):
    import numpy as np
    import torch

    from rl.hf import CHATML_SPECIAL_TOKENS, QwenVLPolicy, tiny_qwen_vl
    from rl.policy import Conversation, TokenBatch
    from rl.tokenizer import train_tokenizer

    preset = os.path.join(ROOT, "configs", "gpu_qwen2vl_grpo.yaml")
    config = load(TrainConfig, preset)
    assert (config.policy.kind, config.policy.chat, config.policy.dtype, config.policy.device) == (
        "vlm", "chatml", "bfloat16", "cuda")
    assert config.policy.lora is not None and config.rollout.backend == "ray" and config.rollout.worker_num_gpus > 0
    assert config.rollout.num_workers * config.rollout.num_envs == config.groups[0] * config.groups[1]
    # the preset's policy section, on a tiny Qwen2-VL saved as a release folder, on the CPU
    tokenizer = train_tokenizer(["Request: draw a cat", "<tool_call>{}</tool_call>"], 300, CHATML_SPECIAL_TOKENS)
    model, processor = tiny_qwen_vl(tokenizer)
    QwenVLPolicy(model, tokenizer, processor, chat="chatml").save(str(tmp_path))
    config = load(TrainConfig, preset, {"policy.model": str(tmp_path), "policy.device": "cpu",
                                        "policy.max_new_tokens": 4})
    policy = config.policy.build()
    assert isinstance(policy, QwenVLPolicy) and policy.model.dtype == torch.bfloat16
    trainable = [name for name, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # the preset's environment: an image row marked by the mask, shown at the saved processor's size
    # (224 x 224 scaled to max_pixels 32 x 32: 8 x 8 patches of 4 pixels, merged 2 x 2)
    obs, _ = config.env.make().reset(seed=0)
    assert obs["pixels"].shape == (4, 224, 224, 3) and obs["pixels_mask"].tolist() == [0, 0, 0, 0]
    obs["pixels"][0] = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    obs["pixels_mask"][0] = 1
    conversation = Conversation(seed=0, segments=[policy.encode(obs, first=True)])
    assert conversation.segments[0].token_ids.count(policy.image_id) == 16
    conversation.segments.append(policy.generate([conversation])[0])
    batch = TokenBatch.from_segments([conversation.segments], policy.pad_id)
    scores = policy.score(batch)
    (-scores.logprobs.sum()).backward()
    assert all(p.grad is not None for p in policy.parameters())
