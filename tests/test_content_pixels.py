"""Pixels of the semantic tier carry learnable signal: a tiny VLM policy tells two counts apart after SFT."""

import pytest
import torch

from rl.hf import VisionLMPolicy, tiny_vlm
from rl.policy import POLICY, Segment, TokenBatch
from rl_helpers import echo_tokenizer
from visenv.envs.visgen import VisGenEnv
from visenv.protocol import format_turn

PROMPTS = {"one": "one red fox", "three": "three red foxes"}


def observation(prompt: str) -> dict:
    """The pixels of one rendered image, under a question whose text is the same for every image."""
    env = VisGenEnv(content="semantic", observe_pixels=True, pixel_size=32, max_pixel_images=1)
    env.reset(seed=0)
    obs = env.step(format_turn(tool_call={"name": "tool_text2image_seed", "arguments": {"prompt": prompt}}))[0]
    return {"text": "How many foxes?", "pixels": obs["pixels"], "pixels_mask": obs["pixels_mask"]}


def answer_logprob(policy: VisionLMPolicy, obs: dict, answer: str) -> torch.Tensor:
    ids = policy.tokenizer.encode(f" {answer}", add_special_tokens=False)
    segments = [policy.encode(obs, True), Segment(POLICY, answer, ids, logprobs=[0.0] * len(ids))]
    batch = TokenBatch.from_segments([segments], policy.tokenizer.pad_token_id)
    return (policy.score(batch).logprobs * batch.loss_mask.to(policy.device)).sum()


@pytest.mark.slow
def test_a_tiny_vlm_tells_two_rendered_counts_apart_after_a_few_sft_steps():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tokenizer = echo_tokenizer()
    model = tiny_vlm(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"), image_size=32)
    policy = VisionLMPolicy(model, tokenizer, max_new_tokens=4)
    observations = {label: observation(prompt) for label, prompt in PROMPTS.items()}
    assert (observations["one"]["pixels"] != observations["three"]["pixels"]).any()

    def margins() -> list[float]:
        with torch.no_grad():
            return [float(answer_logprob(policy, observations[label], label)
                          - answer_logprob(policy, observations[label], other))
                    for label, other in (("one", "three"), ("three", "one"))]

    assert min(margins()) < 0.5  # untrained, it cannot tell both apart
    optimiser = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(40):
        loss = -sum(answer_logprob(policy, observations[label], label) for label in PROMPTS)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert min(margins()) > 2.0  # the text is the same: only the pixels tell the counts apart
