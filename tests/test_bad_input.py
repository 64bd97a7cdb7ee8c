"""Every kind of bad model output gets an observation the agent can learn from, a penalty, and no crash."""

from __future__ import annotations

import json

import pytest

from visenv.envs.visgen import VisGenEnv
from visenv.protocol import format_turn, parse_tool_response

PENALTY = 0.05


def call(name, **arguments):
    return format_turn(think="t", tool_call={"name": name, "arguments": arguments})


@pytest.fixture
def env():
    env = VisGenEnv(error_penalty=PENALTY)
    env.reset(seed=0)
    return env


def step_error(env, action):
    obs, reward, terminated, truncated, info = env.step(action)
    response = parse_tool_response(obs["text"])
    assert response is not None, obs["text"]
    assert env.observation_space.contains(obs)
    return response, reward, terminated, info


@pytest.mark.parametrize("action, expected", [
    ("just some prose without any tags", r"no_tags|no UTPC tags|no tags"),
    ("<think>planning", r"unclosed|never closed"),
    ("<think>a <plan>b</plan></think>", r"nested|inside"),
    ("<think>x</think><tool_call>{\"name\": \"tool_text2image_qwen\", \"arguments\": {</tool_call>", r"JSON"),
    ("<think>x</think><tool_call>[1, 2]</tool_call>", r"object"),
])
def test_malformed_turns_answer_with_an_error_and_a_penalty(env, action, expected):
    response, reward, terminated, _ = step_error(env, action)
    assert response["status"] == "error"
    assert pytest.approx(reward) == -PENALTY and not terminated
    text = json.dumps(response)
    assert __import__("re").search(expected, text, flags=2), text


def test_unknown_tool_names_close_matches(env):
    response, reward, *_ = step_error(env, call("tool_text2image_qwn", prompt="cat"))
    assert "tool_text2image_qwen" in response["error"] and reward == -PENALTY


def test_wrong_argument_types_are_named(env):
    response, reward, _, info = step_error(env, call("tool_text2image_qwen", prompt="cat", n="two"))
    assert "n:" in response["error"] and "integer" in response["error"]
    assert info["tool_result"]["error_kind"] == "bad_arguments"


def test_missing_required_arguments_are_named(env):
    response, *_ = step_error(env, call("tool_image2video_keling", prompt="walk"))
    assert "'image' is a required property" in response["error"]


def test_unknown_artifact_id_lists_the_available_ones(env):
    made = env.step(call("tool_text2image_qwen", prompt="cat"))[4]["tool_result"]["outputs"][0]
    response, *_ = step_error(env, call("tool_image_edit_qwen", image="img_000000000000", prompt="x"))
    assert "no artifact 'img_000000000000'" in response["error"] and made in response["error"]


def test_artifact_from_another_episode_is_recognised(env):
    old = env.step(call("tool_text2image_qwen", prompt="cat"))[4]["tool_result"]["outputs"][0]
    env.reset(seed=1)
    response, *_ = step_error(env, call("tool_image_edit_qwen", image=old, prompt="x"))
    assert "earlier episode" in response["error"]


def test_path_strings_are_refused_as_paths(env):
    response, *_ = step_error(env, call("tool_image_edit_qwen", image="/etc/passwd", prompt="x"))
    assert "looks like a file path" in response["error"]


def test_wrong_artifact_kind_is_named(env):
    image = env.step(call("tool_text2image_qwen", prompt="cat"))[4]["tool_result"]["outputs"][0]
    response, *_ = step_error(env, call("tool_video_trim_edit", video=image, start=0, end=1))
    assert "is a image" in response["error"] or "is an image" in response["error"]


def test_tool_failure_from_the_simulation_is_readable(env):
    image = env.step(call("tool_text2image_qwen", prompt="cat", aspect_ratio="16:9"))[4]["tool_result"]["outputs"][0]
    video = env.step(call("tool_image2video_keling", image=image, prompt="go", duration=5))[4]["tool_result"]["outputs"][0]
    response, reward, _, info = step_error(env, call("tool_video_trim_edit", video=video, start=2, end=9))
    assert info["tool_result"]["error_kind"] == "tool_failure" and reward == -PENALTY
    assert "5" in response["error"]


def test_ten_megabyte_turn_is_cut_not_crashed(env):
    response, *_ = step_error(env, "<think>" + "a" * 10_000_000 + "</think>")
    assert "truncated" in json.dumps(response) or "cut" in json.dumps(response)


def test_non_utf8_bytes_and_lone_surrogates_are_survived(env):
    response, *_ = step_error(env, b"<think>\xff\xfe</think><answer>\xc3\x28 done</answer>")
    assert response["status"] in ("done", "error")
    env.reset(seed=0)
    response, *_ = step_error(env, "<think>\ud800</think><tool_call>{\"name\": \"tool_search_inspire\", "
                                   "\"arguments\": {\"query\": \"cats\"}}</tool_call>")
    assert response["status"] == "ok"


def test_non_string_actions_are_coerced(env):
    response, *_ = step_error(env, 12345)
    assert response["status"] == "error"


def test_answer_citing_unknown_ids_is_penalised_and_ends(env):
    obs, reward, terminated, _, info = env.step("<think>x</think><answer>img_0123456789ab</answer>")
    assert terminated and "img_0123456789ab" in parse_tool_response(obs["text"])["problems"][0]
    assert info["reward_components"]["R_result"] == 0.0
