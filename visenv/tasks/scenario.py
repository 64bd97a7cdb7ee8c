"""The scenario base class: a seeded request template for one of the paper's 42 task types.

A :class:`Scenario` holds pools (subjects, settings, styles, aspect ratios, amounts, durations,
shot counts, audio needs) and request openings; :meth:`Scenario.make` draws from them with
``random.Random`` and writes a natural-English request that states every requirement in a fixed,
parseable vocabulary ("4 product photos", "It should run 30 seconds.", "Use 5 shots in total.",
"Keep the same character and setting across every shot.", "Render it in watercolor style.",
"Add background music and a voice-over.", "Use a 16:9 aspect ratio."). The concrete scenarios live
in :mod:`visenv.tasks.image_scenarios` and :mod:`visenv.tasks.video_scenarios`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from visenv.error import ConfigError
from visenv.tasks.planner import plan_timeline
from visenv.tasks.task import (ASPECT_RATIOS, CONSISTENCY, DIMENSIONS, MAX_IMAGES, MODALITIES,
                               VIDEO_ASPECT_RATIOS, VIDEO_ONLY_DIMENSIONS, Requirements, Task)
from visenv.tasks.workflows import WORKFLOWS

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")
"""Number words a request may spell counts with (index = value)."""
STATED_DURATION_RATE = 0.8
"""Share of video requests that state a duration (always, for the duration and amount dimensions)."""
STATED_SHOTS_RATE = 0.5
"""Share of video requests that state a shot count (always, for the storyboard and amount dimensions)."""
SCENE_NOUNS = ("setting", "location", "environment", "background")
STYLE_NOUNS = ("art style", "visual style", "color palette")
AUDIO_PHRASES = {"music": ("background music", "an original soundtrack"),
                 "voiceover": ("a voice-over", "narration"),
                 "sfx": ("sound effects",)}
"""How a request names each audio track."""
_ORIENTATION = {"1:1": "square", "16:9": "landscape", "4:3": "landscape", "9:16": "vertical",
                "3:4": "portrait"}
_ASPECT = ("Use a {ratio} aspect ratio.", "Format it at {ratio} ({orientation}).",
           "The aspect ratio should be {ratio}.", "Aspect ratio: {ratio}, {orientation}.")
_STYLE = ("Render it in {style} style.", "Use {a_style} style.", "Go for {a_style} look.",
          "The style should be {style}.")
_DURATION = ("It should run {seconds} seconds.", "Keep the running time to {seconds} seconds.",
             "Target length: {seconds} seconds.", "Make it {seconds} seconds long.")
_SHOTS = ("Tell it in {shots} shots.", "Use {shots} shots in total.", "Break it into {shots} shots.",
          "Structure it as {shots} shots.")
_AUDIO = ("Add {tracks}.", "Include {tracks}.", "It should come with {tracks}.")
_CONSISTENCY = ("Keep the same {nouns} across every {unit}.",
                "The {nouns} must stay consistent from one {unit} to the next.",
                "Use the same {nouns} in every {unit}.")
_FLOURISH = {
    "content_creative": ("Be bold and imaginative with the concept.",
                         "Surprise me with an inventive, original idea.",
                         "Take a creative, unexpected angle."),
    "content_match": ("Make sure the {subject} and the {setting} are clearly recognisable.",
                      "Stay faithful to the brief: the {subject} and the {setting} must be obvious."),
    "variety": ("Make each {unit} clearly different in composition.",
                "Vary the framing and composition from one {unit} to the next."),
    "visual_amount": ("Deliver exactly the quantity requested.", "Please stick to the exact count asked for."),
    "video_duration": ("The running time matters, so hit it precisely.",),
    "video_storyboard": ("Plan it carefully, shot by shot.",),
    "object_consistency": ("Consistency matters most here.",),
    "scene_consistency": ("Consistency matters most here.",),
    "style_consistency": ("Consistency matters most here.",),
}


def with_article(phrase: str) -> str:
    """``phrase`` with "a" or "an" in front (pools avoid words where spelling misleads)."""
    return f"{'an' if phrase[0].lower() in 'aeiou' else 'a'} {phrase}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _number(value: int, rng: random.Random) -> str:
    return rng.choice((str(value), NUMBER_WORDS[value]))


@dataclass(frozen=True)
class Scenario:
    """A task type: the pools its tasks are drawn from and the templates of its requests.

    Attributes:
        name: snake_case id, e.g. "product_images".
        modality: "image" or "video".
        workflow: the id of the reference workflow that solves it.
        title: the paper's name of the task type.
        openings: first sentences of the request; slots: {subject}, {a_subject}, {setting},
            {a_setting} and, for images, {count} ("4 product photos").
        subjects: what the output shows (the first content keyword).
        settings: where or in what theme (the second content keyword).
        styles: style keywords; None means the request names no style.
        aspect_ratios: the ratios a request may ask for.
        unit: (singular, plural) noun of what a task counts, e.g. ("icon", "icons"); videos count
            shots.
        amount: (fewest, most) images of an image task.
        consistency: what must always stay consistent across outputs.
        object_noun: how a request names the object kept consistent ("product", "character", ...).
        audio: the audio track sets a video request may ask for.
        durations: seconds a video request may ask for.
        shots: (fewest, most) shots a video request may ask for.
    """

    name: str
    modality: str
    workflow: str
    title: str
    openings: tuple[str, ...]
    subjects: tuple[str, ...]
    settings: tuple[str, ...]
    styles: tuple[str | None, ...]
    aspect_ratios: tuple[str, ...]
    unit: tuple[str, str] = ("shot", "shots")
    amount: tuple[int, int] = (1, 1)
    consistency: tuple[str, ...] = ()
    object_noun: str = "subject"
    audio: tuple[tuple[str, ...], ...] = ((),)
    durations: tuple[int, ...] = ()
    shots: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        where = f"Scenario {self.name!r}"
        if self.modality not in MODALITIES:
            raise ConfigError(f"{where}: modality {self.modality!r} must be one of {MODALITIES}")
        workflow = WORKFLOWS.get(self.workflow)
        if workflow is None or workflow.modality != self.modality:
            raise ConfigError(f"{where}: workflow {self.workflow!r} must be a {self.modality} workflow "
                              f"of {sorted(WORKFLOWS)}")
        if not (self.openings and self.subjects and self.settings and self.styles and self.aspect_ratios):
            raise ConfigError(f"{where}: openings, subjects, settings, styles and aspect_ratios must "
                              "all be non-empty")
        ratios = ASPECT_RATIOS if self.modality == "image" else VIDEO_ASPECT_RATIOS
        if not set(self.aspect_ratios) <= set(ratios):
            raise ConfigError(f"{where}: aspect_ratios {self.aspect_ratios} must be among {ratios}")
        if not set(self.consistency) <= set(CONSISTENCY) or (
                self.consistency and not workflow.supports_consistency):
            raise ConfigError(f"{where}: consistency {self.consistency} must be among {CONSISTENCY} "
                              f"and needs a workflow that generates images ({self.workflow!r} does not)")
        if any(not set(tracks) <= set(workflow.audio) for tracks in self.audio):
            raise ConfigError(f"{where}: audio {self.audio} must use only {workflow.audio}, the tracks "
                              f"workflow {self.workflow!r} can add")
        if self.modality == "image":
            low, high = self.amount
            if not 1 <= low <= high <= MAX_IMAGES or (self.consistency and low < 2):
                raise ConfigError(f"{where}: amount {self.amount} must satisfy 1 <= low <= high <= "
                                  f"{MAX_IMAGES} (low >= 2 when consistency is required)")
            if any("{count}" not in opening for opening in self.openings):
                raise ConfigError(f"{where}: every opening must state the amount with {{count}}")
        else:
            if not self.durations or not 2 <= self.shots[0] <= self.shots[1]:
                raise ConfigError(f"{where}: a video scenario needs durations and a shot range from 2 up")
            for seconds in self.durations:
                if not self._shot_counts(seconds):
                    raise ConfigError(f"{where}: no shot count in {self.shots} adds up to {seconds} s "
                                      f"with the clip lengths of workflow {self.workflow!r}")

    def supports(self, dimension: str | None) -> bool:
        """Whether a benchmark task of this scenario can probe ``dimension``."""
        if dimension is None:
            return True
        if dimension not in DIMENSIONS:
            raise ConfigError(f"dimension {dimension!r} must be None or one of {DIMENSIONS}")
        if dimension in VIDEO_ONLY_DIMENSIONS:
            return self.modality == "video"
        if dimension.endswith("_consistency"):
            return WORKFLOWS[self.workflow].supports_consistency
        return True

    def _shot_counts(self, seconds: int) -> list[int]:
        """Shot counts in range whose clips add up to exactly ``seconds``."""
        workflow = WORKFLOWS[self.workflow]
        return [n for n in range(self.shots[0], self.shots[1] + 1)
                if plan_timeline(workflow, seconds, n).total == seconds]

    def make(self, seed: int, dimension: str | None = None) -> Task:
        """The task of this scenario drawn from ``seed`` (biased toward ``dimension`` if given).

        A dimension forces what it probes: a consistency dimension adds that consistency, "variety"
        and "visual_amount" ask for at least two images, "video_duration" states a duration,
        "video_storyboard" states a shot count, and "visual_amount" states both for videos.

        Raises:
            ConfigError: ``seed`` is not a non-negative integer, or the scenario cannot probe
                ``dimension`` (see :meth:`supports`).
        """
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed ({seed!r}) must be a non-negative integer")
        if not self.supports(dimension):
            raise ConfigError(f"Scenario {self.name!r} cannot probe dimension {dimension!r}; check "
                              "Scenario.supports() first")
        rng = random.Random(f"{self.name}/{seed}")
        subject, setting = rng.choice(self.subjects), rng.choice(self.settings)
        style, aspect_ratio = rng.choice(self.styles), rng.choice(self.aspect_ratios)
        consistency = set(self.consistency)
        if dimension and dimension.endswith("_consistency"):
            consistency.add(dimension.removesuffix("_consistency"))
        words = {"subject": subject, "a_subject": with_article(subject), "setting": setting,
                 "a_setting": with_article(setting)}
        singular, plural = self.unit
        clauses = [rng.choice(_ASPECT).format(ratio=aspect_ratio, orientation=_ORIENTATION[aspect_ratio])]
        if style:
            clauses.append(rng.choice(_STYLE).format(style=style, a_style=with_article(style)))
        if self.modality == "image":
            low, high = self.amount
            if consistency or dimension in ("variety", "visual_amount"):
                low = max(low, 2)
            amount, duration, shots, audio = rng.randint(low, high), None, None, ()
            words["count"] = (rng.choice((with_article(singular), f"one {singular}", f"a single {singular}"))
                              if amount == 1 else f"{_number(amount, rng)} {plural}")
        else:
            amount, audio = 1, rng.choice(self.audio)
            duration = shots = None
            if dimension in ("video_duration", "visual_amount") or rng.random() < STATED_DURATION_RATE:
                duration = rng.choice(self.durations)
                clauses.append(rng.choice(_DURATION).format(seconds=duration))
            if dimension in ("video_storyboard", "visual_amount") or rng.random() < STATED_SHOTS_RATE:
                counts = (self._shot_counts(duration) if duration
                          else list(range(self.shots[0], self.shots[1] + 1)))
                shots = rng.choice(counts)
                clauses.append(rng.choice(_SHOTS).format(shots=_number(shots, rng)))
            if audio:
                tracks = [rng.choice(AUDIO_PHRASES[track]) for track in audio]
                clauses.append(rng.choice(_AUDIO).format(tracks=_join(tracks)))
        if consistency:
            nouns = {"object": self.object_noun, "scene": rng.choice(SCENE_NOUNS),
                     "style": rng.choice(STYLE_NOUNS)}
            clauses.append(rng.choice(_CONSISTENCY).format(
                nouns=_join([nouns[c] for c in CONSISTENCY if c in consistency]), unit=singular))
        if dimension:
            clauses.append(rng.choice(_FLOURISH[dimension]).format(unit=singular, units=plural, **words))
        rng.shuffle(clauses)
        request = " ".join([rng.choice(self.openings).format(**words), *clauses])
        requirements = Requirements(
            modality=self.modality, amount=amount, duration=None if duration is None else float(duration),
            shots=shots, consistency=tuple(c for c in CONSISTENCY if c in consistency), style=style,
            keywords=(subject, setting), audio=tuple(sorted(audio)), aspect_ratio=aspect_ratio)
        task_id = f"{self.name}-{seed}" + (f"-{dimension}" if dimension else "")
        return Task(task_id=task_id, scenario=self.name, workflow=self.workflow, request=request,
                    requirements=requirements, seed=seed, dimension=dimension)

