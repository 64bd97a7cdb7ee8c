"""Instantiate a workflow template into the concrete calls that meet one task's requirements.

The planner decides the numbers (how many images each call makes, how many shots, how long each
clip is, using each tool's allowed durations), wires artifact references between calls (pairing a
clip with its keyframe, a composite with all clips and the music), adds consistency references, and
writes every literal argument (prompts carry the task's keywords and style). Step semantics are
documented in :mod:`visenv.tasks.workflows`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from visenv.error import ConfigError
from visenv.tools.specs import DEFAULT_TOOLS

if TYPE_CHECKING:  # annotations only: the workflow templates import the planner
    from visenv.tasks.task import Task
    from visenv.tasks.workflows import Workflow, WorkflowStep

DEFAULT_SHOTS = 4
"""Shots planned when the request leaves both the shot count and the duration open."""
MAX_CHOSEN_SHOTS = 10
"""Most shots the planner chooses on its own when only the duration is given."""
SLIDE_SECONDS = 5.0
"""Preferred seconds per slide when a slideshow's shot count is open."""
SLIDESHOW_TOOL = "tool_video_auto_pipeline"

_VIEWS = ("hero view", "three-quarter view", "close-up detail", "side view", "top-down view",
          "in-context view", "wide view", "low-angle view", "back view", "macro detail",
          "overhead flat lay", "dramatic angle")
_BEATS = ("establishing wide shot", "medium shot", "close-up", "tracking shot", "low-angle shot",
          "over-the-shoulder shot", "detail insert", "aerial shot", "reaction close-up", "closing wide shot")
_MOTIONS = ("slow push-in", "gentle pan", "orbit around the subject", "dolly out", "handheld follow",
            "tilt up", "crane down", "rack focus", "slow zoom out", "steady hold")


@dataclass(frozen=True)
class PlannedCall:
    """One concrete tool call of an instantiated workflow.

    Attributes:
        index: position in the plan (0-based); refs point at earlier indices.
        step: the id of the workflow step it comes from.
        tool: the tool to call.
        arguments: the literal arguments (prompts written from the task), without artifact ids.
        refs: artifact argument -> ((planned call index, output index or None = all outputs of
            that call), ...); the executor substitutes the ids those calls produced.
        purpose: one line for the plan.
        deliver: whether the call's outputs are part of the answer (the images of an image task,
            the final video of a video task).
    """

    index: int
    step: str
    tool: str
    arguments: dict[str, Any]
    refs: dict[str, tuple[tuple[int, int | None], ...]]
    purpose: str
    deliver: bool = False

    @property
    def media_outputs(self) -> int:
        """How many media artifacts the call makes (images: its ``n``; text tools: 0)."""
        spec = DEFAULT_TOOLS[self.tool]
        if spec.output.kind == "text":
            return 0
        return int(self.arguments.get("n", 1)) if spec.output.kind == "image" else 1


@dataclass(frozen=True)
class Timeline:
    """The planned shots of a video: which tool makes them and how long each lasts.

    Attributes:
        tool: the clip tool (a video generator, or the slideshow tool).
        clips: seconds of each shot, in order.
    """

    tool: str
    clips: tuple[float, ...]

    @property
    def shots(self) -> int:
        """The number of shots."""
        return len(self.clips)

    @property
    def total(self) -> float:
        """The video's planned length in seconds."""
        return float(sum(self.clips))


def _clip_step(workflow: Workflow) -> WorkflowStep:
    for step in workflow.steps:
        if DEFAULT_TOOLS[step.tool].group == "video_generation" or step.tool == SLIDESHOW_TOOL:
            return step
    raise ConfigError(f"Workflow {workflow.id!r} has no clip or slideshow step to time")


def _duration_schema(tool: str) -> dict[str, Any]:
    props = DEFAULT_TOOLS[tool].parameters["properties"]
    return props["duration_per_image" if tool == SLIDESHOW_TOOL else "duration"]


@functools.lru_cache(maxsize=4096)
def _fit(choices: tuple[int, ...], shots: int, target: float) -> tuple[int, ...]:
    """``shots`` clip lengths from ``choices`` whose sum is closest to ``target`` (most even first)."""
    combos = itertools.combinations_with_replacement(sorted(choices, reverse=True), shots)
    return min(combos, key=lambda c: (abs(sum(c) - target), max(c) - min(c)))


