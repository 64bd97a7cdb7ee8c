"""Tasks: requirements, the 42 scenarios, the 15 workflows and their plans, suites, VisGenBench, JSONL."""

from __future__ import annotations

import collections
import itertools
import json
import pickle
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visenv.error import ConfigError, TaskFormatError
from visenv.tasks import (BENCH_DIMENSIONS, DIMENSIONS, IMAGE_SCENARIOS, SCENARIOS,
                          VIDEO_SCENARIOS, WORKFLOWS, Requirements, Task, Workflow, WorkflowStep,
                          load_tasks, make_suite, plan_timeline, save_tasks, split_suite, visgenbench)
from visenv.tasks.planner import DEFAULT_SHOTS, MAX_CHOSEN_SHOTS, PLANNABLE_TOOLS
from visenv.tasks.scenario import AUDIO_PHRASES, NUMBER_WORDS
from visenv.tools.specs import DEFAULT_TOOLS

PAPER_IMAGE = ["product_images", "detail_page", "key_visual", "landing_page", "brand_visual_identity",
               "banner", "official_account_cover", "social_media_cover", "marketing_poster", "avatar",
               "static_emoji", "icon", "logo", "mini_game_ui", "character_design", "character_action_design",
               "scene_design", "storyboard", "picture_book", "stylization", "realistic_photography"]
PAPER_VIDEO = ["product_marketing", "public_service_ad", "corporate_promotion", "brand_story",
               "event_promotion", "instructional", "popular_science", "music_video", "concert", "variety_show",
               "story_video", "video_podcast", "picture_book_video", "dynamic_comic", "animated_short",
               "animated_movie", "game_adaptation_film", "game_video", "movie", "short_drama",
               "story_explanation"]
FAKE_PREFIX = {"image": "img", "video": "vid", "audio": "aud"}


def _image_req(**changes) -> Requirements:
    fields = dict(modality="image", amount=3, duration=None, shots=None, consistency=("object",),
                  style="watercolor", keywords=("mug", "table"), aspect_ratio="1:1")
    fields.update(changes)
    return Requirements(**fields)


def _video_req(**changes) -> Requirements:
    fields = dict(modality="video", amount=1, duration=30.0, shots=4, consistency=(), style=None,
                  keywords=("robot",), audio=("music",), aspect_ratio="16:9")
    fields.update(changes)
    return Requirements(**fields)


def _sample_tasks(seeds: int) -> list[Task]:
    """Every scenario for ``seeds`` seeds, each seed with the next dimension the scenario supports."""
    tasks = []
    for scenario in SCENARIOS.values():
        dims = [None, *(d for d in DIMENSIONS if scenario.supports(d))]
        tasks += [scenario.make(seed, dims[seed % len(dims)]) for seed in range(seeds)]
    return tasks


SAMPLE = _sample_tasks(24)


# --- requirements and tasks ------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    (dict(modality="audio"), r"modality \('audio'\)"),
    (dict(amount=0), r"amount \(0\)"),
    (dict(amount=13), r"amount \(13\)"),
    (dict(amount=True), r"amount \(True\)"),
    (dict(duration=10.0), r"image task must have duration=None"),
    (dict(audio=("music",)), r"image task must have .*audio=\(\)"),
    (dict(consistency=("style", "object")), r"must be sorted and without repeats: use \('object', 'style'\)"),
    (dict(consistency=("identity",)), r"holds \['identity'\]"),
    (dict(consistency=["object"]), r"must be a sequence of strings"),
    (dict(amount=1), r"needs at least 2 images"),
    (dict(style=""), r"style \(''\)"),
    (dict(keywords=("mug", "")), r"keywords"),
    (dict(aspect_ratio="2:1"), r"aspect_ratio \('2:1'\)"),
    (dict(duration_tolerance=1.5), r"duration_tolerance \(1.5\)"),
])
def test_image_requirements_reject_bad_values(changes, message):
    with pytest.raises(ConfigError, match=message):
        _image_req(**changes)


