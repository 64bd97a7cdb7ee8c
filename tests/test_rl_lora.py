"""LoRA through peft: only adapters train and travel, the reference is the base model, saves merge."""

import pytest
import torch

from rl.grpo import GRPO, GRPOConfig
from rl.hf import AdapterOffReference, CausalLMPolicy, add_lora, reference_policy
from rl.policy import TokenBatch
from rl.rollout import SerialRollout, make_specs
from rl_helpers import LetterEnv, echo_tokenizer, tiny_policy

pytest.importorskip("peft")


def test_lora_trains_only_adapters_against_the_base_model(tmp_path):
    policy = add_lora(tiny_policy(echo_tokenizer(), max_new_tokens=8), rank=4, alpha=8,
                      target_modules=["q_proj", "v_proj"])
    weights = policy.get_weights()
    assert weights and all("lora_" in name for name in weights)
    reference = reference_policy(policy)
    assert isinstance(reference, AdapterOffReference)
    base = {n: p.detach().clone() for n, p in policy.model.named_parameters() if not p.requires_grad}
    algorithm = GRPO(policy, reference, GRPOConfig(4, 4, kl_coef=0.1, learning_rate=1e-2))
    for iteration in range(2):
        episodes, _ = SerialRollout(policy, lambda: LetterEnv(turns=1), 16).sample(make_specs(0, iteration, 4, 4))
        metrics = algorithm.update(episodes, iteration)
    after = policy.get_weights()
    assert all(not torch.equal(weights[n], after[n]) for n in weights if "lora_B" in n)
    assert all(torch.equal(p, base[n]) for n, p in policy.model.named_parameters() if not p.requires_grad)
    assert metrics["kl"] > 0  # the adapters moved the policy away from the base model
    # a saved LoRA policy is a plain model with the adapters merged in
    policy.save(str(tmp_path))
    loaded = CausalLMPolicy.from_pretrained(str(tmp_path), max_new_tokens=8)
    batch = TokenBatch.from_segments([[policy.encode({"text": "Turn 0: say cat."}, True)]], policy.pad_id)
    with torch.no_grad():
        assert torch.allclose(loaded.score(batch).logprobs, policy.score(batch).logprobs, atol=1e-5)
