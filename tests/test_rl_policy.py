"""Policies: token continuity across multi-turn episodes (text, Llava and Qwen-VL images), left padding,
the pixel mask, sampling that does not depend on the batch, the baseline and API adapters."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch
from gymnasium import spaces

from baselines.random_agent import RandomAgent
from rl.api import ApiPolicy
from rl.hf import CHATML_SPECIAL_TOKENS, CausalLMPolicy, QwenVLPolicy, VisionLMPolicy, tiny_qwen_vl, tiny_vlm
from rl.policy import ENV, POLICY, AgentPolicy, Conversation, Policy, Segment, TokenBatch, TrainablePolicy
from rl.rollout import make_specs, run_episodes
from rl.tokenizer import train_tokenizer
from rl_helpers import ECHO, LetterEnv, echo_examples, echo_tokenizer, tiny_policy
from visenv.envs.visgen import VisGenEnv
from visenv.protocol import format_turn, parse_tool_response, parse_turn


@pytest.fixture(scope="module")
def tokenizer():
    return echo_tokenizer()


@pytest.fixture(scope="module")
def chatml_tokenizer():
    """The texts of :func:`echo_tokenizer` with Qwen's chat and vision tokens."""
    texts = [m["content"] for e in echo_examples(200, 0.5) for m in e]
    texts += [LetterEnv.prompt(w, t) for w in LetterEnv.WORDS for t in range(3)]
    return train_tokenizer(texts, 1000, CHATML_SPECIAL_TOKENS)


class MaskedPixelEnv(LetterEnv):
    """LetterEnv with VisGen-style pixels: rows of a random 16x24 image, an all-black image and
    padding, with the ``pixels_mask`` that tells the black image from the padding."""

    def __init__(self, turns: int = 3):
        super().__init__(turns)
        self.observation_space = spaces.Dict({**self.observation_space.spaces,
                                              "pixels": spaces.Box(0, 255, (3, 16, 24, 3), dtype=np.uint8),
                                              "pixels_mask": spaces.MultiBinary(3)})

    def _observation(self):
        obs = super()._observation()
        pixels = np.zeros((3, 16, 24, 3), dtype=np.uint8)
        pixels[0] = self.np_random.integers(1, 256, (16, 24, 3), dtype=np.uint8)
        obs.update(pixels=pixels, pixels_mask=np.array([1, 1, 0], dtype=np.int8))
        return obs


def tiny_vision_policy(name, tokenizer, chatml_tokenizer, **options):
    if name == "llava":
        model = tiny_vlm(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"), image_size=16)
        return VisionLMPolicy(model, tokenizer, **options)
    model, processor = tiny_qwen_vl(chatml_tokenizer, name)
    return QwenVLPolicy(model, chatml_tokenizer, processor, chat="chatml", **options)


def image_token_count(policy, images):
    """Placeholder tokens the policy writes for ``images`` (Qwen: 2 x 2 merged 4-pixel patches, plus start and end)."""
    if isinstance(policy, QwenVLPolicy):
        return sum((h // 8) * (w // 8) + 2 for h, w in (image.shape[:2] for image in images))
    return policy.image_tokens * len(images)


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


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "qwen3_vl"])
def test_vlm_policies_show_an_all_black_image_and_never_padding(name, tokenizer, chatml_tokenizer):
    policy = tiny_vision_policy(name, tokenizer, chatml_tokenizer, images_per_turn=3)
    image_ids = {policy.image_id, *policy.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])}

    def shown(observation, limit=3):
        policy.images_per_turn = limit
        segment = policy.encode(observation, first=True)
        count = sum(t in image_ids for t in segment.token_ids)
        return segment.images, count

    env = MaskedPixelEnv()
    obs, _ = env.reset(seed=0)
    images, count = shown(obs)
    # the black row is shown (the mask says it is an image), the padding row is not
    assert images.shape == (2, 16, 24, 3) and images[0].any() and not images[1].any()
    assert count == image_token_count(policy, images)
    images, count = shown(obs, limit=1)
    assert np.array_equal(images, obs["pixels"][:1]) and count == image_token_count(policy, images)
    images, count = shown(obs | {"pixels_mask": np.zeros(3, dtype=np.int8)})
    assert images is None and count == 0
    # VisGen's first observation is all padding: nothing is shown (tests/test_env.py checks that VisGen
    # marks an all-black thumbnail as an image)
    obs, _ = VisGenEnv(observe_pixels=True, pixel_size=16, max_pixel_images=3).reset(seed=0)
    assert shown(obs) == (None, 0)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_vl_token_continuity_with_dynamic_resolution(model_type, chatml_tokenizer):
    model, processor = tiny_qwen_vl(chatml_tokenizer, model_type)
    qwen = QwenVLPolicy(model, chatml_tokenizer, processor, chat="chatml", images_per_turn=2, max_new_tokens=10)
    policy = Recording(qwen)
    episodes, _ = run_episodes(policy, [MaskedPixelEnv() for _ in range(2)], make_specs(2, 0, 3, 1))
    batch = check_continuity(qwen, episodes, policy.calls)
    # each observation shows its random and its black 16x24 image: a 4 x 6 patch grid, 2 x 3 = 6 tokens each
    shown = [s.images for e in episodes for s in e.segments if s.role == ENV]
    assert len(shown) == 9 and all(images.shape == (2, 16, 24, 3) and not images[1].any() for images in shown)
    assert int((batch.input_ids == qwen.image_id).sum()) == 9 * 2 * 6
    inputs = qwen._model_inputs(batch)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]] * 18
    # multimodal RoPE: image tokens get (t, h, w) positions, so the three axes differ there
    positions = inputs["position_ids"]
    assert positions.shape == (3, *batch.input_ids.shape) and not torch.equal(positions[1], positions[2])
    mask = batch.loss_mask.bool()

    def logprobs_with(**changes):
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **(inputs | changes))
        return torch.log_softmax(qwen._restrict(out.logits[:, :-1]), -1).gather(
            -1, batch.input_ids[:, 1:, None]).squeeze(-1)[mask[:, 1:]]

    assert torch.allclose(logprobs_with(), batch.sampled_logprobs[mask], atol=1e-4)
    # both the 3-D positions and the images matter: 1-D positions or other pixels change the log-probs
    assert not torch.allclose(logprobs_with(position_ids=batch.position_ids), batch.sampled_logprobs[mask], atol=1e-4)
    other = qwen._process(255 - batch.pixel_values)["pixel_values"]
    assert not torch.allclose(logprobs_with(pixel_values=other), batch.sampled_logprobs[mask], atol=1e-4)


