"""Property-based fuzzing of every tool through the environment, with each backend chain.

Calls are generated from each tool's own JSON Schema (valid values, and the episode's artifact ids
for artifact arguments), then made hostile: one argument replaced by an integral float, a huge
integer, a float at the edge of the double range, an empty, blank, oversized or odd string, a
nested value, a wrong type; extra or missing arguments; overflowing number literals (``1e999``)
and deep nesting in the JSON text itself; and turns that answer or are not turns at all. Every
step must return normally, with an observation inside the observation space and an info dict
that is strict JSON; a refused call costs the error penalty.

The chains: the attribute tier alone; the exact cache in front of a real callable backend that
records into it (repeated calls are cache hits); exact cache, nearest neighbour (MiniLM) and the
attribute tier over a cache the real chain filled; and the real callable backend alone in front
of the attribute tier.

Run it big once (figures in the report of the hardening change)::

    VISENV_FUZZ_EXAMPLES=6000 VISENV_FUZZ_REPORT=fuzz.json python -m pytest -q tests/test_fuzz_tools.py

``VISENV_FUZZ_EXAMPLES`` is the number of examples per chain (each makes 1-4 calls);
``VISENV_FUZZ_REPORT`` writes the counts (calls, tools, answering backends, statuses) as JSON.
"""

from __future__ import annotations

import collections
import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_fixtures import png_bytes, wav_bytes
from visenv.envs.visgen import VisGenEnv
from visenv.protocol import MAX_JSON_DEPTH
from visenv.tasks import make_suite
from visenv.tools.attribute import AttributeBackend
from visenv.tools.backends import BackendChain
from visenv.tools.cache import ExactCacheBackend, ToolCache
from visenv.tools.nearest import MiniLMEmbedder, NearestBackend
from visenv.tools.real import GeneratedMedia, Generation, RealBackend
from visenv.tools.specs import TOOLS

EXAMPLES = int(os.environ.get("VISENV_FUZZ_EXAMPLES", "25"))
CHAINS = ("attribute", "exact_cache", "nearest", "real")
PENALTY = 0.05
COUNTS: collections.Counter = collections.Counter()
SETUP = ('<tool_call>{"name": "tool_text2image_qwen", "arguments": {"prompt": "a red fox", "n": 2, "aspect_ratio": "16:9"}}</tool_call>',
         '<tool_call>{"name": "tool_text2image_gpt", "arguments": {"prompt": "a tall tower", "aspect_ratio": "9:16"}}</tool_call>',
         '<tool_call>{"name": "tool_text2video_veo", "arguments": {"prompt": "waves", "duration": 6}}</tool_call>',
         '<tool_call>{"name": "tool_text2video_veo", "arguments": {"prompt": "a city", "aspect_ratio": "9:16"}}</tool_call>',
         '<tool_call>{"name": "tool_music_suno", "arguments": {"prompt": "calm piano", "duration": 12}}</tool_call>')


def fuzz_generator(request):
    """A real callable tool for every image, audio and text tool (video passes to the next tier)."""
    kind = request.spec.output.kind
    if kind == "image":
        return Generation(media=tuple(GeneratedMedia(png_bytes(request.seed % 2**32 + i), ".png")
                                      for i in range(request.arguments.get("n", 1))))
    if kind == "audio":
        return Generation(media=(GeneratedMedia(wav_bytes(1 + request.seed % 3, rate=4000), ".wav"),))
    if kind == "text":
        return Generation(text=f"{request.spec.name} answers {json.dumps(request.arguments, sort_keys=True)[:200]}")
    return None


