"""LLM/VLM judges as batched reward components: R_plan, R_traj, R_reflect and the benchmark grader.

Every judge is a class (it pickles to Ray workers: the backend and cache pickle as settings) and a
rubric component: ``judge(episodes) -> list[float | None]``. One call gathers the requests of all
episodes, answers what it can from the :class:`~visenv.rewards.judges.cache.JudgeCache`, sends the
rest to the backend at once (the backend bounds the concurrency), parses each answer strictly
(:mod:`visenv.rewards.judges.templates`) and combines each episode's answers into one score.

Failure policy: when any request of an episode fails (transport, HTTP, the deadline, an
undecodable body, an unparseable answer) the episode's score is ``None``, never 0.0; the judge counts it in ``failures`` and logs a warning
with the judge id, the task id and the reason. The rubric then applies its None policy.

Provenance: ``judge.judge_id`` is ``"<model id>|<name>:<template hash>"``. After each call
``judge.last_details`` holds one dict per episode: ``judge_id``, ``score``, the parsed field
scores of each request (``answers``), how many came from the cache (``cached``) and the failure
reason (``error``, None when it scored). A score of 0.0 or 1.0 decided without the model (no plan,
no reflection, nothing delivered) has ``answers == []``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import av
from PIL import Image

from visenv.episode import CallRecord, EpisodeRecord
from visenv.error import ConfigError, MediaDatabaseError
from visenv.media import Artifact
from visenv.mediadb import thumbnail
from visenv.rewards.judges.backends import ChatBackend, ChatPrompt
from visenv.rewards.judges.cache import JudgeCache, judge_key
from visenv.rewards.judges.templates import GRADER, PLAN, REFLECTION, TRAJECTORY, PromptTemplate
from visenv.tasks import WORKFLOWS, Requirements, Workflow
from visenv.tools.spec import ToolSpec

logger = logging.getLogger(__name__)

VISUAL_KINDS = ("image", "video")
SHOWN_ATTRIBUTES = ("width", "height", "duration")
"""Artifact attributes written next to each picture shown to a judge."""
_PICTURE_ERRORS = (OSError, ValueError, EOFError, av.FFmpegError, MediaDatabaseError)
"""What reading a media file for a picture may raise: the request then fails (score None)."""


@dataclass(frozen=True)
class JudgeRequest:
    """One question to the judge model.

    Attributes:
        template: the prompt template.
        values: the template's fields.
        media: the artifacts shown, in order, after the text (images and videos).
    """

    template: PromptTemplate
    values: Mapping[str, str]
    media: tuple[Artifact, ...] = ()


def requirements_text(req: Requirements) -> str:
    """A task's requirements, one per line."""
    lines = [f"- deliver: {req.amount} {req.modality}{'s' if req.amount > 1 else ''}, aspect ratio {req.aspect_ratio}"]
    if req.duration is not None:
        lines.append(f"- duration: {req.duration:g} s (within {req.duration_tolerance:.0%})")
    if req.shots is not None:
        lines.append(f"- storyboard: {req.shots} shots")
    if req.consistency:
        lines.append(f"- consistency across outputs: {', '.join(req.consistency)}")
    if req.style:
        lines.append(f"- style: {req.style}")
    if req.keywords:
        lines.append(f"- content: {', '.join(req.keywords)}")
    if req.audio:
        lines.append(f"- audio: {', '.join(req.audio)}")
    return "\n".join(lines)


def tools_text(tools: Mapping[str, ToolSpec]) -> str:
    """Every tool of ``tools``, one per line: name, group and description."""
    return "\n".join(f"- {s.name} ({s.group}): {s.description}" for s in tools.values())


def workflow_text(workflow: Workflow) -> str:
    """A reference workflow's steps, numbered, with tools, repetition, inputs and conditions."""
    lines = []
    for i, step in enumerate(workflow.steps, 1):
        notes = [f"or {', '.join(step.alternatives)}"] if step.alternatives else []
        if step.repeat:
            notes.append(f"once per {'image' if step.repeat == 'amount' else 'shot'}")
        if step.inputs:
            notes.append(f"uses {', '.join(step.inputs)}")
        if step.when:
            notes.append(f"only when {step.when} is requested")
        lines.append(f"{i}. [{step.id}] {step.tool}: {step.purpose}" + (f" ({'; '.join(notes)})" if notes else ""))
    return "\n".join(lines)


