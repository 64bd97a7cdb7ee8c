"""verl: the VisGen agent loop's verl-free parts, its wiring over a stand-in of verl, and one episode in real verl.

verl 0.9.1 cannot be installed beside visenv's pinned transformers (it needs transformers<5.11), so
the default run does not import verl: one test runs the class over a minimal stand-in of the verl
names it uses (ToolAgentLoop's run/_call_tool contract as in verl 0.9.1's source, ToolResponse and
OpenAIFunctionToolSchema). The last test runs verl 0.9.1's own ``ToolAgentLoop`` (its state machine,
hermes tool parser and Continuous Token builder) in a subprocess whose ``PYTHONPATH`` puts an
isolated verl install first; it runs only when ``VERL_SITE`` names that folder (the install command
is in docs/integrations.md).
"""

import asyncio
import json
import os
import pathlib
import re
import subprocess
import sys
import types
from dataclasses import dataclass, field

import pytest
import yaml

from visenv.error import DependencyNotInstalled
from visenv.integrations import verl as adapter
from visenv.integrations.session import ToolSession

CALL = {"prompt": "a paper boat on a pond"}


def test_dispatch_runs_plan_tools_and_answer_and_explains_bad_arguments():
    session = ToolSession({"max_turns": 6}, image_size=16)
    session.reset(5)
    assert "Plan noted (1 steps)" in adapter.tool_response(session, "plan", '{"steps": ["draw"]}', False)[0]
    assert "not valid JSON" in adapter.tool_response(session, "tool_text2image_qwen", "{oops", False)[0]
    assert "must be a JSON object" in adapter.tool_response(session, "plan", "[1]", False)[0]
    assert 'takes {"artifacts": [...]}' in adapter.tool_response(session, "answer", "{}", False)[0]
    text, pictures = adapter.tool_response(session, "tool_text2image_qwen", json.dumps(CALL), True)
    assert '"status": "ok"' in text and len(pictures) == 1 and pictures[0].size == (16, 16)
    assert '"error"' in adapter.tool_response(session, "tool_nope", "{}", True)[0]  # the env's unknown-tool error
    ids = re.findall(r'"id": "([0-9a-z_]+)"', text)
    assert '"delivered"' in adapter.tool_response(session, "answer", json.dumps({"artifacts": ids}), False)[0]
    summary = adapter.episode_summary(session)
    assert summary["answered"] and summary["calls"] == 2 and summary["checks"]["s_rate"] is not None
    assert session.env.record.plan_turn.plan == "1. draw"


def test_tool_schemas_list_plan_answer_and_every_tool():
    session = ToolSession()
    names = [s["function"]["name"] for s in session.tool_schemas()]
    assert names[:2] == ["plan", "answer"] and set(names[2:]) == set(session.env.tools)
    assert all(s["type"] == "function" and s["function"]["parameters"]["type"] == "object"
               for s in session.tool_schemas())


def test_task_rows_are_verl_dataset_rows_and_the_recipe_names_the_loop():
    rows = adapter.task_rows(3, seed=0, config={"max_turns": 4})
    assert {r["agent_name"] for r in rows} == {adapter.AGENT_NAME}
    assert len({r["extra_info"]["task_seed"] for r in rows}) == 3
    assert rows[0]["prompt"][0]["content"].startswith("Request: ")
    [entry] = yaml.safe_load(open("examples/verl/agent_loops.yaml"))
    assert entry["name"] == adapter.AGENT_NAME and entry["_target_"] == "visenv.integrations.verl.VisGenAgentLoop"


def test_without_verl_the_class_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl", None)
    monkeypatch.setattr(adapter.__getattr__, "made", {})
    with pytest.raises(DependencyNotInstalled, match=r"pip install 'visenv\[verl\]'"):
        adapter.VisGenAgentLoop


@dataclass
class FunctionCall:
    name: str
    arguments: str


@dataclass
class Output:
    extra_fields: dict = field(default_factory=dict)
    reward_score: float | None = None


