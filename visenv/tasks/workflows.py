"""The 15 expert reference workflows of the VisionAgent teacher (PAPER.md section 5).

The TaskAgent classifies a request into one of 42 scenarios, and each scenario names one of these
workflow templates. A :class:`Workflow` is a short list of :class:`WorkflowStep` s (a tool, its
acceptable alternatives, what it consumes); :meth:`Workflow.instantiate` turns it into the concrete
calls that meet one task's requirements exactly (see :mod:`visenv.tasks.planner`). The same
templates serve as the expert reference plans that a plan judge reads in context.

Step semantics, shared by every workflow:

* ``repeat=None`` makes one call, and one image if the step makes images; but the last delivering
  image step makes every image still owed, in as few calls as the tool's ``n`` allows (the first
  image alone when consistency is required, so that the rest can reference it).
  ``repeat="amount"`` makes one call per image still owed (image workflows); ``repeat="shots"``
  one call per shot (video workflows), the clip step's lengths fitted to the requested duration.
* ``deliver`` marks the steps whose images are the answer of an image task; a video task's answer
  is the last video made.
* ``inputs`` name the earlier steps a step depends on. Their media outputs become its artifact
  arguments: a list argument takes all of them; a single argument takes the only one, or pairs one
  to one with a step that made one output per call of this step (clip i animates keyframe i). Text
  outputs only order the steps; the planner writes the literal arguments itself.
* ``when`` makes a step conditional on an audio track the task asks for; a skipped step that maps a
  medium onto the same kind (a voice-over pass over a video) passes its input through to later steps.
* When the task requires consistency, every text-to-image call after the first image passes that
  first image as a reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from visenv.error import ConfigError
from visenv.tasks.planner import PlannedCall, plan_calls
from visenv.tasks.task import AUDIO, MODALITIES
from visenv.tools.spec import ToolSpec
from visenv.tools.specs import DEFAULT_TOOLS

if TYPE_CHECKING:
    from visenv.tasks.task import Task

__all__ = ["REFERENCE_GROUPS", "WORKFLOWS", "PlannedCall", "Workflow", "WorkflowStep", "get_workflow"]

REFERENCE_GROUPS = ("text2image", "image_edit")
"""Tool groups that can carry an identity, scene or style forward by reference."""


@dataclass(frozen=True)
class WorkflowStep:
    """One step of a workflow template.

    Attributes:
        id: unique within the workflow, e.g. "keyframes".
        tool: the step's tool (a default tool, :data:`visenv.tools.specs.DEFAULT_TOOLS`).
        alternatives: other acceptable tools for the step, from the same tool group.
        purpose: one line, used in plans and as the instruction of edit prompts.
        repeat: None, "amount" (once per image) or "shots" (once per shot).
        inputs: ids of earlier steps whose outputs it consumes.
        when: the audio track ("music", "sfx" or "voiceover") the step exists for; None = always.
        deliver: whether the step's images are part of the answer (image workflows).
    """

    id: str
    tool: str
    alternatives: tuple[str, ...]
    purpose: str
    repeat: str | None = None
    inputs: tuple[str, ...] = ()
    when: str | None = None
    deliver: bool = False

    @property
    def tools(self) -> tuple[str, ...]:
        """The default tool followed by the alternatives."""
        return (self.tool, *self.alternatives)


@dataclass(frozen=True)
class Workflow:
    """An expert workflow template: an ordered list of steps for one modality.

    Attributes:
        id: e.g. "narrative_video".
        name: a human title.
        description: one paragraph: when to use it and how it works.
        modality: "image" or "video": what it delivers.
        steps: the steps, in execution order.
    """

    id: str
    name: str
    description: str
    modality: str
    steps: tuple[WorkflowStep, ...]

    def __post_init__(self) -> None:
        where = f"Workflow {self.id!r}"
        if self.modality not in MODALITIES:
            raise ConfigError(f"{where}: modality {self.modality!r} must be one of {MODALITIES}")
        seen: dict[str, WorkflowStep] = {}
        for step in self.steps:
            if step.id in seen:
                raise ConfigError(f"{where}: step id {step.id!r} is used twice; step ids must be unique")
            for tool in step.tools:
                if tool not in DEFAULT_TOOLS:
                    raise ConfigError(f"{where}, step {step.id!r}: unknown tool {tool!r}")
                if DEFAULT_TOOLS[tool].group != DEFAULT_TOOLS[step.tool].group:
                    raise ConfigError(f"{where}, step {step.id!r}: alternative {tool!r} is not in the "
                                      f"group of {step.tool!r} ({DEFAULT_TOOLS[step.tool].group})")
            wanted = "shots" if self.modality == "video" else "amount"
            if step.repeat not in (None, wanted):
                raise ConfigError(f"{where}, step {step.id!r}: repeat {step.repeat!r} must be None or "
                                  f"{wanted!r} in a {self.modality} workflow")
            if step.when is not None and step.when not in AUDIO:
                raise ConfigError(f"{where}, step {step.id!r}: when {step.when!r} must be one of {AUDIO}")
            for name in step.inputs:
                if name not in seen:
                    raise ConfigError(f"{where}, step {step.id!r}: input {name!r} is not an earlier step")
                kind = DEFAULT_TOOLS[seen[name].tool].output.kind
                if kind != "text" and not any(kind in inp.kinds for inp in DEFAULT_TOOLS[step.tool].inputs):
                    raise ConfigError(f"{where}, step {step.id!r}: {step.tool} takes no {kind} "
                                      f"artifact, but input {name!r} makes one")
            seen[step.id] = step

    @property
    def audio(self) -> tuple[str, ...]:
        """The audio tracks this workflow can add (sorted)."""
        return tuple(sorted({step.when for step in self.steps if step.when}))

    @property
    def supports_consistency(self) -> bool:
        """Whether it makes images that can carry an identity, scene or style by reference."""
        return any(DEFAULT_TOOLS[step.tool].group in REFERENCE_GROUPS for step in self.steps)

    def instantiate(self, task: Task) -> list[PlannedCall]:
        """The concrete, executable calls that meet ``task``'s requirements exactly.

        Raises:
            ConfigError: the task's modality is not the workflow's.
        """
        return plan_calls(self, task)

    def unavailable_steps(self, tools: Mapping[str, ToolSpec]) -> list[WorkflowStep]:
        """The steps that no tool of ``tools`` can play (neither the step's tool nor an alternative)."""
        return [step for step in self.steps if not any(tool in tools for tool in step.tools)]


_T2I = ("tool_text2image_gemini", "tool_text2image_hunyuan", "tool_text2image_seed",
        "tool_text2image_gpt", "tool_text2image_qwen")
_EDIT = ("tool_image_edit_gemini", "tool_image_edit_qwen", "tool_image_edit_gpt")
_I2V = ("tool_image2video_keling", "tool_image2video_veo3")


def _others(default: str, group: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(tool for tool in group if tool != default)


def _step(id: str, tool: str, purpose: str, **options: Any) -> WorkflowStep:
    """A step whose alternatives are the other tools of its family (text-to-image, edit, animate)."""
    family = next((group for group in (_T2I, _EDIT, _I2V) if tool in group), (tool,))
    return WorkflowStep(id, tool, _others(tool, family), purpose, **options)


def _video_tail(clips: str, *, voiceover: bool, sfx: bool) -> tuple[WorkflowStep, ...]:
    """Music, assembly and the optional voice-over and sound-effects passes of a clip video."""
    steps = [
        _step("music", "tool_music_suno", "Compose a background music bed as long as the video",
              when="music"),
        _step("composite", "tool_video_composite", "Join the clips in order over the music",
              inputs=(clips, "music")),
    ]
    last = "composite"
    if voiceover:
        steps.append(_step("voiceover", "tool_tts_composite", "Speak the script over the video",
                           inputs=(last, "script"), when="voiceover"))
        last = "voiceover"
    if sfx:
        steps += [_step("sfx", "tool_sound_fx_gen", "Generate sound effects that fit the video",
                        inputs=(last,), when="sfx"),
                  _step("mix", "tool_video_composite", "Lay the sound effects under the video",
                        inputs=(last, "sfx"), when="sfx")]
    return tuple(steps)


_WORKFLOWS = (
    # --- image ------------------------------------------------------------------------------
    Workflow("single_image", "Single image",
             "One prompt, refined, then generated in a batch: covers, realistic photographs.",
             "image", (
                 _step("refine", "tool_prompt_refine", "Refine the request into a detailed prompt"),
                 _step("generate", "tool_text2image_qwen", "Generate the requested images", deliver=True),
             )),
    Workflow("image_set_consistent", "Consistent image set",
             "An anchor image fixes the subject; every other image is generated with it as a reference.",
             "image", (
                 _step("anchor", "tool_text2image_seed", "Generate the anchor image that fixes the look",
                       deliver=True),
                 _step("set", "tool_text2image_seed", "Generate the other images with the anchor as reference",
                       repeat="amount", inputs=("anchor",), deliver=True),
             )),
    Workflow("image_edit_variants", "Edited variants",
             "A base image is generated once and edited into variants (expressions, outfits, poses).",
             "image", (
                 _step("base", "tool_text2image_gemini", "Generate the base image", deliver=True),
                 _step("variants", "tool_image_edit_gemini", "Edit the base image into a variant",
                       repeat="amount", inputs=("base",), deliver=True),
             )),
    Workflow("poster_design", "Poster design",
             "Search for visual inspiration, refine the prompt with it, then generate the design.",
             "image", (
                 _step("inspire", "tool_search_inspire", "Collect reference styles and layouts"),
                 _step("refine", "tool_prompt_refine", "Write a layout-aware prompt from the inspiration",
                       inputs=("inspire",)),
                 _step("generate", "tool_text2image_seed", "Generate the designs", inputs=("refine",),
                       deliver=True),
             )),
    Workflow("web_page", "Web page",
             "Research the subject, generate one image per page section, then build the HTML page.",
             "image", (
                 _step("research", "tool_search_content", "Collect facts and selling points"),
                 _step("sections", "tool_text2image_qwen", "Generate the image of one page section",
                       repeat="amount", inputs=("research",), deliver=True),
                 _step("page", "tool_html_builder", "Assemble the page from the section images",
                       inputs=("sections",)),
             )),
    Workflow("icon_logo_set", "Icon and logo set",
             "Search for inspiration, generate a master design, then the rest of the set with it as "
             "a style reference.",
             "image", (
                 _step("inspire", "tool_search_inspire", "Collect reference marks and palettes"),
                 _step("master", "tool_text2image_hunyuan", "Generate the master design", deliver=True),
                 _step("set", "tool_text2image_hunyuan", "Generate the next design of the set",
                       repeat="amount", inputs=("master",), deliver=True),
             )),
    Workflow("character_sheet", "Character sheet",
             "Design the character, record its identity traits, then edit the design into new views "
             "or poses.",
             "image", (
                 _step("refine", "tool_prompt_refine", "Describe the character in detail"),
                 _step("design", "tool_text2image_hunyuan", "Generate the character design", deliver=True),
                 _step("traits", "tool_image_analysis", "List the identity traits to keep",
                       inputs=("design",)),
                 _step("poses", "tool_image_edit_qwen", "Redraw the character in a new pose or view",
                       repeat="amount", inputs=("design", "traits"), deliver=True),
             )),
    Workflow("storyboard_images", "Storyboard frames",
             "Write the storyboard, then draw one frame per shot, keeping characters and scenes.",
             "image", (
                 _step("storyboard", "tool_video_shot_gen", "Write the shot list"),
                 _step("frames", "tool_text2image_seed", "Draw the frame of one shot", repeat="amount",
                       inputs=("storyboard",), deliver=True),
             )),
    Workflow("picture_book", "Picture book",
             "Write the page texts, draw a character reference, then illustrate each page with it.",
             "image", (
                 _step("story", "tool_prompt_refine", "Write the story, one line per page"),
                 _step("character", "tool_text2image_gemini", "Draw the character reference sheet"),
                 _step("pages", "tool_text2image_gemini", "Illustrate one page with the character",
                       repeat="amount", inputs=("story", "character"), deliver=True),
             )),
    Workflow("stylization", "Stylization",
             "Make the source image, analyse it, then restyle it with an image edit.",
             "image", (
                 _step("source", "tool_text2image_qwen", "Generate the source photo to restyle"),
                 _step("analyze", "tool_image_analysis", "Describe the content to preserve",
                       inputs=("source",)),
                 _step("restyle", "tool_image_edit_gpt", "Restyle the source image in the requested style",
                       repeat="amount", inputs=("source", "analyze"), deliver=True),
             )),
    # --- video ------------------------------------------------------------------------------
    Workflow("product_video", "Product video",
             "One keyframe per shot, animated into clips, joined over music; optional voice-over.",
             "video", (
                 _step("script", "tool_video_script_gen", "Write the voice-over script", when="voiceover"),
                 _step("keyframes", "tool_text2image_seed", "Generate the keyframe of one shot",
                       repeat="shots"),
                 _step("clips", "tool_image2video_keling", "Animate one keyframe into a clip",
                       repeat="shots", inputs=("keyframes",)),
                 *_video_tail("clips", voiceover=True, sfx=False),
             )),
    Workflow("narrative_video", "Narrative video",
             "Script and storyboard, keyframes with the first as reference, animated clips, assembly, "
             "then voice-over or sound effects.",
             "video", (
                 _step("script", "tool_video_script_gen", "Write the story script"),
                 _step("storyboard", "tool_video_shot_gen", "Break the script into shots",
                       inputs=("script",)),
                 _step("keyframes", "tool_text2image_hunyuan", "Draw the keyframe of one shot",
                       repeat="shots", inputs=("storyboard",)),
                 _step("clips", "tool_image2video_veo3", "Animate one keyframe into a clip",
                       repeat="shots", inputs=("keyframes",)),
                 *_video_tail("clips", voiceover=True, sfx=True),
             )),
    Workflow("music_video", "Music video",
             "Compose the song first, detect its beats, then cut keyframe-animated shots to it.",
             "video", (
                 _step("music", "tool_music_suno", "Compose the song", when="music"),
                 _step("beats", "tool_beat_detect", "Find the beats to cut on", inputs=("music",),
                       when="music"),
                 _step("storyboard", "tool_video_shot_gen", "Plan one shot per musical phrase",
                       inputs=("beats",)),
                 _step("keyframes", "tool_text2image_seed", "Draw the keyframe of one shot",
                       repeat="shots", inputs=("storyboard",)),
                 _step("clips", "tool_image2video_keling", "Animate one keyframe into a clip",
                       repeat="shots", inputs=("keyframes",)),
                 _step("composite", "tool_video_composite", "Join the clips over the song",
                       inputs=("clips", "music")),
             )),
    Workflow("explainer_video", "Explainer video",
             "Research, script, one slide image per shot, a slideshow video, then the voice-over.",
             "video", (
                 _step("research", "tool_search_content", "Collect the facts to explain"),
                 _step("script", "tool_video_script_gen", "Write the narration", inputs=("research",)),
                 _step("slides", "tool_text2image_qwen", "Illustrate one shot of the explanation",
                       repeat="shots", inputs=("script",)),
                 _step("music", "tool_music_suno", "Compose a quiet music bed", when="music"),
                 _step("slideshow", "tool_video_auto_pipeline", "Animate the slides into one video",
                       inputs=("slides", "music")),
                 _step("voiceover", "tool_tts_composite", "Speak the narration over the video",
                       inputs=("slideshow",), when="voiceover"),
             )),
    Workflow("short_text2video", "Short text-to-video",
             "Plan the shots, generate each as a text-to-video clip, and join them; optional music or "
             "sound effects.",
             "video", (
                 _step("storyboard", "tool_video_shot_gen", "Plan the shots"),
                 _step("clips", "tool_text2video_veo", "Generate one shot as a clip", repeat="shots",
                       inputs=("storyboard",)),
                 *_video_tail("clips", voiceover=False, sfx=True),
             )),
)

WORKFLOWS: Mapping[str, Workflow] = {workflow.id: workflow for workflow in _WORKFLOWS}
"""The 15 reference workflows by id: 10 image, then 5 video."""


def get_workflow(name: str) -> Workflow:
    """The workflow named ``name``; raises :class:`ConfigError` listing the valid names."""
    try:
        return WORKFLOWS[name]
    except KeyError:
        raise ConfigError(f"No workflow named {name!r}; choose one of {sorted(WORKFLOWS)}") from None