def calls_text(calls: Sequence[CallRecord], limit: int = 300) -> str:
    """The executed calls, one per line: index, tool, arguments (cut at ``limit`` chars) and result."""
    lines = []
    for call in calls:
        arguments = json.dumps(call.arguments, ensure_ascii=False)
        if len(arguments) > limit:
            arguments = arguments[:limit] + "..."
        result = f"ok -> {', '.join(call.outputs) or 'text'}" if call.ok else f"error: {call.error}"
        lines.append(f"{call.index}. {call.tool} {arguments} => {result}")
    return "\n".join(lines) or "(none)"


def picture_png(artifact: Artifact, size: int) -> bytes:
    """A letterboxed ``size`` x ``size`` PNG of an image or a video's middle frame."""
    buffer = io.BytesIO()
    Image.fromarray(thumbnail(artifact.path, artifact.kind, size)).save(buffer, format="PNG")
    return buffer.getvalue()


class Judge:
    """Base of the judges: batching, cache, backend calls, strict parsing and the failure policy.

    Args:
        backend: the chat backend (:class:`~visenv.rewards.judges.backends.OpenAIChatBackend` or
            :class:`~visenv.rewards.judges.backends.TransformersChatBackend`).
        cache_path: the SQLite judge cache, shared by processes; None caches in this process only.
        image_size: side of the square pictures shown to a vision judge.
        max_images: most pictures shown in one request.

    Attributes:
        failures: episodes that scored None because a request failed (this process).
        requests_sent: requests sent to the backend (cache misses).
        cache_hits: requests answered by the cache.
        last_details: per episode of the last call, see the module docstring.

    Subclasses set ``name``, ``templates`` and ``shows_media`` and implement :meth:`requests` and
    :meth:`combine`.
    """

    name = ""
    templates: tuple[PromptTemplate, ...] = ()
    shows_media = False

    def __init__(self, backend: ChatBackend, *, cache_path: str | None = None, image_size: int = 448,
                 max_images: int = 8):
        if self.shows_media and not backend.vision:
            raise ConfigError(f"{type(self).__name__} shows media to the judge, but {backend!r} is text-only; "
                              "use a vision model (OpenAIChatBackend(..., vision=True) or an "
                              "image-text-to-text TransformersChatBackend).")
        if image_size < 32 or max_images < 1:
            raise ConfigError(f"{type(self).__name__} needs image_size >= 32 and max_images >= 1 "
                              f"(got {image_size} and {max_images}).")
        self.backend, self.image_size, self.max_images = backend, image_size, max_images
        self.cache = JudgeCache(cache_path)
        self.failures = self.requests_sent = self.cache_hits = 0
        self.last_details: list[dict[str, Any]] = []

    @property
    def judge_id(self) -> str:
        """The model and the exact prompts: ``"<model id>|<name>:<template hash>"``."""
        hashes = "".join(t.hash for t in self.templates)
        digest = hashes if len(self.templates) == 1 else hashlib.sha256(hashes.encode()).hexdigest()[:12]
        return f"{self.backend.model_id}|{self.name}:{digest}"

    def requests(self, episode: EpisodeRecord) -> list[JudgeRequest]:
        """The questions to ask about ``episode`` (may be empty: :meth:`combine` then decides)."""
        raise NotImplementedError

    def combine(self, episode: EpisodeRecord, answers: list[dict[str, float]]) -> float | None:
        """The episode's score from the parsed answers of its requests, in order."""
        raise NotImplementedError

    def _prompt(self, request: JudgeRequest) -> ChatPrompt:
        parts: list[str | bytes] = [request.template.render(request.values)]
        for i, artifact in enumerate(request.media, 1):
            shown = ", ".join(f"{k}={v}" for k, v in artifact.attributes.items() if k in SHOWN_ATTRIBUTES)
            parts += [f"\nOutput {i}: {artifact.kind} {artifact.id} ({shown})\n", picture_png(artifact, self.image_size)]
        return ChatPrompt(request.template.system_prompt, tuple(parts))

    def _answer(self, requests: Sequence[JudgeRequest]) -> list[dict[str, Any]]:
        """Per request ``{"scores", "answer", "cached"}`` or ``{"error"}``."""
        keys = [judge_key(self.judge_id, r.template.name, r.values, [a.sha256 for a in r.media]) for r in requests]
        stored = self.cache.get_many(keys)
        results: dict[str, dict[str, Any]] = {k: {**v, "cached": True} for k, v in stored.items()}
        self.cache_hits += sum(k in stored for k in keys)
        todo = {k: r for k, r in zip(keys, requests) if k not in stored}
        prompts: dict[str, ChatPrompt] = {}
        for key, request in todo.items():
            try:
                prompts[key] = self._prompt(request)
            except _PICTURE_ERRORS as err:
                results[key] = {"error": f"cannot render media: {err}"}
        self.requests_sent += len(prompts)
        fresh = {}
        answers = self.backend.complete_many(list(prompts.values())) if prompts else []
        for key, answer in zip(prompts, answers):
            if not isinstance(answer, str):
                results[key] = {"error": str(answer)}
                continue
            try:
                fresh[key] = {"scores": todo[key].template.parse(answer), "answer": answer}
            except ValueError as err:
                results[key] = {"error": f"unparseable answer: {err}"}
                continue
            results[key] = {**fresh[key], "cached": False}
        self.cache.put_many(fresh)
        return [results[k] for k in keys]

    def __call__(self, episodes: Sequence[EpisodeRecord]) -> list[float | None]:
        per_episode = [self.requests(e) for e in episodes]
        answers = iter(self._answer([r for rs in per_episode for r in rs]))
        scores, self.last_details = [], []
        for episode, requests in zip(episodes, per_episode):
            got = [next(answers) for _ in requests]
            error = next((a["error"] for a in got if "error" in a), None)
            if error is None:
                score = self.combine(episode, [a["scores"] for a in got])
            else:
                score = None
                self.failures += 1
                logger.warning("%s judge %s failed on task %s: %s; score None",
                               self.name, self.judge_id, episode.task.task_id, error)
            scores.append(score)
            self.last_details.append({"judge_id": self.judge_id, "score": score, "error": error,
                                      "answers": [a.get("scores") for a in got],
                                      "cached": sum(bool(a.get("cached")) for a in got)})
        return scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.judge_id!r})"


