"""The attribute tier: the paper's simulation of the tools.

Each tool's simulation reproduces the real tool's state transitions, parameter validation and output
specification (PAPER.md section 2): the :class:`AttributeBackend` derives the attributes of every
output from the tool's ``output.derive`` rule, the call's arguments and its input artifacts, then
draws a real file of the right kind and nearest resolution and duration from a
:class:`~visenv.mediadb.MediaDatabase`. The content of that file does not depend on the prompt (the
paper's "rollout gap").

The simulated attributes are the truth the environment records; the file is representative. A
12 s composite of three clips, a 3.5 s trim or a 2560x1440 upscale gets the database file of the
nearest resolution and duration, whose own attributes may differ.

Rules (``derive``; durations in seconds, floats rounded to 3 decimals):

- ``generate``: images: ``n`` outputs at ``output.resolutions[aspect_ratio]``; video: that
  resolution, ``duration``, ``output.fps``, 1 shot.
- ``edit``: ``n`` images at the source image's resolution (a file other than the source's).
- ``animate``: 1280x720 for a landscape or square image, 720x1280 for a portrait one; 1 shot;
  ``with_audio`` sets ``has_audio``.
- ``concat``: summed durations and shots, the first clip's resolution; clips of different
  orientations are refused. Flags are true when any clip has them; an ``audio`` track sets
  ``has_audio`` (the answer says when it is shorter than the video).
- ``slideshow``: ``len(images) x duration_per_image`` seconds, one shot per image, 720x1280 when
  every image is portrait, else 1280x720.
- ``trim`` / ``cut``: ``[start, end)`` must lie inside the source. A trimmed video's shots are the
  equal-length shots of the source that the segment overlaps (the source's shots are assumed equal).
- ``speed``: duration divided by ``speed``.
- ``same`` (post-processing): the source's attributes, ``upscale`` doubles the resolution; the
  operations applied accumulate in ``postprocess``.
- ``subtitle`` sets ``has_subtitles``; ``voiceover`` sets ``has_voiceover`` and ``has_audio`` and
  says whether the speech (2.5 words/s) fits the clip.
- ``music``: ``duration``; ``soundtrack``: the video's duration; ``tts``: max(1, words / 2.5).
- a function instead of a rule name: a tool's own rule, ``rule(request) -> (attributes of each
  output, note) | ToolFailure``.
- text tools: ``output.derive`` is the tool's text simulator, ``simulate(request, rng) -> str |
  ToolFailure`` (the default tools' templates are in :mod:`visenv.tools.simulated_text`).

Every video carries ``width, height, duration, fps, shots, has_audio, has_subtitles,
has_voiceover``; audio carries ``duration`` and the file's ``sample_rate``.

Randomness comes from ``random.Random(request.seed)`` only (seeding it costs a few microseconds,
several times less than a numpy generator), so a call is a pure function of its request and the
database.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Mapping

from visenv.media import Artifact
from visenv.mediadb import MediaDatabase
from visenv.resolutions import VIDEO_RESOLUTIONS
from visenv.tools.backends import BackendAnswer, MediaOutput, ToolFailure, ToolRequest
from visenv.tools.simulated_text import WORDS_PER_SECOND

_EPS = 1e-6
_VIDEO_FLAGS = ("has_audio", "has_subtitles", "has_voiceover")
Derived = tuple[list[dict[str, Any]], str]
"""The attributes of each output, and a note for the agent ("" when there is nothing to say)."""


def _arg(request: ToolRequest, name: str) -> Any:
    """The argument ``name``, or its JSON Schema default when the call leaves it out."""
    value = request.arguments.get(name)
    if value is None:
        return request.spec.parameters["properties"].get(name, {}).get("default")
    return value


def _source(request: ToolRequest, argument: str) -> Artifact:
    return request.inputs[argument][0]


def _seconds(value: float) -> str:
    return f"{round(value, 3):g} s"


def _video(width: int, height: int, duration: float, fps: float, shots: int, **flags: bool) -> dict[str, Any]:
    attributes = {"width": int(width), "height": int(height), "duration": round(float(duration), 3),
                  "fps": fps, "shots": int(shots)}
    attributes.update({flag: bool(flags.get(flag, False)) for flag in _VIDEO_FLAGS})
    return attributes


def _orientation(attributes: Mapping[str, Any]) -> str:
    width, height = attributes["width"], attributes["height"]
    return "square" if width == height else "landscape" if width > height else "portrait"


def _audio_note(request: ToolRequest, video_duration: float) -> str:
    tracks = request.inputs.get("audio", ())
    if not tracks:
        return ""
    audio_duration = float(tracks[0].attributes["duration"])
    if audio_duration < video_duration - _EPS:
        return (f"Note: the audio {tracks[0].id} ({_seconds(audio_duration)}) is shorter than the video "
                f"({_seconds(video_duration)}); the last {_seconds(video_duration - audio_duration)} are silent.")
    if audio_duration > video_duration + _EPS:
        return (f"The audio {tracks[0].id} ({_seconds(audio_duration)}) was cut to the video's "
                f"{_seconds(video_duration)}.")
    return ""


def _segment(request: ToolRequest, source: Artifact) -> tuple[float, float] | ToolFailure:
    """The validated [start, end) of a trim or cut, or the reason it is refused."""
    start, end = float(request.arguments["start"]), float(request.arguments["end"])
    length = float(source.attributes["duration"])
    name = request.spec.name
    if start >= end:
        return ToolFailure(f"{name}: start ({_seconds(start)}) must be before end ({_seconds(end)}).",
                           backend="attribute")
    if end > length + _EPS:
        return ToolFailure(f"{name}: end ({_seconds(end)}) is past the end of {source.id}, which is "
                           f"{_seconds(length)} long; use 0 <= start < end <= {round(length, 3):g}.",
                           backend="attribute")
    return start, min(end, length)


def _generate(request: ToolRequest) -> Derived:
    output = request.spec.output
    width, height = output.resolutions[_arg(request, "aspect_ratio")]
    if output.kind == "image":
        return [{"width": width, "height": height} for _ in range(_arg(request, "n"))], ""
    return [_video(width, height, _arg(request, "duration"), output.fps, 1)], ""


def _edit(request: ToolRequest) -> Derived:
    source = _source(request, "image").attributes
    return [{"width": source["width"], "height": source["height"]} for _ in range(_arg(request, "n"))], ""


def _animate(request: ToolRequest) -> Derived:
    output = request.spec.output
    portrait = _orientation(_source(request, "image").attributes) == "portrait"
    width, height = output.resolutions["9:16" if portrait else "16:9"]
    return [_video(width, height, _arg(request, "duration"), output.fps, 1,
                   has_audio=bool(_arg(request, "with_audio")))], ""


def _concat(request: ToolRequest) -> Derived | ToolFailure:
    clips = request.inputs["clips"]
    first = clips[0]
    odd = next((clip for clip in clips if _orientation(clip.attributes) != _orientation(first.attributes)), None)
    if odd is not None:
        return ToolFailure(
            f"tool_video_composite: clips must share one resolution, but {first.id} is "
            f"{first.attributes['width']}x{first.attributes['height']} ({_orientation(first.attributes)}) and "
            f"{odd.id} is {odd.attributes['width']}x{odd.attributes['height']} ({_orientation(odd.attributes)}). "
            "Make every clip in one orientation.", backend="attribute")
    duration = sum(float(clip.attributes["duration"]) for clip in clips)
    flags = {flag: any(clip.attributes.get(flag, False) for clip in clips) for flag in _VIDEO_FLAGS}
    flags["has_audio"] = flags["has_audio"] or bool(request.inputs.get("audio"))
    shots = sum(int(clip.attributes.get("shots", 1)) for clip in clips)
    attributes = _video(first.attributes["width"], first.attributes["height"], duration,
                        request.spec.output.fps, shots, **flags)
    return [attributes], _audio_note(request, duration)


def _slideshow(request: ToolRequest) -> Derived:
    images = request.inputs["images"]
    portrait = all(_orientation(image.attributes) == "portrait" for image in images)
    width, height = VIDEO_RESOLUTIONS["9:16" if portrait else "16:9"]
    duration = len(images) * float(_arg(request, "duration_per_image"))
    attributes = _video(width, height, duration, request.spec.output.fps, len(images),
                        has_audio=bool(request.inputs.get("audio")))
    return [attributes], _audio_note(request, duration)


def _trim(request: ToolRequest) -> Derived | ToolFailure:
    source = _source(request, "video")
    segment = _segment(request, source)
    if isinstance(segment, ToolFailure):
        return segment
    start, end = segment
    shots = int(source.attributes.get("shots", 1))
    shot_length = float(source.attributes["duration"]) / shots
    overlapped = math.ceil(end / shot_length - _EPS) - math.floor(start / shot_length + _EPS)
    return [{**source.attributes, "duration": round(end - start, 3),
             "shots": max(1, min(shots, overlapped))}], ""


def _speed(request: ToolRequest) -> Derived:
    source = _source(request, "video").attributes
    return [{**source, "duration": round(float(source["duration"]) / float(request.arguments["speed"]), 3)}], ""


def _postprocess(request: ToolRequest) -> Derived:
    source = _source(request, "video").attributes
    operation = request.arguments["operation"]
    attributes = {**source, "postprocess": [*source.get("postprocess", ()), operation]}
    if operation == "upscale":
        attributes["width"], attributes["height"] = 2 * source["width"], 2 * source["height"]
    return [attributes], ""


def _subtitle(request: ToolRequest) -> Derived:
    return [{**_source(request, "video").attributes, "has_subtitles": True}], ""


def _voiceover(request: ToolRequest) -> Derived:
    source = _source(request, "video").attributes
    duration = float(source["duration"])
    words = len(request.arguments["text"].split())
    speech = words / WORDS_PER_SECOND
    if speech <= duration + _EPS:
        note = (f"The voice-over ({words} words, about {_seconds(speech)} of speech) fits the "
                f"{_seconds(duration)} video.")
    else:
        note = (f"Note: the voice-over ({words} words, about {_seconds(speech)} of speech) is longer than the "
                f"{_seconds(duration)} video and is cut off at its end; shorten the text to about "
                f"{int(duration * WORDS_PER_SECOND)} words or lengthen the video.")
    return [{**source, "has_voiceover": True, "has_audio": True}], note


def _music(request: ToolRequest) -> Derived:
    return [{"duration": round(float(request.arguments["duration"]), 3)}], ""


def _soundtrack(request: ToolRequest) -> Derived:
    return [{"duration": round(float(_source(request, "video").attributes["duration"]), 3)}], ""


def _tts(request: ToolRequest) -> Derived:
    words = len(request.arguments["text"].split())
    return [{"duration": round(max(1.0, words / WORDS_PER_SECOND), 3)}], ""


def _cut(request: ToolRequest) -> Derived | ToolFailure:
    segment = _segment(request, _source(request, "audio"))
    if isinstance(segment, ToolFailure):
        return segment
    start, end = segment
    return [{"duration": round(end - start, 3)}], ""


DERIVE_RULES: Mapping[str, Callable[[ToolRequest], Derived | ToolFailure]] = {
    "generate": _generate, "edit": _edit, "animate": _animate, "concat": _concat, "slideshow": _slideshow,
    "trim": _trim, "speed": _speed, "same": _postprocess, "subtitle": _subtitle, "voiceover": _voiceover,
    "music": _music, "soundtrack": _soundtrack, "tts": _tts, "cut": _cut,
}
"""``output.derive`` -> the rule that computes the outputs' attributes of a media tool."""