@pytest.mark.parametrize("changes, message", [
    (dict(amount=2), r"amount \(2\) must be 1: a video task delivers one video"),
    (dict(duration=0.0), r"duration \(0.0\)"),
    (dict(duration=601.0), r"duration \(601.0\)"),
    (dict(shots=0), r"shots \(0\)"),
    (dict(shots=31), r"shots \(31\)"),
    (dict(audio=("voiceover", "music")), r"audio .* must be sorted"),
    (dict(audio=("song",)), r"holds \['song'\]"),
    (dict(aspect_ratio="1:1"), r"aspect_ratio \('1:1'\) must be one of \('16:9', '9:16'\) for video"),
])
def test_video_requirements_reject_bad_values(changes, message):
    with pytest.raises(ConfigError, match=message):
        _video_req(**changes)


def test_open_duration_and_shots_are_valid_for_video():
    req = _video_req(duration=None, shots=None)
    assert req.duration_ok(123.0)
    assert _video_req(duration=30.0).duration_ok(32.9) and not _video_req(duration=30.0).duration_ok(33.1)


@pytest.mark.parametrize("changes, message", [
    (dict(task_id=""), r"Task.task_id"),
    (dict(seed=-1), r"Task.seed \(-1\)"),
    (dict(dimension="beauty"), r"Task.dimension \('beauty'\)"),
    (dict(dimension="video_duration"), r"applies to video tasks only"),
    (dict(requirements={"modality": "image"}), r"must be a Requirements"),
])
def test_task_rejects_bad_values(changes, message):
    fields = dict(task_id="t", scenario="icon", workflow="icon_logo_set", request="Draw icons.",
                  requirements=_image_req(), seed=0)
    fields.update(changes)
    with pytest.raises(ConfigError, match=message):
        Task(**fields)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(SCENARIOS)), st.integers(0, 2**31 - 1), st.sampled_from((None, *DIMENSIONS)))
def test_task_dict_round_trip_is_exact(name, seed, dimension):
    scenario = SCENARIOS[name]
    task = scenario.make(seed, dimension if scenario.supports(dimension) else None)
    data = json.loads(json.dumps(task.to_dict()))
    assert Task.from_dict(data) == task
    assert pickle.loads(pickle.dumps(task)) == task


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("seed"), r"missing task field\(s\) \['seed'\]"),
    (lambda d: d.update(extra=1), r"unexpected task field\(s\) \['extra'\]"),
    (lambda d: d["requirements"].pop("keywords"), r"missing requirements field\(s\) \['keywords'\]"),
    (lambda d: d["requirements"].update(colour="red"), r"unexpected requirements field\(s\) \['colour'\]"),
    (lambda d: d.update(requirements=[1]), r"field 'requirements' must be an object"),
    (lambda d: d["requirements"].update(amount="3"), r"Requirements.amount \('3'\)"),
    (lambda d: d["requirements"].update(aspect_ratio="5:4"), r"Requirements.aspect_ratio \('5:4'\)"),
    (lambda d: d.update(seed=1.5), r"Task.seed \(1.5\)"),
])
def test_from_dict_names_the_bad_field(mutate, message):
    data = SCENARIOS["icon"].make(3).to_dict()
    mutate(data)
    with pytest.raises(TaskFormatError, match=message):
        Task.from_dict(data)


def test_from_dict_rejects_non_objects():
    with pytest.raises(TaskFormatError, match="must be a JSON object, got list"):
        Task.from_dict([1, 2])


def test_from_dict_accepts_integer_durations():
    data = SCENARIOS["movie"].make(1, "video_duration").to_dict()
    data["requirements"]["duration"] = int(data["requirements"]["duration"])
    assert Task.from_dict(data) == SCENARIOS["movie"].make(1, "video_duration")


# --- scenarios -------------------------------------------------------------------------------


