"""VLM SFT: tiny Qwen2-VL, Qwen3-VL and Llava policies learn from trajectories whose tool messages carry
images; the images reach the model; LoRA trains only adapters and writes a loadable merged folder;
gradient checkpointing gives the same step; dtype/device/kind options and their errors; PST stages
on a VLM; `rl sft` on a VLM end to end, from `rl data build --images` data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rl.cli import main, run_sft
from rl.config import LoraConfig, PolicyConfig, SFTConfig
from rl.errors import ChatDataError, ConfigError
from rl.hf import CHATML_SPECIAL_TOKENS, QwenVLPolicy, VisionLMPolicy, tiny_qwen_vl, tiny_vlm
from rl.logging import read_metrics
from rl.policy import TokenBatch
from rl.sft import SFTStage, chat_segments, load_chat_jsonl, run_pst, train_sft
from rl.tokenizer import train_tokenizer

WORDS = ("cat", "robot", "lantern")
VLMS = ("qwen2_vl", "qwen3_vl", "llava")


def trajectory(word: str, images: list[str] | None) -> list[dict]:
    tool = {"role": "tool", "content": f"<tool_response>\n{{\"status\": \"ok\", \"shows\": \"{word}\"}}\n</tool_response>"}
    if images:
        tool["images"] = images
    return [{"role": "user", "content": f"Request: draw a {word}."},
            {"role": "assistant", "content": f"<tool_call>{{\"name\": \"draw\", \"arguments\": {{\"what\": \"{word}\"}}}}"
                                             "</tool_call>"},
            tool, {"role": "assistant", "content": f"<answer>a {word}</answer>"}]


def write_data(folder, name: str = "vis", images: bool = True, size: int = 16, seed: int = 0) -> str:
    """Three trajectories; with ``images`` each tool message shows two random ``size`` x ``size`` pictures."""
    rng = np.random.default_rng(seed)
    (folder / "pics").mkdir(exist_ok=True)
    lines = []
    for i, word in enumerate(WORDS):
        names = []
        for k in range(2 if images else 0):
            names.append(f"pics/{name}_{i}_{k}.png")
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / names[-1])
        lines.append(json.dumps({"messages": trajectory(word, names)}))
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def tiny_vlm_folder(kind: str, folder) -> tuple[str, str]:
    """A tiny random VLM saved as a policy folder; returns (folder, chat format)."""
    texts = [m["content"] for word in WORDS for m in trajectory(word, None)]
    if kind == "llava":
        tokenizer = train_tokenizer(texts, 400)
        model = tiny_vlm(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"), image_size=16)
        VisionLMPolicy(model, tokenizer).save(str(folder))
        return str(folder), "plain"
    tokenizer = train_tokenizer(texts, 400, CHATML_SPECIAL_TOKENS)
    model, processor = tiny_qwen_vl(tokenizer, kind)
    QwenVLPolicy(model, tokenizer, processor, chat="chatml").save(str(folder))
    return str(folder), "chatml"


def sft_config(folder, chat, data, out, **options) -> SFTConfig:
    stage = SFTStage(visual=data, epochs=options.pop("epochs", 8), batch_size=3, learning_rate=1e-2)
    return SFTConfig(model=folder, chat=chat, images_per_turn=2, stages=[stage], output_dir=str(out), **options)


@pytest.mark.parametrize("kind", VLMS)
def test_vlm_sft_lowers_the_loss_on_trajectories_with_images(kind, tmp_path):
    torch.manual_seed(0)
    folder, chat = tiny_vlm_folder(kind, tmp_path / "base")
    config = sft_config(folder, chat, write_data(tmp_path), tmp_path / "out")
    # kind "auto" reads the folder's model_type; dtype "auto" is float32 on a CPU
    assert config.policy_config().kind == "vlm" and config.policy_config().dtype == "float32"
    path = run_sft(config, progress=False)
    losses = [record["sft_loss"] for record in read_metrics(str(tmp_path / "out" / "metrics.jsonl"))]
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0]
    policy = PolicyConfig(model=path, kind="vlm", chat=chat, images_per_turn=2, device="cpu").build()
    assert type(policy) is (VisionLMPolicy if kind == "llava" else QwenVLPolicy)
    assert not policy.model.training  # SFT trains in train mode; the saved policy samples in eval mode


@pytest.mark.parametrize("kind", VLMS)
def test_the_images_reach_the_model(kind, tmp_path):
    folder, chat = tiny_vlm_folder(kind, tmp_path / "base")
    policy = sft_config(folder, chat, "unused.jsonl", tmp_path).policy_config().build()
    examples = load_chat_jsonl(write_data(tmp_path))
    encoded = [chat_segments(policy, messages) for messages in examples]
    # each tool turn shows its two pictures (newest first), with their placeholder tokens
    assert [[None if s.images is None else s.images.shape for s in segments if s.role == "env"]
            for segments in encoded] == [[None, (2, 16, 16, 3)]] * 3
    batch = TokenBatch.from_segments(encoded, policy.pad_id)
    assert int((batch.input_ids == policy.image_id).sum()) == 3 * 2 * 4  # 16x16: 2x2 patches of 8 (Qwen: of 4, merged 2x2)
    mask = batch.loss_mask.bool()
    with torch.no_grad():
        seen = policy.score(batch).logprobs[mask]
        batch.pixel_values = 255 - batch.pixel_values
        other = policy.score(batch).logprobs[mask]
    assert not torch.allclose(seen, other, atol=1e-4)


def test_lora_sft_trains_only_adapters_and_writes_a_merged_policy(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    folder, chat = tiny_vlm_folder("qwen3_vl", tmp_path / "base")
    lora = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.1)
    path = run_sft(sft_config(folder, chat, write_data(tmp_path), tmp_path / "out", lora=lora, epochs=2), progress=False)
    adapter = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_A" in name or "lora_B" in name for name in adapter)
    assert any("lora_B" in name and value.abs().sum() > 0 for name, value in adapter.items())  # B starts at 0
    base, merged = load_file(f"{folder}/model.safetensors"), load_file(f"{path}/model.safetensors")
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed and all(".q_proj." in name or ".v_proj." in name for name in changed)
    # the adapter folder loads onto the base model with peft and merges into the same weights
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(folder), str(tmp_path / "out" / "adapter"))
    remerged = model.merge_and_unload().state_dict()
    assert all(torch.allclose(remerged[name], merged[name], atol=1e-6) for name in changed)
    policy = PolicyConfig(model=path, kind="vlm", chat=chat, device="cpu").build()  # GRPO starts from this folder
    assert type(policy) is QwenVLPolicy and not any("lora" in name for name, _ in policy.model.named_parameters())


def test_gradient_checkpointing_gives_the_same_step(tmp_path, monkeypatch):
    import transformers.modeling_utils

    calls = []
    checkpoint = transformers.modeling_utils.checkpoint
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint",
                        lambda *args, **kwargs: calls.append(1) or checkpoint(*args, **kwargs))
    folder, chat = tiny_vlm_folder("qwen2_vl", tmp_path / "base")
    data = write_data(tmp_path)
    plain = run_sft(sft_config(folder, chat, data, tmp_path / "plain", epochs=2), progress=False)
    assert not calls
    recomputed = run_sft(sft_config(folder, chat, data, tmp_path / "ckpt", epochs=2, gradient_checkpointing=True),
                         progress=False)
    assert calls  # the decoder layers ran under torch.utils.checkpoint
    a, b = load_file(f"{plain}/model.safetensors"), load_file(f"{recomputed}/model.safetensors")
    assert all(torch.allclose(a[name], b[name], atol=1e-5) for name in a)
    assert any(not torch.equal(a[name], load_file(f"{folder}/model.safetensors")[name]) for name in a)


def test_bfloat16_sft_on_cpu(tmp_path):
    folder, chat = tiny_vlm_folder("qwen2_vl", tmp_path / "base")
    path = run_sft(sft_config(folder, chat, write_data(tmp_path), tmp_path / "out", dtype="bfloat16", epochs=1),
                   progress=False)
    assert {value.dtype for value in load_file(f"{path}/model.safetensors").values()} == {torch.bfloat16}


def test_pst_stages_run_the_same_on_a_vlm(tmp_path):
    folder, chat = tiny_vlm_folder("qwen3_vl", tmp_path / "base")
    policy = sft_config(folder, chat, "unused.jsonl", tmp_path).policy_config().build()
    visual, general = write_data(tmp_path), write_data(tmp_path, "general", images=False)
    stages = [SFTStage(visual, general, general_count=3, visual_weight=1.0, batch_size=4, learning_rate=1e-2),
              SFTStage(visual, general, general_count=1, visual_weight=2.0, batch_size=4, learning_rate=1e-2)]
    before = policy.get_weights()
    results = run_pst(policy, stages, seed=0)
    # stage 1: 3 general + 3 visual = 2 batches of <= 4; stage 2: 1 general + 6 visual = 2 batches
    assert [r["steps"] for r in results] == [2.0, 2.0]
    after = policy.get_weights()
    assert all(not torch.equal(before[name], after[name]) for name in before if "embed" not in name)


@pytest.mark.parametrize("options, message", [
    ({"kind": "vision"}, r"sft.kind \('vision'\) must be one of \('auto', 'causal_lm', 'vlm'\)"),
    ({"dtype": "fp16"}, r"sft.dtype \('fp16'\) must be one of \('auto', 'float32', 'bfloat16'\)"),
    ({"device": "tpu"}, r"sft.device \('tpu'\)"),
    ({"chat": "llama"}, r"sft.chat \('llama'\)"),
    ({"images_per_turn": 0}, r"sft.images_per_turn \(0\) must be at least 1"),
    ({"model": "tiny", "kind": "vlm"}, r"sft.kind 'vlm' needs a VLM folder"),
    ({"lora": {"rank": 4, "dropout": 1.5}}, r"lora.dropout \(1.5\) must be in \[0, 1\)"),
])
def test_bad_sft_options_raise_config_errors(options, message):
    from rl.config import from_dict

    with pytest.raises(ConfigError, match=message):
        from_dict(SFTConfig, {"model": "some/folder", "stages": [{"visual": "v.jsonl"}], **options})


def test_dtype_and_device_auto_resolve_for_this_machine():
    config = SFTConfig(stages=[SFTStage("v.jsonl")])
    cuda = torch.cuda.is_available()
    assert (config.torch_device, config.torch_dtype) == (("cuda", "bfloat16") if cuda else ("cpu", "float32"))
    assert SFTConfig(stages=[SFTStage("v.jsonl")], device="cpu").torch_dtype == "float32"
    assert SFTConfig(stages=[SFTStage("v.jsonl")], dtype="bfloat16").torch_dtype == "bfloat16"
    if not cuda:
        with pytest.raises(ConfigError, match="sft.device is 'cuda' but torch sees no CUDA device"):
            SFTConfig(stages=[SFTStage("v.jsonl")], device="cuda")


def test_image_data_errors(tmp_path):
    data = tmp_path / "bad.jsonl"
    messages = trajectory("cat", None)
    messages[1]["images"] = ["pics/x.png"]
    data.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ChatDataError, match=r"bad.jsonl:1: message 1 \(assistant\) has 'images'"):
        load_chat_jsonl(str(data))
    data.write_text(json.dumps({"messages": trajectory("cat", ["pics/missing.png"])}) + "\n")
    with pytest.raises(ChatDataError, match=r"bad.jsonl:1: message 2 names 1 image file\(s\) that do not exist"):
        load_chat_jsonl(str(data))
    folder, chat = tiny_vlm_folder("qwen2_vl", tmp_path / "base")
    policy = sft_config(folder, chat, "unused.jsonl", tmp_path).policy_config().build()
    examples = load_chat_jsonl(write_data(tmp_path, "a", size=16)) + load_chat_jsonl(write_data(tmp_path, "b", size=24))
    with pytest.raises(ChatDataError, match=r"The SFT images have 2 sizes"):
        train_sft(policy, examples, epochs=1, batch_size=3, learning_rate=1e-3, seed=0)
    text_policy = sft_config(folder, chat, "unused.jsonl", tmp_path, kind="causal_lm").policy_config()
    assert text_policy.kind == "causal_lm"


def test_rl_sft_trains_a_vlm_with_lora_from_teacher_data_with_images(tmp_path, capsys):
    """`rl data build --images` -> `rl sft` (a Qwen3-VL, LoRA, gradient checkpointing) -> a policy folder."""
    folder, _ = tiny_vlm_folder("qwen3_vl", tmp_path / "base")
    data = tmp_path / "teacher.jsonl"
    assert main(["data", "build", "--out", str(data), "--n", "1", "--suite", "image", "--mistake-rate", "0",
                 "--max-turns", "12", "--images", "--pixel-size", "16", "--quiet"]) == 0
    assert any("images" in m for line in data.read_text().splitlines() for m in json.loads(line)["messages"])
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {folder}\nchat: chatml\nimages_per_turn: 2\ngradient_checkpointing: true\n"
                      f"lora: {{rank: 4, alpha: 8}}\noutput_dir: {tmp_path / 'out'}\n"
                      f"stages:\n  - {{visual: {data}, epochs: 1, batch_size: 1, learning_rate: 1.0e-3}}\n")
    assert main(["sft", "--config", str(config), "--kind", "vlm", "--dtype", "float32"]) == 0
    assert "policy saved to" in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    policy = PolicyConfig(model=str(tmp_path / "out" / "policy"), kind="vlm", chat="chatml", device="cpu").build()
    assert type(policy.model).__name__ == "Qwen3VLForConditionalGeneration"


def test_rl_train_warm_starts_with_the_rl_policys_system_prompt(monkeypatch):
    """rl train's SFT encodes trajectories without a system message with the prompt RL samples from."""
    import rl.cli
    from rl.config import EnvConfig, TrainConfig
    from visenv.envs.visgen import VisGenEnv

    class Stop(Exception):
        pass

    def fake_sft(config, progress, learner, system_prompt):
        raise Stop(system_prompt)

    monkeypatch.setattr(rl.cli, "run_sft", fake_sft)
    config = TrainConfig(env=EnvConfig(id="visenv/VisGen-v0"), resume=False,
                         policy=PolicyConfig(kind="vlm", chat="chatml", system_prompt="tools"),
                         sft=SFTConfig(model="some/vlm", kind="vlm", chat="chatml", stages=[SFTStage("v.jsonl")]))
    with pytest.raises(Stop) as stopped:
        rl.cli.run_train(config)
    assert stopped.value.args[0] == VisGenEnv().system_prompt


@pytest.mark.slow
def test_rl_eval_plays_a_vlm_policy_folder_on_pixel_observations(tmp_path, monkeypatch):
    folder, _ = tiny_vlm_folder("qwen2_5_vl", tmp_path / "vlm")
    seen = []
    encode = QwenVLPolicy.encode

    def spy(self, observation, first):
        seen.append((self.images_per_turn, np.asarray(observation.get("pixels")).shape))
        return encode(self, observation, first)

    monkeypatch.setattr(QwenVLPolicy, "encode", spy)
    out = tmp_path / "results.json"
    assert main(["eval", "--policy", folder, "--n", "2", "--max-turns", "2", "--max-new-tokens", "4",
                 "--images-per-turn", "2", "--pixel-size", "16", "--num-envs", "2", "--no-report",
                 "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["suite"]["env_config"] == {"max_turns": 2, "observe_pixels": True, "max_pixel_images": 4,
                                            "pixel_size": 16}
    # every observation the policy encoded carried the environment's pixels (4 thumbnails of 16 x 16)
    assert seen and all(entry == (2, (4, 16, 16, 3)) for entry in seen)
    assert main(["eval", "--policy", folder, "--images-per-turn", "0", "--out", str(out)]) == 2