def plan_timeline(workflow: Workflow, duration: float | None, shots: int | None) -> Timeline:
    """The shots of a video workflow for a requested duration and shot count (either may be open).

    With both given, the clip tool (default first, then its alternatives) whose allowed durations
    come closest to ``duration`` wins. With only ``duration``, the planner also picks the shot count
    (at most :data:`MAX_CHOSEN_SHOTS`); with only ``shots``, every clip takes the tool's default
    length; with neither, :data:`DEFAULT_SHOTS` default-length clips.
    """
    step = _clip_step(workflow)
    if duration is None:
        schema = _duration_schema(step.tool)
        return Timeline(step.tool, (float(schema["default"]),) * (shots or DEFAULT_SHOTS))
    if step.tool == SLIDESHOW_TOOL:
        schema = _duration_schema(step.tool)
        if shots is None:
            fewest = math.ceil(duration / schema["maximum"])
            shots = max(fewest, 1, min(MAX_CHOSEN_SHOTS, round(duration / SLIDE_SECONDS)))
        per = min(max(round(duration / shots, 3), schema["minimum"]), schema["maximum"])
        return Timeline(step.tool, (per,) * shots)
    options = []
    for rank, tool in enumerate(step.tools):
        choices = tuple(_duration_schema(tool)["enum"])
        counts = [shots] if shots is not None else range(1, MAX_CHOSEN_SHOTS + 1)
        mean = sum(choices) / len(choices)
        for count in counts:
            clips = _fit(choices, count, duration)
            options.append(((abs(sum(clips) - duration), abs(count - duration / mean), rank), tool, clips))
    _, tool, clips = min(options, key=lambda option: option[0])
    return Timeline(tool, tuple(float(c) for c in clips))


def plan_calls(workflow: Workflow, task: Task) -> list[PlannedCall]:
    """The calls of ``workflow`` that meet ``task``'s requirements (see :meth:`Workflow.instantiate`)."""
    if task.requirements.modality != workflow.modality:
        raise ConfigError(f"Workflow {workflow.id!r} delivers {workflow.modality}, but task "
                          f"{task.task_id!r} asks for {task.requirements.modality}; pick a "
                          f"{task.requirements.modality} workflow")
    return _Planner(workflow, task).run()


