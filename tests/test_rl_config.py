"""Configs: validation messages name the value and the fix; YAML, overrides and --help; the GPU presets."""

import argparse
import glob
import os

import pytest

from rl.cli import build_parser, main
from rl.config import (EnvConfig, EvalConfig, LearnerConfig, PolicyConfig, RolloutConfig, SFTConfig, TinyModelConfig,
                       TrainConfig, apply_overrides, from_dict, load, overrides_from, parse_sets, to_dict)
from rl.errors import ConfigError
from rl.sft import SFTStage
from visenv.yamlio import load_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("make, message", [
    (lambda: RolloutConfig(backend="mpi"), r"rollout.backend \('mpi'\) must be 'serial' or 'ray'"),
    (lambda: RolloutConfig(max_staleness=2), r"max_staleness \(2\) needs backend 'ray'"),
    (lambda: RolloutConfig(backend="ray", chunk_timeout_s=float("inf")),
     r"rollout.chunk_timeout_s \(inf\) must be null \(wait forever\) or a number of seconds > 0"),
    (lambda: RolloutConfig(chunk_timeout_s=60), r"rollout.chunk_timeout_s \(60\) needs backend 'ray'"),
    (lambda: PolicyConfig(dtype="int8"), r"policy.dtype \('int8'\) must be one of"),
    (lambda: TrainConfig(algorithm="dqn", policy=PolicyConfig(model="m")), r"algorithm \('dqn'\)"),
    (lambda: TrainConfig(), r"policy.model is empty and there is no sft section"),
    (lambda: TrainConfig(policy=PolicyConfig(model="m"), rollout=RolloutConfig(backend="ray", max_staleness=1)),
     r"needs grpo.off_policy: true"),
    (lambda: TinyModelConfig(hidden_size=100, num_heads=3), r"tiny.hidden_size \(100\) must be divisible"),
    (lambda: TinyModelConfig(id_pairs="yes"), r"tiny.id_pairs \('yes'\) must be true or false"),
    (lambda: SFTConfig(), r"sft.stages is empty"),
    (lambda: EvalConfig(agent="baselines.random_agent"), r"must look like 'module:Class'"),
    (lambda: EnvConfig("Nope-v0"), r"env.id \('Nope-v0'\) is not a registered environment"),
    (lambda: LearnerConfig(num_workers=0), r"learner.num_workers \(0\) and learner.torch_threads \(1\) must be"),
    (lambda: LearnerConfig(backend="mpi"), r"learner.backend \('mpi'\) must be 'gloo' \(CPU\) or 'nccl'"),
    (lambda: LearnerConfig(backend="nccl"), r"backend 'nccl' needs learner.num_gpus 1 .* got 0.0; use backend 'gloo'"),
    (lambda: LearnerConfig(num_cpus=-1), r"learner.num_cpus \(-1\) .* must be >= 0"),
    (lambda: LearnerConfig(strategy="zero3"), r"learner.strategy \('zero3'\) must be 'ddp' .* or 'fsdp'"),
    (lambda: LearnerConfig(num_workers=2, strategy="fsdp", mixed_precision="fp16"),
     r"learner.mixed_precision \('fp16'\) must be null or 'bfloat16'"),
    (lambda: LearnerConfig(num_workers=2, mixed_precision="bfloat16"),
     r"learner.mixed_precision 'bfloat16' .* needs learner.strategy 'fsdp' and num_workers >= 2, got strategy 'ddp'"),
    (lambda: LearnerConfig(strategy="fsdp", mixed_precision="bfloat16"),
     r"got strategy 'fsdp' with num_workers 1\. Use strategy fsdp, or mixed_precision null and policy.dtype bfloat16"),
    (lambda: TrainConfig(sft=SFTConfig(stages=[SFTStage("v.jsonl")], learner=LearnerConfig(num_workers=2))),
     r"sft.learner is set inside rl train's sft section: the top-level learner section applies"),
    (lambda: SFTConfig(stages=[SFTStage("v.jsonl")], learner=LearnerConfig(gradient_checkpointing=True)),
     r"sft.learner.gradient_checkpointing is for the RL updates; SFT has its own: set sft.gradient_checkpointing"),
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
    with pytest.raises(ConfigError, match=r"policy.tempreature: unknown option; did you mean 'policy.temperature'\? "
                                          r"The options of policy are"):
        load(TrainConfig, str(path))
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="must hold a YAML mapping"):
        load(TrainConfig, str(path))


MODEL = {"policy": {"model": "m"}}


@pytest.mark.parametrize("data, message", [
    ({"iterations": 1.5}, r"^iterations: expected an integer, got 1.5 \(float\); write a whole number such as 1 or 2"),
    ({"iterations": "3"}, r"^iterations: expected an integer, got '3' \(str\); write an integer such as 8 without quotes"),
    ({"iterations": True}, r"^iterations: expected an integer, got True \(bool\)"),
    ({"grpo": {"learning_rate": "abc"}}, r"^grpo.learning_rate: expected a number, got 'abc' \(str\); write a number"),
    ({"grpo": {"learning_rate": float("nan")}}, r"^grpo.learning_rate: expected a number, got nan"),
    ({"grpo": {"scale_rewards": "yes please"}}, r"^grpo.scale_rewards: expected true or false, got 'yes please'"),
    ({"policy": {"model": 7}}, r"^policy.model: expected a string, got 7 \(int\); write text in quotes"),
    ({"rollout": 7}, r"^rollout: expected a mapping of options \(backend, num_envs, .*\), got 7 \(int\)"),
    ({"policy": {"model": "m", "lora": [1]}}, r"^policy.lora: expected a mapping of options \(rank, alpha"),
    ({"policy": {"model": "m", "lora": {"target_modules": "q_proj"}}},
     r"^policy.lora.target_modules: expected a list, got 'q_proj'"),
    ({"policy": {"model": "m", "lora": {"target_modules": ["q", 3]}}},
     r"^policy.lora.target_modules\[1\]: expected a string, got 3"),
    ({"env": {"options": [1]}}, r"^env.options: expected a mapping, got \[1\]"),
    ({"sft": {"stages": [{"epochs": 2}]}}, r"^sft.stages\[0\]: the option\(s\) \['visual'\] are required but missing; "
                                           r"add them \(visual: JSONL path"),
    ({"sft": {"stages": [{"visual": "v.jsonl", "epochs": 0}]}}, r"^sft.stages\[0\].epochs \(0\) and batch_size"),
    ({"grpo": {"group_size": 1}}, r"^grpo.group_size \(1\) must be at least 2"),
    ({"grpo": {"group_size": 1.0}}, r"^grpo.group_size \(1\) must be at least 2"),
    ({"grpo": {"learning_rat": 1}}, r"^grpo.learning_rat: unknown option; did you mean 'grpo.learning_rate'\?"),
    ({"policy": {"model": "m", "temperature": -1}}, r"policy.temperature \(-1.0\) >= 0"),
    ({"env": {"options": {"max_turn": 3}}}, r"^env.options \(\{'max_turn': 3\}\): Unknown ToolEcho option"),
])
def test_from_dict_checks_kinds_and_ranges_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, {**MODEL, **data})