def test_the_papers_42_scenarios_in_order():
    assert list(IMAGE_SCENARIOS) == PAPER_IMAGE
    assert list(VIDEO_SCENARIOS) == PAPER_VIDEO
    assert list(SCENARIOS) == PAPER_IMAGE + PAPER_VIDEO
    assert all(s.modality == "image" for s in IMAGE_SCENARIOS.values())
    assert all(s.modality == "video" for s in VIDEO_SCENARIOS.values())


def test_every_scenario_maps_to_one_of_15_workflows_and_all_are_used():
    assert len(WORKFLOWS) == 15
    assert collections.Counter(w.modality for w in WORKFLOWS.values()) == {"image": 10, "video": 5}
    for scenario in SCENARIOS.values():
        assert WORKFLOWS[scenario.workflow].modality == scenario.modality
    assert {s.workflow for s in SCENARIOS.values()} == set(WORKFLOWS)


def test_a_seed_fully_determines_a_task():
    for scenario in SCENARIOS.values():
        assert scenario.make(11) == scenario.make(11)
        assert scenario.make(11, "variety") == scenario.make(11, "variety")
        assert scenario.make(11).task_id == f"{scenario.name}-11"
        assert scenario.make(11, "variety").task_id == f"{scenario.name}-11-variety"


def test_requests_vary_with_the_seed():
    for scenario in SCENARIOS.values():
        tasks = [scenario.make(seed) for seed in range(40)]
        assert len({t.request for t in tasks}) >= 38, scenario.name
        assert len({t.request.split(".")[0].split(" ")[0] for t in tasks}) >= 2, "several openings"
        assert len({t.requirements.keywords for t in tasks}) >= 10


def _stated(task: Task) -> None:
    """Every requirement of ``task`` appears in its request."""
    text, req = task.request.lower(), task.requirements

    def number(value: int, unit: str) -> bool:
        return any(re.search(rf"\b{form}[- ]{unit}", text) for form in (str(value), NUMBER_WORDS[value]))

    assert req.aspect_ratio in text
    assert all(keyword.lower() in text for keyword in req.keywords)
    assert req.style is None or f"{req.style.lower()} " in text or f"{req.style.lower()}." in text
    scenario = SCENARIOS[task.scenario]
    if req.modality == "image":
        singular, plural = scenario.unit
        assert (number(req.amount, plural.lower()) if req.amount > 1 else
                re.search(rf"\b(a|an|one|a single) {singular.lower()}\b", text)), task.request
    else:
        assert req.duration is None or f"{int(req.duration)} seconds" in text
        assert req.shots is None or number(req.shots, "shots")
        for track in req.audio:
            assert any(phrase in text for phrase in AUDIO_PHRASES[track]), track
        for track in set(AUDIO_PHRASES) - set(req.audio):
            assert not any(phrase in text for phrase in AUDIO_PHRASES[track]), track
    same = [s for s in text.split(". ") if re.search(r"\b(same|consistent)\b", s)]
    assert bool(same) == bool(req.consistency)
    if "object" in req.consistency:
        assert scenario.object_noun in same[0]


def test_every_requirement_is_stated_in_the_request():
    for task in SAMPLE:
        _stated(task)


def test_dimensions_bias_the_template():
    for task in SAMPLE:
        req, dim = task.requirements, task.dimension
        if dim is None:
            continue
        if dim.endswith("_consistency"):
            assert dim.removesuffix("_consistency") in req.consistency
        if dim in ("variety", "visual_amount") and req.modality == "image":
            assert req.amount >= 2
        if dim in ("video_duration", "visual_amount") and req.modality == "video":
            assert req.duration is not None
        if dim in ("video_storyboard", "visual_amount") and req.modality == "video":
            assert req.shots is not None


def test_unsupported_dimensions_are_refused():
    assert not SCENARIOS["icon"].supports("video_duration")
    assert not SCENARIOS["game_video"].supports("object_consistency")
    with pytest.raises(ConfigError, match="cannot probe dimension 'video_storyboard'"):
        SCENARIOS["logo"].make(0, "video_storyboard")
    with pytest.raises(ConfigError, match="dimension 'taste' must be None or one of"):
        SCENARIOS["logo"].make(0, "taste")
    with pytest.raises(ConfigError, match=r"seed \(-3\)"):
        SCENARIOS["logo"].make(-3)