class PlanJudge(Judge):
    """R_plan by vPlanJudger: the plan against the request, the tools and the reference workflow.

    Five facets (PAPER.md section 3), see :data:`~visenv.rewards.judges.templates.PLAN`.
    R_plan = fulfilment x mean(coherence, executability, atomicity, optimality), the same shape as
    :class:`~visenv.rewards.rules.RulePlanReward`. An episode without a plan scores 0.0.
    """

    name = "R_plan"
    templates = (PLAN,)

    def requests(self, episode: EpisodeRecord) -> list[JudgeRequest]:
        turn = episode.plan_turn
        if turn is None:
            return []
        workflow = WORKFLOWS[episode.task.workflow]
        return [JudgeRequest(PLAN, {
            "request": episode.task.request, "requirements": requirements_text(episode.task.requirements),
            "tools": tools_text(episode.tools), "workflow": f"{workflow.name}. {workflow.description}",
            "workflow_steps": workflow_text(workflow), "plan": turn.plan})]

    def combine(self, episode: EpisodeRecord, answers: list[dict[str, float]]) -> float | None:
        if not answers:
            return 0.0
        f = answers[0]
        return f["fulfilment"] * (f["coherence"] + f["executability"] + f["atomicity"] + f["optimality"]) / 4


class TrajectoryJudge(Judge):
    """R_traj by an LLM evaluator: how faithfully the executed calls carry out the plan.

    An episode without a plan or without calls scores 0.0, as the rule version does.
    """

    name = "R_traj"
    templates = (TRAJECTORY,)

    def requests(self, episode: EpisodeRecord) -> list[JudgeRequest]:
        turn = episode.plan_turn
        if turn is None or not episode.calls:
            return []
        ending = (f"The agent then answered: {episode.turns[-1].turn.answer}" if episode.answered
                  else "The episode ended without an answer (budget exhausted).")
        return [JudgeRequest(TRAJECTORY, {"request": episode.task.request, "plan": turn.plan,
                                          "calls": calls_text(episode.calls), "ending": ending})]

    def combine(self, episode: EpisodeRecord, answers: list[dict[str, float]]) -> float | None:
        return answers[0]["agreement"] if answers else 0.0


