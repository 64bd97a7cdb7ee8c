"""The semantic tier: content-aware simulated media, tool fidelity with error modes, perception that sees.

Selected with ``VisGenConfig(content="semantic")``. :class:`SemanticBackend` keeps every rule of the
attribute tier (:mod:`visenv.tools.attribute`: resolutions, durations, shots, flags, refusals), and
instead of drawing a file at random from a media database it *renders* the output from what the
call asked for (:mod:`visenv.scene`), deterministically per call seed, in milliseconds:

- images (``generate``, ``edit``): the ask parsed from the prompt (subjects, counts, colours,
  quoted text, style) drawn as icons on a style background, ``RENDER_SIDE`` px on the longer side
  (the artifact's attributes keep the asked resolution, as in the attribute tier). Identities: a
  call with a reference image (``reference_images``, an edit's ``image``) keeps the reference's
  identities and ask (the prompt updates it); a call without draws fresh identities for every
  output, so two images of one "consistent" set made without a reference differ.
- video: one shot per generated clip (``animate`` keeps the image's identities), shots concatenated
  by ``concat``, one per image in a ``slideshow``, cut by ``trim``, rescaled by ``speed``, kept by
  post-processing; the file (``VIDEO_SIDE`` px, ``VIDEO_FILE_FPS`` fps) cuts at each shot boundary.
- audio: a click track at the content's tempo for exactly the duration (``beat_detect`` reports it).

The ground truth rides on the artifact (``Artifact.content``, never shown to the agent): ``ask``,
``scene`` (image) or ``shots`` (video: ``duration``, ``ask``, ``scene``, ``identities``, ``defects``
each), ``identities`` (those the reference required), ``defects`` (all the output shows wrong,
inherited ones included) and ``reference``.

**Tool fidelity.** With ``fidelity`` below 1 for a tool, each output of a generation
(``generate``, ``edit``, ``animate``) comes out wrong with probability 1 - fidelity, in one of the
ways real generators fail that applies to its ask: ``wrong_count``, ``wrong_colour`` (a colour was
asked), ``missing_text`` / ``misspelled_text`` (text was asked), ``identity_drift`` (a reference
was given); an assembly (``concat``, ``slideshow``) of two or more shots loses one
(``missing_shot``: a shot repeats the one before). The defects this call made are the output's
``MediaOutput.defects``, which become ``info["tool_result"]["defects"]``.

**Perception.** ``tool_image_analysis`` and ``tool_video_analysis`` describe what was rendered
(:func:`visenv.scene.describe`, one line per image or shot), each subject's count and colour misread
with probability ``perception_noise``.
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import av
import numpy as np

from visenv.error import ConfigError
from visenv.media import Artifact, BlobStore
from visenv.mediadb import MediaDatabase
from visenv.procedural_media import wav_bytes
from visenv.scene import (COLOURS, VIDEO_FILE_FPS, VIDEO_SIDE, compare, defect, describe, merge_ask, parse_prompt,
                          realise, render_image, render_size)
from visenv.tools import simulated_text
from visenv.tools.attribute import DERIVE_RULES, AttributeBackend
from visenv.tools.backends import BackendAnswer, MediaOutput, ToolFailure, ToolRequest

SEMANTIC_TIER = "semantic"
SEMANTIC_MEDIA_VERSION = 1
GENERATIONS = ("generate", "edit", "animate")
ASSEMBLIES = ("concat", "slideshow")
FIDELITY_RULES = GENERATIONS + ASSEMBLIES
"""The ``output.derive`` rules whose outputs ``tool_fidelity`` can spoil."""
AUDIO_RATE = 8000
_RENDER_MEMO = 512


def check_fidelity(value: Any, tools: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a fidelity in [0, 1] or a mapping of them.

    A mapping's keys are tool names of ``tools`` (any string when ``tools`` is None) or "*" (every
    other tool).
    """
    entries = value.items() if isinstance(value, Mapping) else [("tool_fidelity", value)]
    for key, number in entries:
        if isinstance(value, Mapping) and key != "*" and (not isinstance(key, str) or
                                                           (tools is not None and key not in tools)):
            raise ConfigError(f"tool_fidelity key {key!r} must be a tool of the tool set or '*'.")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0.0 <= number <= 1.0:
            raise ConfigError(f"tool_fidelity[{key!r}] ({number!r}) must be a number in [0, 1] (1.0: every "
                              "output as asked; 0.8: one in five generations comes out wrong)."
                              if isinstance(value, Mapping) else
                              f"tool_fidelity ({number!r}) must be a number in [0, 1] or a mapping "
                              "{tool name or '*': number}; 1.0 gives every output as asked.")