def test_scenarios_validate_their_pools():
    base = SCENARIOS["game_video"]
    with pytest.raises(ConfigError, match="needs a workflow that generates images"):
        type(base)(**{**base.__dict__, "name": "x", "consistency": ("object",)})
    with pytest.raises(ConfigError, match=r"audio .* must use only \('music', 'sfx'\)"):
        type(base)(**{**base.__dict__, "name": "x", "audio": (("voiceover",),)})
    with pytest.raises(ConfigError, match="no shot count in"):
        type(base)(**{**base.__dict__, "name": "x", "durations": (15,)})
    icon = SCENARIOS["icon"]
    with pytest.raises(ConfigError, match="must state the amount"):
        type(icon)(**{**icon.__dict__, "name": "x", "openings": ("Draw icons.",)})


def test_vocabulary_is_unambiguous():
    """Content and style words never hold digits or another category's phrase."""
    categories = collections.defaultdict(set)
    for scenario in SCENARIOS.values():
        categories["subject"] |= set(scenario.subjects)
        categories["setting"] |= set(scenario.settings)
        categories["style"] |= {s for s in scenario.styles if s}
    for name, phrases in categories.items():
        for phrase in phrases:
            assert not re.search(r"\d", phrase), phrase
            for other, others in categories.items():
                if other != name:
                    assert not any(re.search(rf"\b{re.escape(phrase)}\b", o) for o in others), (phrase, other)


# --- workflows and plans ---------------------------------------------------------------------


def _fake_ids(calls, call) -> dict:
    """The call's arguments with artifact refs replaced by ids of the right kind."""
    args = dict(call.arguments)
    spec = DEFAULT_TOOLS[call.tool]
    for inp in spec.inputs:
        if inp.argument not in call.refs:
            continue
        ids = []
        for index, output in call.refs[inp.argument]:
            source = calls[index]
            kind = DEFAULT_TOOLS[source.tool].output.kind
            outputs = range(source.media_outputs) if output is None else [output]
            ids += [f"{FAKE_PREFIX[kind]}_{index:06d}{j:06d}" for j in outputs]
        args[inp.argument] = ids if inp.many else ids[0]
        assert inp.many or len(ids) == 1
    return args


def _ancestors(calls, index) -> set[int]:
    seen, todo = set(), [index]
    while todo:
        for entries in calls[todo.pop()].refs.values():
            for source, _ in entries:
                if source not in seen:
                    seen.add(source)
                    todo.append(source)
    return seen


