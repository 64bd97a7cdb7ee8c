"""The random agent and the scripted workflow teacher, played through the evaluator."""

from __future__ import annotations

import pytest

from baselines.agent import Agent
from baselines.random_agent import RandomAgent
from baselines.workflow_agent import MISTAKES, WorkflowAgent
from rl.evaluate import evaluate
from visenv.evaluation import format_table
from visenv.tasks import make_suite, visgenbench


def test_baselines_satisfy_the_agent_protocol():
    assert isinstance(WorkflowAgent(), Agent) and isinstance(RandomAgent(), Agent)


def test_teacher_scores_high_and_random_scores_low_on_held_out_tasks():
    tasks = make_suite(84, 10_000)
    _, teacher = evaluate(WorkflowAgent, tasks, progress=False)
    _, random = evaluate(RandomAgent, tasks, progress=False)
    assert teacher["overall"]["reward"] >= 0.99 and teacher["overall"]["s_rate"] == 1.0
    assert random["overall"]["reward"] < 0.1 and random["overall"]["s_rate"] < 0.3
    table = format_table(teacher, "teacher")
    assert "overall" in table and "product_images" in table


def test_teacher_meets_every_objective_requirement_on_a_benchmark_slice():
    tasks = visgenbench(0)[::12]
    results, summary = evaluate(WorkflowAgent, tasks, progress=False)
    for metric in ("s_rate", "amount", "duration", "storyboard", "audio"):
        assert summary["overall"][metric] in (None, 1.0), metric
    assert summary["overall"]["failed_call_rate"] == 0.0


def test_mistake_rate_produces_realistic_failures():
    tasks = make_suite(84, 10_000)
    _, clean = evaluate(lambda: WorkflowAgent(seed=1), tasks, progress=False)
    _, sloppy = evaluate(lambda: WorkflowAgent(seed=1, mistake_rate=0.5), tasks, progress=False)
    assert sloppy["overall"]["reward"] < clean["overall"]["reward"] - 0.1
    assert 0.3 < sloppy["overall"]["components"]["R_result"] < 0.95


def test_agent_argument_validation():
    with pytest.raises(ValueError, match="mistake_rate"):
        WorkflowAgent(mistake_rate=2)
    with pytest.raises(ValueError, match="subset of"):
        WorkflowAgent(mistakes=("typo",))
    with pytest.raises(ValueError, match="answer_probability"):
        RandomAgent(answer_probability=-1)
    assert set(MISTAKES) == {"skip_step", "wrong_count", "wrong_duration", "early_answer"}


def test_evaluation_is_reproducible():
    tasks = make_suite(10, 5)
    a, _ = evaluate(RandomAgent, tasks, seed=3, progress=False)
    b, _ = evaluate(RandomAgent, tasks, seed=3, progress=False)
    assert [r.reward for r in a] == [r.reward for r in b]
