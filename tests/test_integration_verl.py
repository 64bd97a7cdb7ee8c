"""verl: the VisGen agent loop's verl-free parts, and its wiring against a stand-in of verl's ToolAgentLoop.

verl 0.9.1 cannot be installed beside visenv's pinned transformers (it needs transformers<5.11), so
these tests do NOT run verl: the last one runs the class over a minimal stand-in of the two verl
names it uses (ToolAgentLoop's run/_call_tool contract as in verl 0.9.1's source, and ToolResponse).
"""

import asyncio
import json
import re
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
    monkeypatch.setitem(sys.modules, loop_module.__name__, loop_module)
    monkeypatch.setitem(sys.modules, schemas.__name__, schemas)
    monkeypatch.setattr(adapter.__getattr__, "made", {})


def test_the_agent_loop_plays_one_episode_per_run_over_a_stand_in(monkeypatch):
    turns = [[FunctionCall("plan", '{"steps": ["tool_text2image_qwen"]}')],
             [FunctionCall("tool_text2image_qwen", json.dumps(CALL))] * 2]
    stand_in_verl(monkeypatch, turns)
    loop = adapter.VisGenAgentLoop(name="visenv_agent", visenv_config={"max_turns": 5}, images=True, image_size=8)
    assert [s["function"]["name"] for s in loop.tool_schemas][:2] == ["plan", "answer"]

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
