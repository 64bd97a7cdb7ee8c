"""Artifacts and the content-addressed store that holds them.

An :class:`Artifact` is a media item made during an episode: an image, a video or an audio track.
The agent sees it only through its id (``img_``/``vid_``/``aud_`` plus 12 hex digits) and its
attributes; the file behind it is content-addressed (sha256) and its path is never shown. Ids are
scoped to an episode: an id from another episode, or a file path, is refused with a message the
agent can read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from visenv.error import ArtifactError

ID_PREFIX = {"image": "img", "video": "vid", "audio": "aud"}
KIND_OF_PREFIX = {prefix: kind for kind, prefix in ID_PREFIX.items()}


@dataclass(frozen=True)
class Artifact:
    """A media item produced in an episode.

    Attributes:
        id: the handle the agent uses, e.g. "img_3f2a9c01d4e7".
        kind: "image", "video" or "audio".
        sha256: content hash of the file.
        attributes: width/height (image, video), duration/fps/shots (video), duration/sample_rate
            (audio), plus flags such as has_audio, has_subtitles, has_voiceover.
        producer: the tool that made it.
        prompt: the prompt it was made from ("" if none).
        sources: ids of the artifacts consumed to make it (its lineage, for consistency rewards).
        backend: the tier that produced it ("attribute", "exact_cache", "nearest", "real", ...).
        call_index: the index of the tool call (0-based, within the episode) that produced it.
        path: where the file lies; internal, never rendered to the agent.
        content: the ground truth of what the file shows (semantic tier only, see
            :mod:`visenv.tools.semantic`): the ask, the rendered scene or shots, the defects. Never
            rendered to the agent; None for the other tiers.
    """

    id: str
    kind: str
    sha256: str
    attributes: Mapping[str, Any]
    producer: str
    prompt: str = ""
    sources: tuple[str, ...] = ()
    backend: str = ""
    call_index: int = -1
    path: str = field(default="", repr=False, compare=False)
    content: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    def describe(self) -> dict[str, Any]:
        """What the agent is shown: id, kind and attributes (no path, no hash)."""
        return {"id": self.id, "kind": self.kind, **dict(self.attributes)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (for trajectories and reports), path included (content when known)."""
        record = {"id": self.id, "kind": self.kind, "sha256": self.sha256,
                  "attributes": dict(self.attributes), "producer": self.producer, "prompt": self.prompt,
                  "sources": list(self.sources), "backend": self.backend, "call_index": self.call_index,
                  "path": self.path}
        if self.content is not None:
            record["content"] = self.content
        return record


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class BlobStore:
    """Files stored by content hash under ``root/ab/abcdef...ext``; writes are atomic.

    Args:
        root: the folder that holds the blobs (created if missing).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str, suffix: str = "") -> Path:
        """Where the blob with this hash lies (whether or not it exists yet)."""
        return self.root / sha256[:2] / f"{sha256}{suffix}"

    def put_bytes(self, data: bytes, suffix: str = "") -> tuple[str, Path]:
        """Store ``data``; returns (sha256, path). Storing the same bytes twice is a no-op."""
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha, suffix)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        return sha, target

    def put_file(self, source: str | os.PathLike) -> tuple[str, Path]:
        """Copy a file into the store; returns (sha256, path)."""
        sha = sha256_file(source)
        target = self.path(sha, Path(source).suffix.lower())
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            os.close(fd)
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        return sha, target


class ArtifactRegistry:
    """The artifacts of the current episode, by id, plus a bounded memory of past episodes' ids.

    Ids are derived from the episode id, the artifact's position and its content hash, so the same
    seed and the same actions give the same ids.

    Args:
        remember_episodes: how many past episodes' ids to remember, to tell the agent that an id
            "belongs to another episode" rather than "does not exist".
    """

    def __init__(self, remember_episodes: int = 64):
        self.episode_id = ""
        self._artifacts: dict[str, Artifact] = {}
        self._past: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._remember = remember_episodes

    def new_episode(self, episode_id: str) -> None:
        """Forget the current artifacts (remembering their ids) and start ``episode_id``."""
        if self.episode_id and self._artifacts:
            self._past[self.episode_id] = frozenset(self._artifacts)
            while len(self._past) > self._remember:
                self._past.popitem(last=False)
        self.episode_id = episode_id
        self._artifacts = {}

    def add(self, kind: str, sha256: str, attributes: Mapping[str, Any], producer: str, *,
            prompt: str = "", sources: tuple[str, ...] = (), backend: str = "",
            call_index: int = -1, path: str = "", content: Mapping[str, Any] | None = None) -> Artifact:
        """Register a new artifact of this episode and return it."""
        if kind not in ID_PREFIX:
            raise ArtifactError(f"Artifact kind {kind!r} must be one of {tuple(ID_PREFIX)}")
        digest = hashlib.sha256(f"{self.episode_id}:{len(self._artifacts)}:{sha256}".encode()).hexdigest()
        artifact = Artifact(id=f"{ID_PREFIX[kind]}_{digest[:12]}", kind=kind, sha256=sha256,
                            attributes=dict(attributes), producer=producer, prompt=prompt,
                            sources=tuple(sources), backend=backend, call_index=call_index, path=path, content=content)
        self._artifacts[artifact.id] = artifact
        return artifact

    def get(self, artifact_id: str) -> Artifact:
        """The artifact with this id; raises :class:`ArtifactError` with :meth:`explain_missing`."""
        try:
            return self._artifacts[artifact_id]
        except KeyError:
            raise ArtifactError(self.explain_missing(artifact_id)) from None

    def __contains__(self, artifact_id: object) -> bool:
        return artifact_id in self._artifacts

    def __len__(self) -> int:
        return len(self._artifacts)

    def all(self) -> tuple[Artifact, ...]:
        """Every artifact of this episode, in the order made."""
        return tuple(self._artifacts.values())

    def all_ids(self) -> tuple[str, ...]:
        """The ids of this episode's artifacts, in the order made."""
        return tuple(self._artifacts)

    def explain_missing(self, reference: Any) -> str:
        """An agent-readable reason why ``reference`` is not an artifact of this episode."""
        available = ", ".join(self._artifacts) or "none yet"
        if not isinstance(reference, str):
            return (f"{reference!r} is not an artifact id: ids are strings such as 'img_3f2a9c01d4e7'. "
                    f"Available: {available}.")
        shown = reference if len(reference) <= 80 else reference[:77] + "..."
        if "/" in reference or "\\" in reference or "." in reference:
            return (f"{shown!r} looks like a file path; artifacts are referenced by id only "
                    f"(such as 'img_3f2a9c01d4e7'), never by path. Available: {available}.")
        for episode, ids in self._past.items():
            if reference in ids:
                return (f"Artifact {shown!r} belongs to an earlier episode ({episode}), not this one. "
                        f"Available: {available}.")
        return f"There is no artifact {shown!r} in this episode. Available: {available}."
