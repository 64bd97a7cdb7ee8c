"""Pictures for the report: PNG thumbnails of an episode's artifacts, copied next to the page.

Images and audio get one thumbnail (:func:`visenv.mediadb.thumbnail`: letterboxed picture, or the
waveform of a track); videos get a strip of frames spread over the clip. Files are named by the
content hash of the media they show, so a file that several artifacts share (the attribute tier
draws from a small media database) is written once. Paths are relative to the report folder, so
the page renders offline wherever the folder is moved. Media of the semantic tier also carry what
was rendered and the defects they show, which the trajectory viewer prints under the pictures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageOps

from visenv.episode import EpisodeRecord
from visenv.media import Artifact
from visenv.mediadb import thumbnail
from visenv.scene import describe, shot_scenes

MEDIA_FOLDER = "media"
"""The folder, inside the report folder, that holds the pictures."""


@dataclass(frozen=True)
class MediaItem:
    """One artifact as the report shows it.

    Attributes:
        id: the artifact id.
        kind: "image", "video" or "audio".
        producer: the tool that made it.
        attributes: its attributes (resolution, duration...).
        pictures: paths of its PNGs relative to the report folder (one; a video: its frames in order).
        content: what the semantic tier rendered (:func:`visenv.scene.describe`, one line per shot of
            a video); "" for media without truth.
        defects: what it shows wrong, one line each ("wrong_count (fox: asked 1, shows 2)").
    """

    id: str
    kind: str
    producer: str
    attributes: dict[str, Any]
    pictures: tuple[str, ...]
    content: str = ""
    defects: tuple[str, ...] = ()


@dataclass(frozen=True)
class EpisodeCapture:
    """What the report shows of an episode beyond its :class:`~visenv.evaluation.EpisodeResult`.

    Attributes:
        request: the task's request text.
        artifacts: artifact id -> its media item, in the order made.
        delivered: the ids the agent delivered.
    """

    request: str
    artifacts: dict[str, MediaItem] = field(default_factory=dict)
    delivered: tuple[str, ...] = ()


def video_frames(path: str, count: int, size: int) -> list[np.ndarray]:
    """``count`` letterboxed ``(size, size, 3)`` frames at evenly spaced times of a video (fewer if it is short).

    Frame ``k`` is the first frame at or after ``(k + 0.5) / count`` of the duration.
    """
    frames = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        start = stream.start_time or 0
        duration = stream.duration or int(container.duration / av.time_base / stream.time_base)
        for k in range(count):
            target = start + int(duration * (k + 0.5) / count)
            container.seek(target, stream=stream)
            frame = next((f for f in container.decode(stream) if f.pts is None or f.pts >= target), None)
            if frame is not None:
                picture = ImageOps.pad(frame.to_image().convert("RGB"), (size, size), color=(0, 0, 0))
                frames.append(np.asarray(picture))
    return frames


def _save(picture: np.ndarray, report_dir: Path, name: str) -> str:
    relative = f"{MEDIA_FOLDER}/{name}.png"
    target = report_dir / relative
    if not target.exists():
        Image.fromarray(picture).save(target, format="PNG", optimize=True)
    return relative


def media_item(artifact: Artifact, report_dir: Path, size: int, frames: int) -> MediaItem:
    """The artifact's PNGs written under ``report_dir/media`` (skipped when already there)."""
    stem = f"{artifact.sha256[:20]}_{size}"
    if artifact.kind == "video":
        names = [f"{stem}_f{k}of{frames}" for k in range(frames)]
        if all((report_dir / MEDIA_FOLDER / f"{name}.png").exists() for name in names):
            pictures = [f"{MEDIA_FOLDER}/{name}.png" for name in names]
        else:
            pictures = [_save(p, report_dir, name) for name, p in zip(names, video_frames(artifact.path, frames, size))]
    else:
        pictures = [_save(thumbnail(artifact.path, artifact.kind, size), report_dir, stem)]
    content, defects = "", ()
    if artifact.content is not None and artifact.kind in ("image", "video"):
        scenes = shot_scenes(artifact.content)
        content = describe(scenes[0]) if "scene" in artifact.content else "\n".join(
            f"shot {i}: {describe(scene)}" for i, scene in enumerate(scenes, start=1))
        defects = tuple(defect_line(d) for d in artifact.content["defects"])
    return MediaItem(artifact.id, artifact.kind, artifact.producer, dict(artifact.attributes), tuple(pictures),
                     content, defects)


def defect_line(found: dict[str, str]) -> str:
    """One defect as a line: ``wrong_count (fox: asked 1, shows 2)``."""
    subject = f"{found['subject']}: " if found.get("subject") else ""
    return f"{found['kind']} ({subject}asked {found['expected']}, shows {found['actual']})"


def capture_episode(record: EpisodeRecord, report_dir: str | Path, size: int = 160, frames: int = 4) -> EpisodeCapture:
    """Write the pictures of a finished episode's artifacts and describe them for the page.

    Args:
        record: the finished episode (``env.record`` right after its last step); its media files
            must still exist.
        report_dir: the report folder; pictures go to its ``media/`` folder.
        size: side of each square picture, in pixels.
        frames: frames shown per video.
    """
    report_dir = Path(report_dir)
    (report_dir / MEDIA_FOLDER).mkdir(parents=True, exist_ok=True)
    items = {a.id: media_item(a, report_dir, size, frames) for a in record.artifacts.values()}
    return EpisodeCapture(record.task.request, items, tuple(record.deliverables))
