"""Rule reward components, result checks and the two rubrics, on real episodes and hand-made cases."""

from __future__ import annotations

import math

import pytest

from baselines.workflow_agent import WorkflowAgent
from visenv.envs.visgen import VisGenEnv
from visenv.error import ConfigError
from visenv.protocol import format_turn
from visenv.rewards import (AdditiveReward, ConsistencyReward, Entry, FormatReward, LtrReward,
                            ResultReward, RulePlanReward, RuleTrajectoryReward, ToolReward, run_checks)
from visenv.rewards.rules import lcs_length
from visenv.tasks import SCENARIOS


def episode(task, agent=None, seed=0, edit=None):
    """Play ``task`` with the teacher (optionally rewriting each action with ``edit``); return the record."""
    env = VisGenEnv(tasks=[task])
    agent = agent or WorkflowAgent(seed=seed)
    obs, _ = env.reset(seed=seed)
    agent.reset(obs, seed=seed)
    done, info = False, {}
    while not done:
        action = agent.act(obs)
        obs, _, terminated, truncated, info = env.step(edit(action) if edit else action)
        done = terminated or truncated
    return env.record, info


def vague_plan(action):
    """The teacher's action with its plan replaced by a vague one (the rest of the turn kept)."""
    if "<plan>" not in action:
        return action
    head, rest = action.split("<plan>", 1)
    return head + "<plan>\n1. make it nice\n2. deliver" + rest[rest.index("\n</plan>"):]


class Constant:
    """A test component that answers a fixed value for every episode."""

    def __init__(self, value):
        self.value = value

    def __call__(self, episodes):
        return [self.value] * len(episodes)


def test_lcs_hand_computed():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length([], ["a"]) == 0


def test_teacher_scores_one_on_every_component_for_every_scenario():
    rubric = LtrReward()
    for name, scenario in SCENARIOS.items():
        record, info = episode(scenario.make(3))
        breakdown = rubric([record])[0]
        assert breakdown.total == pytest.approx(1.0), (name, breakdown.components)
        assert all(v is True or v is None for v in info["checks"].values()), (name, info["checks"])


def test_wrong_count_fails_result_and_amount():
    task = SCENARIOS["product_images"].make(0)
    agent = WorkflowAgent(mistake_rate=1.0, mistakes=("wrong_count",))
    record, info = episode(task, agent)
    assert task.requirements.amount != len(record.delivered())
    assert info["checks"]["amount"] is False and ResultReward()([record]) == [0.0]


def test_wrong_clip_duration_fails_the_duration_check():
    task = next(SCENARIOS["product_marketing"].make(s) for s in range(50)
                if SCENARIOS["product_marketing"].make(s).requirements.duration)
    record, info = episode(task, WorkflowAgent(mistake_rate=1.0, mistakes=("wrong_duration",)))
    assert info["checks"]["duration"] is False


def test_tool_levels():
    task = SCENARIOS["social_media_cover"].make(0)
    good, _ = episode(task)
    assert ToolReward()([good]) == [1.0]

    env = VisGenEnv(tasks=[task])
    obs, _ = env.reset(seed=0)
    env.step(format_turn(think="t", tool_call={"name": "tool_nope", "arguments": {}}))
    agent = WorkflowAgent()
    agent.reset({"text": f"Request: {task.request}"})
    done = False
    while not done:
        obs, _, terminated, truncated, _ = env.step(agent.act(obs))
        done = terminated or truncated
    assert ToolReward()([env.record]) == [0.8]

    no_delivery, _ = episode(task, edit=lambda a: a if "<answer>" not in a else
                             format_turn(think="t", answer="nothing"))
    no_delivery.deliverables = ()
    assert ToolReward()([no_delivery]) == [0.1]

    nothing, _ = episode(task, edit=lambda a: "<think>x</think><answer>done</answer>")
    assert ToolReward()([nothing]) == [0.0]


def test_well_executed_bad_plan_scores_low_under_ltr_but_not_additive():
    task = SCENARIOS["product_images"].make(1)
    record, _ = episode(task)
    good = LtrReward()([record])[0].total

    bad_plan, _ = episode(task, edit=vague_plan)
    assert ResultReward()([bad_plan]) == [1.0]
    assert RulePlanReward()([bad_plan]) == [0.0]
    assert LtrReward()([bad_plan])[0].total == 0.0 < good
    assert AdditiveReward()([bad_plan])[0].total > 0.5


def test_result_format_rubric_is_the_mean_of_result_and_format_and_ignores_the_plan():
    from visenv.rewards.rubric import make_rubric

    task = SCENARIOS["product_images"].make(1)

    bad_plan, _ = episode(task, edit=vague_plan)
    scored = make_rubric("result_format")([bad_plan])[0]
    # the result is right and the format clean: (1 + 1) / 2, whatever the plan
    assert ResultReward()([bad_plan]) == [1.0] and FormatReward()([bad_plan]) == [1.0]
    assert scored.total == 1.0 and set(scored.components) == {"R_result", "R_format", "total"}
    env = VisGenEnv(tasks=[task], rubric="result_format")
    assert env.config.rubric is not None
    with pytest.raises(ConfigError, match="'result_format'"):
        VisGenEnv(tasks=[task], rubric="rf")


def test_consistency_is_none_when_not_required_and_dropped_from_the_mean():
    task = next(t for t in (SCENARIOS["realistic_photography"].make(s) for s in range(20))
                if not t.requirements.consistency)
    record, info = episode(task)
    assert ConsistencyReward()([record]) == [None]
    breakdown = LtrReward()([record])[0]
    assert "R_cons" in breakdown.dropped and breakdown.total == pytest.approx(1.0)


