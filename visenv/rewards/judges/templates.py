"""Prompt templates of the LLM/VLM judges and their strict score parsers.

A :class:`PromptTemplate` is a system prompt, a user prompt with ``{named}`` fields, and the
:class:`ScoreField` s the judge must answer, as one JSON object. The answer format is written into
the system prompt from the fields, so the template's :attr:`~PromptTemplate.hash` (part of every
judge id) changes whenever anything the judge reads changes.

Parsing is strict: the answer must hold exactly one JSON object (reasoning models' ``<think>``
blocks and Markdown fences are ignored), no JSON object in it may repeat a key, and it must hold
every field, each an integer in its range: 0 or 1 for a binary field, 0 to 10 for a scale. Anything else raises :class:`ValueError` with the reason;
the judge then scores ``None`` for the sample. A number is never guessed from prose.

Templates:

* :data:`PLAN` (vPlanJudger, PAPER.md section 3): the plan against the request, the tools and the
  expert reference workflow, on five facets.
* :data:`TRAJECTORY` (R_traj): the executed calls against the plan.
* :data:`REFLECTION` (VisionCreator-R1 checkpoints): is the agent's reflection on a generated
  result right?
* :data:`GRADER` (VisGenBench): one meta-item rubric per subjective dimension.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

SCALE_MAX = 10
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        twice = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise ValueError(f"the answer repeats the key {twice!r}")
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_refuse_duplicate_keys)


@dataclass(frozen=True)
class ScoreField:
    """One number the judge answers.

    Attributes:
        name: the JSON key.
        binary: True for 0 or 1; False for an integer from 0 to :data:`SCALE_MAX`.
        meaning: what the number measures, as the judge reads it.
    """

    name: str
    binary: bool
    meaning: str

    @property
    def range_text(self) -> str:
        return "0 or 1" if self.binary else f"integer 0-{SCALE_MAX}"


@dataclass(frozen=True)
class PromptTemplate:
    """A judge prompt and the JSON answer it expects.

    Attributes:
        name: e.g. "plan".
        system: the judge's role and criteria (the answer format is appended).
        user: the user message with ``{field}`` placeholders.
        fields: the numbers to answer.
    """

    name: str
    system: str
    user: str
    fields: tuple[ScoreField, ...]

    @property
    def system_prompt(self) -> str:
        """The system prompt with the answer format."""
        lines = [f'- "{f.name}" ({f.range_text}): {f.meaning}' for f in self.fields]
        example = ", ".join(f'"{f.name}": <{f.range_text}>' for f in self.fields)
        return (f"{self.system}\n\nScore these fields:\n" + "\n".join(lines) +
                "\n\nAnswer with one JSON object and nothing else, for example "
                f'{{{example}, "rationale": "<one or two sentences>"}}.')

    @property
    def hash(self) -> str:
        """12 hex digits naming the exact prompt and answer format."""
        payload = json.dumps([self.name, self.system_prompt, self.user], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def render(self, values: Mapping[str, str]) -> str:
        """The user message with ``values`` filled in."""
        return self.user.format_map(dict(values))

    def parse(self, answer: str) -> dict[str, float]:
        """Each field's score scaled to [0, 1], from the judge's answer.

        Raises:
            ValueError: the answer is not exactly one JSON object holding every field as an
                integer in its range.
        """
        obj = single_json_object(answer)
        scores = {}
        for f in self.fields:
            if f.name not in obj:
                raise ValueError(f"the answer lacks the field {f.name!r}")
            value = obj[f.name]
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"field {f.name!r} must be an integer, got {value!r}")
            top = 1 if f.binary else SCALE_MAX
            if not 0 <= value <= top:
                raise ValueError(f"field {f.name!r} ({value}) must be within 0..{top}")
            scores[f.name] = int(value) / top
        return scores


def single_json_object(answer: str) -> dict:
    """The one JSON object in ``answer``, outside any ``<think>`` block.

    Raises:
        ValueError: no JSON object, more than one, an object that repeats a key (which of the two
            values the judge meant is unknowable), or nesting too deep to decode.
    """
    text = _THINK.sub("", answer)
    found, position = [], 0
    while (start := text.find("{", position)) != -1:
        try:
            obj, end = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        except RecursionError:
            raise ValueError(f"the answer nests JSON too deeply to decode: {answer[:200]!r}") from None
        if isinstance(obj, dict):
            found.append(obj)
        position = end
    if len(found) != 1:
        raise ValueError(f"the answer must hold exactly one JSON object, found {len(found)}: {answer[:200]!r}")
    return found[0]


PLAN = PromptTemplate(
    name="plan",
    system=(
        "You are vPlanJudger, an expert reviewer of the plans of a visual-creation agent. The agent "
        "must satisfy a user's request with the listed tools only. You read the request, its "
        "requirements, the tools, an expert reference workflow for this kind of request, and the "
        "agent's plan. Judge the plan itself, not how it was executed. The reference shows one good "
        "way; a different plan that is as good scores as well."),
    user=("## Request\n{request}\n\n## Requirements\n{requirements}\n\n## Available tools\n{tools}\n\n"
          "## Expert reference workflow: {workflow}\n{workflow_steps}\n\n## The agent's plan\n{plan}\n"),
    fields=(
        ScoreField("fulfilment", True,
                   "requirement fulfilment: 1 when carrying out the plan would deliver the requested "
                   "modality in the requested quantity, with every stated duration, shot count, audio "
                   "track and consistency requirement covered by some step; else 0."),
        ScoreField("coherence", False,
                   "logical coherence: steps in a sensible order, each step's inputs made by an "
                   "earlier step, no contradictions."),
        ScoreField("executability", False,
                   "pragmatic executability: every step is grounded in one available tool that can "
                   "do what the step says."),
        ScoreField("atomicity", False,
                   "decomposition atomicity: each step is one tool call with one purpose; no merged, "
                   "vague or missing steps."),
        ScoreField("optimality", False,
                   "expert-guided optimality: the expert's good practice (reference images for "
                   "identity, scene or style consistency across shots or images, audio aligned to "
                   "the beat, the fewest steps that do the job)."),
    ),
)

TRAJECTORY = PromptTemplate(
    name="trajectory",
    system=(
        "You are an evaluator of a visual-creation agent's trajectories. You read the agent's plan "
        "and the tool calls it then executed, with their results. Judge how faithfully the "
        "execution carried out the plan."),
    user="## Request\n{request}\n\n## The agent's plan\n{plan}\n\n## Executed tool calls\n{calls}\n\n{ending}\n",
    fields=(
        ScoreField("agreement", False,
                   "plan-execution agreement: planned steps executed in order with the planned (or "
                   "equivalent) tools, deviations justified by tool feedback such as a retry after "
                   "an error, no unplanned detours, nothing planned left undone."),
    ),
)

REFLECTION = PromptTemplate(
    name="reflection",
    system=(
        "You check the reflections of a visual-creation agent. After a tool produced media, the "
        "agent wrote a reflection judging the result. You see the request, the step, the media "
        "(pictures; a video is shown by a frame) and the reflection."),
    user=("## Request\n{request}\n\n## The step\nTool {tool} with prompt: {prompt}\n\n"
          "## The agent's reflection\n{reflection}\n\n## The media the step produced\n"),
    fields=(
        ScoreField("satisfied", True,
                   "1 when the reflection's verdict is right: it accepts media that fit the request "
                   "and the step, or it names a real, visible defect of media that do not; 0 when it "
                   "accepts flawed media, rejects good media for no visible reason, or does not "
                   "judge the media at all."),
    ),
)


def _grader(dimension: str, focus: str, items: tuple[tuple[str, str], ...]) -> PromptTemplate:
    return PromptTemplate(
        name=f"grade_{dimension}",
        system=(
            "You grade the outputs of a visual-creation agent for the VisGenBench benchmark, on one "
            f"dimension: {dimension.replace('_', ' ')}: {focus} You see the request and every "
            "delivered output (pictures; a video is shown by a frame). Score each meta-item of "
            "the rubric independently."),
        user="## Request\n{request}\n\n## Delivered outputs ({count})\n",
        fields=tuple(ScoreField(name, False, meaning) for name, meaning in items),
    )


GRADER: dict[str, PromptTemplate] = {
    "content_creative": _grader("content_creative", "how creative the content is.", (
        ("originality", "goes beyond a literal, generic rendering of the request"),
        ("concept", "a clear creative idea that serves the request's purpose"),
        ("composition", "deliberate framing, colour and layout"),
        ("appeal", "would catch and hold the intended audience's attention"))),
    "content_match": _grader("content_match", "how exactly the content matches the request.", (
        ("subject", "every requested subject is present and recognisable"),
        ("attributes", "the requested attributes (style, colours, text, mood) are shown"),
        ("setting", "the requested setting or context is shown"),
        ("no_contradiction", "nothing contradicts or distracts from the request"))),
    "object_consistency": _grader("object_consistency", "whether the same object or character keeps its identity "
                                  "across the outputs (images of a set, shots of a video).", (
        ("identity", "the object or character is recognisably the same one in every output"),
        ("details", "colours, markings, clothing and features stay the same"),
        ("proportions", "shape and proportions stay the same"))),
    "scene_consistency": _grader("scene_consistency", "whether the outputs show one coherent scene or "
                                 "environment.", (
        ("environment", "the same place, with the same landmarks and props"),
        ("lighting", "consistent lighting, time of day and weather"),
        ("layout", "spatial layout that agrees between outputs"))),
    "style_consistency": _grader("style_consistency", "whether the outputs share one visual style.", (
        ("medium", "the same medium or rendering technique (photo, watercolour, 3D, ...)"),
        ("palette", "the same colour palette and grading"),
        ("mood", "the same mood and visual language"))),
    "variety": _grader("variety", "how varied the outputs are while staying on brief.", (
        ("distinct", "the outputs differ meaningfully from each other, not near duplicates"),
        ("range", "they explore different compositions, angles or ideas"),
        ("on_brief", "every output still answers the request"))),
}
"""The grader's meta-item rubric for each of the six subjective VisGenBench dimensions."""
