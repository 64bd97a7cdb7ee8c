"""A configurable tool set: a user's own tools played through the env, subsets, and build-time checks."""

from __future__ import annotations

import math
import pickle

import pytest

from visenv.envs.visgen import VisGenEnv
from visenv.error import ConfigError, UnknownToolError
from visenv.protocol import format_turn, parse_tool_response
from visenv.tasks import WORKFLOWS, make_suite
from visenv.tools.backends import ToolFailure
from visenv.tools.spec import CostModel, OutputSpec, ToolSpec
from visenv.tools.specs import DEFAULT_TOOLS, ToolSet, make_tool_set

STICKER_SIDE = 512


def sticker_rule(request):
    """The sticker tool's own attribute rule: ``n`` square stickers, or a refusal for a blank motif."""
    if request.arguments["prompt"].strip() == "blank":
        return ToolFailure("tool_sticker_gen: a sticker needs a motif; describe what it shows.", backend="attribute")
    return [{"width": STICKER_SIDE, "height": STICKER_SIDE}] * request.arguments.get("n", 1), "Stickers are die-cut."


def caption_simulator(request, rng):
    """The caption tool's text simulator."""
    return f"Caption for {request.arguments['image']}: {rng.choice(['bold', 'playful'])} and short."


STICKER = ToolSpec(
    name="tool_sticker_gen", group="text2image",
    description="Generate die-cut stickers from a text prompt.",
    parameters={"type": "object", "additionalProperties": False, "required": ["prompt"],
                "properties": {"prompt": {"type": "string", "minLength": 1},
                               "n": {"type": "integer", "minimum": 1, "maximum": 2, "default": 1}}},
    inputs=(), output=OutputSpec("image", sticker_rule, max_count=2), cost=CostModel("image", 2.0, 3.0))
CAPTION = ToolSpec(
    name="tool_caption_writer", group="text", description="Write a caption for an image.",
    parameters={"type": "object", "additionalProperties": False, "required": ["image"],
                "properties": {"image": {"type": "string"}}},
    inputs=(), output=OutputSpec("text", caption_simulator), cost=CostModel("call", 1.0, 1.0))
CONSISTENT = next(t for t in make_suite(42, 0, modality="image") if t.requirements.consistency)


def call(name, **arguments):
    return format_turn(think="t", tool_call={"name": name, "arguments": arguments})


@pytest.fixture(scope="module")
def custom_env():
    return VisGenEnv(tasks=[CONSISTENT], tools=[*DEFAULT_TOOLS, STICKER, CAPTION])


def test_a_custom_tool_plays_through_step_valid_invalid_and_refused(custom_env):
    env = custom_env
    assert len(env.tools) == len(DEFAULT_TOOLS) + 2 and list(env.tools)[-2:] == [STICKER.name, CAPTION.name]
    assert '"name": "tool_sticker_gen"' in env.system_prompt and STICKER.description in env.system_prompt
    env.reset(seed=0)
    obs, reward, terminated, _, info = env.step(call("tool_sticker_gen", prompt="a fox", n=2))
    response = parse_tool_response(obs["text"])
    assert response["status"] == "ok" and not terminated and reward == 0.0
    assert info["tool_result"]["backend"] == "attribute" and info["tool_result"]["text"] == "Stickers are die-cut."
    stickers = info["tool_result"]["outputs"]
    assert len(stickers) == 2 and all(a["kind"] == "image" for a in response["artifacts"])
    assert {(a["width"], a["height"]) for a in info["artifacts"]} == {(STICKER_SIDE, STICKER_SIDE)}
    assert info["cost"]["gpu_seconds"] == 4.0  # two images at 2 GPU-seconds each

    obs, reward, *_ , info = env.step(call("tool_sticker_gen", prompt="a fox", n=3))
    assert info["tool_result"]["error_kind"] == "bad_arguments" and "n: 3 is greater than the maximum of 2" in obs["text"]
    assert reward == -env.config.error_penalty
    obs, *_, info = env.step(call("tool_sticker_gen", prompt="blank"))
    assert info["tool_result"]["error_kind"] == "tool_failure" and "needs a motif" in obs["text"]
    obs, *_, info = env.step(call("tool_caption_writer", image=stickers[0]))
    assert info["tool_result"]["status"] == "ok" and info["tool_result"]["text"].startswith(f"Caption for {stickers[0]}")

    _, reward, terminated, _, info = env.step(format_turn(answer=" ".join(stickers)))
    assert terminated and info["deliverables"] == stickers and math.isfinite(reward)
    assert info["reward_components"]["R_cons"] == 0.0  # the second sticker call passed no reference