def test_consistency_counts_reference_based_generations():
    task = next(t for t in (SCENARIOS["picture_book"].make(s) for s in range(20))
                if t.requirements.consistency and t.requirements.amount >= 3)
    record, _ = episode(task)
    assert ConsistencyReward()([record]) == [1.0]

    def drop_references(action):
        import json
        if "reference_images" not in action:
            return action
        start, end = action.index("<tool_call>") + len("<tool_call>"), action.index("</tool_call>")
        call = json.loads(action[start:end])
        call["arguments"].pop("reference_images")
        return action[:start] + json.dumps(call) + action[end:]

    unreferenced, _ = episode(task, edit=drop_references)
    assert ConsistencyReward()([unreferenced])[0] < 0.5


def test_trajectory_follows_the_plan():
    task = SCENARIOS["marketing_poster"].make(0)
    record, _ = episode(task)
    assert RuleTrajectoryReward()([record]) == [1.0]
    short, _ = episode(task, agent=WorkflowAgent(mistake_rate=1.0, mistakes=("early_answer",)))
    assert RuleTrajectoryReward()([short])[0] < 1.0


def test_format_reward_counts_problem_kinds():
    task = SCENARIOS["logo"].make(0)
    record, _ = episode(task, edit=lambda a: a.replace("<think>", "stray text <think>", 1))
    score = FormatReward()([record])[0]
    assert 0.0 < score < 1.0


def test_none_policy_invalid_is_the_default_and_lowest_counts_zero():
    record, _ = episode(SCENARIOS["logo"].make(0))
    fine = {"R_result": Entry(ResultReward()), "judge": Entry(Constant(None), required=True)}
    strict = LtrReward(fine=fine)([record])[0]
    assert strict.total is None and not strict.valid and strict.none_policy == "invalid"
    assert strict.components["judge"] is None and strict.dropped == ("judge",)
    lowest = LtrReward(fine=fine, none_policy="lowest")([record])[0]
    assert lowest.total == pytest.approx(1.0 * (1.0 + 0.0) / 2) and lowest.dropped == ("judge",)
    optional = LtrReward(fine={"R_result": Entry(ResultReward()), "judge": Entry(Constant(None))})([record])[0]
    assert optional.valid and optional.total == pytest.approx(1.0)  # "not applicable": dropped, renormalised


@pytest.mark.parametrize("policy, expected", [("invalid", None), ("lowest", 0.0)])
def test_a_missing_required_plan_never_scores_above_any_present_plan(policy, expected):
    """R_fine = (3 x 1.0 + 1 x 0.2) / 4 = 0.8; a present R_plan p gives 0.8 p, a missing one None or 0.0."""
    record, _ = episode(SCENARIOS["logo"].make(0))
    fine = {"a": Entry(Constant(1.0), weight=3.0), "b": Entry(Constant(0.2))}
    present = [LtrReward(plan=Entry(Constant(p), required=True), fine=fine, none_policy=policy)([record])[0].total
               for p in (0.0, 0.75, 1.0)]
    assert present == pytest.approx([0.0, 0.6, 0.8])
    missing = LtrReward(plan=Entry(Constant(None), required=True), fine=fine, none_policy=policy)([record])[0]
    assert missing.total == expected and missing.components["R_fine"] == pytest.approx(0.8)
    assert missing.none_policy == policy and missing.dropped == ("R_plan",)
    optional = LtrReward(plan=Entry(Constant(None)), fine=fine, none_policy=policy)([record])[0]
    assert optional.total == pytest.approx(0.8)  # an optional R_plan's None leaves the factor out


@pytest.mark.parametrize("policy, expected", [("invalid", None), ("lowest", (0.0 + 2 * 0.9) / 3)])
def test_additive_none_policy_hand_computed(policy, expected):
    record, _ = episode(SCENARIOS["logo"].make(0))
    rubric = AdditiveReward(entries={"plan": Entry(Constant(None), required=True),
                                     "n/a": Entry(Constant(None), weight=5.0),
                                     "tool": Entry(Constant(0.9), weight=2.0)}, none_policy=policy)
    result = rubric([record])[0]
    assert result.total == (None if expected is None else pytest.approx(expected))
    assert result.dropped == ("plan", "n/a") and result.none_policy == policy
    present = AdditiveReward(entries={"plan": Entry(Constant(0.0), required=True),
                                      "tool": Entry(Constant(0.9), weight=2.0)})([record])[0]
    assert present.total == pytest.approx(0.6)  # the lowest a present plan score gives: "lowest" matches it


def test_invalid_total_reaches_the_env_as_nan():
    rubric = LtrReward(plan=Entry(Constant(None), required=True), none_policy="invalid")
    env = VisGenEnv(rubric=rubric)
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step("<think>x</think><answer>done</answer>")
    assert terminated and math.isnan(reward) and info["reward_valid"] is False
    assert info["reward_none_policy"] == "invalid"


def test_weights_matter_and_are_validated():
    record, _ = episode(SCENARIOS["logo"].make(0))
    rubric = AdditiveReward(entries={"one": Entry(Constant(1.0), weight=3.0), "zero": Entry(Constant(0.0))})
    assert rubric([record])[0].total == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="weight"):
        Entry(Constant(1.0), weight=-1)
    with pytest.raises(ConfigError, match=r"none_policy \('renormalize'\) must be one of \('invalid', 'lowest'\)"):
        LtrReward(none_policy="renormalize")


def test_checks_on_a_video_task():
    task = next(t for t in (SCENARIOS["music_video"].make(s) for s in range(30))
                if t.requirements.duration and t.requirements.shots)
    record, _ = episode(task)
    checks = run_checks(record)
    assert checks == {"s_rate": True, "amount": True, "duration": True, "storyboard": True, "audio": True}
    video = record.delivered()[0]
    assert video.attributes["shots"] == task.requirements.shots
