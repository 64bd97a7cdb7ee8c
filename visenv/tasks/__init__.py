"""Tasks: the 42 seeded scenarios, the 15 reference workflows, suites and the VisGenBench set.

Typical use::

    from visenv.tasks import SCENARIOS, WORKFLOWS, make_suite, visgenbench

    task = SCENARIOS["picture_book"].make(seed=7)
    plan = WORKFLOWS[task.workflow].instantiate(task)  # the expert's concrete tool calls
    bench = visgenbench()                                 # 1,200 tasks, 400 image + 800 video
"""

from visenv.tasks.io import load_tasks, save_tasks
from visenv.tasks.planner import Timeline, plan_timeline
from visenv.tasks.scenario import Scenario
from visenv.tasks.scenarios import IMAGE_SCENARIOS, SCENARIOS, VIDEO_SCENARIOS, get_scenario
from visenv.tasks.suite import BENCH_DIMENSIONS, make_suite, split_suite, visgenbench
from visenv.tasks.task import (ASPECT_RATIOS, AUDIO, CONSISTENCY, DIMENSIONS, MODALITIES, Requirements,
                               Task)
from visenv.tasks.workflows import WORKFLOWS, PlannedCall, Workflow, WorkflowStep, get_workflow

__all__ = [
    "ASPECT_RATIOS", "AUDIO", "BENCH_DIMENSIONS", "CONSISTENCY", "DIMENSIONS", "IMAGE_SCENARIOS",
    "MODALITIES", "SCENARIOS", "VIDEO_SCENARIOS", "WORKFLOWS", "PlannedCall", "Requirements", "Scenario",
    "Task", "Timeline", "Workflow", "WorkflowStep", "get_scenario", "get_workflow", "load_tasks",
    "make_suite", "plan_timeline", "save_tasks", "split_suite", "visgenbench",
]
