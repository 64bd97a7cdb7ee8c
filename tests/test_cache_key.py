"""Exact-cache key normalisation: what counts as the same call."""

import dataclasses

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cache_fixtures import image_artifact, write_png
from visenv.tools.cache_key import (CallKey, canonical_json, nearest_eligible, normalise_arguments,
                                    normalise_value, query_text, shape_of)
from visenv.tools.specs import get_tool

T2I = get_tool("tool_text2image_qwen")


def digest(spec, arguments, seed=1, inputs=None):
    return CallKey.of(spec, arguments, inputs, seed).digest


def test_key_ignores_argument_order():
    a = {"prompt": "a red fox", "n": 2, "aspect_ratio": "16:9"}
    b = {"aspect_ratio": "16:9", "n": 2, "prompt": "a red fox"}
    assert digest(T2I, a) == digest(T2I, b)


def test_key_collapses_whitespace_and_normalises_unicode():
    assert digest(T2I, {"prompt": "  a  red\n\tfox "}) == digest(T2I, {"prompt": "a red fox"})
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert digest(T2I, {"prompt": composed}) == digest(T2I, {"prompt": decomposed})
    assert digest(T2I, {"prompt": "a red fox"}) != digest(T2I, {"prompt": "a red fox."})


def test_key_fills_schema_defaults():
    assert digest(T2I, {"prompt": "fox"}) == digest(T2I, {"prompt": "fox", "n": 1, "aspect_ratio": "1:1"})
    assert digest(T2I, {"prompt": "fox"}) != digest(T2I, {"prompt": "fox", "n": 2})


def test_key_formats_floats_canonically():
    speed = get_tool("tool_video_speed_adjust")
    clip = {"video": ("sha256:" + "a" * 64)}
    assert digest(speed, {**clip, "speed": 0.1 + 0.2}) == digest(speed, {**clip, "speed": 0.3})
    assert digest(speed, {**clip, "speed": 2.0}) == digest(speed, {**clip, "speed": 2})
    assert digest(speed, {**clip, "speed": 1.5}) != digest(speed, {**clip, "speed": 1.50001})
    assert normalise_value(1e-7) == 1e-7
    assert normalise_value(True) is True and normalise_value(1) == 1
    assert canonical_json(normalise_value([True, 1, 1.0])) == "[true,1,1]"
    with pytest.raises(ValueError, match="nan"):
        normalise_value(float("nan"))


def test_key_replaces_artifact_ids_by_content_hashes(tmp_path):
    edit = get_tool("tool_image_edit_qwen")
    first = write_png(tmp_path, "a.png", seed=1)
    other = write_png(tmp_path, "b.png", seed=2)
    same_content_other_id = image_artifact(first, "img_000000000002")
    args = {"image": "img_000000000001", "prompt": "night"}
    key_a = digest(edit, args, inputs={"image": (image_artifact(first, "img_000000000001"),)})
    key_b = digest(edit, {**args, "image": "img_000000000002"}, inputs={"image": (same_content_other_id,)})
    key_c = digest(edit, args, inputs={"image": (image_artifact(other, "img_000000000001"),)})
    assert key_a == key_b != key_c
    normalised = normalise_arguments(edit, args, {"image": (same_content_other_id,)})
    assert normalised["image"] == "sha256:" + same_content_other_id.sha256
    with pytest.raises(ValueError, match="was not resolved"):
        normalise_arguments(edit, args, {})


def test_key_keeps_the_order_of_artifact_lists():
    composite = get_tool("tool_video_composite")
    one, two = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    assert digest(composite, {"clips": [one, two]}) != digest(composite, {"clips": [two, one]})


def test_key_depends_on_seed_and_tool_version():
    base = digest(T2I, {"prompt": "fox"}, seed=1)
    assert base != digest(T2I, {"prompt": "fox"}, seed=2)
    assert base != digest(T2I, {"prompt": "fox"}, seed=None)
    assert base != digest(dataclasses.replace(T2I, version=2), {"prompt": "fox"}, seed=1)
    assert base != digest(get_tool("tool_text2image_gpt"), {"prompt": "fox"}, seed=1)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12)


@given(json_values)
@example(value=100000000000.5)  # rounds to an integral float: must become the integer, as 1e11 does
def test_normalisation_is_idempotent(value):
    once = normalise_value(value)
    assert canonical_json(normalise_value(once)) == canonical_json(once)


@given(st.dictionaries(st.sampled_from(["prompt", "style", "n", "aspect_ratio"]), st.text(min_size=1, max_size=8),
                       min_size=1), st.randoms())
def test_key_is_invariant_under_key_permutation(arguments, rng):
    items = list(arguments.items())
    rng.shuffle(items)
    assert digest(T2I, dict(items)) == digest(T2I, arguments)


def test_query_text_and_shape():
    args = normalise_arguments(T2I, {"prompt": "a fox", "style": "watercolour", "n": 2})
    assert query_text(T2I, args) == "a fox\nstyle: watercolour"
    assert shape_of(T2I, args) == shape_of(T2I, {**args, "prompt": "a cat", "style": "oil"})
    assert shape_of(T2I, args) != shape_of(T2I, {**args, "n": 1})
    assert shape_of(T2I, args) != shape_of(T2I, {**args, "aspect_ratio": "16:9"})


def test_nearest_eligibility():
    assert nearest_eligible(T2I, {"prompt": "fox"})
    assert not nearest_eligible(T2I, {"prompt": "fox", "reference_images": ["img_1"]})
    assert not nearest_eligible(get_tool("tool_image_edit_qwen"), {"image": "img_1", "prompt": "x"})
    assert not nearest_eligible(get_tool("tool_task_manager"), {"action": "list"})
    assert nearest_eligible(get_tool("tool_prompt_refine"), {"prompt": "fox"})