def checkpoints(episode: EpisodeRecord) -> list[tuple[CallRecord, tuple[Artifact, ...], str | None]]:
    """VisionCreator-R1 reflection checkpoints: each successful call that produced images or
    videos, as (call, its visual outputs, the reflection of the next turn or None)."""
    found = []
    for i, step in enumerate(episode.turns):
        call = step.call
        if call is None or not call.ok:
            continue
        media = tuple(episode.artifacts[o] for o in call.outputs
                      if o in episode.artifacts and episode.artifacts[o].kind in VISUAL_KINDS)
        if media:
            following = episode.turns[i + 1].turn.reflection if i + 1 < len(episode.turns) else None
            found.append((call, media, following))
    return found


class ReflectionJudge(Judge):
    """R_reflect (VisionCreator-R1): the share of reflection checkpoints a VLM judges satisfied.

    A checkpoint is a successful call that produced images or videos; it is satisfied when the
    agent's next turn reflects on the result and the judge finds the verdict right (see
    :data:`~visenv.rewards.judges.templates.REFLECTION`). A checkpoint without a reflection is
    unsatisfied without asking the judge. None when the episode has no checkpoint.
    """

    name = "R_reflect"
    templates = (REFLECTION,)
    shows_media = True

    def requests(self, episode: EpisodeRecord) -> list[JudgeRequest]:
        out = []
        for call, media, reflection in checkpoints(episode):
            if reflection is None:
                continue
            arguments = call.arguments if isinstance(call.arguments, dict) else {}
            prompt = arguments.get("prompt") or json.dumps(arguments, ensure_ascii=False)
            out.append(JudgeRequest(REFLECTION, {"request": episode.task.request, "tool": call.tool,
                                                 "prompt": str(prompt), "reflection": reflection},
                                    media[:self.max_images]))
        return out

    def combine(self, episode: EpisodeRecord, answers: list[dict[str, float]]) -> float | None:
        total = len(checkpoints(episode))
        return sum(a["satisfied"] for a in answers) / total if total else None


class BenchmarkGrader(Judge):
    """The VisGenBench grader: the six subjective dimensions, each by its meta-item rubric.

    A benchmark task probes one dimension (``task.dimension``). For a subjective one the grader
    shows the request and the delivered images and videos to a VLM and scores the mean of the
    dimension's meta-items (:data:`~visenv.rewards.judges.templates.GRADER`). An episode that
    delivered nothing visual scores 0.0; an episode whose task has no subjective dimension, None.
    """

    name = "grade"
    templates = tuple(GRADER.values())
    shows_media = True

    def requests(self, episode: EpisodeRecord) -> list[JudgeRequest]:
        template = GRADER.get(episode.task.dimension)
        media = [a for a in episode.delivered() if a.kind in VISUAL_KINDS][:self.max_images]
        if template is None or not media:
            return []
        return [JudgeRequest(template, {"request": episode.task.request, "count": str(len(media))}, tuple(media))]

    def combine(self, episode: EpisodeRecord, answers: list[dict[str, float]]) -> float | None:
        if episode.task.dimension not in GRADER:
            return None
        if not answers:
            return 0.0
        return sum(answers[0].values()) / len(answers[0])
