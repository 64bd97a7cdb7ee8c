"""The default tools of the VisGen environment (PAPER.md section 2), and the tool set of an environment.

:data:`DEFAULT_TOOLS` is the paper's tool set; :class:`ToolSet` is any set an environment plays with
(``VisGenConfig(tools=...)``, built by :func:`make_tool_set`): a subset of the default tools and your
own :class:`~visenv.tools.spec.ToolSpec` s, each carrying its simulation (``output.derive``).

Argument schemas are ours (the papers do not publish them). Conventions shared by every tool:
``prompt`` is the generation prompt; artifact arguments (``image``, ``video``, ``audio``,
``clips``, ``images``, ``reference_images``) hold artifact ids such as ``"img_3f2a9c01d4e7"``;
durations are seconds. Cost figures are our estimates of the real tools' serving cost (a real video
model needs about 8 GPUs for about 30 s per clip, PAPER.md section 2).
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Callable, Iterable, Iterator, Mapping

import visenv.tools.simulated_text as simulate
from visenv.error import ConfigError, UnknownToolError
from visenv.resolutions import VIDEO_RESOLUTIONS, aspect_resolutions
from visenv.tools.attribute import DERIVE_RULES
from visenv.tools.spec import TEXT_PATTERN, ArtifactInput, CostModel, OutputSpec, ToolSpec

ASPECTS_SQUARE_FIRST = ("1:1", "16:9", "9:16", "4:3", "3:4")


def _id(kind_hint: str) -> dict[str, Any]:
    return {"type": "string", "description": f"id of a {kind_hint} artifact"}


def _ids(kind_hint: str, max_items: int, min_items: int = 1) -> dict[str, Any]:
    return {"type": "array", "items": _id(kind_hint), "minItems": min_items, "maxItems": max_items}


def _text(description: str, max_length: int = 4000) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_length, "pattern": TEXT_PATTERN,
            "description": description}


def _schema(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}


def _text2image(name: str, model: str, base: int, max_n: int, gpu_s: float, latency_s: float) -> ToolSpec:
    return ToolSpec(
        name=name, group="text2image",
        description=(f"Generate images from a text prompt with {model}. Pass reference_images to keep "
                     "an object, character, scene or style consistent with earlier images."),
        parameters=_schema(
            ["prompt"],
            prompt=_text("what the image shows"),
            n={"type": "integer", "minimum": 1, "maximum": max_n, "default": 1},
            aspect_ratio={"type": "string", "enum": list(ASPECTS_SQUARE_FIRST), "default": "1:1"},
            style=_text("visual style, e.g. 'flat illustration'", 200),
            reference_images=_ids("image", 4),
        ),
        inputs=(ArtifactInput("reference_images", ("image",), many=True, required=False),),
        output=OutputSpec("image", "generate", resolutions=aspect_resolutions(base), max_count=max_n),
        cost=CostModel("image", gpu_s, latency_s),
    )


def _image_edit(name: str, model: str, gpu_s: float, latency_s: float) -> ToolSpec:
    return ToolSpec(
        name=name, group="image_edit",
        description=(f"Edit an image with {model} following an instruction; the result keeps the "
                     "source's resolution. reference_images add identities or styles to respect."),
        parameters=_schema(
            ["image", "prompt"],
            image=_id("image"),
            prompt=_text("the edit instruction"),
            n={"type": "integer", "minimum": 1, "maximum": 2, "default": 1},
            reference_images=_ids("image", 3),
        ),
        inputs=(ArtifactInput("image", ("image",)),
                ArtifactInput("reference_images", ("image",), many=True, required=False)),
        output=OutputSpec("image", "edit", max_count=2),
        cost=CostModel("image", gpu_s, latency_s),
    )


def _llm_tool(name: str, description: str, simulator: Callable[..., Any], required: list[str],
              **properties: Any) -> ToolSpec:
    return ToolSpec(name=name, group="text", description=description,
                    parameters=_schema(required, **properties), inputs=(),
                    output=OutputSpec("text", simulator), cost=CostModel("call", 4.0, 6.0))


def _analysis(name: str, kind: str, what: str, simulator: Callable[..., Any]) -> ToolSpec:
    return ToolSpec(
        name=name, group="understanding",
        description=f"Describe {what}: its attributes and content, optionally answering a question.",
        parameters=_schema([kind], **{kind: _id(kind)}, question=_text("what to look for", 500)),
        inputs=(ArtifactInput(kind, (kind,)),),
        output=OutputSpec("text", simulator),
        cost=CostModel("call", 6.0, 8.0),
    )


def _video_edit(name: str, description: str, derive: str, required: list[str], inputs: tuple,
                cost: CostModel, **properties: Any) -> ToolSpec:
    return ToolSpec(name=name, group="video_editing", description=description,
                    parameters=_schema(required, **properties), inputs=inputs,
                    output=OutputSpec("video", derive, fps=24), cost=cost)


_SPECS: tuple[ToolSpec, ...] = (
    # --- text (LLM) -------------------------------------------------------------------------
    _llm_tool("tool_prompt_refine",
              "Polish a generation prompt or storyboard text: adds subject, composition, lighting and style detail.",
              simulate.prompt_refine,
              ["prompt"], prompt=_text("the text to refine"), style=_text("target style", 200)),
    _llm_tool("tool_video_shot_gen",
              "Write a storyboard: a numbered list of shots, each with its content, camera and duration.",
              simulate.video_shot_gen,
              ["topic", "shots"], topic=_text("what the video is about"),
              shots={"type": "integer", "minimum": 1, "maximum": 30},
              duration={"type": "number", "exclusiveMinimum": 0, "maximum": 600,
                        "description": "total seconds"}),
    _llm_tool("tool_video_script_gen",
              "Write a narration script for a video of a given length and tone.",
              simulate.video_script_gen,
              ["topic"], topic=_text("what the video is about"),
              duration={"type": "number", "exclusiveMinimum": 0, "maximum": 600},
              tone=_text("e.g. 'warm', 'energetic'", 100)),
    _llm_tool("tool_storyboard_polish",
              "Improve a storyboard's continuity, pacing and visual detail, keeping its shot count.",
              simulate.storyboard_polish,
              ["storyboard"], storyboard=_text("the storyboard text", 20000), style=_text("target style", 200)),
    _llm_tool("tool_script_storyboard_merge",
              "Align a narration script with a storyboard, shot by shot.",
              simulate.script_storyboard_merge,
              ["script", "storyboard"], script=_text("the script", 20000),
              storyboard=_text("the storyboard", 20000)),
    _llm_tool("tool_content_summary",
              "Summarise content into key points.",
              simulate.content_summary,
              ["content"], content=_text("the text to summarise", 20000),
              max_words={"type": "integer", "minimum": 10, "maximum": 1000}),
    ToolSpec(
        name="tool_task_manager", group="text",
        description="Keep the episode's to-do list: add an item, complete an item, or list the items.",
        parameters=_schema(["action"], action={"type": "string", "enum": ["add", "complete", "list"]},
                           item=_text("the to-do item (for add and complete)", 300)),
        inputs=(), output=OutputSpec("text", simulate.task_manager), cost=CostModel("call", 0.0, 0.1), stateful=True),
    ToolSpec(
        name="tool_html_builder", group="text",
        description="Build an HTML page (landing page, H5, detail page) from a title, sections and images.",
        parameters=_schema(["title", "sections"], title=_text("page title", 200),
                           sections={"type": "array", "items": _text("section text"), "minItems": 1,
                                     "maxItems": 20},
                           images=_ids("image", 20)),
        inputs=(ArtifactInput("images", ("image",), many=True, required=False),),
        output=OutputSpec("text", simulate.html_builder), cost=CostModel("call", 4.0, 6.0)),
    # --- text to image ----------------------------------------------------------------------
    _text2image("tool_text2image_gemini", "Gemini image generation", 1024, 4, 6.0, 8.0),
    _text2image("tool_text2image_hunyuan", "HunyuanImage", 1024, 4, 10.0, 12.0),
    _text2image("tool_text2image_seed", "Seedream", 2048, 4, 8.0, 10.0),
    _text2image("tool_text2image_gpt", "GPT image generation", 1536, 2, 12.0, 25.0),
    _text2image("tool_text2image_qwen", "Qwen-Image", 1328, 4, 9.0, 11.0),
    # --- image edit -------------------------------------------------------------------------
    _image_edit("tool_image_edit_gemini", "Gemini image editing", 6.0, 8.0),
    _image_edit("tool_image_edit_qwen", "Qwen-Image-Edit", 9.0, 11.0),
    _image_edit("tool_image_edit_gpt", "GPT image editing", 12.0, 25.0),
    # --- video generation -------------------------------------------------------------------
    ToolSpec(
        name="tool_text2video_veo", group="video_generation",
        description="Generate a video clip from a text prompt with Veo.",
        parameters=_schema(["prompt"], prompt=_text("what the clip shows"),
                           duration={"type": "integer", "enum": [4, 6, 8], "default": 8},
                           aspect_ratio={"type": "string", "enum": ["16:9", "9:16"], "default": "16:9"}),
        inputs=(), output=OutputSpec("video", "generate", resolutions=VIDEO_RESOLUTIONS, fps=24),
        cost=CostModel("video_second", 30.0, 4.0)),
    ToolSpec(
        name="tool_image2video_keling", group="video_generation",
        description="Animate an image into a video clip with Kling; the clip keeps the image's identity.",
        parameters=_schema(["image", "prompt"], image=_id("image"), prompt=_text("the motion"),
                           duration={"type": "integer", "enum": [5, 10], "default": 5}),
        inputs=(ArtifactInput("image", ("image",)),),
        output=OutputSpec("video", "animate", resolutions=VIDEO_RESOLUTIONS, fps=24),
        cost=CostModel("video_second", 48.0, 6.0)),
    ToolSpec(
        name="tool_image2video_veo3", group="video_generation",
        description="Animate an image into a video clip with Veo 3, optionally with native audio.",
        parameters=_schema(["image", "prompt"], image=_id("image"), prompt=_text("the motion"),
                           duration={"type": "integer", "enum": [4, 6, 8], "default": 8},
                           with_audio={"type": "boolean", "default": False}),
        inputs=(ArtifactInput("image", ("image",)),),
        output=OutputSpec("video", "animate", resolutions=VIDEO_RESOLUTIONS, fps=24),
        cost=CostModel("video_second", 30.0, 4.0)),
    # --- audio ------------------------------------------------------------------------------
    ToolSpec(
        name="tool_music_suno", group="audio",
        description="Compose music (a song or an instrumental bed) from a prompt, of a given length.",
        parameters=_schema(["prompt", "duration"], prompt=_text("genre, mood, instruments"),
                           duration={"type": "number", "minimum": 5, "maximum": 240},
                           instrumental={"type": "boolean", "default": True}),
        inputs=(), output=OutputSpec("audio", "music"), cost=CostModel("audio_second", 0.5, 0.3)),
    ToolSpec(
        name="tool_sound_fx_gen", group="audio",
        description="Generate sound effects that fit a video clip; the audio matches the clip's length.",
        parameters=_schema(["video", "prompt"], video=_id("video"), prompt=_text("the sounds wanted")),
        inputs=(ArtifactInput("video", ("video",)),),
        output=OutputSpec("audio", "soundtrack"), cost=CostModel("audio_second", 0.8, 0.4)),
    ToolSpec(
        name="tool_tts_generation", group="audio",
        description="Speak a text aloud (about 2.5 words per second).",
        parameters=_schema(["text"], text=_text("what to say", 10000),
                           voice={"type": "string", "enum": ["female", "male", "child", "narrator"],
                                  "default": "narrator"}),
        inputs=(), output=OutputSpec("audio", "tts"), cost=CostModel("audio_second", 0.2, 0.1)),
    ToolSpec(
        name="tool_tts_composite", group="audio",
        description="Speak a text and mix the voice-over into a video; the video keeps its length.",
        parameters=_schema(["video", "text"], video=_id("video"), text=_text("the voice-over", 10000),
                           voice={"type": "string", "enum": ["female", "male", "child", "narrator"],
                                  "default": "narrator"}),
        inputs=(ArtifactInput("video", ("video",)),),
        output=OutputSpec("video", "voiceover", fps=24), cost=CostModel("video_second", 0.5, 0.3)),
    ToolSpec(
        name="tool_audio_edit_cut", group="audio",
        description="Cut a segment [start, end) out of an audio track.",
        parameters=_schema(["audio", "start", "end"], audio=_id("audio"),
                           start={"type": "number", "minimum": 0},
                           end={"type": "number", "exclusiveMinimum": 0}),
        inputs=(ArtifactInput("audio", ("audio",)),),
        output=OutputSpec("audio", "cut"), cost=CostModel("call", 0.0, 1.0)),
    ToolSpec(
        name="tool_beat_detect", group="audio",
        description="Detect the beats of an audio track; returns the tempo and beat times for cutting on beat.",
        parameters=_schema(["audio"], audio=_id("audio")),
        inputs=(ArtifactInput("audio", ("audio",)),),
        output=OutputSpec("text", simulate.beat_detect), cost=CostModel("call", 1.0, 2.0)),
    # --- video editing ----------------------------------------------------------------------
    _video_edit("tool_video_composite",
                "Join clips in order into one video (MoviePy), optionally over an audio track; transitions "
                "do not change the total duration.",
                "concat", ["clips"],
                (ArtifactInput("clips", ("video",), many=True), ArtifactInput("audio", ("audio",), required=False)),
                CostModel("video_second", 0.2, 0.5),
                clips=_ids("video", 60), audio=_id("audio"),
                transition={"type": "string", "enum": ["cut", "fade", "dissolve"], "default": "cut"}),
    _video_edit("tool_video_postprocess",
                "Post-process a video: colour grade, stabilise, denoise, or upscale to twice the resolution.",
                "same", ["video", "operation"], (ArtifactInput("video", ("video",)),),
                CostModel("video_second", 2.0, 1.0),
                video=_id("video"),
                operation={"type": "string", "enum": ["color_grade", "stabilize", "denoise", "upscale"]}),
    _video_edit("tool_video_auto_pipeline",
                "Turn a sequence of images into a video, each image shown for duration_per_image seconds "
                "with motion, optionally over an audio track.",
                "slideshow", ["images"],
                (ArtifactInput("images", ("image",), many=True), ArtifactInput("audio", ("audio",), required=False)),
                CostModel("video_second", 1.0, 1.0),
                images=_ids("image", 60),
                duration_per_image={"type": "number", "minimum": 0.5, "maximum": 20, "default": 3},
                audio=_id("audio")),
    _video_edit("tool_video_trim_edit", "Keep the segment [start, end) of a video.",
                "trim", ["video", "start", "end"], (ArtifactInput("video", ("video",)),),
                CostModel("call", 0.0, 1.0),
                video=_id("video"), start={"type": "number", "minimum": 0},
                end={"type": "number", "exclusiveMinimum": 0}),
    _video_edit("tool_video_speed_adjust", "Change a video's playback speed; the duration divides by speed.",
                "speed", ["video", "speed"], (ArtifactInput("video", ("video",)),),
                CostModel("call", 0.0, 2.0),
                video=_id("video"), speed={"type": "number", "minimum": 0.25, "maximum": 4}),
    _video_edit("tool_subtitle_add_text", "Burn subtitles or a caption into a video.",
                "subtitle", ["video", "text"], (ArtifactInput("video", ("video",)),),
                CostModel("call", 0.0, 2.0),
                video=_id("video"), text=_text("the subtitle text", 10000)),
    # --- understanding ----------------------------------------------------------------------
    _analysis("tool_video_analysis", "video", "a video clip", simulate.video_analysis),
    _analysis("tool_audio_analysis", "audio", "an audio track", simulate.audio_analysis),
    _analysis("tool_image_analysis", "image", "an image", simulate.image_analysis),
    # --- search -----------------------------------------------------------------------------
    ToolSpec(
        name="tool_search_content", group="search",
        description="Search the web and extract content (facts, product details) about a query.",
        parameters=_schema(["query"], query=_text("the search query", 500),
                           max_results={"type": "integer", "minimum": 1, "maximum": 10, "default": 3}),
        inputs=(), output=OutputSpec("text", simulate.search_content), cost=CostModel("call", 0.0, 3.0)),
    ToolSpec(
        name="tool_search_inspire", group="search",
        description="Search for visual inspiration: reference styles, palettes and compositions for a theme.",
        parameters=_schema(["query"], query=_text("the theme", 500),
                           n={"type": "integer", "minimum": 1, "maximum": 10, "default": 3}),
        inputs=(), output=OutputSpec("text", simulate.search_inspire), cost=CostModel("call", 0.0, 3.0)),
)

def _simulation_problem(spec: ToolSpec) -> str | None:
    """Why the attribute tier cannot simulate ``spec``, or None."""
    derive = spec.output.derive
    if spec.output.kind == "text" and not callable(derive):
        return (f"{spec.name} makes text, so its output.derive must be its text simulator, a function "
                f"(request, rng) -> str | ToolFailure; got {derive!r}.")
    if spec.output.kind != "text" and not callable(derive) and derive not in DERIVE_RULES:
        return (f"{spec.name}: output.derive {derive!r} is not a rule of the attribute tier "
                f"({', '.join(sorted(DERIVE_RULES))}); name one of them or give your own function "
                "(request) -> (attributes of each output, note) | ToolFailure.")
    return None


def _can_call(spec: ToolSpec, made: set[str]) -> bool:
    """Whether every artifact ``spec`` requires is of a kind in ``made``."""
    return all(made.intersection(inp.kinds) for inp in spec.inputs if inp.required)


class ToolSet(Mapping[str, ToolSpec]):
    """The tools an environment offers, by name, in order: checked as a whole when built.

    Raises :class:`~visenv.error.ConfigError` when an entry is not a ToolSpec, two tools share a
    name, a tool cannot be simulated (see ``OutputSpec.derive``), or a tool requires an artifact
    kind that no sequence of calls of the set can make first (an image edit without an image
    generator).

    Args:
        specs: the tool specifications.
    """

    def __init__(self, specs: Iterable[ToolSpec]):
        self._specs: dict[str, ToolSpec] = {}
        for spec in specs:
            if not isinstance(spec, ToolSpec):
                raise ConfigError(f"A tool set holds ToolSpec objects; got {spec!r}. Build your tool with "
                                  "visenv.tools.spec.ToolSpec, or name a default tool.")
            if spec.name in self._specs:
                raise ConfigError(f"The tool set names {spec.name!r} twice; tool names must be unique "
                                  "(rename your tool, or drop the default tool of that name).")
            self._specs[spec.name] = spec
        if not self._specs:
            raise ConfigError("The tool set is empty; give at least one tool.")
        problems = [p for p in map(_simulation_problem, self._specs.values()) if p]
        if problems:
            raise ConfigError("Cannot simulate every tool: " + " ".join(problems))
        made: set[str] = set()  # the kinds that some order of calls can make, starting from nothing
        waiting = dict(self._specs)
        while ready := [name for name, spec in waiting.items() if _can_call(spec, made)]:
            made.update(waiting.pop(name).output.kind for name in ready)
        if waiting:
            spec = next(iter(waiting.values()))
            inp = next(inp for inp in spec.inputs if inp.required and not made.intersection(inp.kinds))
            kinds = " or ".join(inp.kinds)
            raise ConfigError(f"{spec.name} needs an artifact of kind {kinds} (argument {inp.argument!r}), but no "
                              f"sequence of calls of the set makes one (it can make {sorted(made) or 'nothing'}); "
                              f"add a tool that makes {kinds}, or remove {spec.name}.")

    def __getitem__(self, name: str) -> ToolSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"ToolSet({list(self._specs)})"

    def __reduce__(self) -> str | tuple:
        # the default set pickles by reference (a few bytes per episode sent to a Ray worker)
        return "DEFAULT_TOOLS" if self is DEFAULT_TOOLS else (ToolSet, (tuple(self._specs.values()),))

    def close_matches(self, name: str) -> list[str]:
        """Up to three tool names of the set that look like ``name`` (for "did you mean")."""
        return difflib.get_close_matches(name, self._specs, n=3, cutoff=0.6)

    def get_tool(self, name: str) -> ToolSpec:
        """The spec named ``name``; raises :class:`UnknownToolError` naming close matches."""
        try:
            return self._specs[name]
        except KeyError:
            close = self.close_matches(name)
            hint = f" Did you mean {', '.join(close)}?" if close else f" The tools are {list(self._specs)}."
            raise UnknownToolError(f"No tool named {name!r}.{hint}") from None

    def in_group(self, group: str) -> tuple[str, ...]:
        """Names of the tools in ``group`` (e.g. "text2image")."""
        return tuple(name for name, spec in self._specs.items() if spec.group == group)

    def prompt(self) -> str:
        """The function description of every tool, one JSON object per line (for system prompts)."""
        return "\n".join(json.dumps(spec.to_prompt(), sort_keys=True) for spec in self._specs.values())


DEFAULT_TOOLS = ToolSet(_SPECS)
"""The default tools (the paper's set), by name, in the order of PAPER.md section 2."""
TOOLS = DEFAULT_TOOLS
"""The default tools under their earlier name."""


def make_tool_set(tools: ToolSet | Iterable[str | ToolSpec] | None) -> ToolSet:
    """The tool set that ``VisGenConfig(tools=...)`` describes.

    Args:
        tools: None (:data:`DEFAULT_TOOLS`), a :class:`ToolSet`, or a sequence whose entries are
            default tool names (a subset) and your own :class:`ToolSpec` s; ``[*DEFAULT_TOOLS,
            my_spec]`` adds a tool to the default set.
    """
    if tools is None:
        return DEFAULT_TOOLS
    if isinstance(tools, ToolSet):
        return tools
    if isinstance(tools, (str, ToolSpec)) or not isinstance(tools, Iterable):
        raise ConfigError(f"tools ({tools!r}) must be None, a ToolSet, or a list of default tool names and "
                          "ToolSpecs, e.g. ['tool_prompt_refine', 'tool_text2image_qwen', my_spec].")
    specs = []
    for entry in tools:
        specs.append(DEFAULT_TOOLS.get_tool(entry) if isinstance(entry, str) else entry)
    return ToolSet(specs)


def get_tool(name: str) -> ToolSpec:
    """The default spec named ``name``; raises :class:`UnknownToolError` naming close matches."""
    return DEFAULT_TOOLS.get_tool(name)


def tools_in_group(group: str) -> tuple[str, ...]:
    """Names of the default tools in ``group`` (e.g. "text2image")."""
    return DEFAULT_TOOLS.in_group(group)
