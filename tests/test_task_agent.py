"""The scripted TaskAgent: routing requests to scenarios, workflows and requirements from text alone."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baselines.task_agent import DEFAULT_SCENARIO, Route, TaskAgent
from visenv.tasks import SCENARIOS, WORKFLOWS, make_suite, visgenbench

AGENT = TaskAgent()


def _accuracy(tasks) -> tuple[float, collections.Counter]:
    misses = collections.Counter()
    for task in tasks:
        route = AGENT.route(task.request)
        if (route.scenario, route.workflow, route.requirements) != (
                task.scenario, task.workflow, task.requirements):
            misses[task.scenario] += 1
    return 1 - sum(misses.values()) / len(tasks), misses


def test_routes_generated_requests_exactly():
    tasks = make_suite(42 * 50, seed=2024)
    rate, misses = _accuracy(tasks)
    print(f"TaskAgent exact routing on make_suite(2100): {rate:.4f}")
    assert rate >= 0.99, misses
    assert all(count <= 2 for count in misses.values()), misses


def test_routes_the_benchmark_exactly():
    rate, misses = _accuracy(visgenbench())
    print(f"TaskAgent exact routing on visgenbench(): {rate:.4f}")
    assert rate >= 0.99, misses


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_scenario_is_recognised(name):
    for seed in range(5):
        route = AGENT.route(SCENARIOS[name].make(seed).request)
        assert route.scenario == name and route.workflow == SCENARIOS[name].workflow


def test_the_plan_of_a_request_is_the_expert_plan_of_its_task():
    for task in make_suite(84, seed=5):
        assert AGENT.plan(task.request) == WORKFLOWS[task.workflow].instantiate(task)


@pytest.mark.parametrize("request_text, scenario", [
    ("Make a picture book video about a fox.", "picture_book_video"),
    ("Illustrate a picture book about a fox: four illustrated pages.", "picture_book"),
    ("Create an animated movie sequence about a fox.", "animated_movie"),
    ("Make a movie scene about a fox.", "movie"),
    ("Create a story recap video of The Odyssey.", "story_explanation"),
    ("Make a story video about a fox.", "story_video"),
    ("Design a sticker pack of a fox.", "static_emoji"),
])
def test_longest_trigger_wins(request_text, scenario):
    assert AGENT.route(request_text).scenario == scenario


def test_parses_free_phrasings():
    req = AGENT.route("Make a one-minute story video in vertical format, 6-shot, with a narrator.").requirements
    assert (req.duration, req.shots, req.aspect_ratio, req.audio) == (60.0, 6, "9:16", ("voiceover",))
    req = AGENT.route("Design seven icons in watercolor style, same visual style throughout.").requirements
    assert (req.amount, req.style, req.consistency) == (7, "watercolor", ("style",))
    req = AGENT.route("Draw a logo; keep the same style.").requirements
    assert (req.amount, req.consistency) == (1, ())  # one image cannot be consistent with itself


@pytest.mark.parametrize("request_text, modality", [
    ("", "image"), ("hello", "image"), ("Please make something nice.", "image"),
    ("I want a video of my dog", "video"), ("A 900-second film with 99 shots", "video"),
])
def test_unknown_requests_get_a_default_route(request_text, modality):
    route = AGENT.route(request_text)
    assert route.scenario == DEFAULT_SCENARIO[modality]
    assert route.requirements.modality == modality
    if modality == "video":
        assert route.requirements.duration is None and route.requirements.shots is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_route_never_raises(text):
    route = AGENT.route(text)
    assert isinstance(route, Route) and route.workflow == SCENARIOS[route.scenario].workflow
    assert AGENT.plan(text)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(SCENARIOS)), st.integers(0, 2**31 - 1))
def test_routes_any_seed(name, seed):
    task = SCENARIOS[name].make(seed)
    route = AGENT.route(task.request)
    assert (route.scenario, route.requirements) == (task.scenario, task.requirements)