@pytest.fixture(scope="module")
def envs(tmp_path_factory, media_db):
    cache = ToolCache(tmp_path_factory.mktemp("fuzz") / "cache")
    attribute = AttributeBackend(media_db)
    recorder = RealBackend(fuzz_generator, cache=cache)
    chains = {
        "attribute": [attribute],
        "exact_cache": [ExactCacheBackend(cache), recorder, attribute],
        "nearest": [ExactCacheBackend(cache), NearestBackend(cache, threshold=0.5, embedder=MiniLMEmbedder()),
                    attribute],
        "real": [RealBackend(fuzz_generator, media_dir=tmp_path_factory.mktemp("real")), attribute],
    }
    tasks = make_suite(4, 0)
    made = {}
    for name, chain in chains.items():
        env = VisGenEnv(tasks=tasks, backends={"*": BackendChain(chain)}, error_penalty=PENALTY, max_turns=40)
        made[name] = {"env": env, "open": False, "episodes": 0}
    yield made
    report = os.environ.get("VISENV_FUZZ_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump(summary(COUNTS), f, indent=1, sort_keys=True)


def summary(counts: collections.Counter) -> dict:
    grouped: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (group, key), n in counts.items():
        grouped[group][key] = n
    return {"calls": sum(grouped["tool"].values()), "steps": sum(grouped["chain"].values()), **grouped}


def _open_episode(state) -> None:
    """Reset and make images of both orientations, videos and audio for artifact arguments."""
    env = state["env"]
    env.reset(seed=state["episodes"] % 4)
    state["episodes"] += 1
    for turn in SETUP:
        _, _, terminated, truncated, info = env.step(turn)
        assert info["tool_result"]["status"] == "ok" and not (terminated or truncated), info
    state["open"] = True


# --- values -----------------------------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8"), max_size=24)
_FLOATS = st.floats(allow_nan=False, allow_infinity=False)
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), _FLOATS, _TEXT)
HOSTILE = st.one_of(
    st.integers(-3, 40).map(float),  # integral floats
    st.sampled_from([10**400, -10**400, 2**1024, 2**63, -1, 0]),  # huge and edge integers
    st.sampled_from([1e308, -1e308, 5e-324, 1e-300, 0.5, -0.0]),  # edges of the double range
    st.sampled_from(["", " ", "   ", "\t\n", "\u3000", "\u200b", "\ufeff", "<tool_call>", "</tool_call>",
                     "Shot 1 (" + "9" * 400 + " s): x", "Shot 1:", ".", "..."]),  # empty and blank
    st.integers(4001, 25000).map(lambda n: "x " * (n // 2)),  # oversized text
    st.integers(61, 200).map(lambda n: ["img_000000000000"] * n),  # oversized lists
    st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
                 max_leaves=8),  # nested values
    _SCALARS,
)


def schema_values(schema, ids_for, argument):
    """Values that satisfy one argument's JSON Schema (artifact arguments: ids from the episode)."""
    kind = schema.get("type")
    if argument in ids_for:  # an index, not a sampled id, so that what is drawn never depends on the episode
        ids = st.integers(0, 63).map(lambda i: ids_for[argument][i % len(ids_for[argument])])
        if kind == "array":
            return st.lists(ids, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
        return ids
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if kind == "string":
        return st.text(st.characters(codec="utf-8"), min_size=schema.get("minLength", 0),
                       max_size=min(schema.get("maxLength", 40), 40))
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return st.floats(low, schema.get("maximum"), exclude_min="exclusiveMinimum" in schema,
                         allow_nan=False, allow_infinity=False) | st.integers(math.ceil(low or 0), 50)
    if kind == "array":
        return st.lists(schema_values(schema["items"], {}, ""), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 4), 4))
    raise AssertionError(f"the fuzzer has no strategy for {schema}")


@st.composite
def arguments_for(draw, spec, ids_for):
    """Schema-valid arguments of ``spec``, then (mostly) made hostile."""
    properties = spec.parameters["properties"]
    required = spec.parameters["required"]
    arguments = {}
    for name, schema in properties.items():
        if name in required or draw(st.booleans()):
            arguments[name] = draw(schema_values(schema, ids_for, name))
    change = draw(st.sampled_from(["none", "none", "replace", "replace", "extra", "drop"]))
    if change == "replace":
        arguments[draw(st.sampled_from(sorted(properties)))] = draw(HOSTILE)
    elif change == "extra":
        arguments[draw(_TEXT)] = draw(HOSTILE)
    elif change == "drop" and required:
        arguments.pop(draw(st.sampled_from(required)))
    return arguments


