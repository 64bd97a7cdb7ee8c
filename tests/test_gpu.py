"""The trainer on a CUDA device: policies, GRPO, LoRA in bf16, VLMs seeing VisGen images, CLIP.

Tiny random models built from configs (nothing is downloaded), a few tokens each: the file takes well
under a minute on one GPU. Without CUDA every test is skipped. ``VISENV_TEST_DEVICE=cpu`` runs the same
tests on the CPU, to check their logic where there is no GPU (bf16 then runs on the CPU's bf16 kernels,
which round differently from the GPU's). ``scripts/gpu_check.sh`` runs the file on a GPU machine.

Needs neither Ray nor open_clip (the CLIP test skips without open_clip).
"""

from __future__ import annotations

import importlib
import math
import os

import gymnasium as gym
import pytest
import torch

from rl import checkpoint
from rl.config import LoraConfig, PolicyConfig
from rl.grpo import GRPO, GRPOConfig
from rl.hf import AdapterOffReference, QwenVLPolicy, VisionLMPolicy, reference_policy
from rl.policy import POLICY, Conversation, TokenBatch
from rl.rollout import SerialRollout, make_specs, run_episodes
from rl.sft import train_sft
from rl.train import Trainer
from rl_helpers import ECHO, LetterEnv, echo_examples, tiny_policy
from test_rl_policy import Recording, chatml_tokenizer, tiny_vision_policy, tokenizer  # noqa: F401 (fixtures)
from visenv.envs.visgen import VisGenEnv
from visenv.protocol import format_turn

DEVICE = os.environ.get("VISENV_TEST_DEVICE", "cuda")
"""Where the tests run: "cuda", or "cpu" to check the tests themselves on a machine without a GPU."""

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() or DEVICE == "cpu"), reason="needs a CUDA GPU"),
]

FP32_ATOL = 1e-4
"""Sampler vs ``score()`` log-probs in float32: the bound of the CPU tests (tests/test_rl_policy.py).
The KV-cached decoding and the one-pass recomputation add the same terms in another order (~1e-6)."""

BF16_MEAN_GAP, BF16_MAX_GAP = 0.02, 0.2
"""Sampler vs ``score()`` log-probs in bfloat16 (mean and largest absolute gap over the sampled tokens).
bf16 keeps 8 significant bits (relative rounding 2**-9 ~ 0.002 per stored activation); the KV-cached
decoding and the one-pass recomputation round different partial results (other kernels, other
attention lengths), so the same token's log-prob moves by about that relative error of the logits.
Both log-probs are computed in float32 from the bf16 logits (rl.core.token_logprobs): the gap is the
model's rounding only. Measured on the CPU's bf16 kernels: mean 3e-4 and max 2e-3 (tiny Llama), mean
<= 4e-5 and max <= 1e-3 (tiny VLMs); the GPU's kernels (flash attention rounds its probabilities to
bf16) may be several times worse, hence ~50x headroom on the mean. What the bounds must catch: the
tiny random models' log-probs are about -6 with a spread of ~0.2 between tokens, and scoring with
another model's weights or with the mask shifted by one token gives a mean gap of ~0.17."""

CLIP_ATOL = 2e-2
"""CLIP cosines on the device vs on the CPU: cuDNN runs float32 convolutions (the patch embedding) in
TF32 by default (10-bit mantissa, relative error ~1e-3), so unit embeddings differ by ~1e-3."""

DRAW_ONE = format_turn(think="t", tool_call={"name": "tool_text2image_qwen", "arguments": {"prompt": "a cat", "n": 1}})


def on_device(policy, dtype=torch.float32):
    """The policy with its model moved to DEVICE (and cast to ``dtype``)."""
    policy.model.to(device=DEVICE, dtype=dtype)
    return policy


def on_the_device(tensors) -> bool:
    return all(t.device.type == DEVICE for t in tensors)


def assert_continuity(episodes, calls) -> None:
    """Each policy turn is exactly what the sampler returned for exactly the tokens before it, with a
    finite log-prob per token."""
    sampled = dict(calls)
    for episode in episodes:
        sequence = []
        for segment in episode.segments:
            if segment.role == POLICY:
                assert sampled[episode.spec.sample_seed, tuple(sequence)] == segment.token_ids
                assert len(segment.logprobs) == len(segment.token_ids)
                assert all(math.isfinite(v) and v <= 0 for v in segment.logprobs)
            sequence += segment.token_ids


