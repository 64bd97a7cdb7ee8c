"""Policies: token continuity across multi-turn episodes (text and images), left padding, sampling
that does not depend on the batch, the baseline and API adapters."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch

from baselines.random_agent import RandomAgent
from rl.api import ApiPolicy
from rl.hf import CausalLMPolicy, VisionLMPolicy, tiny_vlm
from rl.policy import POLICY, AgentPolicy, Conversation, Policy, Segment, TokenBatch, TrainablePolicy
from rl.rollout import make_specs, run_episodes
from rl_helpers import ECHO, LetterEnv, echo_tokenizer, tiny_policy


@pytest.fixture(scope="module")
def tokenizer():
    return echo_tokenizer()


class Recording:
    """Wraps a policy and records, for each generated turn, the prompt ids it saw and the ids it returned."""

    def __init__(self, policy):
        self.policy = policy
        self.calls = []

    def encode(self, observation, first):
        return self.policy.encode(observation, first)

    def generate(self, conversations):
        prompts = [(conv.seed, tuple(conv.token_ids)) for conv in conversations]
        turns = self.policy.generate(conversations)
        self.calls += [(prompt, list(turn.token_ids)) for prompt, turn in zip(prompts, turns)]
        return turns


def check_continuity(policy, episodes, calls):
    """The assertions shared by the text and image continuity tests."""
    sampled = dict(calls)
    retokenised_differs = False
    for episode in episodes:
        sequence, turns = [], 0
        for segment in episode.segments:
            if segment.role == POLICY:
                # what the model saw when it sampled this turn is exactly the sequence so far,
                # and what it sampled is exactly what the episode keeps
                assert sampled[episode.spec.sample_seed, tuple(sequence)] == segment.token_ids
                end = [policy.stop_id] if segment.token_ids[-1:] == [policy.stop_id] else []
                retokenised = policy.tokenizer.encode(segment.text, add_special_tokens=False) + end
                retokenised_differs |= retokenised != segment.token_ids
                turns += 1
            else:
                assert segment.token_ids == policy.tokenizer.encode(segment.text, add_special_tokens=False)
            sequence += segment.token_ids
        assert turns == 3
    # the random policy's texts do not round-trip through the tokenizer, so re-tokenising would be caught
    assert retokenised_differs
    batch = TokenBatch.from_segments([e.segments for e in episodes], policy.pad_id)
    for row, episode in enumerate(episodes):
        real = batch.attention_mask[row].bool()
        assert batch.input_ids[row][real].tolist() == [t for s in episode.segments for t in s.token_ids]
        trained = batch.input_ids[row][batch.loss_mask[row].bool()].tolist()
        assert trained == [t for s in episode.segments if s.role == POLICY for t in s.token_ids]
    # scoring the left-padded batch gives back the sampler's log-probs at the sampled tokens
    with torch.no_grad():
        scores = policy.score(batch)
    mask = batch.loss_mask.bool()
    assert torch.allclose(scores.logprobs[mask], batch.sampled_logprobs[mask], atol=1e-4)
    return batch


def test_token_continuity_across_a_multi_turn_episode(tokenizer):
    policy = Recording(tiny_policy(tokenizer, max_new_tokens=12))
    envs = [LetterEnv() for _ in range(3)]
    episodes, stats = run_episodes(policy, envs, make_specs(0, 0, 5, 1))
    assert stats.env_steps == 15 and all(len(e.rewards) == 3 for e in episodes)
    check_continuity(policy.policy, episodes, policy.calls)


def test_token_continuity_with_images(tokenizer):
    model = tiny_vlm(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"), image_size=16)
    vlm = VisionLMPolicy(model, tokenizer, max_new_tokens=10)
    policy = Recording(vlm)
    envs = [LetterEnv(pixels=True) for _ in range(2)]
    episodes, _ = run_episodes(policy, envs, make_specs(1, 0, 3, 1))
    batch = check_continuity(vlm, episodes, policy.calls)
    # one non-blank image per observation, as image_tokens placeholders, travels with its segment
    shown = [s.images for e in episodes for s in e.segments if s.images is not None]
    assert len(shown) == 9 and all(images.shape == (1, 16, 16, 3) for images in shown)
    assert np.array_equal(batch.pixel_values, np.concatenate(shown))
    assert int((batch.input_ids == vlm.image_id).sum()) == 9 * vlm.image_tokens
    # the images matter: scoring with other pixels changes the log-probs
    batch.pixel_values = 255 - batch.pixel_values
    with torch.no_grad():
        other = vlm.score(batch).logprobs
    mask = batch.loss_mask.bool()
    assert not torch.allclose(other[mask], batch.sampled_logprobs[mask], atol=1e-4)


def test_left_padding_uses_positions_from_the_attention_mask(tokenizer):
    # GPT-2 has absolute position embeddings: positions counted from the padding would change its
    # outputs (Llama's rotary embeddings are shift-invariant, so it could not tell)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128))
    policy = CausalLMPolicy(model, tokenizer, max_new_tokens=8)
    def episode(prompt, reply):
        return [policy.encode({"text": prompt}, True), Segment(POLICY, reply, tokenizer.encode(reply))]

    short = episode("Turn 0: say cat.", "cat castle teapot")
    long = episode("Call tool_text2image_qwen with prompt 'robot' and n=2. Please.", "robot")
    with torch.no_grad():
        alone_batch = TokenBatch.from_segments([short], policy.pad_id)
        alone = policy.score(alone_batch).logprobs[0]
        batch = TokenBatch.from_segments([short, long], policy.pad_id)
        padded = policy.score(batch).logprobs[0, -len(alone):]
        trained = alone_batch.loss_mask[0].bool()
        assert trained.sum() == 3 and (alone[trained] < 0).all()
        assert torch.allclose(alone, padded, atol=1e-5)
        positions = torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits
    from rl.core import token_logprobs
    shifted = token_logprobs(logits[0, -len(alone):-1], batch.input_ids[0, -len(alone) + 1:])
    assert not torch.allclose(alone[1:][trained[1:]], shifted[trained[1:]], atol=1e-3)
    # generation from the padded batch matches generation alone, too
    conv = [Conversation(seed=3, segments=short[:1]), Conversation(seed=4, segments=long[:1])]
    assert policy.generate(conv[:1])[0].token_ids == policy.generate(conv)[0].token_ids


def test_samples_do_not_depend_on_the_batch(tokenizer):
    policy = tiny_policy(tokenizer, max_new_tokens=12)
    env = ECHO.make()

    def conversation(seed):
        conv = Conversation(seed=seed)
        conv.segments.append(policy.encode(env.reset(seed=seed)[0], True))
        return conv

    together = policy.generate([conversation(s) for s in range(6)])
    alone = [policy.generate([conversation(s)])[0] for s in (4, 1)]
    assert [t.token_ids for t in alone] == [together[4].token_ids, together[1].token_ids]
    assert together[0].token_ids != together[1].token_ids  # different seeds sample differently


def test_protocols_and_weight_errors(tokenizer):
    policy = tiny_policy(tokenizer)
    assert isinstance(policy, TrainablePolicy) and isinstance(AgentPolicy(RandomAgent), Policy)
    weights = policy.get_weights()
    assert set(weights) == {n for n, p in policy.model.named_parameters()}
    policy.set_weights(weights)
    with pytest.raises(ValueError, match="unknown parameter"):
        policy.set_weights({"not.a.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="has no token"):
        CausalLMPolicy(policy.model, tokenizer, chat="chatml")


def test_agent_policy_runs_a_baseline_in_the_same_loop():
    envs = [ECHO.make() for _ in range(4)]
    episodes, _ = run_episodes(AgentPolicy(RandomAgent), envs, make_specs(0, 0, 6, 1))
    assert len(episodes) == 6 and all(len(e.segments) == 2 and e.segments[1].text for e in episodes)
    again, _ = run_episodes(AgentPolicy(RandomAgent), envs[:1], make_specs(0, 0, 6, 1))
    assert [e.segments[1].text for e in again] == [e.segments[1].text for e in episodes]


class FakeChatServer(BaseHTTPRequestHandler):
    """Answers every chat completion with the tool call that ToolEcho's prompt asks for."""

    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeChatServer.requests.append(body)
        words = body["messages"][-1]["content"].split()
        call = {"name": words[1], "arguments": {"prompt": words[4].strip("'"), "n": int(words[6][2])}}
        text = f"<tool_call>{json.dumps(call)}</tool_call>"
        reply = {"choices": [{"message": {"role": "assistant", "content": text}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_api_policy_against_a_loopback_endpoint():
    server = HTTPServer(("127.0.0.1", 0), FakeChatServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        policy = ApiPolicy(f"http://127.0.0.1:{server.server_port}/v1", "fake", system_prompt="Be exact.")
        episodes, _ = run_episodes(policy, [ECHO.make() for _ in range(3)], make_specs(0, 0, 4, 1))
    finally:
        server.shutdown()
    assert [e.reward for e in episodes] == [1.0] * 4
    first = FakeChatServer.requests[0]
    assert first["model"] == "fake" and first["messages"][0] == {"role": "system", "content": "Be exact."}


def test_policy_config_builds_a_saved_vlm_that_sees_images(tokenizer, tmp_path):
    from rl.config import PolicyConfig

    model = tiny_vlm(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"), image_size=16)
    VisionLMPolicy(model, tokenizer).save(str(tmp_path))
    policy = PolicyConfig(model=str(tmp_path), kind="vlm", max_new_tokens=6, device="cpu").build()
    assert isinstance(policy, VisionLMPolicy)
    episodes, _ = run_episodes(policy, [LetterEnv(turns=2, pixels=True)], make_specs(0, 0, 2, 1))
    assert all(s.images is not None for e in episodes for s in e.segments if s.role != POLICY)