class _Planner:
    """One instantiation: walks the active steps and appends calls."""

    def __init__(self, workflow: Workflow, task: Task):
        self.workflow = workflow
        self.req = task.requirements
        self.steps = {step.id: step for step in workflow.steps}
        self.video = self.req.modality == "video"
        self.timeline = plan_timeline(workflow, self.req.duration, self.req.shots) if self.video else None
        self.clip_step = _clip_step(workflow).id if self.video else None
        self.writer = _Writer(task, workflow, self.timeline)
        self.calls: list[PlannedCall] = []
        self.outputs: dict[str, list[tuple[int, int]]] = {}
        self.anchor: tuple[int, int] | None = None
        self.owed = 0 if self.video else self.req.amount
        self.shown = 0  # images delivered so far: each gets its own view

    def run(self) -> list[PlannedCall]:
        active = [s for s in self.workflow.steps if s.when is None or s.when in self.req.audio]
        for position, step in enumerate(active):
            more_to_deliver = any(s.deliver for s in active[position + 1:])
            self._add(step, more_to_deliver)
        if self.video:  # the answer is the last video made
            last = max(c.index for c in self.calls if DEFAULT_TOOLS[c.tool].output.kind == "video")
            self.calls[last] = dataclasses.replace(self.calls[last], deliver=True)
        return self.calls

    def _add(self, step: WorkflowStep, more_to_deliver: bool) -> None:
        timed = self.timeline is not None and step.id == self.clip_step
        tool = self.timeline.tool if timed else step.tool
        group = DEFAULT_TOOLS[tool].group
        jobs = self._jobs(step, tool, more_to_deliver)
        self.outputs[step.id] = []
        for k, images in enumerate(jobs):
            refs = self._refs(step, tool, k, len(jobs))
            if self.req.consistency and group == "text2image" and self.anchor is not None:
                refs.setdefault("reference_images", [])
                if self.anchor not in refs["reference_images"]:
                    refs["reference_images"].append(self.anchor)
            seconds = self.timeline.clips[k] if timed else None
            purpose = step.purpose + (f" ({k + 1} of {len(jobs)})" if len(jobs) > 1 else "")
            position = self.shown if step.deliver else None
            call = PlannedCall(index=len(self.calls), step=step.id, tool=tool,
                               arguments=self.writer.arguments(step, tool, k, len(jobs), images, seconds,
                                                               position),
                               refs=self._compress(tool, refs), purpose=purpose, deliver=step.deliver)
            self.calls.append(call)
            self.outputs[step.id] += [(call.index, j) for j in range(call.media_outputs)]
            if step.deliver:
                self.shown += call.media_outputs
            if self.anchor is None and group == "text2image":
                self.anchor = (call.index, 0)

    def _jobs(self, step: WorkflowStep, tool: str, more_to_deliver: bool) -> list[int | None]:
        """One entry per call: the images it makes (image tools) or None."""
        spec = DEFAULT_TOOLS[tool]
        makes_images = spec.output.kind == "image"
        if step.repeat == "shots":
            return [1 if makes_images else None] * self.timeline.shots
        if not makes_images:
            return [None]
        if step.repeat == "amount":
            count = self.owed if step.deliver else self.req.amount
        else:
            count = self.owed if step.deliver and not more_to_deliver else 1
        if step.deliver:
            self.owed -= count
        if step.repeat == "amount":
            return [1] * count
        first = []
        if self.req.consistency and self.anchor is None and count > 1 and spec.group == "text2image":
            first, count = [1], count - 1  # the anchor comes alone so the rest can reference it
        size = spec.output.max_count
        return first + [min(size, count - start) for start in range(0, count, size)]

    def _resolve(self, step_id: str) -> list[tuple[int, int]]:
        """The outputs of a step; a skipped step passes through its inputs of the same kind."""
        if step_id in self.outputs:
            return self.outputs[step_id]
        step = self.steps[step_id]
        kind = DEFAULT_TOOLS[step.tool].output.kind
        return [out for name in step.inputs if DEFAULT_TOOLS[self.steps[name].tool].output.kind == kind
                for out in self._resolve(name)]

    def _refs(self, step: WorkflowStep, tool: str, k: int, count: int) -> dict[str, list[tuple[int, int]]]:
        refs: dict[str, list[tuple[int, int]]] = {}
        for name in step.inputs:
            kind = DEFAULT_TOOLS[self.steps[name].tool].output.kind
            outs = self._resolve(name)
            if kind == "text" or not outs:
                continue
            arg = next(inp for inp in DEFAULT_TOOLS[tool].inputs if kind in inp.kinds)
            if arg.many or len(outs) == 1:
                picked = outs
            elif len(outs) == count:
                picked = [outs[k]]
            else:
                raise ValueError(f"workflow {self.workflow.id!r}, step {step.id!r}: cannot pair "
                                 f"{len(outs)} outputs of {name!r} with {count} calls")
            refs.setdefault(arg.argument, []).extend(picked)
        return refs

    def _compress(self, tool: str, refs: dict[str, list[tuple[int, int]]]) -> dict[str, tuple]:
        """List arguments name whole calls where they take all of a call's outputs."""
        many = {inp.argument for inp in DEFAULT_TOOLS[tool].inputs if inp.many}
        result: dict[str, tuple] = {}
        for argument, outs in refs.items():
            if argument not in many:
                result[argument] = tuple(outs)
                continue
            entries: list[tuple[int, int | None]] = []
            for call_index, group in itertools.groupby(outs, key=lambda out: out[0]):
                taken = [j for _, j in group]
                if len(taken) == self.calls[call_index].media_outputs:
                    entries.append((call_index, None))
                else:
                    entries += [(call_index, j) for j in taken]
            result[argument] = tuple(entries)
        return result