def sampled_and_scored(policy, episodes):
    """The episodes as one left-padded batch, and the sampler's and ``score()``'s log-probs (on the
    CPU) at every sampled token."""
    batch = TokenBatch.from_segments([e.segments for e in episodes], policy.pad_id)
    with torch.no_grad():
        scores = policy.score(batch)
    assert scores.logprobs.device.type == DEVICE and scores.logprobs.dtype == torch.float32
    assert scores.entropy.device.type == DEVICE
    mask = batch.loss_mask.bool()
    return batch, batch.sampled_logprobs[mask], scores.logprobs.cpu()[mask]


def assert_bf16_gap(sampled, scored) -> None:
    gap = (sampled - scored).abs()
    assert gap.mean() < BF16_MEAN_GAP and gap.max() < BF16_MAX_GAP, (
        f"bf16 sampler/score gap: mean {gap.mean():.4f}, max {gap.max():.4f} over {len(gap)} tokens")


def require(module: str) -> None:
    """Skip the test when ``module`` cannot be imported (absent, or installed but broken)."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        pytest.skip(f"needs {module}: {err}")


def finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())


@pytest.fixture(scope="module")
def text_model_folder(tokenizer, tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a model folder (what PolicyConfig.model names)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_policy(tokenizer).save(str(path))
    return str(path)


class DrawingVisGen(gym.Wrapper):
    """VisGen with pixel observations (32 x 32, two rows) in which every turn draws one image, whatever
    the policy wrote (a random policy never writes a valid call): the policy's second observation shows
    one image, its third two; the third turn ends the episode."""

    def __init__(self):
        super().__init__(VisGenEnv(max_turns=3, observe_pixels=True, pixel_size=32, max_pixel_images=2))

    def step(self, action):
        return self.env.step(DRAW_ONE)


# ---------------------------------------------------------------- 1. text policy: sampling vs scoring


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_causal_lm_samples_and_scores_on_the_device(dtype, tokenizer):
    policy = on_device(tiny_policy(tokenizer, max_new_tokens=12), dtype)
    assert policy.device.type == DEVICE and on_the_device(policy.model.parameters())
    recording = Recording(policy)
    episodes, stats = run_episodes(recording, [LetterEnv() for _ in range(3)], make_specs(0, 0, 5, 1))
    assert stats.env_steps == 15 and all(len(e.rewards) == 3 for e in episodes)
    assert_continuity(episodes, recording.calls)
    batch, sampled, scored = sampled_and_scored(policy, episodes)
    if dtype == torch.float32:
        torch.testing.assert_close(scored, sampled, rtol=0, atol=FP32_ATOL)
        # the same weights on the CPU give the same log-probs: nothing is lost moving to the device
        with torch.no_grad():
            on_cpu = tiny_policy(tokenizer).score(batch).logprobs[batch.loss_mask.bool()]
        torch.testing.assert_close(scored, on_cpu, rtol=0, atol=FP32_ATOL)
    else:
        assert_bf16_gap(sampled, scored)
    # get_weights: CPU tensors of the model's dtype (the TrainablePolicy contract); set_weights loads them
    # into a policy on the device and leaves it there
    weights = policy.get_weights()
    assert weights and all(w.device.type == "cpu" and w.dtype == dtype for w in weights.values())
    other = on_device(tiny_policy(tokenizer, seed=1), dtype)
    assert not torch.equal(other.get_weights()["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])
    other.set_weights(weights)
    assert on_the_device(other.model.parameters())
    assert all(torch.equal(w, weights[name]) for name, w in other.get_weights().items())


def test_samples_on_the_device_do_not_depend_on_the_batch(tokenizer):
    policy = on_device(tiny_policy(tokenizer, max_new_tokens=12))
    env = ECHO.make()

    def conversation(seed):
        return Conversation(seed=seed, segments=[policy.encode(env.reset(seed=seed)[0], True)])

    together = policy.generate([conversation(s) for s in range(6)])
    alone = [policy.generate([conversation(s)])[0] for s in (4, 1)]
    assert [t.token_ids for t in alone] == [together[4].token_ids, together[1].token_ids]
    assert together[0].token_ids != together[1].token_ids


# ---------------------------------------------------------------- 2. GRPO and the training loop


def test_one_grpo_update_on_the_device(tokenizer):
    policy = on_device(tiny_policy(tokenizer, max_new_tokens=8))
    reference = reference_policy(policy)
    algorithm = GRPO(policy, reference, GRPOConfig(tasks_per_iteration=4, group_size=4, kl_coef=0.05))
    episodes, _ = SerialRollout(policy, lambda: LetterEnv(turns=2), 16).sample(make_specs(0, 0, 4, 4))
    before = policy.get_weights()
    metrics = algorithm.update(episodes, 0)
    after = policy.get_weights()
    assert metrics["episodes_trained"] > 0 and finite(metrics), metrics
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the policy before the step
    assert metrics["sampler_logprob_gap"] < FP32_ATOL
    assert sorted(name for name in before if not torch.equal(before[name], after[name])) == sorted(before)
    # everything stayed on the device: policy, reference (unchanged) and the optimizer's moments
    assert on_the_device(policy.model.parameters()) and on_the_device(reference.model.parameters())
    assert all(torch.equal(p.cpu(), before[name]) for name, p in reference.model.named_parameters())
    moments = [s[k] for s in algorithm.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and on_the_device(moments)


def test_trainer_runs_checkpoints_and_resumes_on_the_device(tokenizer, tmp_path):
    def trainer(iterations):
        policy = on_device(tiny_policy(tokenizer, max_new_tokens=8))
        algorithm = GRPO(policy, reference_policy(policy), GRPOConfig(4, 4, kl_coef=0.05, learning_rate=1e-3))
        return Trainer(policy, algorithm, SerialRollout(policy, lambda: LetterEnv(turns=1), 16),
                       iterations=iterations, num_groups=4, group_size=4, checkpoint_dir=str(tmp_path))

    first = trainer(2)
    history = first.run()
    assert len(history) == 2 and all(m["episodes_trained"] > 0 and finite(m) for m in history), history
    path = checkpoint.latest(str(tmp_path))
    assert path is not None and path.endswith("iter_000002")
    resumed = trainer(3)
    resumed.resume(path)
    assert resumed.iteration == 2
    weights = first.policy.get_weights()
    assert all(torch.equal(w, weights[name]) for name, w in resumed.policy.get_weights().items())
    assert on_the_device(resumed.policy.model.parameters())
    moments = [s["exp_avg"] for s in resumed.algorithm.optimizer.state.values()]
    assert moments and on_the_device(moments)  # the optimizer state went back to the parameters' device
    more = resumed.run()
    assert len(more) == 1 and finite(more[0]) and resumed.iteration == 3


# ---------------------------------------------------------------- 3. LoRA in bf16, as the GPU presets


def test_lora_bf16_policy_from_config_trains_only_adapters_on_the_device(text_model_folder):
    require("peft")
    config = PolicyConfig(model=text_model_folder, dtype="bfloat16", device=DEVICE, max_new_tokens=8,
                          lora=LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    policy = config.build()
    assert policy.device.type == DEVICE and on_the_device(policy.model.parameters())
    trainable = [name for name, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert len(policy.parameters()) == len(trainable)
    frozen = {name: p.detach().clone() for name, p in policy.model.named_parameters() if not p.requires_grad}
    assert all(p.dtype == torch.bfloat16 for p in frozen.values())
    reference = reference_policy(policy)
    assert isinstance(reference, AdapterOffReference)
    algorithm = GRPO(policy, reference, GRPOConfig(4, 4, kl_coef=0.1, learning_rate=1e-2))
    start = policy.get_weights()
    for iteration in range(2):
        episodes, _ = SerialRollout(policy, lambda: LetterEnv(turns=1), 16).sample(make_specs(0, iteration, 4, 4))
        metrics = algorithm.update(episodes, iteration)
        assert metrics["episodes_trained"] > 0 and finite(metrics), metrics
    assert metrics["kl"] > 0  # the adapters moved the policy away from the base model
    moved = policy.get_weights()
    assert all(not torch.equal(start[name], moved[name]) for name in start if "lora_B" in name)
    assert all(torch.equal(p, frozen[name]) for name, p in policy.model.named_parameters() if not p.requires_grad)
    # an SFT step on the same policy
    sft = train_sft(policy, echo_examples(16, 0.5), epochs=1, batch_size=8, learning_rate=1e-3, seed=0)
    assert sft["steps"] == 2 and math.isfinite(sft["loss"])
    # the adapters travel as CPU tensors to a second policy built from the same config
    weights = policy.get_weights()
    assert weights.keys() == start.keys() and all(w.device.type == "cpu" for w in weights.values())
    second = config.build()
    second.set_weights(weights)
    assert on_the_device(second.model.parameters())
    assert all(torch.equal(w, weights[name]) for name, w in second.get_weights().items())
    batch = TokenBatch.from_segments([e.segments for e in episodes[:4]], policy.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(second.score(batch).logprobs, policy.score(batch).logprobs)


# ---------------------------------------------------------------- 4. VLMs seeing VisGen images


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vlm_policies_sample_and_score_visgen_images_on_the_device(name, dtype, tokenizer, chatml_tokenizer,
                                                                    tmp_path):
    if dtype == "bfloat16":
        require("peft")
    tiny_vision_policy(name, tokenizer, chatml_tokenizer).save(str(tmp_path))
    # bf16 with LoRA adapters (rank 16 on q/k/v/o), as configs/gpu_*vl*_grpo.yaml; float32 as the CPU tests
    config = PolicyConfig(model=str(tmp_path), kind="vlm", chat="plain" if name == "llava" else "chatml",
                          dtype=dtype, device=DEVICE, images_per_turn=2, max_new_tokens=8,
                          lora=LoraConfig() if dtype == "bfloat16" else None)
    policy = config.build()
    assert type(policy) is (VisionLMPolicy if name == "llava" else QwenVLPolicy)
    assert policy.device.type == DEVICE and on_the_device(policy.model.parameters())
    recording = Recording(policy)
    episodes, _ = run_episodes(recording, [DrawingVisGen() for _ in range(2)], make_specs(3, 0, 2, 1))
    assert_continuity(episodes, recording.calls)
    shown = [[None if s.images is None else s.images.shape for s in e.segments if s.role != POLICY] for e in episodes]
    assert shown == [[None, (1, 32, 32, 3), (2, 32, 32, 3)]] * 2
    batch, sampled, scored = sampled_and_scored(policy, episodes)
    assert batch.pixel_values.shape == (6, 32, 32, 3) and batch.pixel_values.any()
    if dtype == "float32":
        torch.testing.assert_close(scored, sampled, rtol=0, atol=FP32_ATOL)
        # the images reach the model on the device: other pixels give other log-probs
        batch.pixel_values = 255 - batch.pixel_values
        with torch.no_grad():
            other = policy.score(batch).logprobs.cpu()[batch.loss_mask.bool()]
        assert not torch.allclose(other, sampled, atol=FP32_ATOL)
    else:
        assert_bf16_gap(sampled, scored)
        # gradients reach every adapter, finite, on the device
        scores = policy.score(batch)
        (-(scores.logprobs * batch.loss_mask.to(policy.device)).sum()).backward()
        grads = [p.grad for p in policy.parameters()]
        assert grads and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        assert on_the_device(grads)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl"])
def test_vlm_sft_with_lora_bf16_and_checkpointing_on_the_device(name, tmp_path):
    """rl sft's VLM path as the GPU recipes would use it: images, LoRA, bf16, gradient checkpointing."""
    require("peft")
    from rl.cli import run_sft
    from rl.logging import read_metrics
    from test_rl_vlm_sft import sft_config, tiny_vlm_folder, write_data

    folder, chat = tiny_vlm_folder(name, tmp_path / "base")
    config = sft_config(folder, chat, write_data(tmp_path), tmp_path / "out", device=DEVICE, dtype="bfloat16",
                        gradient_checkpointing=True, lora=LoraConfig(rank=8, alpha=16))
    path = run_sft(config, progress=False)
    losses = [record["sft_loss"] for record in read_metrics(str(tmp_path / "out" / "metrics.jsonl"))]
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses) and losses[-1] < 0.8 * losses[0]
    policy = PolicyConfig(model=path, kind="vlm", chat=chat, dtype="bfloat16", device=DEVICE, images_per_turn=2).build()
    assert isinstance(policy, QwenVLPolicy) and on_the_device(policy.model.parameters())
    assert policy.model.dtype == torch.bfloat16