def test_from_dict_converts_what_is_meant():
    config = from_dict(TrainConfig, {**MODEL, "iterations": 1e3, "grpo": {"learning_rate": 1, "clip": 0.1},
                                     "policy": {"model": "m", "system_prompt": None, "lora": {"rank": 4}},
                                     "sft": None, "env": {"options": {"subjects": ["cat"]}}})
    assert config.iterations == 1000 and type(config.iterations) is int
    assert config.grpo.learning_rate == 1.0 and type(config.grpo.learning_rate) is float
    assert config.policy.lora.rank == 4 and config.policy.lora.alpha == 32.0 and config.sft is None


def test_dotted_overrides_on_any_nested_config():
    assert parse_sets(["grpo.kl_coef=0.05", "env.options={max_turns: 5}", "policy.model=a=b"]) == {
        "grpo.kl_coef": 0.05, "env.options": {"max_turns": 5}, "policy.model": "a=b"}
    with pytest.raises(ConfigError, match=r"--set 'grpo.kl_coef': expected FIELD=VALUE"):
        parse_sets(["grpo.kl_coef"])
    with pytest.raises(ConfigError, match=r"--set grpo.kl_coef: '\[1' is not valid YAML"):
        parse_sets(["grpo.kl_coef=[1"])
    config = load(TrainConfig, None, {"policy.model": "m"})
    changed = apply_overrides(config, {"grpo.group_size": 4, "seed": 2, "sft.model": "tiny",
                                       "sft.stages": [{"visual": "v.jsonl"}], "sft.stages.0.epochs": 3})
    assert (changed.grpo.group_size, changed.seed, changed.policy.model, changed.sft.stages[0].epochs) == (4, 2, "m", 3)
    assert config.grpo.group_size == 8 and config.sft is None  # the input is not changed
    with pytest.raises(ConfigError, match=r"^grpo.group_size: expected an integer, got 'four'"):
        apply_overrides(config, {"grpo.group_size": "four"})
    with pytest.raises(ConfigError, match=r"iterations.x: iterations holds 100, not a section of options"):
        apply_overrides(config, {"iterations.x": 1})
    with pytest.raises(ConfigError, match=r"sft.stages.1.epochs: '1' is not an index of the 1-item list sft.stages"):
        apply_overrides(changed, {"sft.stages.1.epochs": 1})
    with pytest.raises(ConfigError, match=r"grpo.clipp: unknown option; did you mean 'grpo.clip'"):
        apply_overrides(config, {"grpo.clipp": 0.1})


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


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "recipes", "*.yaml"))))
def test_recipes_load_and_fill_their_nodes_gpus(path, tmp_path):
    config = load(TrainConfig, path, {"policy.model": str(tmp_path)})
    assert config.policy.model == str(tmp_path) and config.policy.kind == "vlm"
    nodes = 2 if path.endswith("_2nodes.yaml") else 1
    learner, rollout = config.learner, config.rollout
    assert learner.num_workers * learner.num_gpus + rollout.num_workers * rollout.worker_num_gpus == 8 * nodes
    assert rollout.num_workers * rollout.num_envs == config.grpo.episodes_per_iteration  # one chunk per worker
    assert learner.backend == "nccl" and learner.strategy == ("ddp" if config.policy.lora else "fsdp")
    # full fine-tuning: float32 masters (16 bytes a parameter) leave room for the activations only when recomputed
    full = config.policy.lora is None
    assert (learner.mixed_precision, learner.gradient_checkpointing) == (("bfloat16", True) if full else (None, False))
    assert config.grpo.episodes_per_iteration % config.grpo.minibatch_size == 0


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--grpo.kl_estimator VALUE" in text and '"k1", "k2" or "k3"' in text
    assert "--rollout.max_staleness VALUE" in text and "(default: 0)" in text
    assert "--sft.tiny.hidden_size" in text
    assert "--learner.num_workers VALUE learner processes; 1 trains in this process" in text
    for command in ("train", "sft", "record"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        assert "--set FIELD=VALUE set any field by its dotted name" in " ".join(capsys.readouterr().out.split())


def test_set_options_win_over_section_options_and_reach_nested_fields():
    args = build_parser().parse_args(["train", "--policy.model", "a", "--set", "policy.model=b", "--grpo.epochs", "2",
                                      "--set", "env.options={subjects: [cat]}", "--set", "policy.lora.rank=4"])
    config = load(TrainConfig, None, overrides_from(args))
    assert (config.policy.model, config.grpo.epochs, config.env.options, config.policy.lora.rank) == (
        "b", 2, {"subjects": ["cat"]}, 4)


def test_learner_section_from_yaml_and_options(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("policy: {model: m}\nlearner: {num_workers: 2, num_cpus: 0.5}\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--learner.torch_threads", "2"])
    learner = load(TrainConfig, args.config, overrides_from(args)).learner
    assert (learner.num_workers, learner.num_cpus, learner.torch_threads, learner.backend) == (2, 0.5, 2, "gloo")
    args = build_parser().parse_args(["sft", "--set", "stages=[{visual: v.jsonl}]", "--learner.num_workers", "2"])
    assert load(SFTConfig, None, overrides_from(args)).learner.num_workers == 2
    with pytest.raises(ConfigError, match=r"^learner.num_workers: expected an integer, got 1.5"):
        load(TrainConfig, None, {"policy.model": "m", "learner.num_workers": 1.5})


def test_learner_group_must_fit_the_local_cpus(monkeypatch):
    monkeypatch.setattr("ray.is_initialized", lambda: False)  # the check is made before a local Ray starts
    needed = os.cpu_count() + 1
    with pytest.raises(ConfigError, match=rf"learner.num_workers \({needed}\) x learner.num_cpus \(1.0\) and 0 CPUs"):
        LearnerConfig(num_workers=needed).start(None, None)


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
    policy = config.policy.for_env(config.env).build()
    assert "tool_text2image_qwen" in policy.system_prompt  # the preset shows the model its tools
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


TOOL_DOCS_PRESETS = {"gpu_qwen2vl_grpo.yaml": "qwen2_vl", "gpu_vlm_grpo.yaml": "llava"}
"""Presets of pretrained chat models (Qwen's chat format or a VLM), with the family of the tiny stand-in."""
TINY_PRESETS = {"eval_visgen.yaml", "visgen_grpo_ray.yaml", "visgen_ppo.yaml", "visgen_pst_grpo.yaml",
                "toolecho_grpo.yaml"}
"""Presets of tiny models trained from scratch ("plain" chat, 2048 positions): they learn the tools from the
SFT data; VisGen's tool documentation (about 20,000 characters) would not fit their context."""
NO_POLICY_PRESETS = {"sft_visgen.yaml", "teacher_visgen.yaml"}


def tiny_release(family: str, folder) -> str:
    """A tiny random model of ``family`` with Qwen's chat tokens, saved as a release folder."""
    from rl.hf import CHATML_SPECIAL_TOKENS, QwenVLPolicy, VisionLMPolicy, tiny_qwen_vl, tiny_vlm
    from rl.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["Request: draw a cat", "<tool_call>{}</tool_call>"], 300, CHATML_SPECIAL_TOKENS)
    if family == "llava":
        model = tiny_vlm(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"))
        VisionLMPolicy(model, tokenizer, chat="chatml").save(str(folder))
    else:
        model, processor = tiny_qwen_vl(tokenizer, family)
        QwenVLPolicy(model, tokenizer, processor, chat="chatml").save(str(folder))
    return str(folder)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_preset_shows_a_pretrained_chat_model_its_36_tools(path, tmp_path):
    name = os.path.basename(path)
    assert name in {*TOOL_DOCS_PRESETS, *TINY_PRESETS, *NO_POLICY_PRESETS}, f"classify the new preset {name}"
    if name in NO_POLICY_PRESETS:  # a scripted teacher, or SFT of a tiny model (its policy comes later)
        config = load(SFTConfig if name.startswith("sft") else EvalConfig, path)
        assert config.agent if name.startswith("teacher") else config.model == "tiny"
        return
    cls = EvalConfig if name.startswith("eval") else TrainConfig
    if name in TINY_PRESETS:
        config = load(cls, path)
        assert not config.policy.needs_tools and config.policy.system_prompt is None
        return
    # the preset's policy as rl train builds it (and its Ray workers, through the same config), on a tiny
    # stand-in for the release folder it names; its first prompt is what the model reads first
    config = load(cls, path, {"policy.model": tiny_release(TOOL_DOCS_PRESETS[name], tmp_path), "policy.device": "cpu"})
    policy = config.policy.for_env(config.env).build()
    env = config.env.make()
    observation, _ = env.reset(seed=0)
    first = policy.encode(observation, first=True).text
    tools = list(env.unwrapped.tools)
    assert len(tools) == 36 and all(f'"name": "{tool}"' in first for tool in tools)
    assert first.startswith("<|im_start|>system\n" + env.unwrapped.system_prompt + "<|im_end|>")


def test_a_pretrained_chat_model_must_be_given_a_system_prompt(tmp_path):
    from rl.jobs.cli import load_policy

    with pytest.raises(ConfigError, match=r"policy.system_prompt is null for a 'vlm' policy with chat 'chatml'"):
        TrainConfig(policy=PolicyConfig(model="m", kind="vlm", chat="chatml"))
    with pytest.raises(ConfigError, match="never see the tools"):
        EvalConfig(policy=PolicyConfig(model="m", chat="chatml"))
    assert TrainConfig(policy=PolicyConfig(model="m", kind="vlm", chat="chatml", system_prompt=""))  # on purpose
    assert EvalConfig(agent="baselines.random_agent:RandomAgent")  # no policy, nothing to tell
    with pytest.raises(ConfigError, match=r"sft.kind \('vlm'\) differs from policy.kind \('causal_lm'\)"):
        TrainConfig(sft=SFTConfig(model="some/vlm", kind="vlm", stages=[SFTStage("v.jsonl")]))
    # rl eval --policy DIR: a VLM folder in Qwen's chat format gets the kind, chat and tool documentation
    folder = tiny_release("qwen3_vl", tmp_path)
    config = PolicyConfig.for_folder(folder, device="cpu")
    assert (config.kind, config.chat, config.system_prompt) == ("vlm", "chatml", "tools")
    args = argparse.Namespace(policy=folder, max_new_tokens=4, temperature=1.0, device="cpu", images_per_turn=1)
    policy = load_policy(args, {"max_turns": 3})
    assert "tool_text2image_qwen" in policy.system_prompt and type(policy).__name__ == "QwenVLPolicy"


def test_system_prompt_tools_is_the_environments_tool_documentation():
    import gymnasium

    env = EnvConfig(id="visenv/VisGen-v0", options={"tasks": "image", "num_tasks": 2})
    resolved = PolicyConfig(model="m", system_prompt="tools").for_env(env)
    expected = gymnasium.make("visenv/VisGen-v0").unwrapped.system_prompt
    assert resolved.system_prompt == expected and "tool_text2image_qwen" in expected
    assert PolicyConfig(model="m", system_prompt="hi").for_env(env).system_prompt == "hi"
    with pytest.raises(ConfigError, match="resolved from the environment"):
        PolicyConfig(model="m", system_prompt="tools").build()
    with pytest.raises(ConfigError, match="has no system_prompt"):
        PolicyConfig(model="m", system_prompt="tools").for_env(EnvConfig(id="visenv/ToolEcho-v0"))
