"""SkyRL: VisGen as a skyrl-gym text environment, checked against the package's own base class and registry."""

import json
import re
import sys

import pytest

from visenv.error import DependencyNotInstalled
from visenv.integrations import skyrl as adapter

import skyrl_gym  # noqa: E402  (in the `all` extra: CI runs these tests, so a missing package fails them)

CALL = {"name": "tool_text2image_qwen", "arguments": {"prompt": "a lighthouse at dusk"}}


def test_an_episode_through_skyrl_gym_make():
    from skyrl_gym.envs.base_text_env import BaseTextEnv

    adapter.register()
    adapter.register()  # twice is harmless
    rows = adapter.task_rows(2, seed=0)
    assert rows[0]["env_class"] == adapter.ENV_ID and rows[0]["task_seed"] != rows[1]["task_seed"]
    env = skyrl_gym.make(adapter.ENV_ID, env_config={"max_turns": 4}, extras=rows[0])
    assert isinstance(env, BaseTextEnv) and env.max_turns == 4
    twin = skyrl_gym.make(adapter.ENV_ID, env_config={"max_turns": 4}, extras={"extra_info": {"task_seed":
                                                                                             rows[0]["task_seed"]}})
    messages, info = env.init(rows[0]["prompt"])
    assert [m["role"] for m in messages] == ["system", "user"] and "tool_text2image_qwen" in messages[0]["content"]
    assert messages[1]["content"].startswith("Request: ") and twin.init([])[0] == messages

    out = env.step(f"<plan>1. tool_text2image_qwen</plan><tool_call>{json.dumps(CALL)}</tool_call>")
    assert out["done"] is False and out["reward"] == 0.0 and out["metadata"]["tool_result"]["status"] == "ok"
    [observation] = out["observations"]
    ids = re.findall(r'"id": "([0-9a-z_]+)"', observation["content"])
    assert observation["role"] == "user" and ids
    bad = env.step("no tags at all")
    assert bad["reward"] < 0 and bad["done"] is False  # a malformed turn is an observation and a penalty
    end = env.step(f"<answer>{ids[0]}</answer>")
    assert end["done"] is True and end["observations"] == []
    assert end["reward"] == end["metadata"]["reward_components"]["total"]
    metrics = env.get_metrics()
    assert metrics["turns"] == 3 and metrics["calls"] == 1 and metrics["failed_calls"] == 0
    assert metrics["reward/total"] == end["reward"] and "check/s_rate" in metrics
    assert set(type(env).aggregate_metrics([metrics, metrics])) >= {"turns", "reward/total"}
    env.close()


def test_the_turn_budget_ends_the_episode():
    env = adapter.VisGenSkyRLEnv({"max_turns": 2}, {"task_seed": 3})
    env.init([])
    assert env.step("hello")["done"] is False
    assert env.step("hello again")["done"] is True


def test_without_skyrl_gym_the_class_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "skyrl_gym.envs.base_text_env", None)
    monkeypatch.setattr(adapter.__getattr__, "made", {})
    with pytest.raises(DependencyNotInstalled, match=r"pip install 'visenv\[skyrl\]'"):
        adapter.VisGenSkyRLEnv