QWEN_TOOL_TEMPLATE = (
    # The system, user, assistant (with tool_calls) and tool blocks of the chat template that Qwen2.5-VL
    # and Qwen3-VL-Instruct releases ship (tokenizer_config.json), string contents only; written out
    # here because no release is downloaded.
    "{%- for message in messages %}"
    "{%- if message.role == 'system' or message.role == 'user' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + message.content }}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if (loop.first and message.content) or (not loop.first) %}{{- '\\n' }}{%- endif %}"
    "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_qwen3_tool_calls_and_responses_are_the_utpc_protocol(chatml_tokenizer):
    """A Qwen3-VL policy's conversation is, token for token, what the model's own chat template writes for
    the same exchange: the call the model writes in its format is the UTPC call the env executes, and
    the env's answer is Qwen's tool turn."""
    model, processor = tiny_qwen_vl(chatml_tokenizer, "qwen3_vl")
    policy = QwenVLPolicy(model, chatml_tokenizer, processor, chat="chatml", system_prompt="Tools: ...")
    env = VisGenEnv(max_turns=3)
    first, _ = env.reset(seed=0)
    call = {"name": "tool_prompt_refine", "arguments": {"prompt": "a red fox, «neon»", "style": "ink"}}
    turn_text = format_turn(think="I refine the prompt first.", tool_call=call)
    response, *_ = env.step(turn_text)
    payload = parse_tool_response(response["text"])
    assert payload["status"] == "ok" and payload["tool"] == call["name"]
    ours = (policy.encode(first, first=True).text + turn_text + policy.chat.stop
            + policy.encode(response, first=False).text)
    messages = [{"role": "system", "content": "Tools: ..."}, {"role": "user", "content": first["text"]},
                {"role": "assistant", "content": "<think>\nI refine the prompt first.\n</think>",
                 "tool_calls": [{"type": "function", "function": call}]},
                {"role": "tool", "content": json.dumps(payload, ensure_ascii=False, sort_keys=True)}]
    qwen = chatml_tokenizer.apply_chat_template(messages, chat_template=QWEN_TOOL_TEMPLATE, tokenize=False,
                                                add_generation_prompt=True)
    assert ours == qwen
    # and the other way: the turn as Qwen's template writes it parses into the same call, with no problem
    written = qwen.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    parsed = parse_turn(written)
    assert not parsed.problems and parsed.action == "tool_call"
    assert (parsed.tool_call.name, parsed.tool_call.arguments) == (call["name"], call["arguments"])


def test_qwen_vl_checks_its_processor_and_chat_format(chatml_tokenizer):
    from transformers import Qwen2VLImageProcessor

    model, processor = tiny_qwen_vl(chatml_tokenizer)
    with pytest.raises(ValueError, match=r"image processor's patch_size \(14\) differs from the vision tower's"):
        QwenVLPolicy(model, chatml_tokenizer, Qwen2VLImageProcessor(), chat="chatml")
    with pytest.raises(ValueError, match="has no token '<\\|end\\|>'"):
        QwenVLPolicy(model, chatml_tokenizer, processor, chat="plain")


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


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_policy_config_picks_the_vlm_class_from_the_saved_model_type(name, tokenizer, chatml_tokenizer, tmp_path):
    from rl.config import PolicyConfig

    tiny_vision_policy(name, tokenizer, chatml_tokenizer).save(str(tmp_path))
    chat = "plain" if name == "llava" else "chatml"
    policy = PolicyConfig(model=str(tmp_path), kind="vlm", chat=chat, max_new_tokens=6, images_per_turn=2,
                          device="cpu").build()
    assert type(policy) is (VisionLMPolicy if name == "llava" else QwenVLPolicy)
    episodes, _ = run_episodes(policy, [MaskedPixelEnv(turns=2)], make_specs(0, 0, 2, 1))
    assert all(len(s.images) == 2 for e in episodes for s in e.segments if s.role != POLICY)


def test_policy_config_refuses_a_text_model_as_vlm(tokenizer, tmp_path):
    from rl.config import PolicyConfig

    tiny_policy(tokenizer).save(str(tmp_path))
    with pytest.raises(ValueError, match=r"model_type 'llama'; policy.kind 'vlm' supports \['llava', 'qwen2_5_vl', 'qwen2_vl', 'qwen3_vl'\]"):
        PolicyConfig(model=str(tmp_path), kind="vlm", device="cpu").build()


class ForwardLog:
    """Wraps a policy's model forward and records each call's input width and whether it came with a cache."""

    def __init__(self, policy):
        self.calls = []
        forward = policy.model.forward

        def logged(*args, **kwargs):
            self.calls.append((kwargs["input_ids"].shape[1], kwargs.get("cache") is not None))
            return forward(*args, **kwargs)

        policy.model.forward = logged


@pytest.mark.parametrize("shrink_at,reuse", [(0.75, False), (0.0, True), (0.75, True), (1.0, True)])
def test_generate_savings_sample_what_the_plain_loop_samples(tokenizer, shrink_at, reuse):
    # dropping finished rows and keeping each row's keys and values between turns change the cost only:
    # the same tokens with the same log-probs as every row run to the end and every prompt prefilled whole
    def play(shrink, keep):
        policy = tiny_policy(tokenizer, max_new_tokens=12)
        policy.shrink_at, policy.reuse_prefixes = shrink, keep
        log = ForwardLog(policy)
        episodes, _ = run_episodes(policy, [LetterEnv() for _ in range(4)], make_specs(0, 0, 6, 1))
        return episodes, log.calls

    plain, plain_calls = play(0.0, False)
    saved, saved_calls = play(shrink_at, reuse)
    for a, b in zip(plain, saved, strict=True):
        assert [s.token_ids for s in a.segments] == [s.token_ids for s in b.segments]
        for x, y in zip(a.segments, b.segments):
            if x.role == POLICY:
                assert np.allclose(x.logprobs, y.logprobs, atol=1e-5)
    assert any(len(s.token_ids) < 12 for e in plain for s in e.segments if s.role == POLICY)  # turns differ in length
    prefilled = lambda calls: sum(width for width, cached in calls if width > 1)  # noqa: E731
    if reuse:  # later turns prefill their new tokens only, against the kept ones
        assert any(cached and width > 1 for width, cached in saved_calls)
        assert prefilled(saved_calls) < prefilled(plain_calls) / 2
    else:
        assert prefilled(saved_calls) == prefilled(plain_calls)


def test_kept_prefixes_serve_only_the_same_conversation_and_weights(tokenizer):
    policy = tiny_policy(tokenizer, max_new_tokens=8)
    log = ForwardLog(policy)
    env = LetterEnv()

    def opened(seed):
        conv = Conversation(seed=seed)
        conv.segments.append(policy.encode(env.reset(seed=seed)[0], True))
        return conv

    def went_on(conv, turn):
        conv.segments += [turn, policy.encode({"text": "Turn 1: say violin.", "artifacts": ()}, False)]
        return conv

    convs = [opened(0), opened(1)]
    turns = policy.generate(convs)
    convs = [went_on(c, t) for c, t in zip(convs, turns)]
    log.calls.clear()
    policy.generate(convs)
    assert log.calls[0][1] and log.calls[0][0] < len(convs[0].token_ids)  # only the new tokens
    # a copy of a conversation is another conversation: prefilled whole
    copies = [Conversation(seed=c.seed, segments=list(c.segments)) for c in convs]
    log.calls.clear()
    policy.generate(copies)
    assert not log.calls[0][1] and log.calls[0][0] == max(len(c.token_ids) for c in copies)
    # new weights: the kept keys and values are stale, so the next turn prefills whole and samples
    # what a fresh policy with those weights samples
    turns = policy.generate(copies)
    copies = [went_on(c, t) for c, t in zip(copies, turns)]
    weights = {name: value + 0.05 * torch.randn_like(value) for name, value in policy.get_weights().items()}
    policy.set_weights(weights)
    log.calls.clear()
    after = policy.generate(copies)
    assert not log.calls[0][1]
    fresh = tiny_policy(tokenizer, max_new_tokens=8)
    fresh.set_weights(weights)
    fresh.reuse_prefixes = False
    assert [t.token_ids for t in after] == [t.token_ids for t in fresh.generate(copies)]
