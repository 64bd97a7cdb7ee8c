"""The structured VisGen wrapper: spaces, rendered turns, features, errors, and RLlib PPO learning it."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from visenv.error import ConfigError, ResetNeeded
from visenv.protocol import parse_turn
from visenv.wrappers import StructuredVisGen, make_structured
from baselines.rllib_ppo import mean_return


CALL, ANSWER = 0, 1
REFINE, GENERATE, EDIT, ANALYSE = range(4)
ONE, OWED = 0, 1
NONE, FIRST, LATEST = 0, 1, 2


def features(env, observation) -> dict:
    return dict(zip(env.feature_names, observation.tolist()))


def consistent_task_seed(env) -> int:
    """A reset seed whose task asks for several consistent images."""
    for seed in range(200):
        env.reset(seed=seed)
        req = env.unwrapped.record.task.requirements
        if req.consistency and req.amount >= 3:
            return seed
    raise AssertionError("no consistent multi-image task in the first 200 seeds")


def test_passes_the_gymnasium_checker():
    env = make_structured()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*different from the unwrapped version.*")
        check_env(env, skip_render_check=True)
    assert env.action_space.nvec.tolist() == [2, 4, 2, 3]
    assert env.observation_space.shape == (len(env.feature_names),)


def test_features_track_the_request_and_progress():
    env = make_structured()
    seed = consistent_task_seed(env)
    observation, _ = env.reset(seed=seed)
    req = env.unwrapped.record.task.requirements
    f = features(env, observation)
    assert f["amount"] == pytest.approx(req.amount / 12) and f["owed"] == pytest.approx(req.amount / 12)
    assert f["video"] == 0.0 and f["last_none"] == 1.0 and f["images"] == 0.0 and f["turn"] == 0.0
    assert any(f[f"consistency_{c}"] for c in req.consistency)
    observation, *_ = env.step([CALL, GENERATE, ONE, NONE])
    f = features(env, observation)
    assert f["images"] == pytest.approx(1 / 12) and f["owed"] == pytest.approx((req.amount - 1) / 12)
    assert f["last_ok"] == 1.0 and f["used_tool_text2image_qwen"] == 1.0 and f["used_tool_prompt_refine"] == 0.0
    observation, reward, *_ = env.step([CALL, EDIT, ONE, NONE])  # an edit needs an image: left out, it fails
    assert features(env, observation)["last_error"] == 1.0 and reward < 0


def test_turns_are_well_formed_utpc_with_templated_arguments():
    env = make_structured()
    seed = consistent_task_seed(env)
    env.reset(seed=seed)
    record = env.unwrapped.record
    req = record.task.requirements
    first = parse_turn(env.turn_text([CALL, GENERATE, ONE, NONE]))
    assert first.well_formed and "tool_text2image_qwen" in first.plan and len(first.plan_steps) == 4
    assert first.tool_call.arguments["n"] == 1 and first.tool_call.arguments["aspect_ratio"] == req.aspect_ratio
    assert first.tool_call.arguments["prompt"] == ", ".join(req.keywords)
    env.step([CALL, GENERATE, ONE, NONE])
    anchor = next(iter(record.artifacts))
    later = parse_turn(env.turn_text([CALL, GENERATE, OWED, FIRST]))
    assert later.well_formed and later.plan is None
    assert later.tool_call.arguments["n"] == min(4, req.amount - 1)
    assert later.tool_call.arguments["reference_images"] == [anchor]
    assert parse_turn(env.turn_text([CALL, EDIT, ONE, LATEST])).tool_call.arguments["image"] == anchor
    answer = parse_turn(env.turn_text([ANSWER, 0, 0, 0]))
    assert answer.well_formed and anchor in answer.answer


def test_a_good_script_beats_random_actions():
    """The problem is learnable: a five-line script scores far above uniform random actions."""
    env = make_structured({"task_seed": 10_000})

    def script(observation):
        f = features(env, observation)
        if f["nothing_owed"]:
            return [ANSWER, 0, 0, 0]
        consistent = f["consistency_object"] or f["consistency_scene"] or f["consistency_style"]
        return [CALL, GENERATE, ONE if consistent and not f["images"] else OWED, FIRST if consistent else NONE]

    env.action_space.seed(0)
    scripted = mean_return(env, script, 40)
    uniform = mean_return(env, lambda _: env.action_space.sample(), 40)
    assert scripted > 0.6 and uniform < 0.35 and scripted > uniform + 0.3


def test_errors_and_pickling():
    env = make_structured({"max_turns": 3})
    with pytest.raises(ResetNeeded, match="before reset"):
        env.step([CALL, GENERATE, ONE, NONE])
    env.reset(seed=0)
    with pytest.raises(ConfigError, match="outside"):
        env.step([CALL, 7, ONE, NONE])
    with pytest.raises(ConfigError, match="outside"):
        env.step([CALL, GENERATE, ONE])
    with pytest.raises(ConfigError, match="requires \\['topic', 'shots'\\]"):
        make_structured({"tools": ["tool_video_shot_gen"]})
    with pytest.raises(ConfigError, match="not a VisGen tool"):
        make_structured({"tools": ["tool_nope"]})
    with pytest.raises(ConfigError, match="distinct"):
        make_structured({"tools": ["tool_text2image_qwen", "tool_text2image_qwen"]})
    with pytest.raises(ConfigError, match="Unknown VisGen option"):
        make_structured({"colour": "red"})
    copy = pickle.loads(pickle.dumps(make_structured(tools=["tool_text2image_seed"])))
    assert isinstance(copy, StructuredVisGen) and copy.tools == ("tool_text2image_seed",)
    observation, _ = env.reset(seed=1)
    for _ in range(3):
        observation, _, terminated, truncated, _ = env.step([CALL, REFINE, ONE, NONE])
    assert truncated and not terminated and features(env, observation)["turn"] == 1.0


@pytest.mark.slow
def test_rllib_ppo_beats_random(ray_session):
    """A few PPO iterations (new API stack, all in the driver) already beat the random policy on held-out tasks."""
    from baselines.rllib_ppo import greedy_policy, mean_return, ppo_config, random_policy

    algo = ppo_config({"task_seed": 0}, seed=0).build_algo()
    try:
        sampled = [algo.train()["env_runners"]["episode_return_mean"] for _ in range(4)]
        held_out = make_structured({"task_seed": 10_000})
        ppo = mean_return(held_out, greedy_policy(algo.get_module(), held_out.action_space), episodes=100)
        rand = mean_return(held_out, random_policy(held_out.action_space, seed=0), episodes=100)
    finally:
        algo.stop()
    assert all(np.isfinite(sampled)) and sampled[-1] > sampled[0]
    assert ppo > rand + 0.2, (ppo, rand, sampled)
