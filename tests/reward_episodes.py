"""Builders of small, real episode records with real media files, for the CLIP and judge tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from visenv.episode import CallRecord, EpisodeRecord, TurnRecord
from visenv.media import Artifact
from visenv.procedural_media import mp4_video, png_image
from visenv.protocol import parse_turn
from visenv.rewards.clip import tiny_clip_model as tiny_clip  # noqa: F401 (test_judges, test_cache_fidelity)
from visenv.tasks import Requirements, Task

PLAN = "1. tool_prompt_refine: refine the request\n2. tool_text2image_qwen: generate the images"


def media(folder: Path, kind: str, seed: int, *, prompt: str = "", size: int = 64) -> Artifact:
    """An image (PNG) or video (MP4, 2 s at 8 fps) artifact backed by a real file."""
    data = png_image(size, size, seed) if kind == "image" else mp4_video(size, size, 2, 8, seed)
    path = folder / f"{kind}-{seed}-{size}.{'png' if kind == 'image' else 'mp4'}"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    attributes = {"width": size, "height": size} | ({"duration": 2.0, "fps": 8.0} if kind == "video" else {})
    return Artifact(id=f"{'img' if kind == 'image' else 'vid'}_{digest[:12]}", kind=kind, sha256=digest,
                    attributes=attributes, producer="tool_text2image_qwen", prompt=prompt, path=str(path))


def task(*, amount: int = 1, consistency: tuple[str, ...] = (), dimension: str | None = None,
         request: str = "A photo of a red bicycle by a canal.", modality: str = "image", seed: int = 0) -> Task:
    """A single-image-workflow task (or a short video task) with the given requirements."""
    video = modality == "video"
    reqs = Requirements(modality=modality, amount=amount, duration=8.0 if video else None, shots=None,
                        consistency=consistency, style=None, keywords=("red bicycle", "canal"),
                        aspect_ratio="16:9" if video else "1:1")
    return Task(task_id=f"t-{seed}", scenario="realistic_photography",
                workflow="short_text2video" if video else "single_image",
                request=request, requirements=reqs, seed=seed, dimension=dimension)


def episode(the_task: Task, outputs: list[Artifact], *, plan: str | None = PLAN,
            reflections: tuple[str | None, ...] = (), deliver: bool = True) -> EpisodeRecord:
    """An episode that planned (optionally), made each output in its own call, maybe reflected
    after each (``reflections[i]`` is written in the turn after call ``i``), and answered."""
    turns = []
    for i, artifact in enumerate(outputs):
        prefix = f"<plan>{plan}</plan>" if plan and i == 0 else ""
        reflection = reflections[i - 1] if 0 < i <= len(reflections) and reflections[i - 1] else None
        prefix = (f"<reflection>{reflection}</reflection>" if reflection else "") + prefix
        arguments = {"prompt": artifact.prompt or "a red bicycle"}
        text = f"{prefix}<tool_call>{json.dumps({'name': 'tool_text2image_qwen', 'arguments': arguments})}</tool_call>"
        call = CallRecord(index=i, tool="tool_text2image_qwen", arguments=arguments, status="ok",
                          outputs=(artifact.id,), backend="attribute")
        turns.append(TurnRecord(parse_turn(text), call))
    last = len(outputs)
    reflection = reflections[last - 1] if 0 < last <= len(reflections) and reflections[last - 1] else None
    answer = "Delivered: " + ", ".join(a.id for a in outputs)
    closing = (f"<reflection>{reflection}</reflection>" if reflection else "")
    if plan and not outputs:
        closing += f"<plan>{plan}</plan>"
    turns.append(TurnRecord(parse_turn(f"{closing}<answer>{answer}</answer>"), None))
    return EpisodeRecord(task=the_task, turns=turns, artifacts={a.id: a for a in outputs}, answered=True,
                         deliverables=tuple(a.id for a in outputs) if deliver else ())
