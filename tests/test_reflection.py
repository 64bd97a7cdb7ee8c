"""Rewards that use the semantic tier's truth (R_reflect, R_percept) and the teacher that reflects."""

import json

import pytest

from baselines.data import DataConfig, build_dataset
from baselines.workflow_agent import WorkflowAgent
from visenv.envs.visgen import VisGenEnv
from visenv.error import ConfigError
from visenv.protocol import format_turn
from visenv.rewards import AdditiveReward, LtrReward, PerceptionReward, make_rubric
from visenv.rewards.rules import claimed_defects, reflection_credit
from visenv.tasks import Requirements, Task


def image_task(consistency=(), amount=1, style=None):
    requirements = Requirements(modality="image", amount=amount, duration=None, shots=None,
                                consistency=consistency, style=style, keywords=("red fox", "snowy forest"))
    return Task(task_id="fox", scenario="realistic_photography", workflow="single_image",
                request=f"Make {amount} images of a red fox in a snowy forest.", requirements=requirements, seed=0)


def play(turns, rubric="r1+percept", task=None, **options):
    """Play scripted turns (a function of the ids made so far -> turn text); the final info."""
    env = VisGenEnv(rubric=rubric, tasks=[task or image_task()], max_turns=20, **options)
    env.reset(seed=0)
    made: list[str] = []
    for turn in turns:
        obs, reward, terminated, truncated, info = env.step(turn(made))
        made += (info.get("tool_result") or {}).get("outputs", [])
    assert terminated
    return info, env


def generate(prompt="a red fox"):
    return lambda made: format_turn(tool_call={"name": "tool_text2image_seed", "arguments": {"prompt": prompt}})


def answer(reflection=None):
    return lambda made: format_turn(reflection=reflection, answer="Delivered: " + " ".join(made))


def r_reflect(reflection, fidelity):
    info, env = play([generate(), answer(reflection)], content="semantic", tool_fidelity=fidelity)
    return info["reward_components"]["R_reflect"], env


def test_claims_and_credit():
    assert claimed_defects("img_1: wrong_count (fox: asked 1, shows 2)") == {"wrong_count"}
    assert claimed_defects("Looks fine, no defects.") == set()
    assert reflection_credit(set(), set()) == 1.0
    assert reflection_credit({"wrong_count"}, {"wrong_count"}) == 1.0
    assert reflection_credit(set(), {"wrong_count"}) == -1.0
    assert reflection_credit({"wrong_colour"}, set()) == -1.0
    assert reflection_credit({"wrong_count", "wrong_colour"}, {"wrong_count"}) == 0.0


def test_ok_after_a_defective_image_scores_below_no_reflection():
    silent, env = r_reflect(None, 0.0)
    (image,) = env.record.delivered()
    kind = image.content["defects"][0]["kind"]
    ok, _ = r_reflect("ok", 0.0)
    right, _ = r_reflect(f"The image has a defect: {kind}.", 0.0)
    assert ok < silent < right
    assert (ok, silent, right) == (0.0, 0.5, 1.0)


def test_a_false_claim_on_a_clean_image_is_penalised():
    clean, _ = r_reflect("It shows what I asked for.", 1.0)
    false, _ = r_reflect("wrong_colour: the fox is blue.", 1.0)
    assert (clean, false) == (1.0, 0.0)


def test_a_reflection_may_follow_an_analysis_call():
    inspect = lambda made: format_turn(tool_call={"name": "tool_image_analysis", "arguments": {"image": made[0]}})
    info, env = play([generate(), inspect, answer("no defects")], content="semantic", tool_fidelity=1.0)
    assert info["reward_components"]["R_reflect"] == 1.0


def test_the_attribute_tier_keeps_the_presence_rule():
    info, _ = play([generate(), answer("ok")])
    assert info["reward_components"]["R_reflect"] == 1.0
    info, _ = play([generate(), answer()])
    assert info["reward_components"]["R_reflect"] == 0.0


def test_perception_reward_reads_the_truth():
    ok, _ = play([generate("a red fox"), answer()], content="semantic")
    wrong_subject, _ = play([generate("a red car"), answer()], content="semantic")
    spoiled, _ = play([generate("a red fox"), answer()], content="semantic", tool_fidelity=0.0)
    assert ok["reward_components"]["R_percept"] == 1.0
    assert wrong_subject["reward_components"]["R_percept"] == 0.0
    assert spoiled["reward_components"]["R_percept"] == 0.0


def test_perception_reward_checks_consistency_and_style():
    task = image_task(consistency=("object",), amount=2, style="watercolor")
    two = lambda made: format_turn(tool_call={"name": "tool_text2image_seed",
                                              "arguments": {"prompt": "a red fox", "n": 2, "style": "watercolor"}})
    drifted, _ = play([two, answer()], content="semantic", task=task)
    referenced = lambda made: format_turn(tool_call={"name": "tool_text2image_seed", "arguments": {
        "prompt": "a red fox", "style": "watercolor", "reference_images": made[:1]}})
    kept, _ = play([generate("a red fox, watercolor style"), referenced, answer()], content="semantic", task=task)
    unstyled, _ = play([generate("a red fox"), generate("a red fox"), answer()], content="semantic", task=task)
    assert drifted["reward_components"]["R_percept"] == pytest.approx(2 / 3)  # two right images, no consistency
    assert kept["reward_components"]["R_percept"] == 1.0
    assert unstyled["reward_components"]["R_percept"] == 0.0