def test_removed_tools_are_unknown_and_missing_workflow_tools_are_named():
    kept = ["tool_prompt_refine", "tool_text2image_qwen", "tool_image_analysis"]
    with pytest.warns(UserWarning, match=r"image_edit_variants \(step 'variants' needs one of \['tool_image_edit_gemini'"):
        env = VisGenEnv(tasks="image", num_tasks=21, tools=kept)
    assert list(env.tools) == kept and "tool_image_edit_qwen" not in env.system_prompt
    env.reset(seed=0)
    obs, reward, *_, info = env.step(call("tool_image_edit_qwen", image="img_000000000001", prompt="x"))
    assert info["tool_result"]["error_kind"] == "unknown_tool" and reward == -env.config.error_penalty
    assert "There is no tool named 'tool_image_edit_qwen'" in parse_tool_response(obs["text"])["error"]
    *_, info = env.step(call("tool_text2image_qwen", prompt="a cat"))
    assert info["tool_result"]["status"] == "ok"
    assert [s.id for s in WORKFLOWS["single_image"].unavailable_steps(env.tools)] == []
    assert [s.id for s in WORKFLOWS["stylization"].unavailable_steps(env.tools)] == ["restyle"]


def test_a_subset_whose_workflows_are_all_playable_does_not_warn(recwarn):
    VisGenEnv(tasks=[t for t in make_suite(42, 0, modality="image") if t.workflow == "single_image"],
              tools=["tool_prompt_refine", "tool_text2image_qwen"])
    assert not [w for w in recwarn if "reference workflows" in str(w.message)]


@pytest.mark.parametrize("tools, error, match", [
    ([*DEFAULT_TOOLS, DEFAULT_TOOLS["tool_text2image_qwen"]], ConfigError, "names 'tool_text2image_qwen' twice"),
    ([ToolSpec("tool_echo", "text", "Echo.", {"type": "object"}, (), OutputSpec("text", "text"),
               CostModel("call", 0, 0))], ConfigError, "tool_echo makes text, so its output.derive must be its text"),
    ([ToolSpec("tool_sparkle", "text2image", "Sparkle.", {"type": "object"}, (), OutputSpec("image", "sparkle"),
               CostModel("call", 0, 0))], ConfigError, "output.derive 'sparkle' is not a rule of the attribute tier"),
    (["tool_image_edit_qwen"], ConfigError,
     r"tool_image_edit_qwen needs an artifact of kind image \(argument 'image'\), but no sequence of calls of the set makes one"),
    (["tool_text2image_qwen", "tool_video_composite"], ConfigError, r"kind video \(argument 'clips'\).*it can make \['image'\]"),
    (["tool_text2image_qwn"], UnknownToolError, "Did you mean tool_text2image_qwen"),
    (["tool_prompt_refine", {"name": "tool_mine"}], ConfigError, "A tool set holds ToolSpec objects"),
    ("tool_text2image_qwen", ConfigError, r"tools \('tool_text2image_qwen'\) must be None, a ToolSet, or a list"),
    ([], ConfigError, "The tool set is empty"),
])
def test_a_bad_tool_set_is_refused_at_env_construction(tools, error, match):
    with pytest.raises(error, match=match):
        VisGenEnv(tasks="image", num_tasks=21, tools=tools)


def test_backends_may_only_name_tools_of_the_set():
    with pytest.raises(ConfigError, match="backends key 'tool_image_edit_qwen' must be"):
        VisGenEnv(tools=["tool_text2image_qwen"], backends={"tool_image_edit_qwen": []})


def test_tool_sets_pickle_and_the_default_set_by_reference(custom_env):
    assert pickle.loads(pickle.dumps(DEFAULT_TOOLS)) is DEFAULT_TOOLS
    assert len(pickle.dumps(DEFAULT_TOOLS)) < 100
    clone = pickle.loads(pickle.dumps(custom_env))
    assert isinstance(clone.tools, ToolSet) and clone.tools == custom_env.tools
    assert clone.tools["tool_sticker_gen"].output.derive is sticker_rule
    assert make_tool_set(None) is DEFAULT_TOOLS and make_tool_set(custom_env.tools) is custom_env.tools