def _check_plan(task: Task) -> None:
    req = task.requirements
    calls = WORKFLOWS[task.workflow].instantiate(task)
    assert 2 <= len(calls) <= 25
    assert [c.index for c in calls] == list(range(len(calls)))
    for call in calls:
        spec = DEFAULT_TOOLS[call.tool]
        assert not spec.validate(_fake_ids(calls, call)), (task.task_id, call)
        kinds = {inp.argument: inp.kinds for inp in spec.inputs}
        for argument, entries in call.refs.items():
            for index, output in entries:
                assert index < call.index
                assert DEFAULT_TOOLS[calls[index].tool].output.kind in kinds[argument]
                assert output is None or 0 <= output < calls[index].media_outputs
        if spec.group in ("text2image", "image_edit", "video_generation"):
            assert all(k in call.arguments["prompt"] for k in req.keywords)
            assert req.style is None or req.style in call.arguments["prompt"]
        if "aspect_ratio" in call.arguments:
            assert call.arguments["aspect_ratio"] == req.aspect_ratio
    media = [c for c in calls if c.media_outputs]
    delivered = [c for c in calls if c.deliver]
    tools = [c.tool for c in calls]
    if req.modality == "image":
        assert sum(c.media_outputs for c in delivered) == req.amount
        assert all(DEFAULT_TOOLS[c.tool].output.kind == "image" for c in delivered)
        assert not any(DEFAULT_TOOLS[t].group in ("video_generation", "audio") for t in tools)
    else:
        assert delivered == [media[-1]] and DEFAULT_TOOLS[media[-1].tool].output.kind == "video"
        clips = [c for c in calls if DEFAULT_TOOLS[c.tool].group == "video_generation"]
        if clips:
            count, seconds = len(clips), sum(c.arguments["duration"] for c in clips)
        else:
            (show,) = [c for c in calls if c.tool == "tool_video_auto_pipeline"]
            count = len(_fake_ids(calls, show)["images"])
            seconds = count * show.arguments["duration_per_image"]
        assert req.shots is None or count == req.shots
        assert req.duration_ok(seconds), (task.task_id, seconds)
        assert {c.index for c in clips} <= _ancestors(calls, media[-1].index)
        assert ("tool_music_suno" in tools) == ("music" in req.audio)
        assert ("tool_tts_composite" in tools) == ("voiceover" in req.audio)
        assert ("tool_sound_fx_gen" in tools) == ("sfx" in req.audio)
        for track_tool in ("tool_music_suno", "tool_sound_fx_gen", "tool_tts_composite"):
            for call in calls:
                if call.tool == track_tool:  # every audio track reaches the answer
                    assert call.index in _ancestors(calls, media[-1].index) | {media[-1].index}
    if req.consistency:
        generated = [c for c in calls if DEFAULT_TOOLS[c.tool].group == "text2image"]
        for call in generated[1:]:
            assert (generated[0].index, None) in call.refs["reference_images"]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_plans_meet_every_requirement(name):
    for task in (t for t in SAMPLE if t.scenario == name):
        _check_plan(task)


def test_plans_for_the_benchmark_meet_every_requirement():
    for task in visgenbench(seed=5)[::7]:
        _check_plan(task)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(SCENARIOS)), st.integers(0, 2**31 - 1))
def test_plans_meet_requirements_for_any_seed(name, seed):
    _check_plan(SCENARIOS[name].make(seed))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([w for w in WORKFLOWS.values() if w.modality == "video"]),
       st.one_of(st.none(), st.integers(8, 60)), st.one_of(st.none(), st.integers(1, 12)))
def test_requested_video_lengths_are_met_as_closely_as_the_clip_tools_allow(workflow, seconds, shots):
    timeline = plan_timeline(workflow, seconds, shots)
    assert shots is None or timeline.shots == shots
    if seconds is None:
        assert timeline.shots == (shots or DEFAULT_SHOTS)
    elif shots is None:
        assert timeline.shots <= MAX_CHOSEN_SHOTS
        assert abs(timeline.total - seconds) <= max(0.1 * seconds, 2)
    else:  # both given: the closest total any single clip tool of the step can reach, found by brute force
        clip_tools = {t for step in workflow.steps for t in step.tools
                      if DEFAULT_TOOLS[t].group == "video_generation" or t == "tool_video_auto_pipeline"}
        reachable = set()
        for tool in clip_tools:
            schema = DEFAULT_TOOLS[tool].parameters["properties"].get("duration" if tool != "tool_video_auto_pipeline"
                                                               else "duration_per_image", {})
            if "enum" in schema:
                reachable |= {sum(c) for c in itertools.combinations_with_replacement(schema["enum"], shots)}
            else:
                reachable.add(seconds if schema["minimum"] * shots <= seconds <= schema["maximum"] * shots
                              else timeline.total)
        best = min(abs(total - seconds) for total in reachable)
        assert abs(timeline.total - seconds) <= best + 0.01  # slides are rounded to milliseconds


