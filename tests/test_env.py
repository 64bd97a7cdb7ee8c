"""The VisGen and ToolEcho environments: the gymnasium contract, determinism, info, budgets, pixels."""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import visenv
from baselines.workflow_agent import WorkflowAgent
from visenv.envs.visgen import VisGenEnv
from visenv.error import ConfigError, ResetNeeded
from visenv.protocol import format_turn, parse_tool_response
from visenv.tasks import SCENARIOS, make_suite


def play(env, agent, seed, task=None):
    """Play one episode; returns the list of (action, obs, reward, terminated, truncated, info)."""
    obs, info = env.reset(seed=seed, options=None if task is None else {"task": task})
    agent.reset(obs, seed=seed)
    steps, done = [], False
    while not done:
        action = agent.act(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        steps.append((action, obs, reward, terminated, truncated, info))
        done = terminated or truncated
    return steps


def made(env_id):
    """The registered environment without gymnasium's own checking wrappers (our wrappers kept)."""
    env = gym.make(env_id, disable_env_checker=True)
    while isinstance(env, gym.wrappers.OrderEnforcing):
        env = env.env
    return env


def an_action(env):
    if isinstance(env.action_space, gym.spaces.Text):
        return format_turn(think="t", tool_call={"name": "tool_text2image_qwen", "arguments": {"prompt": "cat"}})
    env.action_space.seed(0)
    return env.action_space.sample()


@pytest.mark.parametrize("env_id", visenv.ENV_IDS)
def test_check_env_passes_on_every_registered_id(env_id):
    check_env(made(env_id), skip_render_check=True)


@pytest.mark.parametrize("env_id", visenv.ENV_IDS)
def test_registered_env_pickles_mid_episode_and_continues_identically(env_id):
    env = made(env_id)
    env.reset(seed=3)
    clone = pickle.loads(pickle.dumps(env))
    action = an_action(env)
    a, b = env.step(action), clone.step(action)
    assert pickle.dumps(a[:2]) == pickle.dumps(b[:2])


def test_variants_draw_only_their_modality():
    for env_id, modality in (("visenv/VisGenImage-v0", "image"), ("visenv/VisGenVideo-v0", "video")):
        env = gym.make(env_id).unwrapped
        assert {t.requirements.modality for t in env.tasks} == {modality}
    assert len({t.scenario for t in gym.make("visenv/VisGen-v0").unwrapped.tasks}) == 42


def test_rllib_style_config_dict_constructor():
    env = VisGenEnv({"tasks": "image", "max_turns": 5, "num_tasks": 21})
    assert env.config.max_turns == 5 and len(env.tasks) == 21
    with pytest.raises(ConfigError, match="Unknown VisGen option"):
        VisGenEnv({"max_turn": 5})
    with pytest.raises(ConfigError, match=r"max_turns \(0\) must be a positive integer"):
        VisGenEnv(max_turns=0)


def test_same_seed_same_actions_identical_episodes_byte_for_byte():
    tasks = make_suite(6, 1)
    runs = []
    for _ in range(2):
        env = VisGenEnv(tasks=tasks)
        runs.append(pickle.dumps([play(env, WorkflowAgent(), seed) for seed in range(6)]))
    assert runs[0] == runs[1]


def test_different_seeds_give_different_artifacts():
    env = VisGenEnv()
    task = SCENARIOS["product_images"].make(1)
    a = play(env, WorkflowAgent(), 1, task)[-1][1]["artifacts"]
    b = play(env, WorkflowAgent(), 2, task)[-1][1]["artifacts"]
    assert a and b and a != b


def test_info_holds_turn_tool_result_artifacts_components_and_cost():
    env = VisGenEnv()
    steps = play(env, WorkflowAgent(), 0, SCENARIOS["product_marketing"].make(0))
    first_info = steps[0][5]
    assert first_info["turn"]["plan_steps"] and first_info["turn"]["tool_call"]["name"].startswith("tool_")
    media = next(s[5] for s in steps if s[5].get("tool_result", {}).get("outputs"))
    assert media["tool_result"]["status"] == "ok"
    assert media["cost"]["gpu_seconds"] > 0 and media["cost"]["latency_seconds"] > 0
    assert media["artifacts"] and {"id", "kind"} <= set(media["artifacts"][0])
    last = steps[-1][5]
    assert steps[-1][3] is True and steps[-1][4] is False
    assert {"R_plan", "R_format", "R_tool", "R_result", "R_traj", "R_cons", "R_fine", "total"} <= set(
        last["reward_components"])
    assert last["cost"]["episode_gpu_seconds"] == pytest.approx(sum(s[5]["cost"]["gpu_seconds"] for s in steps))
    assert last["checks"]["s_rate"] is True
    assert last["reward_valid"] is True


def test_video_gpu_cost_follows_the_cost_model():
    env = VisGenEnv()
    env.reset(seed=0)
    image = env.step(format_turn(think="t", tool_call={"name": "tool_text2image_qwen",
                                                       "arguments": {"prompt": "a cat", "aspect_ratio": "16:9"}}))
    image_id = image[4]["tool_result"]["outputs"][0]
    video = env.step(format_turn(think="t", tool_call={"name": "tool_image2video_keling",
                                                       "arguments": {"image": image_id, "prompt": "walks", "duration": 10}}))
    assert video[4]["tool_result"]["status"] == "ok"
    assert video[4]["cost"]["gpu_seconds"] == pytest.approx(48.0 * 10)
    assert video[4]["artifacts"][-1]["duration"] == 10


def test_turn_limit_truncates_and_still_scores():
    env = VisGenEnv(max_turns=2)
    env.reset(seed=0)
    call = format_turn(think="t", tool_call={"name": "tool_search_inspire", "arguments": {"query": "cats"}})
    _, _, terminated, truncated, _ = env.step(call)
    assert not terminated and not truncated
    obs, reward, terminated, truncated, info = env.step(call)
    assert truncated and not terminated
    assert "truncated" in parse_tool_response(obs["text"])
    assert info["reward_components"]["R_result"] == 0.0 and np.isfinite(reward)


def test_character_budget_truncates():
    env = VisGenEnv(max_episode_chars=100)
    env.reset(seed=0)
    _, _, terminated, truncated, _ = env.step("<think>" + "x" * 200 + "</think>")
    assert truncated and not terminated


def test_step_order_errors():
    env = VisGenEnv()
    with pytest.raises(ResetNeeded, match=r"step\(\) was called before reset\(\)"):
        env.step("<answer>done</answer>")
    env.reset(seed=0)
    env.step("<answer>done</answer>")
    with pytest.raises(ResetNeeded, match="after the episode ended"):
        env.step("<answer>done</answer>")


def test_task_selection_by_option():
    env = VisGenEnv()
    _, info = env.reset(seed=0, options={"task": env.tasks[5].task_id})
    assert info["task_id"] == env.tasks[5].task_id
    _, info = env.reset(seed=0, options={"task": 7})
    assert info["task_id"] == env.tasks[7].task_id
    with pytest.raises(ConfigError, match="options\\['task'\\]"):
        env.reset(seed=0, options={"task": "no-such-task"})


DRAW_ONE = format_turn(think="t", tool_call={"name": "tool_text2image_qwen", "arguments": {"prompt": "a cat", "n": 1}})


def test_pixels_show_the_latest_images_when_enabled():
    env = VisGenEnv(observe_pixels=True, pixel_size=16, max_pixel_images=2)
    obs, _ = env.reset(seed=0)
    assert obs["pixels"].shape == (2, 16, 16, 3) and not obs["pixels"].any()
    assert obs["pixels_mask"].tolist() == [0, 0] and obs["pixels_mask"].dtype == np.int8
    assert env.observation_space.contains(obs)
    obs, *_ = env.step(DRAW_ONE)
    assert obs["pixels"][0].any() and not obs["pixels"][1].any()
    assert obs["pixels_mask"].tolist() == [1, 0]
    assert env.observation_space.contains(obs)
    obs, *_ = env.step(DRAW_ONE)
    obs, *_ = env.step(DRAW_ONE)  # three images, two rows: the newest two, no padding
    assert obs["pixels_mask"].tolist() == [1, 1] and obs["pixels"][1].any()


def test_pixels_mask_tells_an_all_black_image_from_padding(monkeypatch):
    monkeypatch.setattr("visenv.envs.visgen.thumbnail", lambda path, kind, size: np.zeros((size, size, 3), np.uint8))
    env = VisGenEnv(observe_pixels=True, pixel_size=16, max_pixel_images=3)
    env.reset(seed=0)
    obs, *_ = env.step(DRAW_ONE)
    assert not obs["pixels"].any()  # the pixels alone cannot tell the black image from the padding
    assert obs["pixels_mask"].tolist() == [1, 0, 0]
    assert env.observation_space.contains(obs)


def test_check_env_and_pickling_with_pixels():
    env = VisGenEnv(observe_pixels=True, pixel_size=16, max_pixel_images=2)
    check_env(env, skip_render_check=True)
    env.reset(seed=1)
    clone = pickle.loads(pickle.dumps(env))
    a, b = env.step(DRAW_ONE), clone.step(DRAW_ONE)
    assert pickle.dumps(a[:2]) == pickle.dumps(b[:2]) and a[0]["pixels_mask"].tolist() == [1, 0]


def test_vector_envs_batch_pixels_and_their_mask():
    def make():
        return gym.make("visenv/VisGen-v0", observe_pixels=True, pixel_size=16, max_pixel_images=2)

    sync = gym.vector.SyncVectorEnv([make] * 2)
    obs, _ = sync.reset(seed=0)
    assert obs["pixels"].shape == (2, 2, 16, 16, 3) and obs["pixels_mask"].tolist() == [[0, 0], [0, 0]]
    obs, *_ = sync.step((DRAW_ONE, "no tags at all"))
    sync.close()
    assert obs["pixels_mask"].tolist() == [[1, 0], [0, 0]]
    assert sync.observation_space.contains(obs)
    vec = gym.vector.AsyncVectorEnv([make] * 2, shared_memory=False)
    vec.reset(seed=0)
    obs_async, *_ = vec.step((DRAW_ONE, "no tags at all"))
    vec.close()
    assert np.array_equal(obs_async["pixels_mask"], obs["pixels_mask"])
    assert np.array_equal(obs_async["pixels"], obs["pixels"])


def test_default_observations_have_no_pixels():
    obs, _ = VisGenEnv().reset(seed=0)
    assert set(obs) == {"text", "artifacts"}


def test_sync_and_async_vector_envs_step_together():
    turn = format_turn(think="t", tool_call={"name": "tool_text2image_qwen", "arguments": {"prompt": "cat"}})
    sync = gym.vector.SyncVectorEnv([lambda: gym.make("visenv/VisGen-v0")] * 2)
    obs, _ = sync.reset(seed=0)
    obs, rewards, *_ = sync.step((turn, turn))
    assert len(obs["text"]) == 2 and all("tool_response" in t for t in obs["text"])
    sync.close()
    vec = gym.vector.AsyncVectorEnv([lambda: gym.make("visenv/VisGen-v0")] * 2, shared_memory=False)
    obs_async, _ = vec.reset(seed=0)
    obs_async, rewards_async, *_ = vec.step((turn, turn))
    vec.close()
    assert obs_async["text"] == obs["text"] and np.array_equal(rewards, rewards_async)


def test_tool_echo_rewards_the_exact_call():
    env = gym.make("visenv/ToolEcho-v0").unwrapped
    obs, info = env.reset(seed=0)
    target = info["target"]
    assert target["name"] in obs["text"] and repr(target["arguments"]["prompt"]) in obs["text"]
    _, reward, terminated, _, info = env.step(format_turn(tool_call=target))
    assert terminated and reward == pytest.approx(1.0)
    env.reset(seed=0)
    wrong = {"name": target["name"], "arguments": {"prompt": "nothing", "n": target["arguments"]["n"]}}
    _, reward, *_ = env.step(format_turn(tool_call=wrong))
    assert reward == pytest.approx(0.2 + 0.3 + 0.25)
    env.reset(seed=0)
    _, reward, *_ = env.step("no tags at all")
    assert reward == 0.0


def test_deferred_scoring_hands_over_a_picklable_score_equal_to_the_inline_one():
    tasks = make_suite(4, 2)
    inline, deferred = VisGenEnv(tasks=tasks), VisGenEnv(tasks=tasks)
    deferred.defer_scoring = True
    for seed in range(4):
        expected = play(inline, WorkflowAgent(), seed)
        steps = play(deferred, WorkflowAgent(), seed)
        assert pickle.dumps(steps[:-1]) == pickle.dumps(expected[:-1])
        *_, reward, terminated, truncated, info = steps[-1]
        assert info["reward_pending"] is True and "checks" not in info and "R_plan" not in info["reward_components"]
        assert (terminated, truncated) == expected[-1][3:5] and reward in (0.0, -deferred.config.error_penalty)
        pending = pickle.loads(pickle.dumps(deferred.detach_pending_score()))
        with pytest.raises(ResetNeeded, match="no episode score pending"):
            deferred.detach_pending_score()
        deferred.reset(seed=seed + 100)  # the env moves on; the detached score still holds its episode
        assert pending.run() == (expected[-1][2], expected[-1][5])
        assert expected[-1][5]["reward_components"]["R_plan"] is not None and "reward_pending" not in expected[-1][5]


def test_detaching_a_score_needs_the_opt_in_and_an_ended_episode():
    env = VisGenEnv(max_turns=2)
    env.reset(seed=0)
    env.step("<think>x</think>")
    with pytest.raises(ResetNeeded, match="defer_scoring = True"):
        env.detach_pending_score()
    env.step("<think>x</think>")  # the last step, scored inside step: nothing to detach
    with pytest.raises(ResetNeeded, match="no episode score pending"):
        env.detach_pending_score()