# ---------------------------------------------------------------- 5. device "auto"


def test_auto_device_is_cuda_when_available(text_model_folder):
    config = PolicyConfig(model=text_model_folder, device="auto", max_new_tokens=4)
    policy = config.build()
    assert policy.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    turn = policy.generate([Conversation(seed=0, segments=[policy.encode({"text": "Turn 0: say cat."}, True)])])[0]
    assert 1 <= len(turn.token_ids) <= 4 and all(math.isfinite(v) for v in turn.logprobs)


# ---------------------------------------------------------------- 6. CLIP


def test_tiny_clip_scores_on_the_device(tmp_path):
    require("open_clip")
    from reward_episodes import media
    from visenv.rewards.clip import ClipScorer

    images = [media(tmp_path, "image", seed) for seed in range(2)]
    texts = ["a red bicycle", "a canal at night"]

    def scorer(device):
        return ClipScorer.tiny(tmp_path / "tiny-clip", seed=0, device=device)

    clip = scorer(DEVICE)
    values = clip.alignment(images, texts)
    assert clip.loaded and on_the_device(clip._net.parameters())
    assert all(v is not None and math.isfinite(v) and -1.0 <= v <= 1.0 for v in values)
    cpu = scorer("cpu")
    assert cpu.alignment(images, texts) == pytest.approx(values, abs=CLIP_ATOL) and cpu.loaded


