"""The media database: real files that the attribute tier hands out as tool outputs.

In the paper's virtual environment a media output is "a file drawn at random from a media database,
with physically correct attributes" (PAPER.md section 2). A :class:`MediaDatabase` holds
:class:`MediaEntry` records (content hash, kind, path, measured attributes) and samples from them
on the environment's hot path: a query is answered from a dictionary, and the ranking behind a
query is computed once and memoised, so sampling does no file IO and no sorting per call.

Two sources:

- :meth:`MediaDatabase.default`: procedural media (:mod:`visenv.procedural_media`), built on first
  use into ``$VISENV_HOME/media-v1`` (else ``~/.cache/visenv/media-v1``) and re-opened from its
  ``index.json`` afterwards. Files are content-addressed (``blobs/ab/<sha256>.<ext>``). Two
  processes may build at once: each builds into a private folder and renames it into place; the
  loser discards its copy and opens the winner's.
- :meth:`MediaDatabase.from_folder`: a user's own folder of images, videos and audio, scanned on
  each call (nothing is ever written into the folder).

:func:`thumbnail` renders any entry as a small RGB array, for judges and reports.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import tempfile
import wave
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import av
import numpy as np
from PIL import Image

from visenv.error import MediaDatabaseError
from visenv.media import BlobStore, sha256_file
from visenv.procedural_media import DEFAULT_MEDIA_VERSION, write_default_media

MEDIA_SUFFIXES = {".png": "image", ".jpg": "image", ".jpeg": "image", ".webp": "image",
                  ".mp4": "video", ".mov": "video", ".webm": "video",
                  ".wav": "audio", ".mp3": "audio", ".flac": "audio"}
INDEX_FORMAT = "visenv-media-index"
_UNREADABLE = (OSError, ValueError, EOFError, wave.Error, av.FFmpegError)
_MEMO_LIMIT = 4096


@dataclass(frozen=True)
class MediaEntry:
    """One media file of the database.

    Attributes:
        sha256: content hash of the file.
        kind: "image", "video" or "audio".
        path: absolute path of the file.
        attributes: measured attributes: width/height (image); width/height/duration/fps (video);
            duration/sample_rate (audio). Durations are seconds.
    """

    sha256: str
    kind: str
    path: str
    attributes: Mapping[str, Any] = field(hash=False)


def default_root() -> Path:
    """Where :meth:`MediaDatabase.default` keeps its files: ``$VISENV_HOME/media-v<N>`` or the cache."""
    home = os.environ.get("VISENV_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "visenv"
    return base / f"media-v{DEFAULT_MEDIA_VERSION}"


class MediaDatabase:
    """Media entries indexed for fast, seeded sampling by kind, resolution and duration.

    Args:
        entries: the entries (at least one).

    Sampling ranks candidates lexicographically: resolution first (exact; else nearest aspect ratio,
    then nearest pixel count), then nearest duration. Every entry tied on the best rank is equally
    likely. ``rng`` is a :class:`numpy.random.Generator` or a :class:`random.Random` (the attribute
    tier uses the latter: it is several times cheaper to seed).

    Pickling carries only the small entry list, never file contents.
    """

    def __init__(self, entries: Iterable[MediaEntry]):
        self._entries = tuple(entries)
        if not self._entries:
            raise MediaDatabaseError("A MediaDatabase needs at least one entry.")
        groups: dict[str, dict[tuple, list[MediaEntry]]] = {}
        for entry in self._entries:
            attrs = entry.attributes
            key = (attrs.get("width"), attrs.get("height"), attrs.get("duration"))
            groups.setdefault(entry.kind, {}).setdefault(key, []).append(entry)
        self._groups = {kind: {key: tuple(group) for key, group in by_key.items()}
                        for kind, by_key in groups.items()}
        self._by_kind = {kind: tuple(e for e in self._entries if e.kind == kind) for kind in groups}
        self._memo: dict[tuple, tuple[MediaEntry, ...]] = {}

    def __reduce__(self):
        return (type(self), (self._entries,))

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def default(cls, root: str | os.PathLike | None = None) -> MediaDatabase:
        """The procedural database, built into ``root`` on first use (about 10 s, 20 MB).

        Args:
            root: the database folder; defaults to :func:`default_root`. It must be missing, empty,
                or a database built earlier.
        """
        root = Path(root) if root is not None else default_root()
        if not (root / "index.json").exists():
            _build_default(root)
        return cls._open_index(root)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> MediaDatabase:
        """A database of the media files under ``path`` (recursively), read in place.

        Images: .png .jpg .jpeg .webp; video: .mp4 .mov .webm; audio: .wav .mp3 .flac. Files with
        other suffixes are ignored; media files that cannot be read are skipped with a warning.

        Raises:
            MediaDatabaseError: ``path`` is not a folder, or holds no readable media file.
        """
        root = Path(path)
        if not root.is_dir():
            raise MediaDatabaseError(
                f"Media folder {str(root)!r} does not exist or is not a folder. Pass a folder of "
                f"{', '.join(MEDIA_SUFFIXES)} files, or use MediaDatabase.default().")
        entries = []
        for file in sorted(p for p in root.rglob("*") if p.suffix.lower() in MEDIA_SUFFIXES and p.is_file()):
            kind = MEDIA_SUFFIXES[file.suffix.lower()]
            try:
                attributes = probe(file, kind)
            except _UNREADABLE as exc:
                warnings.warn(f"Skipping unreadable {kind} file {str(file)!r}: {exc}", stacklevel=2)
                continue
            entries.append(MediaEntry(sha256_file(file), kind, str(file.resolve()), attributes))
        if not entries:
            raise MediaDatabaseError(
                f"Media folder {str(root)!r} holds no readable media file (looked for "
                f"{', '.join(MEDIA_SUFFIXES)}, recursively). Add media files, or use MediaDatabase.default().")
        return cls(entries)

    @classmethod
    def _open_index(cls, root: Path) -> MediaDatabase:
        index_path = root / "index.json"
        try:
            index = json.loads(index_path.read_text())
            if index.get("format") != INDEX_FORMAT:
                raise ValueError(f"format is {index.get('format')!r}, expected {INDEX_FORMAT!r}")
            entries = [MediaEntry(e["sha256"], e["kind"], str(root / e["path"]), e["attributes"])
                       for e in index["entries"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MediaDatabaseError(f"Media index {str(index_path)!r} is unreadable ({exc}); delete "
                                     f"the folder {str(root)!r} and it will be rebuilt.") from None
        return cls(entries)

    # ---- queries -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def kinds(self) -> tuple[str, ...]:
        """The kinds that have at least one entry."""
        return tuple(self._by_kind)

    def entries(self, kind: str | None = None) -> tuple[MediaEntry, ...]:
        """Every entry of ``kind`` (all entries when ``kind`` is None)."""
        return self._entries if kind is None else self._by_kind.get(kind, ())

    def sample(self, kind: str, rng: np.random.Generator | random.Random, *, width: int | None = None,
               height: int | None = None, duration: float | None = None) -> MediaEntry:
        """One entry of ``kind``, the best match for the requested resolution and duration.

        Raises:
            MediaDatabaseError: the database holds no entry of ``kind``.
        """
        candidates = self._candidates(kind, width, height, duration)
        return candidates[_randrange(rng, len(candidates))]

    def sample_many(self, kind: str, count: int, rng: np.random.Generator | random.Random, *,
                    width: int | None = None, height: int | None = None, duration: float | None = None,
                    exclude: frozenset[str] = frozenset()) -> tuple[MediaEntry, ...]:
        """``count`` best-matching entries, distinct while the tied candidates last.

        Args:
            exclude: content hashes to avoid (e.g. an edit's source image) unless nothing else matches.
        """
        candidates = self._candidates(kind, width, height, duration)
        if exclude:
            candidates = tuple(e for e in candidates if e.sha256 not in exclude) or candidates
        n = len(candidates)
        if isinstance(rng, np.random.Generator):
            order = rng.choice(n, size=min(count, n), replace=False).tolist()
        else:
            order = rng.sample(range(n), min(count, n))
        return tuple(candidates[order[i % n]] for i in range(count))

    def _candidates(self, kind: str, width: int | None, height: int | None,
                    duration: float | None) -> tuple[MediaEntry, ...]:
        query = (kind, width, height, duration)
        found = self._memo.get(query)
        if found is None:
            found = self._rank(kind, width, height, duration)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[query] = found
        return found

    def _rank(self, kind: str, width: int | None, height: int | None,
              duration: float | None) -> tuple[MediaEntry, ...]:
        groups = self._groups.get(kind)
        if groups is None:
            raise MediaDatabaseError(
                f"The media database has no {kind} entry (it holds: {', '.join(self._by_kind)}). Add "
                f"{kind} files to the folder, or use MediaDatabase.default().")
        if (width is None) != (height is None):
            raise ValueError(f"Give both width and height, or neither (got {width=}, {height=}).")

        def distance(key: tuple) -> tuple[float, float, float]:
            w, h, d = key
            aspect = size = span = 0.0
            if width is not None and w is not None:
                aspect = abs(math.log((w / h) / (width / height)))
                size = abs(math.log((w * h) / (width * height)))
            if duration is not None and d is not None:
                span = abs(d - duration)
            return round(aspect, 9), round(size, 9), round(span, 9)

        scores = {key: distance(key) for key in groups}
        best = min(scores.values())
        return tuple(e for key, score in scores.items() if score == best for e in groups[key])


def _randrange(rng: np.random.Generator | random.Random, n: int) -> int:
    return int(rng.integers(n)) if isinstance(rng, np.random.Generator) else rng.randrange(n)


def _build_default(root: Path) -> None:
    """Build the default media into a private folder, then rename it to ``root`` atomically."""
    if root.is_dir() and any(root.iterdir()) and not (root / "index.json").exists():
        raise MediaDatabaseError(f"{str(root)!r} is neither empty nor a media database (no index.json); "
                                 "pass another root, or delete the folder.")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        records = write_default_media(BlobStore(staging / "blobs"))
        index = {"format": INDEX_FORMAT, "version": DEFAULT_MEDIA_VERSION,
                 "entries": [{"sha256": sha, "kind": kind, "path": f"blobs/{rel}", "attributes": attrs}
                             for sha, kind, rel, attrs in records]}
        (staging / "index.json").write_text(json.dumps(index, indent=1))
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, root)  # replaces a missing or empty root; fails if another build won
        except OSError:
            if not (root / "index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- reading files ---------------------------------------------------------------------------

def probe(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """Measure a file's attributes (see :class:`MediaEntry`); raises OSError/ValueError if unreadable."""
    if kind == "image":
        with Image.open(path) as image:
            return {"width": image.width, "height": image.height}
    if kind == "audio" and Path(path).suffix.lower() == ".wav":
        with wave.open(str(path), "rb") as track:
            return {"duration": round(track.getnframes() / track.getframerate(), 3),
                    "sample_rate": track.getframerate()}
    with av.open(str(path)) as container:
        streams = container.streams.video if kind == "video" else container.streams.audio
        if not streams:
            raise ValueError(f"no {kind} stream")
        stream = streams[0]
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            raise ValueError("unknown duration")
        if kind == "audio":
            return {"duration": round(duration, 3), "sample_rate": stream.codec_context.sample_rate}
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise ValueError("unknown frame rate")
        return {"width": stream.codec_context.width, "height": stream.codec_context.height,
                "duration": round(duration, 3), "fps": round(float(rate), 3)}


@functools.lru_cache(maxsize=256)
def thumbnail(path: str, kind: str, size: int) -> np.ndarray:
    """A read-only (size, size, 3) uint8 picture of a media file, memoised.

    Images and video frames are letterboxed: scaled to fit, centred on black, aspect kept. A video
    shows its middle frame; an audio track shows its waveform (min/max envelope per column).
    """
    if kind == "image":
        with Image.open(path) as image:
            picture = _letterbox(image, size)
    elif kind == "video":
        picture = _letterbox(_middle_frame(path), size)
    elif kind == "audio":
        picture = _waveform(path, size)
    else:
        raise ValueError(f"thumbnail kind {kind!r} must be 'image', 'video' or 'audio'")
    picture.setflags(write=False)
    return picture


def _letterbox(image: Image.Image, size: int) -> np.ndarray:
    scale = size / max(image.size)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (size, size))
    resized = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
    canvas.paste(resized, ((size - width) // 2, (size - height) // 2))
    return np.array(canvas)


def _middle_frame(path: str) -> Image.Image:
    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.duration is not None:
            target = (stream.start_time or 0) + stream.duration // 2
        else:
            target = int(container.duration / av.time_base / 2 / stream.time_base)
        container.seek(target, stream=stream)
        frame = None
        for frame in container.decode(stream):
            if frame.pts is None or frame.pts >= target:
                break
        if frame is None:
            raise MediaDatabaseError(f"Video {path!r} has no decodable frame.")
        return frame.to_image()


def _waveform(path: str, size: int) -> np.ndarray:
    resampler = av.AudioResampler(format="flt", layout="mono", rate=8000)
    with av.open(path) as container:
        chunks = [out.to_ndarray().reshape(-1) for frame in container.decode(audio=0)
                  for out in resampler.resample(frame)]
    samples = np.concatenate(chunks) if chunks else np.zeros(1, np.float32)
    if samples.size < size:
        samples = np.pad(samples, (0, size - samples.size))
    samples = samples / max(float(np.abs(samples).max()), 1e-6)
    starts = np.linspace(0, samples.size, size, endpoint=False).astype(int)
    highs, lows = np.maximum.reduceat(samples, starts), np.minimum.reduceat(samples, starts)
    levels = 1 - 2 * (np.arange(size) + 0.5) / size
    wave_mask = (levels[:, None] <= highs[None, :] + 1 / size) & (levels[:, None] >= lows[None, :] - 1 / size)
    picture = np.empty((size, size, 3), np.uint8)
    picture[:] = (18, 18, 28)
    picture[size // 2] = (60, 60, 80)
    picture[wave_mask] = (90, 200, 250)
    return picture