class AttributeBackend:
    """Answers every tool call by simulation: the last resort of a backend chain; never passes.

    Args:
        media: the database to draw files from; None opens :meth:`MediaDatabase.default` on the
            first media output (so that constructing an environment stays cheap).

    Example:
        >>> from visenv.tools.backends import BackendChain
        >>> chain = BackendChain([AttributeBackend()])
    """

    name = "attribute"

    def __init__(self, media: MediaDatabase | None = None):
        self._media = media

    @property
    def media(self) -> MediaDatabase:
        """The media database, opened (and built, the first time on this machine) on first use."""
        if self._media is None:
            self._media = MediaDatabase.default()
        return self._media

    def answer(self, request: ToolRequest) -> BackendAnswer | ToolFailure:
        """Simulate ``request``: a text answer, media outputs, or the tool's refusal."""
        rng = random.Random(request.seed)
        output = request.spec.output
        if output.kind == "text":
            text = output.derive(request, rng)
            if isinstance(text, ToolFailure):
                return text
            return BackendAnswer(outputs=(), text=text, backend=self.name)
        rule = output.derive if callable(output.derive) else DERIVE_RULES[output.derive]
        derived = rule(request)
        if isinstance(derived, ToolFailure):
            return derived
        outputs, note = derived
        shape = outputs[0]
        exclude = frozenset()
        if output.derive == "edit":  # an edit should not hand back its own source file
            exclude = frozenset(source.sha256 for source in request.inputs["image"])
        entries = self.media.sample_many(output.kind, len(outputs), rng, width=shape.get("width"),
                                         height=shape.get("height"), duration=shape.get("duration"),
                                         exclude=exclude)
        prompt = request.arguments.get("prompt", "")
        media = tuple(MediaOutput(output.kind, entry.sha256, entry.path, {**entry.attributes, **attributes}, prompt)
                      for entry, attributes in zip(entries, outputs))
        return BackendAnswer(outputs=media, text=note, backend=self.name)