# ---------------------------------------------------------------- 7. the vLLM engine


def test_vllm_engine_samples_seeded_turns_and_syncs_weights(tokenizer, tmp_path):
    """rl.engine.vllm on a tiny Llama (head size 64, float32): sampled log-probs are what score()
    recomputes, a seed gives the same tokens alone or in a batch, and update_weights swaps the model."""
    require("vllm")
    if DEVICE != "cuda":
        pytest.skip("vLLM needs a CUDA device")
    from rl.engine import GenerationRequest
    from rl.engine.vllm import VLLMEngine, VLLMEngineConfig
    from rl.policy import ENV, Segment

    policy = tiny_policy(tokenizer, hidden_size=256, max_new_tokens=12)
    policy.save(str(tmp_path / "model"))
    other = tiny_policy(tokenizer, hidden_size=256, seed=1)
    prompts = [policy.encode({"text": f"Turn {i}: say cat."}, True).token_ids for i in range(4)]
    requests = [GenerationRequest(ids, 12, seed=i, stop_token_ids=[policy.stop_id]) for i, ids in enumerate(prompts)]

    def assert_scored_by(scorer, results):
        batch = TokenBatch.from_segments([[Segment(ENV, "", r.prompt_ids), Segment(POLICY, "", s.token_ids, s.logprobs)]
                                          for r, s in zip(requests, results)], scorer.pad_id)
        scored = scorer.score(batch).logprobs[batch.loss_mask.bool()].cpu()
        assert (scored - batch.sampled_logprobs[batch.loss_mask.bool()]).abs().max() < 1e-3

    config = VLLMEngineConfig(str(tmp_path / "model"), dtype="float32", gpu_memory_utilization=0.2,
                              max_model_len=512, engine_args={"enforce_eager": True})
    with VLLMEngine(config) as engine:
        together = engine.generate_many(requests)
        alone = engine.generate_many(requests[2:3])[0]
        assert alone.token_ids == together[2].token_ids
        assert all(1 <= len(r.token_ids) <= 12 and r.weight_version == 0 for r in together)
        assert_scored_by(on_device(policy), together)
        engine.update_weights(other.get_weights(), version=1)
        after = engine.generate_many(requests)
        assert all(r.weight_version == 1 for r in after)
        assert_scored_by(on_device(other), after)
