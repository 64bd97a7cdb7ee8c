"""A task: a natural-language request plus the requirements a correct answer must meet.

A :class:`Task` is what an environment resets to. Its ``request`` is the only thing the agent reads;
its :class:`Requirements` are what the result reward checks (image count, video duration within
tolerance, shot count, consistency, style, audio tracks, aspect ratio). Tasks are made by the
scenarios of :mod:`visenv.tasks.scenarios`, each from a seed, and every requirement is stated in the
request text, so a policy (or the scripted TaskAgent) can recover it from the text alone.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Mapping

from visenv.error import ConfigError, TaskFormatError

MODALITIES = ("image", "video")
CONSISTENCY = ("object", "scene", "style")
AUDIO = ("music", "sfx", "voiceover")
ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4")
VIDEO_ASPECT_RATIOS = ("16:9", "9:16")
DIMENSIONS = ("content_creative", "content_match", "object_consistency", "scene_consistency",
              "style_consistency", "variety", "visual_amount", "video_duration", "video_storyboard")
"""The nine VisGenBench dimensions (PAPER.md section 6), in the paper's order."""
VIDEO_ONLY_DIMENSIONS = ("video_duration", "video_storyboard")
MAX_IMAGES = 12
"""Most images one task may ask for."""
MAX_SHOTS = 30
"""Most shots one video task may ask for (the storyboard tool's limit)."""
MAX_DURATION = 600.0
"""Longest video one task may ask for, in seconds."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_subset(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} ({value!r}) must be a sequence of strings, e.g. {allowed[:2]!r}")
    unknown = [v for v in value if v not in allowed]
    if unknown:
        raise ConfigError(f"{name} ({value!r}) holds {unknown!r}; use only {allowed!r}")
    if list(value) != sorted(set(value)):
        raise ConfigError(f"{name} ({value!r}) must be sorted and without repeats: "
                          f"use {tuple(sorted(set(value)))!r}")


@dataclass(frozen=True)
class Requirements:
    """What the delivered media must satisfy; every field is stated in the task's request.

    Attributes:
        modality: "image" or "video": what the agent must deliver.
        amount: images to deliver (image tasks, 1 to :data:`MAX_IMAGES`); videos to deliver (video
            tasks: always 1).
        duration: the video's length in seconds, or None when the request leaves it open (always
            None for images).
        shots: the video's storyboard shot count, or None when the request leaves it open (always
            None for images).
        consistency: sorted subset of :data:`CONSISTENCY` that must hold across the outputs (images
            of a set, shots of a video); image tasks need ``amount >= 2`` for it.
        style: the style keyword the output must show, e.g. "watercolor", or None.
        keywords: content keywords the output must be about (subject first, then setting).
        audio: sorted subset of :data:`AUDIO` the video must carry (always empty for images).
        aspect_ratio: one of :data:`ASPECT_RATIOS`; videos use "16:9" or "9:16".
        duration_tolerance: relative tolerance of the duration check (0.1 = within 10%).
    """

    modality: str
    amount: int
    duration: float | None
    shots: int | None
    consistency: tuple[str, ...]
    style: str | None
    keywords: tuple[str, ...]
    audio: tuple[str, ...] = ()
    aspect_ratio: str = "1:1"
    duration_tolerance: float = 0.1

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ConfigError(f"Requirements.modality ({self.modality!r}) must be one of {MODALITIES}")
        image = self.modality == "image"
        if not _is_int(self.amount) or not 1 <= self.amount <= (MAX_IMAGES if image else 1):
            fix = (f"an integer from 1 to {MAX_IMAGES}; split larger sets into several tasks" if image
                   else "1: a video task delivers one video")
            raise ConfigError(f"Requirements.amount ({self.amount!r}) must be {fix}")
        if image and (self.duration is not None or self.shots is not None or self.audio):
            raise ConfigError(
                f"Requirements of an image task must have duration=None, shots=None and audio=() "
                f"(got duration={self.duration!r}, shots={self.shots!r}, audio={self.audio!r}); "
                "set modality='video' for a video task")
        if self.duration is not None and (
                isinstance(self.duration, bool) or not isinstance(self.duration, (int, float))
                or not 0 < self.duration <= MAX_DURATION):
            raise ConfigError(f"Requirements.duration ({self.duration!r}) must be seconds in "
                              f"(0, {MAX_DURATION:g}], or None to leave the length open")
        if self.shots is not None and (not _is_int(self.shots) or not 1 <= self.shots <= MAX_SHOTS):
            raise ConfigError(f"Requirements.shots ({self.shots!r}) must be an integer from 1 to "
                              f"{MAX_SHOTS}, or None to leave the shot count open")
        _check_subset("Requirements.consistency", self.consistency, CONSISTENCY)
        if image and self.consistency and self.amount < 2:
            raise ConfigError(f"Requirements.consistency ({self.consistency!r}) needs at least 2 "
                              f"images to hold across, but amount is {self.amount}; raise amount or "
                              "drop the consistency requirement")
        if self.style is not None and (not isinstance(self.style, str) or not self.style.strip()):
            raise ConfigError(f"Requirements.style ({self.style!r}) must be a non-empty string or None")
        if not isinstance(self.keywords, tuple) or not all(
                isinstance(k, str) and k.strip() for k in self.keywords):
            raise ConfigError(f"Requirements.keywords ({self.keywords!r}) must be a sequence of "
                              "non-empty strings, e.g. ('ceramic mug', 'marble countertop')")
        _check_subset("Requirements.audio", self.audio, AUDIO)
        allowed_ratios = ASPECT_RATIOS if image else VIDEO_ASPECT_RATIOS
        if self.aspect_ratio not in allowed_ratios:
            raise ConfigError(f"Requirements.aspect_ratio ({self.aspect_ratio!r}) must be one of "
                              f"{allowed_ratios} for {self.modality} tasks")
        if (isinstance(self.duration_tolerance, bool) or not isinstance(self.duration_tolerance, (int, float))
                or not 0 < self.duration_tolerance < 1):
            raise ConfigError(f"Requirements.duration_tolerance ({self.duration_tolerance!r}) must be "
                              "a fraction in (0, 1), e.g. 0.1 for within 10%")

    def duration_ok(self, seconds: float) -> bool:
        """Whether a video of ``seconds`` meets the duration (always True when it is open)."""
        if self.duration is None:
            return True
        return abs(seconds - self.duration) <= self.duration_tolerance * self.duration


@dataclass(frozen=True)
class Task:
    """One seeded request of a scenario.

    Attributes:
        task_id: unique id, ``f"{scenario}-{seed}"`` (plus ``f"-{dimension}"`` for benchmark tasks).
        scenario: the scenario id, e.g. "product_images" (see :data:`visenv.tasks.SCENARIOS`).
        workflow: the id of the expert reference workflow that solves it (see
            :data:`visenv.tasks.WORKFLOWS`).
        request: the natural-English request the agent reads; it states every requirement.
        requirements: what the delivered media must satisfy.
        seed: the seed the task was drawn from; it fully determines the task.
        dimension: the VisGenBench dimension the task probes (one of :data:`DIMENSIONS`), or None.
    """

    task_id: str
    scenario: str
    workflow: str
    request: str
    requirements: Requirements
    seed: int
    dimension: str | None = None

    def __post_init__(self) -> None:
        for name in ("task_id", "scenario", "workflow", "request"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"Task.{name} ({value!r}) must be a non-empty string")
        if not isinstance(self.requirements, Requirements):
            raise ConfigError(f"Task.requirements must be a Requirements, got "
                              f"{type(self.requirements).__name__}; build it with Requirements(...)")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"Task.seed ({self.seed!r}) must be a non-negative integer")
        if self.dimension is not None and self.dimension not in DIMENSIONS:
            raise ConfigError(f"Task.dimension ({self.dimension!r}) must be None or one of {DIMENSIONS}")
        if self.dimension in VIDEO_ONLY_DIMENSIONS and self.requirements.modality != "video":
            raise ConfigError(f"Task.dimension {self.dimension!r} applies to video tasks only, but "
                              f"the task's modality is {self.requirements.modality!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); :meth:`from_dict` inverts it exactly."""
        data = asdict(self)
        data["requirements"] = {key: list(value) if isinstance(value, tuple) else value
                                for key, value in data["requirements"].items()}
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Task:
        """Rebuild a task from :meth:`to_dict`'s output, validating every field.

        Raises:
            TaskFormatError: a field is missing, unexpected, of the wrong type or invalid; the
                message names the field.
        """
        if not isinstance(data, Mapping):
            raise TaskFormatError(f"a task must be a JSON object, got {type(data).__name__}")
        reqs = data.get("requirements")
        if not isinstance(reqs, Mapping):
            raise TaskFormatError(f"field 'requirements' must be an object, got {reqs!r}")
        task_kwargs = _fields(cls, data, "task")
        req_kwargs = _fields(Requirements, reqs, "requirements")
        for key in ("consistency", "keywords", "audio"):
            if isinstance(req_kwargs.get(key), list):
                req_kwargs[key] = tuple(req_kwargs[key])
        if _is_int(req_kwargs.get("duration")):
            req_kwargs["duration"] = float(req_kwargs["duration"])
        try:
            task_kwargs["requirements"] = Requirements(**req_kwargs)
            return cls(**task_kwargs)
        except ConfigError as err:
            raise TaskFormatError(str(err)) from None


def _fields(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The keyword arguments of ``cls`` found in ``data``; unknown or missing required keys raise."""
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise TaskFormatError(f"unexpected {where} field(s) {unknown}; expected only {sorted(names)}")
    required = [name for name, f in names.items()
                if f.default is MISSING and f.default_factory is MISSING and name not in data]
    if required:
        raise TaskFormatError(f"missing {where} field(s) {required}")
    return dict(data)