def _deep(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


@st.composite
def turns(draw, ids_for, all_ids):
    """One model turn: mostly a tool call, sometimes raw hostile JSON, an answer, or no action."""
    name = draw(st.sampled_from(sorted(TOOLS)))
    shape = draw(st.sampled_from(["call"] * 8 + ["literal", "deep", "string_arguments", "answer", "prose"]))
    if shape == "answer":
        cited = [all_ids[i % len(all_ids)] for i in draw(st.lists(st.integers(0, 63), max_size=3))]
        return None, f"<answer>Delivered: {' '.join(cited) or draw(_TEXT)}</answer>"
    if shape == "prose":
        return None, draw(st.text(max_size=60))
    arguments = draw(arguments_for(TOOLS[name], ids_for))
    if shape == "literal":  # number literals JSON cannot hold in a double, written by the model
        key = draw(st.sampled_from(sorted(TOOLS[name].parameters["properties"])))
        literal = draw(st.sampled_from(["1e999", "-1e999", "1" + "0" * 400, "1.0e308", "1E+999"]))
        body = json.dumps({k: v for k, v in arguments.items() if k != key})[:-1]
        body = (body + ", " if len(body) > 1 else "{") + f'"{key}": {literal}}}'
        return name, f'<tool_call>{{"name": "{name}", "arguments": {body}}}</tool_call>'
    if shape == "deep":
        depth = draw(st.integers(MAX_JSON_DEPTH - 2, 200))
        return name, f'<tool_call>{{"name": "{name}", "arguments": {{"prompt": {_deep(depth)}}}}}</tool_call>'
    text = json.dumps(arguments) if shape == "string_arguments" else arguments
    return name, "<tool_call>" + json.dumps({"name": name, "arguments": text}) + "</tool_call>"


def _ids_by_argument(env) -> tuple[dict[str, list[str]], list[str]]:
    by_kind = collections.defaultdict(list)
    for artifact in env.registry.all():
        by_kind[artifact.kind].append(artifact.id)
    everything = [i for ids in by_kind.values() for i in ids]
    ids_for = {}
    for spec in TOOLS.values():
        for inp in spec.inputs:
            ids_for[inp.argument] = [i for kind in inp.kinds for i in by_kind[kind]] + ["img_000000000000"]
    return ids_for, everything


def check_step(env, turn: str, chain: str) -> tuple[bool, dict]:
    """One step, with the properties every step must have; returns (episode over, info)."""
    obs, reward, terminated, truncated, info = env.step(turn)
    assert env.observation_space.contains(obs), obs
    json.dumps(info, allow_nan=False)
    result = info.get("tool_result")
    COUNTS["chain", chain] += 1
    if result is not None:
        COUNTS["tool", result["tool"]] += 1
        COUNTS["status", f"{result['status']}:{result['error_kind'] if 'error_kind' in result else 'ok'}"] += 1
        if result["status"] == "ok":
            COUNTS["backend", result["backend"]] += 1
        elif not (terminated or truncated):
            assert reward == -PENALTY and result["error"], result
    return terminated or truncated, info


@pytest.mark.parametrize("chain", CHAINS)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                         HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_tool_call_crashes_an_episode(envs, chain, data):
    state = envs[chain]
    env = state["env"]
    _open_episode(state)
    for _ in range(data.draw(st.integers(1, 4))):
        if not state["open"]:
            _open_episode(state)
        ids_for, everything = _ids_by_argument(env)
        _, turn = data.draw(turns(ids_for, everything))
        over, _ = check_step(env, turn, chain)
        state["open"] = not over


@pytest.mark.parametrize("chain", CHAINS)
def test_the_reported_crashes_are_answers_or_refusals(envs, chain):
    state = envs[chain]
    env = state["env"]
    _open_episode(state)
    ids_for, _ = _ids_by_argument(env)
    audio, video = ids_for["audio"][0], ids_for["video"][0]

    def step(name, arguments, raw=None):
        text = raw or "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"
        obs, reward, _, _, info = env.step(text)
        json.dumps(info, allow_nan=False)
        return obs["text"], reward, info.get("tool_result")

    _, reward, result = step("tool_text2image_qwen", {"prompt": "a fox", "n": 2.0})
    assert result["status"] == "ok" and len(result["outputs"]) == 2 and reward == 0.0
    assert json.loads(result["arguments"])["n"] == 2  # accepted as the integer it equals
    _, _, result = step("tool_video_shot_gen", {"topic": "a fox", "shots": 3.0})
    assert result["status"] == "ok" and json.loads(result["arguments"])["shots"] == 3
    for name, arguments in (("tool_search_content", {"query": "fox", "max_results": 2.0}),
                            ("tool_search_inspire", {"query": "fox", "n": 4.0}),
                            ("tool_image_edit_qwen", {"image": ids_for["image"][0], "prompt": "night", "n": 1.0})):
        assert step(name, arguments)[2]["status"] == "ok"
    for name, arguments, message in (
            ("tool_audio_edit_cut", {"audio": audio, "start": 10**400, "end": 1}, "an integer of 401 digits is too large"),
            ("tool_video_trim_edit", {"video": video, "start": 0, "end": -10**400}, "an integer of 401 digits is too large"),
            ("tool_script_storyboard_merge", {"script": "Hi.", "storyboard": " \n\t "}, "not only whitespace"),
            ("tool_text2image_qwen", {"prompt": "\u3000 "}, "prompt: must hold some text"),
            ("tool_text2image_qwen", {"prompt": "a fox", "n": 2.5}, "is not of type 'integer'")):
        text, reward, result = step(name, arguments)
        assert result["status"] == "error" and message in result["error"] and reward == -PENALTY, result
    text, reward, result = step("", {}, f'<tool_call>{{"name": "tool_audio_edit_cut", "arguments": '
                                        f'{{"audio": "{audio}", "start": 0, "end": 1e999}}}}</tool_call>')
    assert result is None and "1e999 is too large" in text and reward == -PENALTY
    text, reward, _ = step("", {}, f'<tool_call>{{"name": "tool_prompt_refine", "arguments": '
                                   f'{{"prompt": {_deep(MAX_JSON_DEPTH)}}}}}</tool_call>')
    assert f"more than {MAX_JSON_DEPTH} levels" in text and reward == -PENALTY
    text, _, result = step("tool_prompt_refine", {"prompt": "x" * 5000, "style": {"a": ["b" * 2000]}})
    assert result["status"] == "error" and len(result["error"]) < 1000, len(result["error"])


def test_validation_refuses_non_finite_numbers_anywhere():
    spec = TOOLS["tool_audio_edit_cut"]
    for bad in (math.nan, math.inf, -math.inf, 10**309, -10**5000):
        problems = spec.validate({"audio": "aud_0", "start": 0, "end": bad})
        assert problems and problems[0].startswith("end: "), problems
    assert spec.validate({"audio": "aud_0", "start": 0, "end": 1e308}) == []
    problems = TOOLS["tool_html_builder"].validate({"title": "t", "sections": ["a"] * 30 + [math.nan] * 30})
    assert len(problems) == 6 and problems[-1].startswith("and ") and "more problems" in problems[-1]