def stand_in_verl(monkeypatch, turns):
    """Modules ``verl.experimental.agent_loop.tool_agent_loop`` and ``verl.tools.schemas`` with a
    ToolAgentLoop whose ``run`` replays scripted model turns through ``_call_tool`` (tool calls of one
    turn run concurrently, as verl gathers them)."""

    class ToolResponse:
        def __init__(self, text=None, image=None):
            if image is not None and not isinstance(image, list):
                raise ValueError("Image must be a list")
            self.text, self.image = text, image

    class ToolAgentLoop:
        def __init__(self, *args, tools=None, **kwargs):
            self.tools, self.tool_schemas = {}, []
            self.seen = []

        def check_tools(self):  # what verl's loop reads from self.tools before it parses a turn
            return [tool.tool_schema for tool in self.tools.values()]

        async def run(self, sampling_params, **kwargs):
            self.seen.append(kwargs["raw_prompt"])
            for calls in turns:
                responses = await asyncio.gather(*(self._call_tool(c, {}, None) for c in calls))
                self.seen.append([r for r, _, _ in responses])
            return Output()

    for name in ("verl", "verl.experimental", "verl.experimental.agent_loop", "verl.tools"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    loop_module = types.ModuleType("verl.experimental.agent_loop.tool_agent_loop")
    loop_module.ToolAgentLoop = ToolAgentLoop
    schemas = types.ModuleType("verl.tools.schemas")
    schemas.ToolResponse = ToolResponse
    schemas.OpenAIFunctionToolSchema = types.SimpleNamespace(model_validate=lambda schema: schema)
    monkeypatch.setitem(sys.modules, loop_module.__name__, loop_module)
    monkeypatch.setitem(sys.modules, schemas.__name__, schemas)
    monkeypatch.setattr(adapter.__getattr__, "made", {})


def test_the_agent_loop_plays_one_episode_per_run_over_a_stand_in(monkeypatch):
    turns = [[FunctionCall("plan", '{"steps": ["tool_text2image_qwen"]}')],
             [FunctionCall("tool_text2image_qwen", json.dumps(CALL))] * 2]
    stand_in_verl(monkeypatch, turns)
    loop = adapter.VisGenAgentLoop(name="visenv_agent", visenv_config={"max_turns": 5}, images=True, image_size=8)
    assert [s["function"]["name"] for s in loop.tool_schemas][:2] == ["plan", "answer"]
    assert loop.check_tools() == loop.tool_schemas and list(loop.tools) == [t["function"]["name"]
                                                                             for t in loop.tool_schemas]

    async def both():
        return await asyncio.gather(loop.run({}, extra_info={"task_seed": 1}, raw_prompt=[]),
                                    loop.run({}, extra_info={"task_seed": 2}, raw_prompt=[]))

    first, second = asyncio.run(both())
    for output in (first, second):
        visenv = output.extra_fields["visenv"]
        assert visenv["calls"] == 2  # two pictures each: the concurrent episodes stayed apart
        assert len(visenv["rewards"]) == 3  # two tool turns, then the empty answer that closed the episode
        assert output.reward_score == pytest.approx(sum(visenv["rewards"]))
    assert first.extra_fields["visenv"]["task_id"] != second.extra_fields["visenv"]["task_id"]
    prompts = [seen for seen in loop.seen if isinstance(seen[0], dict)]
    assert len(prompts) == 2 and all(p[0]["content"].startswith("Request: ") for p in prompts)
    pictures = [r for seen in loop.seen if not isinstance(seen[0], dict) for r in seen if r.image]
    assert len(pictures) == 4 and all(r.image[0].size == (8, 8) for r in pictures)


VERL_EPISODE = r"""

import asyncio
import json
import re
import sys
from importlib.metadata import version

import hydra.utils
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput

from visenv.integrations.session import ToolSession

IMAGES = sys.argv[1:] == ["images"]  # tool responses carry their pictures, through a LLaVA processor
TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for c in m.content %}{% if c.type == 'text' %}{{ c.text }}{% else %}<image>{% endif %}{% endfor %}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<pad>", "<image>"]


def tokenizer(texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = TEMPLATE
    return fast


def call(name, arguments):
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


class Server:  # verl's LLM server client, scripted: each turn's text depends on what the prompt holds so far

    def __init__(self, tok):
        self.tok, self.turns = tok, []

    async def generate(self, request_id, prompt_ids, sampling_params, **kwargs):
        seen = self.tok.decode(prompt_ids)
        ids = re.findall(r'"id": "([0-9a-z_]+)"', seen)
        k = len(self.turns)
        text = [call("plan", {"steps": ["tool_text2image_qwen"]}),
                "one picture " + call("tool_text2image_qwen", {"prompt": "a paper boat on a pond"}),
                call("answer", {"artifacts": ids}), "done"][k]
        token_ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
        self.turns.append(token_ids)
        return TokenOutput(token_ids=token_ids, log_probs=[-(k + 1) / 10 - i / 1000 for i in range(len(token_ids))])


config = OmegaConf.create({
    "actor_rollout_ref": {"rollout": {
        "prompt_length": 16384, "response_length": 8192, "full_determinism": True,
        "multi_turn": {"max_user_turns": 8, "max_assistant_turns": 8, "max_parallel_calls": 1,
                       "max_tool_response_length": 100000, "tool_response_truncate_side": "middle",
                       "format": "hermes"}}},
    "data": {}})
session = ToolSession({"max_turns": 8})
corpus = [session.reset(s) for s in range(4)] + [json.dumps(session.tool_schemas()), TEMPLATE,
                                                 call("plan", {"steps": ["x"]})] * 3
tok = tokenizer(corpus)
processor = None
if IMAGES:
    from transformers import CLIPImageProcessor, LlavaProcessor

    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                  crop_size={"height": 16, "width": 16}),
                               tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                               chat_template=TEMPLATE, image_token="<image>")
server = Server(tok)
async def main():  # made as verl's AgentLoopWorker makes it (inside the running event loop, which it binds)
    [entry] = OmegaConf.load("examples/verl/agent_loops.yaml")  # the recipe's registry entry
    entry.images, entry.image_size = IMAGES, 16
    loop = hydra.utils.instantiate(config=entry, trainer_config=DictConfigWrap(config), server_manager=server,
                                   tokenizer=tok, processor=processor, hf_model_type=None, dataset_cls=RLHFDataset,
                                   data_config=DictConfigWrap(config.data), tools=ToolListWrap([]))
    assert type(loop).__name__ == "VisGenAgentLoop" and loop.visenv_config == {"max_turns": 8}
    return await loop.run({"temperature": 1.0}, extra_info={"task_seed": 3}, raw_prompt=[])


out = asyncio.run(main())
mask, ids, logprobs = out.response_mask, out.response_ids, out.response_logprobs
assert len(mask) == len(ids) == len(logprobs)
runs, i = [], 0  # maximal runs of equal mask
while i < len(mask):
    j = i
    while j < len(mask) and mask[j] == mask[i]:
        j += 1
    runs.append((mask[i], ids[i:j], logprobs[i:j]))
    i = j
sampled = [r for r in runs if r[0] == 1]
assert [r[1] for r in sampled] == server.turns, "the sampled turns must come back token for token"
assert all(p == -(k + 1) / 10 - n / 1000 for k, r in enumerate(sampled) for n, p in enumerate(r[2]))
env_text = [tok.decode(r[1]) for r in runs if r[0] == 0]
assert [r[0] for r in runs] == [1, 0, 1, 0, 1, 0, 1], [r[0] for r in runs]
assert "Plan noted" in env_text[0] and '"status": "ok"' in env_text[1] and '"delivered"' in env_text[2], env_text
assert all(t.startswith("<|im_start|>tool\n") for t in env_text), env_text
assert tok.decode(out.prompt_ids).count("Request: ") == 1
summary = out.extra_fields["visenv"]
assert summary["answered"] and summary["calls"] == 1 and summary["failed_calls"] == 0, summary
assert out.reward_score == sum(summary["rewards"]) and out.num_turns == 8, (out.reward_score, out.num_turns)
image_id = tok.convert_tokens_to_ids("<image>")
pictures = out.multi_modal_data.get("images") or []
if IMAGES:  # the picture in multi_modal_data, and in the tool's run as LLaVA's 2x2 patches less the one it drops
    assert [p.size for p in pictures] == [(16, 16)], pictures
    assert [r[1].count(image_id) for r in runs] == [0, 0, 0, 3, 0, 0, 0], [r[1].count(image_id) for r in runs]
else:
    assert not pictures and image_id not in ids
print("verl", version("verl"), "transformers", version("transformers"))
print("reward", out.reward_score, "response tokens", len(ids), "runs", [len(r[1]) for r in runs])
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VERL_SITE"), reason="set VERL_SITE to a folder holding verl 0.9.1 and its "
                    "transformers<5.11 (docs/integrations.md, verl): verl cannot be installed beside visenv")
@pytest.mark.parametrize("mode", ["text", "images"])
def test_real_verl_tool_agent_loop_plays_a_token_exact_episode(mode):
    """verl's own ToolAgentLoop, fed by a scripted LLM server (plan, one picture, answer, a closing
    turn) through a tiny byte-level tokenizer: every sampled token and log-prob comes back with
    response_mask 1, each tool response is environment tokens (mask 0) holding the env's text, and
    the episode's return is the reward; with images, through a LLaVA processor, the picture the call
    made is in multi_modal_data and its patch tokens in the tool response."""
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", VERL_EPISODE, mode], capture_output=True, text=True, timeout=300,
                          cwd=root, env={**os.environ, "PYTHONPATH": f"{os.environ['VERL_SITE']}{os.pathsep}{root}"})
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == ["ok"], done.stderr[-3000:]
