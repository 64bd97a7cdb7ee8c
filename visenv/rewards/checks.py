"""Machine checks of an episode's deliverables against the task's requirements.

Each check is a small callable object (BabyAI-verifier style) returning True, False, or None when
it does not apply to the task. They back R_result and the objective benchmark metrics (S-Rate,
amount, duration, storyboard, audio).

The deliverables are the artifact ids the agent cites in its ``<answer>``. When the answer cites
none, they are the *leaves* of the episode of the requested modality: artifacts that no later
successful call consumed (the final products).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from visenv.episode import EpisodeRecord
from visenv.media import Artifact

ARTIFACT_ID = re.compile(r"\b(?:img|vid|aud)_[0-9a-f]{12}\b")
AUDIO_PRODUCERS = {
    "music": ("tool_music_suno",),
    "voiceover": ("tool_tts_composite", "tool_tts_generation"),
    "sfx": ("tool_sound_fx_gen", "tool_image2video_veo3"),
}


def deliverables(record: EpisodeRecord, answer: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(delivered ids, problems) for an answer text, following the rule in the module docstring."""
    cited = list(dict.fromkeys(ARTIFACT_ID.findall(answer)))
    problems = tuple(f"The answer cites {i}, which is not an artifact of this episode." for i in cited
                     if i not in record.artifacts)
    known = tuple(i for i in cited if i in record.artifacts)
    if known:
        return known, problems
    modality = record.task.requirements.modality
    consumed = {i for call in record.calls if call.ok for i in call.inputs}
    leaves = tuple(a.id for a in record.artifacts.values() if a.kind == modality and a.id not in consumed)
    return leaves, problems


def lineage(artifact: Artifact, artifacts: Mapping[str, Artifact]) -> Iterable[Artifact]:
    """The artifact and all its ancestors (each once)."""
    seen, stack = set(), [artifact]
    while stack:
        current = stack.pop()
        if current.id in seen:
            continue
        seen.add(current.id)
        yield current
        stack.extend(artifacts[s] for s in current.sources if s in artifacts)


def _videos(record: EpisodeRecord) -> list[Artifact]:
    return [a for a in record.delivered() if a.kind == "video"]


class ModalityCheck:
    """S-Rate: the agent answered and delivered at least one output of the requested modality."""

    name = "s_rate"

    def __call__(self, record: EpisodeRecord) -> bool | None:
        modality = record.task.requirements.modality
        return record.answered and any(a.kind == modality for a in record.delivered())


class AmountCheck:
    """The number of delivered outputs of the requested modality equals the requested amount."""

    name = "amount"

    def __call__(self, record: EpisodeRecord) -> bool | None:
        req = record.task.requirements
        return sum(a.kind == req.modality for a in record.delivered()) == req.amount


class DurationCheck:
    """Every delivered video lasts the requested duration, within the task's relative tolerance."""

    name = "duration"

    def __call__(self, record: EpisodeRecord) -> bool | None:
        req = record.task.requirements
        if req.modality != "video" or req.duration is None:
            return None
        videos = _videos(record)
        tolerance = req.duration * req.duration_tolerance
        return bool(videos) and all(abs(a.attributes.get("duration", 0.0) - req.duration) <= tolerance
                                    for a in videos)


class StoryboardCheck:
    """Every delivered video has the requested number of shots."""

    name = "storyboard"

    def __call__(self, record: EpisodeRecord) -> bool | None:
        req = record.task.requirements
        if req.modality != "video" or req.shots is None:
            return None
        videos = _videos(record)
        return bool(videos) and all(a.attributes.get("shots", 1) == req.shots for a in videos)


class AudioCheck:
    """Every delivered video carries the requested audio (music, voice-over, sound effects)."""

    name = "audio"

    def __call__(self, record: EpisodeRecord) -> bool | None:
        req = record.task.requirements
        if req.modality != "video" or not req.audio:
            return None
        videos = _videos(record)
        if not videos:
            return False
        for video in videos:
            producers = {a.producer for a in lineage(video, record.artifacts)}
            if not all(producers & set(AUDIO_PRODUCERS[need]) for need in req.audio):
                return False
        return True


RESULT_CHECKS = (ModalityCheck(), AmountCheck(), DurationCheck(), StoryboardCheck(), AudioCheck())
"""The checks whose conjunction is R_result."""


def run_checks(record: EpisodeRecord) -> dict[str, bool | None]:
    """Every result check by name."""
    return {check.name: check(record) for check in RESULT_CHECKS}