def semantic_root() -> Path:
    """Where rendered media are stored: ``$VISENV_HOME/semantic-v<N>`` or ``~/.cache/visenv/...``."""
    home = os.environ.get("VISENV_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "visenv"
    return base / f"semantic-v{SEMANTIC_MEDIA_VERSION}"


def _first_content(request: ToolRequest, *arguments: str) -> tuple[Artifact | None, Mapping[str, Any] | None]:
    for argument in arguments:
        for artifact in request.inputs.get(argument, ()):
            if artifact.content and artifact.content.get("scene") is not None:
                return artifact, artifact.content
    return None, None


def _spoil_scene(ask: Mapping[str, Any], scene: dict[str, Any], identities: Mapping[str, str],
                 rng: random.Random) -> None:
    """Make ``scene`` wrong in one realistic way that applies to ``ask`` (in place)."""
    modes = ["wrong_count"]
    if any(s["colour"] for s in ask["subjects"]):
        modes.append("wrong_colour")
    if ask.get("text"):
        modes += ["missing_text", "misspelled_text"]
    if identities:
        modes.append("identity_drift")
    mode = rng.choice(modes)
    subjects = scene["subjects"]
    if mode == "wrong_count":
        subject = rng.choice(subjects)
        count = subject["count"]
        subject["count"] = count + 1 if count == 1 or (count < 12 and rng.random() < 0.5) else count - 1
    elif mode == "wrong_colour":
        subject = rng.choice([s for s, a in zip(subjects, ask["subjects"]) if a["colour"]])
        subject["colour"] = rng.choice([c for c in sorted(COLOURS) if c != subject["colour"]])
    elif mode == "missing_text":
        scene["text"] = None
    elif mode == "misspelled_text":
        text = scene["text"]
        if len(text) < 2:
            scene["text"] = text + "x"
        else:
            i = rng.randrange(len(text) - 1)
            swapped = text[:i] + text[i + 1] + text[i] + text[i + 2:]
            scene["text"] = swapped if swapped != text else text[:i] + text[i + 1:]
    else:
        subject = rng.choice([s for s in subjects if s["name"] in identities])
        while subject["identity"] == identities[subject["name"]]:
            subject["identity"] = f"{subject['name']}-{rng.getrandbits(16):04x}"


class SemanticBackend(AttributeBackend):
    """Answers every tool call by simulation, rendering media from what the call asked for.

    Args:
        media: the database for outputs of custom ``derive`` functions (rendered otherwise).
        fidelity: probability that a generation comes out as asked: a number, or a mapping from a
            tool name (or "*", every other tool) to one; tools not named get 1.0.
        perception_noise: probability that the analysis tools misread a subject's count or colour.
        root: where rendered files are stored (default :func:`semantic_root`).
    """

    name = SEMANTIC_TIER

    def __init__(self, media: MediaDatabase | None = None, fidelity: float | Mapping[str, float] = 1.0,
                 perception_noise: float = 0.0, root: str | os.PathLike | None = None):
        super().__init__(media)
        check_fidelity(fidelity)
        if isinstance(fidelity, Mapping):
            self._fidelity = dict(fidelity)
        else:
            self._fidelity = {"*": float(fidelity)}
        if isinstance(perception_noise, bool) or not isinstance(perception_noise, (int, float)) \
                or not 0.0 <= perception_noise <= 1.0:
            raise ConfigError(f"perception_noise ({perception_noise!r}) must be a number in [0, 1].")
        self.perception_noise = float(perception_noise)
        self._root = Path(root) if root is not None else None
        self._blobs: BlobStore | None = None
        self._rendered: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def fidelity(self, tool: str) -> float:
        """The fidelity of ``tool``: its own entry, else "*", else 1.0."""
        return float(self._fidelity.get(tool, self._fidelity.get("*", 1.0)))

    def __reduce__(self):
        return (type(self), (self._media, self._fidelity, self.perception_noise, self._root))

    # ---- answering ---------------------------------------------------------------------------

    def answer(self, request: ToolRequest) -> BackendAnswer | ToolFailure:
        """Simulate ``request``: rendered media with their truth, or what the analysis tools see."""
        output = request.spec.output
        derive = output.derive
        if output.kind == "text":
            if derive in (simulated_text.image_analysis, simulated_text.video_analysis):
                return self._perceive(request)
            return super().answer(request)
        if callable(derive):
            return super().answer(request)
        derived = DERIVE_RULES[derive](request)
        if isinstance(derived, ToolFailure):
            return derived
        outputs, note = derived
        rng = random.Random(request.seed ^ 0x5E3A71C)
        prompt = request.arguments.get("prompt", "")
        media = []
        for attributes in outputs:
            content, made = self._content(request, attributes, rng)
            sha256, path = self._render(output.kind, attributes, content)
            media.append(MediaOutput(output.kind, sha256, path, attributes, prompt, content, tuple(made)))
        return BackendAnswer(outputs=tuple(media), text=note, backend=self.name)

    def _content(self, request: ToolRequest, attributes: Mapping[str, Any], rng: random.Random
                 ) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """The truth of one output and the defects this call made in it."""
        derive = request.spec.output.derive
        spoil = rng.random() >= self.fidelity(request.spec.name)
        if request.spec.output.kind == "audio":
            tempo = 80 + rng.randrange(61)
            duration = float(attributes["duration"])
            return {"duration": duration, "tempo": tempo, "beats": int(duration * tempo / 60.0 + 1e-9) + 1}, []
        if derive in ("generate", "edit", "animate"):
            shot = self._generated(request, rng, spoil)
            if request.spec.output.kind == "image":
                return {key: shot[key] for key in ("ask", "scene", "identities", "defects", "reference")}, \
                    list(shot["made"])
            duration = float(attributes["duration"])
            return self._video([{**shot, "duration": duration}], shot["reference"]), list(shot["made"])
        shots, made = self._edited_shots(request, derive, attributes)
        if spoil and derive in ASSEMBLIES and len(shots) >= 2:
            k = 1 + rng.randrange(len(shots) - 1)
            shots[k] = {**shots[k], "scene": copy.deepcopy(shots[k - 1]["scene"])}
            made.append(defect("missing_shot", "", f"shot {k + 1} of {len(shots)}", f"shot {k} repeated"))
        content = self._video(shots, None)
        content["defects"] += made
        return content, made

    def _generated(self, request: ToolRequest, rng: random.Random, spoil: bool) -> dict[str, Any]:
        prompt = request.arguments.get("prompt", "")
        asked = parse_prompt(prompt, request.arguments.get("style"))
        reference, ref = _first_content(request, "image", "reference_images")
        if ref is not None:
            ask = merge_ask(ref["ask"], asked, prompt)
            identities = {s["name"]: s["identity"] for s in ref["scene"]["subjects"]}
            identities = {s["name"]: identities[s["name"]] for s in ask["subjects"] if s["name"] in identities}
        else:
            ask, identities = asked, {}
        scene = realise(ask, identities, rng.getrandbits(32))
        if spoil:
            _spoil_scene(ask, scene, identities, rng)
        made = compare(ask, scene, identities)
        return {"ask": ask, "scene": scene, "identities": identities, "defects": made, "made": made,
                "reference": reference.id if reference else None}

    def _video(self, shots: list[dict[str, Any]], reference: str | None) -> dict[str, Any]:
        clean = [{key: shot[key] for key in ("duration", "ask", "scene", "identities", "defects")} for shot in shots]
        return {"shots": clean, "defects": [d for shot in clean for d in shot["defects"]], "reference": reference}

    def _edited_shots(self, request: ToolRequest, derive: str, attributes: Mapping[str, Any]
                      ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """The shots of a video made from other media (no new defects unless fidelity spoils it)."""

        def shots_of(artifact: Artifact) -> list[dict[str, Any]]:
            content = artifact.content or {}
            if "shots" in content:
                return copy.deepcopy(list(content["shots"]))
            duration = float(artifact.attributes.get("duration", 0.0))
            if content.get("scene") is not None:
                return [{"duration": duration, **{k: copy.deepcopy(content[k]) for k in
                                                  ("ask", "scene", "identities", "defects")}}]
            return [{"duration": duration, "ask": None, "scene": None, "identities": {}, "defects": []}]

        if derive == "concat":
            shots = [shot for clip in request.inputs["clips"] for shot in shots_of(clip)]
        elif derive == "slideshow":
            per = float(request.arguments.get("duration_per_image") or
                        request.spec.parameters["properties"]["duration_per_image"].get("default", 3.0))
            shots = [{**shot, "duration": per} for image in request.inputs["images"] for shot in shots_of(image)]
        else:
            source = request.inputs["video"][0]
            shots = shots_of(source)
            if derive == "trim":
                start, end, position, kept = float(request.arguments["start"]), float(request.arguments["end"]), 0.0, []
                for shot in shots:
                    overlap = min(end, position + shot["duration"]) - max(start, position)
                    if overlap > 1e-6:
                        kept.append({**shot, "duration": overlap})
                    position += shot["duration"]
                shots = kept or shots[:1]
            elif derive == "speed":
                shots = [{**shot, "duration": shot["duration"] / float(request.arguments["speed"])} for shot in shots]
        total = float(attributes["duration"])
        planned = sum(shot["duration"] for shot in shots) or 1.0
        for shot in shots:  # durations sum to the video's exact duration
            shot["duration"] = round(shot["duration"] * total / planned, 3)
        return shots, []

    # ---- files -------------------------------------------------------------------------------

    @property
    def blobs(self) -> BlobStore:
        """The store of rendered files (created on first use)."""
        if self._blobs is None:
            self._blobs = BlobStore(self._root or semantic_root())
        return self._blobs

    def _render(self, kind: str, attributes: Mapping[str, Any], content: Mapping[str, Any]) -> tuple[str, str]:
        if kind == "image":
            size = render_size(attributes["width"], attributes["height"])
            key = json.dumps([kind, size, content["scene"]], sort_keys=True)
        elif kind == "video":
            size = render_size(attributes["width"], attributes["height"], VIDEO_SIDE)
            key = json.dumps([kind, size, [(s["duration"], s["scene"]) for s in content["shots"]]], sort_keys=True)
        else:
            size = None
            key = json.dumps([kind, content["duration"], content["tempo"]])
        found = self._rendered.get(key)
        if found is None:
            if kind == "image":
                buffer = io.BytesIO()
                render_image(content["scene"], *size).save(buffer, format="PNG", compress_level=1)
                sha, path = self.blobs.put_bytes(buffer.getvalue(), ".png")
            elif kind == "video":
                sha, path = self.blobs.put_bytes(_mp4(content["shots"], *size), ".mp4")
            else:
                sha, path = self.blobs.put_bytes(_wav(content["duration"], content["tempo"]), ".wav")
            found = (sha, str(path))
            self._rendered[key] = found
            if len(self._rendered) > _RENDER_MEMO:
                self._rendered.popitem(last=False)
        return found

    # ---- perception --------------------------------------------------------------------------

    def _perceive(self, request: ToolRequest) -> BackendAnswer | ToolFailure:
        kind = "image" if request.spec.output.derive is simulated_text.image_analysis else "video"
        artifact = request.inputs[kind][0]
        question = request.arguments.get("question")
        plain = ToolRequest(request.spec, {k: v for k, v in request.arguments.items() if k != "question"},
                            request.inputs, request.seed, request.state)
        header = request.spec.output.derive(plain, random.Random(request.seed))
        if not artifact.content:
            return super().answer(request)
        rng = random.Random(request.seed ^ 0xA11CE)
        if kind == "image":
            seen = f"Shows: {describe(self._misread(artifact.content['scene'], rng))}"
        else:
            seen = "\n".join(f"Shot {i} ({shot['duration']:g} s): {describe(self._misread(shot['scene'], rng))}"
                             for i, shot in enumerate(artifact.content["shots"], start=1))
        asked = f"\nOn '{question}': compare the content above with what you asked for." if question else ""
        return BackendAnswer(outputs=(), text=f"{header}\n{seen}{asked}", backend=self.name)

    def _misread(self, scene: Mapping[str, Any] | None, rng: random.Random) -> Mapping[str, Any] | None:
        if scene is None or not self.perception_noise:
            return scene
        seen = copy.deepcopy(scene)
        for subject in seen["subjects"]:
            if rng.random() < self.perception_noise:
                if rng.random() < 0.5:
                    subject["count"] = max(1, subject["count"] + rng.choice((-1, 1)))
                else:
                    subject["colour"] = rng.choice(sorted(COLOURS))
        return seen


def _mp4(shots: list[Mapping[str, Any]], width: int, height: int) -> bytes:
    """An H.264 MP4 whose frames show each shot's scene for its duration (a cut per shot)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FILE_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "30", "threads": "1"}
        shown = 0
        end = 0.0
        for shot in shots:
            end += float(shot["duration"])
            frames = max(1, round(end * VIDEO_FILE_FPS)) - shown
            picture = np.asarray(render_image(shot["scene"], width, height))
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format="yuv420p")
            for _ in range(max(0, frames)):
                frame.pts = None
                container.mux(stream.encode(frame))
            shown += max(0, frames)
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _wav(duration: float, tempo: int) -> bytes:
    """A 16-bit mono WAV of exactly ``duration`` seconds with a decaying click on every beat."""
    t = np.arange(round(duration * AUDIO_RATE)) / AUDIO_RATE
    since = t % (60.0 / tempo)
    return wav_bytes(np.sin(2 * np.pi * 440.0 * since) * np.exp(-since * 30.0) * 0.6 * 32767, AUDIO_RATE)
