"""TRL: VisGen as GRPOTrainer's environment_factory; a tiny model trains two GRPO steps on CPU with it."""

import inspect
import json
import re

import pytest

from visenv.error import ConfigError, ResetNeeded
from visenv.integrations.trl import environment_factory, task_rows

TOOLS = ["tool_text2image_qwen", "tool_prompt_refine"]
CALL = {"name": "tool_text2image_qwen", "arguments": {"prompt": "a red fox"}}
COMPLETION = f"<tool_call>\n{json.dumps(CALL)}\n</tool_call><|im_end|>"
pytestmark = pytest.mark.filterwarnings("ignore:The tool set lacks tools")  # the workflows a subset cannot run


@pytest.fixture(scope="module")
def make_env():
    return environment_factory({"tools": TOOLS, "max_turns": 4})


def test_the_tools_are_typed_documented_methods(make_env):
    from transformers.utils import get_json_schema

    env = make_env()
    public = {n for n, _ in inspect.getmembers(type(env), inspect.isfunction) if not n.startswith("_")}
    assert public == {"reset", "get_reward", "plan", "answer", *TOOLS}
    schema = get_json_schema(env.tool_text2image_qwen)["function"]
    assert schema["parameters"]["required"] == ["prompt"]
    assert schema["parameters"]["properties"]["aspect_ratio"]["enum"] == ["1:1", "16:9", "9:16", "4:3", "3:4"]
    assert schema["parameters"]["properties"]["n"]["type"] == "integer"
    assert get_json_schema(env.answer)["function"]["parameters"]["properties"]["artifacts"]["type"] == "array"


def test_an_episode_through_the_methods_scores_with_the_rubric(make_env):
    env, twin = make_env(), make_env()
    with pytest.raises(ResetNeeded, match="call reset"):
        env.tool_prompt_refine(prompt="x")
    request = env.reset(task_seed=7, prompt=[{"role": "user", "content": ""}])
    assert request.startswith("Request: ") and request == twin.reset(task_seed=7)
    env.plan(["tool_text2image_qwen: draw the picture"])
    made = env.tool_text2image_qwen(prompt="a red fox", aspect_ratio="9:16")
    assert '"status": "ok"' in made
    assert "error" in env.tool_text2image_qwen(prompt="x", n=99)  # a bad argument is an observation
    ids = re.findall(r'"id": "([0-9a-z_]+)"', made)
    assert '"delivered"' in env.answer(ids)
    assert "has ended" in env.tool_prompt_refine(prompt="late")
    record = env.session.env.record
    assert record.plan_turn is not None and record.answered
    rewards = env.session.rewards
    assert rewards[:2] == [0.0, -0.05]  # the bad call's error penalty, then the rubric at the answer
    assert env.get_reward() == pytest.approx(sum(rewards)) and len(rewards) == 3


def test_images_come_back_as_image_content():
    env = environment_factory({"tools": TOOLS}, images=True, image_size=32)()
    env.reset(task_seed=1)
    content = env.tool_text2image_qwen(prompt="a fox", n=2)
    assert [part["type"] for part in content] == ["image", "image", "text"]
    assert content[0]["image"].size == (32, 32) and '"status": "ok"' in content[2]["text"]
    assert isinstance(env.tool_prompt_refine(prompt="a fox"), str)  # a text tool returns text


def test_a_clashing_tool_name_is_refused():
    from visenv.tools.specs import DEFAULT_TOOLS
    import dataclasses

    clash = dataclasses.replace(DEFAULT_TOOLS["tool_prompt_refine"], name="answer")
    with pytest.raises(ConfigError, match="clash with the session's own calls"):
        environment_factory({"tools": [*TOOLS, clash]})()


ANSWER = {"name": "answer", "arguments": {"artifacts": ["img_000000000000"]}}
TURN = f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>\n<tool_call>\n{json.dumps(ANSWER)}\n</tool_call><|im_end|>"
"""The turn the tiny model learns first: make a picture, then deliver an id that does not exist."""


def tiny_tool_caller(tokenizer, prompts, completion):
    """A random tiny Qwen2 fitted to answer each prompt with ``completion`` (a few seconds on a CPU)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    target = tokenizer(completion, add_special_tokens=False)["input_ids"]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(400):
        loss = 0
        for prompt in prompts:
            ids = torch.tensor([prompt + target])
            labels = ids.clone()
            labels[0, :len(prompt)] = -100
            loss = loss + model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.005 * len(prompts):
            break
    return model


@pytest.mark.slow
def test_grpo_trainer_trains_two_steps_with_the_environment(make_env, tmp_path, monkeypatch):
    import torch
    import trl  # in the `all` extra: CI runs this test
    from datasets import Dataset
    from transformers.utils import get_json_schema
    from trl.chat_template_utils import qwen2_5_chat_template

    from rl.tokenizer import train_tokenizer

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    torch.set_num_threads(1)
    seen: list[tuple[str, str]] = []
    rewards: list[float] = []
    base = type(make_env())

    class Recorded(base):  # what reached the environment, and what it scored
        def _call(self, name, arguments):
            result = super()._call(name, arguments)
            seen.append((name, result))
            return result

        def answer(self, artifacts: list[str]) -> str:
            """Deliver the finished artifacts and end the episode. Call it once, last.

            Args:
                artifacts: the ids of the artifacts delivered.
            """
            seen.append(("answer", super().answer(artifacts)))
            return seen[-1][1]

        def get_reward(self) -> float:
            rewards.append(super().get_reward())
            return rewards[-1]

    Recorded.__name__ = "VisGenToolEnv"
    config = {"tools": TOOLS, "max_turns": 4}
    probe = Recorded(config)
    tools = [getattr(probe, n) for n, _ in inspect.getmembers(Recorded, inspect.isfunction)
             if not n.startswith("_") and n not in ("reset", "get_reward")]
    rows = task_rows(2, seed=0)
    requests = [probe.reset(**row) for row in rows]
    tokenizer = train_tokenizer([json.dumps([get_json_schema(t) for t in tools]), TURN, *requests] * 3,
                                vocab_size=600, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tokenizer.chat_template = qwen2_5_chat_template  # TRL knows how to parse this template's tool calls
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r}], tools=tools, add_generation_prompt=True,
                                             tokenize=False) for r in requests]
    model = tiny_tool_caller(tokenizer, [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], TURN)

    args = trl.GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, num_generations=2,
                          max_completion_length=96, logging_steps=1, report_to="none", use_cpu=True,
                          save_strategy="no", max_tool_calling_iterations=1, bf16=False,
                          temperature=0.2)  # near-greedy: the fitted turn comes back as fitted
    trainer = trl.GRPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              environment_factory=lambda: Recorded(config))
    trainer.train()

    made = [result for name, result in seen if name == "tool_text2image_qwen"]
    assert len(made) == 4 and all('"status": "ok"' in r and '"kind": "image"' in r for r in made)
    assert [name for name, _ in seen].count("answer") == 4  # the second call of each turn ended its episode
    assert len(rewards) == 4 and all(r == pytest.approx(rewards[0]) for r in rewards) and rewards[0] < 0
    logged = [h for h in trainer.state.log_history if "rewards/VisGenToolEnv/mean" in h]
    assert len(logged) == 2 and all(h["tools/call_frequency"] > 0 for h in logged)
    assert sum(h["rewards/VisGenToolEnv/mean"] for h in logged) / 2 == pytest.approx(sum(rewards) / 4)