def test_plan_timeline_uses_the_tools_clip_lengths():
    product = WORKFLOWS["product_video"]
    assert plan_timeline(product, 30, 4).clips == (10.0, 10.0, 5.0, 5.0)
    assert plan_timeline(product, 24, 4) == plan_timeline(product, 24, 4)
    assert plan_timeline(product, 24, 4).tool == "tool_image2video_veo3"  # Kling cannot make 24 s
    assert plan_timeline(product, 24, 4).total == 24
    assert plan_timeline(product, None, 3).clips == (5.0, 5.0, 5.0)  # Kling's default length
    assert plan_timeline(WORKFLOWS["explainer_video"], 45, 6).clips == (7.5,) * 6
    assert plan_timeline(WORKFLOWS["short_text2video"], 20, None).total == 20


def test_instantiate_refuses_the_other_modality():
    with pytest.raises(ConfigError, match="delivers image, but task .* asks for video"):
        WORKFLOWS["single_image"].instantiate(SCENARIOS["movie"].make(0))


def test_every_tool_of_every_workflow_can_be_planned():
    for workflow in WORKFLOWS.values():
        for step in workflow.steps:
            assert set(step.tools) <= PLANNABLE_TOOLS, (workflow.id, step.id)


@pytest.mark.parametrize("steps, message", [
    ((WorkflowStep("a", "tool_nope", (), "x"),), "unknown tool 'tool_nope'"),
    ((WorkflowStep("a", "tool_text2image_qwen", ("tool_image_edit_qwen",), "x"),), "is not in the group"),
    ((WorkflowStep("a", "tool_text2image_qwen", (), "x", inputs=("b",)),), "input 'b' is not an earlier step"),
    ((WorkflowStep("a", "tool_text2image_qwen", (), "x", repeat="shots"),),
     "repeat 'shots' must be None or 'amount'"),
    ((WorkflowStep("a", "tool_text2image_qwen", (), "x"),) * 2, "step id 'a' is used twice"),
    ((WorkflowStep("a", "tool_text2image_qwen", (), "x", when="song"),), "when 'song' must be one of"),
    ((WorkflowStep("a", "tool_text2image_qwen", (), "x"),
      WorkflowStep("b", "tool_music_suno", (), "x", inputs=("a",))), "takes no image artifact"),
])
def test_workflows_validate_their_steps(steps, message):
    with pytest.raises(ConfigError, match=message):
        Workflow("w", "W", "test", "image", steps)


# --- suites and the benchmark ----------------------------------------------------------------


def test_make_suite_cycles_through_every_scenario():
    tasks = make_suite(100, seed=3)
    first = [t.scenario for t in tasks[:42]]
    assert sorted(first) == sorted(SCENARIOS)
    assert first[0::2] == list(IMAGE_SCENARIOS) and first[1::2] == list(VIDEO_SCENARIOS)
    assert len({t.seed for t in tasks}) == 100
    assert make_suite(100, seed=3) == tasks and make_suite(100, seed=4) != tasks
    assert {t.scenario for t in make_suite(30, 0, modality="video")} <= set(VIDEO_SCENARIOS)
    assert [t.scenario for t in make_suite(4, 0, scenarios=["logo", "movie"])] == ["logo", "movie"] * 2
    assert make_suite(0, 0) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=-1), r"n \(-1\)"),
    (dict(modality="audio"), r"modality \('audio'\)"),
    (dict(scenarios=["poster"]), r"No scenario named 'poster'"),
    (dict(scenarios=["logo"], modality="video"), "no scenario is left"),
])
def test_make_suite_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_suite(**{"n": 5, "seed": 0, **kwargs})


def test_visgenbench_has_the_papers_composition():
    bench = visgenbench()
    assert len(bench) == 1200
    modality = collections.Counter(t.requirements.modality for t in bench)
    assert modality == {"image": 400, "video": 800}
    counts = collections.Counter((t.dimension, t.requirements.modality) for t in bench)
    for dimension, (image, video) in BENCH_DIMENSIONS.items():
        assert counts[(dimension, "image")] == image and counts[(dimension, "video")] == video
    assert tuple(BENCH_DIMENSIONS) == DIMENSIONS
    assert len({t.seed for t in bench}) == len({t.task_id for t in bench}) == 1200


