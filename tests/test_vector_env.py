"""VisGen inside gymnasium's vector envs: every mix of steps merges (tool calls, bad turns, answers, resets)."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

from visenv.envs.visgen import VisGenEnv
from visenv.protocol import format_turn
from visenv.tasks import make_suite

TASKS = make_suite(3, 0)


def call(name, **arguments):
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


TURNS = (
    format_turn(think="fox", plan="1. tool_text2image_qwen\n2. answer",
                tool_call={"name": "tool_text2image_qwen", "arguments": {"prompt": "a fox", "n": 2}}),
    call("tool_text2image_qwen", prompt="a fox", n="two"),  # "n" of another kind: refused
    "hello, no tags at all",
    "<answer>Done.</answer>",  # ends the episode: the next step of that env is its autoreset
    call("tool_prompt_refine", prompt="a fox", style="ink"),
    call("tool_search_content", query="fox", max_results=2.0),  # an integral float
    "<tool_call>{</tool_call>",
    call("tool_video_trim_edit", video="vid_000000000000", start=0, end=1.5),  # unknown artifact
)
NUM_ENVS, STEPS = 8, 9


def make():
    return VisGenEnv(tasks=TASKS)


def scripted(step: int, env_index: int) -> str:
    return TURNS[(step + env_index) % len(TURNS)]


def reference_run():
    """Each env alone, with the vector envs' autoreset (the step after an episode's end resets it)."""
    runs = []
    for i in range(NUM_ENVS):
        env, steps, ended = make(), [], False
        env.reset(seed=i)
        for t in range(STEPS):
            if ended:
                _, info = env.reset()
                steps.append((0.0, False, info))
                ended = False
                continue
            _, reward, terminated, truncated, info = env.step(scripted(t, i))
            steps.append((reward, terminated, info))
            ended = terminated or truncated
        runs.append(steps)
    return runs


@pytest.fixture(scope="module")
def reference():
    return reference_run()


@pytest.mark.parametrize("vector", ["sync", "async"])
def test_eight_envs_merge_infos_on_mixed_steps(vector, reference):
    if vector == "sync":
        envs = gym.vector.SyncVectorEnv([make] * NUM_ENVS)
    else:
        envs = gym.vector.AsyncVectorEnv([make] * NUM_ENVS, shared_memory=False)
    try:
        envs.reset(seed=0)
        for t in range(STEPS):
            obs, rewards, terminated, _, infos = envs.step(tuple(scripted(t, i) for i in range(NUM_ENVS)))
            assert envs.observation_space.contains(obs)
            expected = [reference[i][t] for i in range(NUM_ENVS)]
            np.testing.assert_allclose(rewards, [reward for reward, _, _ in expected])
            assert terminated.tolist() == [done for _, done, _ in expected]
            has_call = [info.get("tool_result") is not None for _, _, info in expected]
            assert infos.get("_tool_result", np.zeros(NUM_ENVS, bool)).tolist() == has_call
            for i, (_, _, info) in enumerate(expected):
                json.dumps(info, allow_nan=False)
                if has_call[i]:
                    assert infos["tool_result"]["status"][i] == info["tool_result"]["status"]
                    assert infos["tool_result"]["arguments"][i] == info["tool_result"]["arguments"]
                if "checks" in info:  # the end of an episode
                    assert infos["_checks"][i] and infos["reward_valid"][i] == info["reward_valid"]
                assert infos["task_id"][i] == info["task_id"]
    finally:
        envs.close()


def test_the_script_mixes_every_kind_of_step(reference):
    statuses = {info["tool_result"]["status"] for run in reference for _, _, info in run if "tool_result" in info}
    kinds = {info["tool_result"].get("error_kind") for run in reference for _, _, info in run if "tool_result" in info}
    assert statuses == {"ok", "error"} and {"bad_arguments", "bad_artifact"} <= kinds
    assert sum(done for run in reference for _, done, _ in run) >= NUM_ENVS  # every env answers at least once
    assert any("episode_id" in info for run in reference for _, _, info in run)  # and is reset mid-run