def test_percept_rubrics_leave_the_attribute_tier_scores_unchanged():
    for base, extended in (("ltr", "ltr+percept"), ("r1", "r1+percept")):
        plain, _ = play([generate(), answer("ok")], rubric=base)
        opted, _ = play([generate(), answer("ok")], rubric=extended)
        assert "R_percept" not in opted["reward_components"]  # None values are left out of info
        assert opted["reward_components"]["total"] == plain["reward_components"]["total"]
    assert isinstance(make_rubric("ltr+percept"), LtrReward) and "R_percept" in make_rubric("ltr+percept").fine
    assert isinstance(make_rubric("r1+percept"), AdditiveReward)
    assert isinstance(make_rubric("r1+percept").entries["R_percept"].component, PerceptionReward)
    with pytest.raises(ConfigError, match="ltr\\+percept"):
        VisGenEnv(rubric="percept")


# ---- the reflecting teacher ----------------------------------------------------------------------

def run_teacher(inspect, episodes, fidelity=0.8):
    env = VisGenEnv(content="semantic", tool_fidelity=fidelity, max_turns=90, rubric="r1+percept", tasks="image",
                    num_tasks=episodes)
    agent = WorkflowAgent(seed=0, inspect=inspect)
    percept, reflect, found = [], [], 0
    for episode in range(episodes):
        obs, _ = env.reset(seed=episode, options={"task": episode})
        agent.reset(obs)
        done = False
        while not done:
            obs, _, terminated, truncated, info = env.step(agent.act(obs))
            done = terminated or truncated
        assert terminated
        percept.append(info["reward_components"]["R_percept"])
        reflect.append(info["reward_components"]["R_reflect"])
        found += agent.defects_found
    return sum(percept) / episodes, sum(reflect) / episodes, found, env


def test_the_inspecting_teacher_finds_and_repairs_defects():
    plain_percept, plain_reflect, _, _ = run_teacher(False, 8)
    percept, reflect, found, env = run_teacher(True, 8)
    assert found > 0
    assert percept > plain_percept and reflect > plain_reflect
    turns = [t.turn for t in env.record.turns]
    assert any(t.tool_call and t.tool_call.name == "tool_image_analysis" for t in turns)
    assert all("came back as expected" not in (t.reflection or "") for t in turns)


def test_inspecting_at_full_fidelity_changes_no_output():
    percept, reflect, found, _ = run_teacher(True, 3, fidelity=1.0)
    assert (found, reflect) == (0, 1.0)


def test_inspect_needs_reflect():
    with pytest.raises(ValueError, match="reflect"):
        WorkflowAgent(inspect=True, reflect=False)


def test_the_data_funnel_reports_reflection_trajectories(tmp_path):
    config = DataConfig(out=str(tmp_path / "d.jsonl"), num_tasks=4, tasks="image", mistake_rate=0.0, inspect=True,
                        min_reward=0.0, env={"content": "semantic", "tool_fidelity": 0.5, "max_turns": 90})
    funnel = build_dataset(config)
    assert funnel.reflections_generated == 4 and funnel.revisions_generated >= 1
    assert 0 < funnel.revisions_kept <= funnel.kept
    assert "revised" in funnel.format()


def test_the_data_config_refuses_inspect_without_reflect(tmp_path):
    with pytest.raises(ConfigError, match="inspect=True needs reflect=True"):
        DataConfig(out=str(tmp_path / "d.jsonl"), inspect=True, reflect=False)


def test_the_data_build_command_plays_the_inspecting_teacher_on_the_semantic_tier(tmp_path, capsys):
    from rl.cli import main

    assert main(["data", "build", "--out", str(tmp_path / "d.jsonl"), "--n", "3", "--suite", "image", "--inspect",
                 "--content", "semantic", "--tool-fidelity", "0.5", "--max-turns", "90", "--rubric", "r1+percept",
                 "--mistake-rate", "0", "--min-reward", "0", "--funnel", str(tmp_path / "f.json"), "--quiet"]) == 0
    funnel = json.loads((tmp_path / "f.json").read_text())
    assert funnel["reflections_generated"] == 3 and funnel["revisions_generated"] >= 1
    assert "trajectories reflect" in capsys.readouterr().out
    assert any("tool_image_analysis" in line for line in (tmp_path / "d.jsonl").read_text().splitlines())


def test_the_inspecting_teacher_plans_once_even_when_its_first_call_is_revised():
    env = VisGenEnv(content="semantic", tool_fidelity=0.0, max_turns=120, tasks="image", num_tasks=6)
    agent = WorkflowAgent(seed=0, inspect=True)
    for episode in range(6):
        obs, _ = env.reset(seed=episode, options={"task": episode})
        agent.reset(obs)
        turns, done = [], False
        while not done:
            turns.append(agent.act(obs))
            obs, _, terminated, truncated, _ = env.step(turns[-1])
            done = terminated or truncated
        assert sum("<plan>" in turn for turn in turns) == 1 and terminated
        assert sum(agent.revisions.values()) >= 1
