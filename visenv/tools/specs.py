"""The 36 virtual tools of the VisGen environment (PAPER.md section 2), as typed specifications.

Argument schemas are ours (the papers do not publish them). Conventions shared by every tool:
``prompt`` is the generation prompt; artifact arguments (``image``, ``video``, ``audio``,
``clips``, ``images``, ``reference_images``) hold artifact ids such as ``"img_3f2a9c01d4e7"``;
durations are seconds. Cost figures are our estimates of the real tools' serving cost (a real video
model needs about 8 GPUs for about 30 s per clip, PAPER.md section 2).
"""

from __future__ import annotations

from typing import Any, Mapping

from visenv.error import UnknownToolError
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


def _resolutions(base: int) -> dict[str, tuple[int, int]]:
    """Aspect ratio -> resolution with the long side ``base`` (square side ``base``)."""
    short34 = base * 3 // 4
    short169 = (base * 9 // 16) // 8 * 8
    return {"1:1": (base, base), "16:9": (base, short169), "9:16": (short169, base),
            "4:3": (base, short34), "3:4": (short34, base)}


VIDEO_RESOLUTIONS = {"16:9": (1280, 720), "9:16": (720, 1280)}


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
        output=OutputSpec("image", "generate", resolutions=_resolutions(base), max_count=max_n),
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


def _llm_tool(name: str, description: str, required: list[str], **properties: Any) -> ToolSpec:
    return ToolSpec(name=name, group="text", description=description,
                    parameters=_schema(required, **properties), inputs=(),
                    output=OutputSpec("text", "text"), cost=CostModel("call", 4.0, 6.0))


def _analysis(name: str, kind: str, what: str) -> ToolSpec:
    return ToolSpec(
        name=name, group="understanding",
        description=f"Describe {what}: its attributes and content, optionally answering a question.",
        parameters=_schema([kind], **{kind: _id(kind)}, question=_text("what to look for", 500)),
        inputs=(ArtifactInput(kind, (kind,)),),
        output=OutputSpec("text", "text"),
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
              ["prompt"], prompt=_text("the text to refine"), style=_text("target style", 200)),
    _llm_tool("tool_video_shot_gen",
              "Write a storyboard: a numbered list of shots, each with its content, camera and duration.",
              ["topic", "shots"], topic=_text("what the video is about"),
              shots={"type": "integer", "minimum": 1, "maximum": 30},
              duration={"type": "number", "exclusiveMinimum": 0, "maximum": 600,
                        "description": "total seconds"}),
    _llm_tool("tool_video_script_gen",
              "Write a narration script for a video of a given length and tone.",
              ["topic"], topic=_text("what the video is about"),
              duration={"type": "number", "exclusiveMinimum": 0, "maximum": 600},
              tone=_text("e.g. 'warm', 'energetic'", 100)),
    _llm_tool("tool_storyboard_polish",
              "Improve a storyboard's continuity, pacing and visual detail, keeping its shot count.",
              ["storyboard"], storyboard=_text("the storyboard text", 20000), style=_text("target style", 200)),
    _llm_tool("tool_script_storyboard_merge",
              "Align a narration script with a storyboard, shot by shot.",
              ["script", "storyboard"], script=_text("the script", 20000),
              storyboard=_text("the storyboard", 20000)),
    _llm_tool("tool_content_summary",
              "Summarise content into key points.",
              ["content"], content=_text("the text to summarise", 20000),
              max_words={"type": "integer", "minimum": 10, "maximum": 1000}),
    ToolSpec(
        name="tool_task_manager", group="text",
        description="Keep the episode's to-do list: add an item, complete an item, or list the items.",
        parameters=_schema(["action"], action={"type": "string", "enum": ["add", "complete", "list"]},
                           item=_text("the to-do item (for add and complete)", 300)),
        inputs=(), output=OutputSpec("text", "text"), cost=CostModel("call", 0.0, 0.1), stateful=True),
    ToolSpec(
        name="tool_html_builder", group="text",
        description="Build an HTML page (landing page, H5, detail page) from a title, sections and images.",
        parameters=_schema(["title", "sections"], title=_text("page title", 200),
                           sections={"type": "array", "items": _text("section text"), "minItems": 1,
                                     "maxItems": 20},
                           images=_ids("image", 20)),
        inputs=(ArtifactInput("images", ("image",), many=True, required=False),),
        output=OutputSpec("text", "text"), cost=CostModel("call", 4.0, 6.0)),
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
        output=OutputSpec("text", "text"), cost=CostModel("call", 1.0, 2.0)),
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
    _analysis("tool_video_analysis", "video", "a video clip"),
    _analysis("tool_audio_analysis", "audio", "an audio track"),
    _analysis("tool_image_analysis", "image", "an image"),
    # --- search -----------------------------------------------------------------------------
    ToolSpec(
        name="tool_search_content", group="search",
        description="Search the web and extract content (facts, product details) about a query.",
        parameters=_schema(["query"], query=_text("the search query", 500),
                           max_results={"type": "integer", "minimum": 1, "maximum": 10, "default": 3}),
        inputs=(), output=OutputSpec("text", "text"), cost=CostModel("call", 0.0, 3.0)),
    ToolSpec(
        name="tool_search_inspire", group="search",
        description="Search for visual inspiration: reference styles, palettes and compositions for a theme.",
        parameters=_schema(["query"], query=_text("the theme", 500),
                           n={"type": "integer", "minimum": 1, "maximum": 10, "default": 3}),
        inputs=(), output=OutputSpec("text", "text"), cost=CostModel("call", 0.0, 3.0)),
)

TOOLS: Mapping[str, ToolSpec] = {spec.name: spec for spec in _SPECS}
"""All 36 tool specifications, by name, in the order of PAPER.md section 2."""


def get_tool(name: str) -> ToolSpec:
    """The spec named ``name``; raises :class:`UnknownToolError` naming close matches."""
    try:
        return TOOLS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, TOOLS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownToolError(f"No tool named {name!r}.{hint}") from None


def tools_in_group(group: str) -> tuple[str, ...]:
    """Names of the tools in ``group`` (e.g. "text2image")."""
    return tuple(name for name, spec in TOOLS.items() if spec.group == group)