def test_visgenbench_spreads_scenarios_evenly_and_is_deterministic():
    bench = visgenbench(seed=1)
    assert bench == visgenbench(seed=1) and bench != visgenbench(seed=2)
    for dimension, counts in BENCH_DIMENSIONS.items():
        for modality, count in zip(("image", "video"), counts):
            if not count:
                continue
            eligible = {s.name for s in SCENARIOS.values()
                        if s.modality == modality and s.supports(dimension)}
            spread = collections.Counter(t.scenario for t in bench
                                         if t.dimension == dimension and t.requirements.modality == modality)
            assert set(spread) == eligible
            assert max(spread.values()) - min(spread.values()) <= 1


def test_split_suite_holds_out_whole_seeds():
    tasks = make_suite(200, seed=0)
    train, held = split_suite(tasks, 0.25, seed=7)
    assert len(held) == 50 and len(train) == 150
    assert not {t.seed for t in train} & {t.seed for t in held}
    assert split_suite(tasks, 0.25, seed=7) == (train, held)
    assert split_suite(tasks, 0.25, seed=8) != (train, held)
    assert [t for t in tasks if t in held] == held
    bench = visgenbench()
    doubled = bench + [SCENARIOS[t.scenario].make(t.seed) for t in bench[:100]]
    train, held = split_suite(doubled, 0.5, seed=0)
    assert not {t.seed for t in train} & {t.seed for t in held}
    with pytest.raises(ConfigError, match=r"held_out_fraction \(1.5\)"):
        split_suite(tasks, 1.5, seed=0)


# --- JSONL -----------------------------------------------------------------------------------


def test_jsonl_round_trip_is_exact(tmp_path):
    tasks = visgenbench()[::10] + make_suite(42, seed=9)
    path = tmp_path / "tasks.jsonl"
    save_tasks(tasks, path)
    assert load_tasks(path) == tasks
    assert len(path.read_text().splitlines()) == len(tasks)


def test_blank_lines_are_ignored(tmp_path):
    tasks = make_suite(3, seed=0)
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n" + "\n\n".join(json.dumps(t.to_dict()) for t in tasks) + "\n   \n")
    assert load_tasks(path) == tasks


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", r"line 2: not valid JSON \(Expecting property name"),
    ("[1, 2]", r"line 2: a task must be a JSON object, got list"),
    (json.dumps({"task_id": "x"}), r"line 2: field 'requirements' must be an object"),
    ("DUPLICATE", r"line 2: task_id '.*' already appears on line 1"),
    ("BAD_AMOUNT", r"line 2: Requirements.amount \(0\)"),
    ("MISSING_SEED", r"line 2: missing task field\(s\) \['seed'\]"),
])
def test_malformed_lines_name_the_line(tmp_path, bad_line, message):
    good = make_suite(2, seed=0)
    first = good[0].to_dict()
    if bad_line == "DUPLICATE":
        bad_line = json.dumps(first)
    elif bad_line == "BAD_AMOUNT":
        data = good[1].to_dict()
        data["requirements"]["amount"] = 0
        bad_line = json.dumps(data)
    elif bad_line == "MISSING_SEED":
        data = good[1].to_dict()
        del data["seed"]
        bad_line = json.dumps(data)
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(first) + "\n" + bad_line + "\n")
    with pytest.raises(TaskFormatError, match=message) as info:
        load_tasks(path)
    assert str(path) in str(info.value)



def test_a_small_default_suite_covers_both_modalities():
    tasks = make_suite(12, seed=0)
    modalities = [SCENARIOS[t.scenario].modality for t in tasks]
    assert modalities.count("image") == 6 and modalities.count("video") == 6
    assert len({t.scenario for t in tasks}) == 12
    assert {t.scenario for t in make_suite(42, seed=1)} == set(SCENARIOS)