class _Writer:
    """Writes the literal arguments of each call from the task."""

    def __init__(self, task: Task, workflow: Workflow, timeline: Timeline | None):
        req = task.requirements
        self.req = req
        self.workflow = workflow
        self.timeline = timeline
        self.title = task.scenario.replace("_", " ")
        self.content = ", ".join(req.keywords) or self.title
        self.styled = f", {req.style} style" if req.style else ""
        self.style_arg = {"style": req.style} if req.style else {}

    def arguments(self, step: WorkflowStep, tool: str, k: int, count: int, images: int | None,
                  seconds: float | None, position: int | None) -> dict[str, Any]:
        """The literal arguments of call ``k`` of ``count`` of ``step``.

        Args:
            step: the workflow step.
            tool: the tool chosen for it.
            k: the call's position within the step.
            count: the step's number of calls.
            images: images the call makes (image tools), else None.
            seconds: the clip's length (clip steps), else None.
            position: how many images were delivered before this call (delivering steps), else None.
        """
        spec = DEFAULT_TOOLS[tool]
        if spec.group == "text2image":
            if self.timeline:
                detail = self._shot(k)
            elif position is None:
                detail = step.purpose.lower()
            else:
                views = [_VIEWS[(position + j) % len(_VIEWS)] for j in range(images)]
                detail = views[0] if images == 1 else "one image each: " + ", ".join(views)
            return {"prompt": f"{self.title}: {self.content}; {detail}{self.styled}", "n": images,
                    "aspect_ratio": self.req.aspect_ratio, **self.style_arg}
        if spec.group == "image_edit":
            return {"prompt": f"{step.purpose}, variation {k + 1} of {count}: {self.content}{self.styled}",
                    "n": images}
        if spec.group == "video_generation":
            prompt = f"{self._shot(k)}, {_MOTIONS[k % len(_MOTIONS)]}: {self.content}{self.styled}"
            args = {"prompt": prompt, "duration": int(seconds)}
            if "aspect_ratio" in spec.parameters["properties"]:
                args["aspect_ratio"] = self.req.aspect_ratio
            return args
        return _WRITERS[tool](self)

    def _shot(self, k: int) -> str:
        return f"shot {k + 1} of {self.timeline.shots}, {_BEATS[k % len(_BEATS)]}"

    @property
    def topic(self) -> str:
        return f"{self.title} about {self.content}{self.styled}"

    @property
    def seconds(self) -> float:
        return self.timeline.total

    def narration(self) -> str:
        return (f"This {self.title} is about {self.content}. Scene by scene, it shows what makes it "
                f"special, and it ends with one clear message to remember.")


_WRITERS: dict[str, Callable[[_Writer], dict[str, Any]]] = {
    "tool_prompt_refine": lambda w: {"prompt": f"{w.title}: {w.content}", **w.style_arg},
    "tool_search_content": lambda w: {"query": f"{w.content}: key facts", "max_results": 3},
    "tool_search_inspire": lambda w: {"query": f"{w.title} inspiration: {w.content}{w.styled}", "n": 3},
    "tool_video_shot_gen": lambda w: (
        {"topic": w.topic, "shots": w.timeline.shots, "duration": w.seconds} if w.timeline
        else {"topic": w.topic, "shots": w.req.amount}),
    "tool_video_script_gen": lambda w: {"topic": w.topic, "duration": w.seconds, "tone": "engaging"},
    "tool_html_builder": lambda w: {
        "title": w.content[:200],
        "sections": [f"Section {k + 1}: {w.content}, {_VIEWS[k % len(_VIEWS)]}" for k in range(w.req.amount)]},
    "tool_image_analysis": lambda w: {"question": f"Which traits of {w.content} must stay the same?"},
    "tool_music_suno": lambda w: {
        "prompt": f"upbeat {'song' if w.workflow.id == 'music_video' else 'background music'} "
                  f"for {w.topic}",
        "duration": min(max(w.seconds, 5.0), 240.0),
        "instrumental": w.workflow.id != "music_video"},
    "tool_beat_detect": lambda w: {},
    "tool_video_composite": lambda w: {"transition": "cut"},
    "tool_video_auto_pipeline": lambda w: {"duration_per_image": w.timeline.clips[0]},
    "tool_tts_composite": lambda w: {"text": w.narration(), "voice": "narrator"},
    "tool_sound_fx_gen": lambda w: {"prompt": f"sound effects for {w.content}"},
}

PLANNABLE_TOOLS = frozenset(_WRITERS) | {
    name for name, spec in DEFAULT_TOOLS.items()
    if spec.group in ("text2image", "image_edit", "video_generation")}
"""The tools the planner can write arguments for; every workflow step uses only these."""
