"""Rewards that look at the pixels with CLIP (open_clip): text-image alignment and consistency.

The paper scores structure only ("objective inconsistency"); with cached or real tool outputs the
delivered media can be scored directly:

* :class:`ClipAlignment`: how well the delivered images (and sampled video frames) match a text:
  the task's request, its content keywords, or each artifact's own generation prompt.
* :class:`ClipConsistency`: how alike the delivered pictures are, for tasks that require object,
  scene or style consistency (PAPER.md section 3, R_cons).

Both are batched rubric components (``component(episodes) -> list[float | None]``) and benchmark
metrics (see :func:`visenv.rewards.judges.grader.grade_benchmark`). They share a
:class:`ClipScorer`, which loads the model lazily, encodes in batches on the GPU when there is one,
and memoises every embedding in a persistent :class:`~visenv.rewards.cache.MemoCache` keyed by
(model id, artifact sha256) for pictures and (model id, text sha256) for texts. An alignment score
is the dot product of two memoised embeddings, so the memo answers every (artifact, text, model)
triple, and a fully memoised batch never loads the model.

Weights come from a named pretrained tag (from the local Hugging Face cache, or downloaded when the
network is allowed), a checkpoint file, an open_clip ``local-dir:`` folder, or seeded random init
(tests and benchmarks). With ``HF_HUB_OFFLINE=1`` a tag that is not cached fails at once with a
message that says how to supply the weights. Nothing is downloaded by the tests.

:meth:`ClipScorer.tiny` builds a tiny model (:data:`TINY_CLIP_CONFIG`) with random weights offline,
in milliseconds: the pipeline runs end to end, the scores mean nothing.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import av
import numpy as np
from PIL import Image

from visenv.episode import EpisodeRecord
from visenv.error import ConfigError, DependencyNotInstalled
from visenv.media import Artifact, sha256_file
from visenv.rewards.cache import MemoCache

logger = logging.getLogger(__name__)

CLIP_CACHE_VERSION = 1
"""Bump when preprocessing or frame sampling changes: it is part of every memo key."""
LOCAL_WEIGHTS = "local"
"""``pretrained`` value that loads the weights stored in a ``local-dir:`` model folder."""
VISUAL_KINDS = ("image", "video")
TEXT_SOURCES = ("request", "keywords", "prompt")
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
TINY_CLIP_CONFIG: dict[str, Any] = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
"""An open_clip config (16-dim embeddings, one-layer towers, 32-pixel pictures, 16-token texts) that
builds in milliseconds. With random weights it runs the whole CLIP pipeline, but its scores mean
nothing: see :func:`tiny_clip_model` and :meth:`ClipScorer.tiny`."""


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError:
        raise DependencyNotInstalled("open_clip_torch", "clip", "CLIP rewards") from None
    return open_clip


def tiny_clip_model(folder: str | Path) -> str:
    """Write :data:`TINY_CLIP_CONFIG` as ``folder/open_clip_config.json`` (no weights; the folder is
    created) and return its open_clip model name, ``"local-dir:FOLDER"``, for ``ClipScorer(model=...,
    pretrained=None)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    return f"local-dir:{folder}"


def video_frames(path: str, count: int) -> list[Image.Image]:
    """``count`` frames at evenly spaced times (the middle of ``count`` equal spans) of a video."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        start = stream.start_time or 0
        if stream.duration is not None:
            span = stream.duration
        else:
            span = int(container.duration / av.time_base / stream.time_base)
        frames = []
        for i in range(count):
            target = start + int(span * (2 * i + 1) / (2 * count))
            container.seek(target, stream=stream)
            frame = None
            for frame in container.decode(stream):
                if frame.pts is None or frame.pts >= target:
                    break
            if frame is None:
                raise ValueError(f"video {path!r} has no decodable frame near pts {target}")
            frames.append(frame.to_image())
    return frames


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _encode_array(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _decode_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class ClipScorer:
    """A CLIP model with a persistent embedding memo; shared by the CLIP components.

    Args:
        model: an open_clip architecture name (``open_clip.list_models()``), or
            ``"local-dir:PATH"`` for a folder holding ``open_clip_config.json`` (and its weights).
        pretrained: where the weights come from: a pretrained tag of ``model``
            (``open_clip.list_pretrained_tags_by_model(model)``), a checkpoint file,
            :data:`LOCAL_WEIGHTS` for the checkpoint in a ``local-dir:`` folder, or None for seeded
            random weights (tests and benchmarks only: the scores mean nothing).
        cache_path: the SQLite memo file, shared by processes; None memoises in this process only.
        device: a torch device; None picks "cuda" when available, else "cpu".
        batch_size: pictures or texts per forward pass.
        video_frames: frames sampled from each video (evenly spaced).
        seed: the seed of the random weights (``pretrained=None``).

    Attributes:
        images_encoded: pictures (images or video frames) run through the model by this process.
        texts_encoded: texts run through the model by this process.
    """

    model: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    cache_path: str | None = None
    device: str | None = None
    batch_size: int = 64
    video_frames: int = 4
    seed: int = 0
    images_encoded: int = field(default=0, init=False)
    texts_encoded: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"ClipScorer.batch_size ({self.batch_size}) must be >= 1.")
        if self.video_frames < 1:
            raise ConfigError(f"ClipScorer.video_frames ({self.video_frames}) must be >= 1.")
        open_clip = _open_clip()
        local = self.model.startswith("local-dir:")
        if local:
            config = Path(self.model.removeprefix("local-dir:")) / "open_clip_config.json"
            if not config.is_file():
                raise ConfigError(f"ClipScorer.model ({self.model!r}): {str(config)!r} does not exist; a "
                                  "local-dir: folder must hold open_clip_config.json (and its weights).")
            if self.pretrained not in (LOCAL_WEIGHTS, None):
                raise ConfigError(f"ClipScorer.pretrained ({self.pretrained!r}) must be {LOCAL_WEIGHTS!r} "
                                  "(the folder's weights) or None (random) for a local-dir: model.")
            if self.pretrained == LOCAL_WEIGHTS and not self._checkpoints():
                raise ConfigError(f"ClipScorer.pretrained is {LOCAL_WEIGHTS!r} but {str(config.parent)!r} holds "
                                  f"no checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}); add the weights there, or "
                                  "pass pretrained=None for random weights.")
        elif self.model not in open_clip.list_models():
            raise ConfigError(f"ClipScorer.model ({self.model!r}) is not an open_clip architecture; "
                              "see open_clip.list_models(), or pass 'local-dir:PATH'.")
        elif self.pretrained is not None and not self._is_tag(self.pretrained) and not os.path.isfile(self.pretrained):
            tags = open_clip.list_pretrained_tags_by_model(self.model)
            raise ConfigError(f"ClipScorer.pretrained ({self.pretrained!r}) is neither a pretrained tag of "
                              f"{self.model} ({', '.join(tags) or 'none'}) nor an existing checkpoint file.")
        self._setup()

    @classmethod
    def tiny(cls, folder: str | Path, seed: int = 0, cache_path: str | None = None,
             device: str | None = None) -> ClipScorer:
        """A scorer of the tiny open_clip model (:data:`TINY_CLIP_CONFIG`) with seeded random weights.

        Random weights: the pipeline runs (loading, batching, video frames, the memo, the report
        column), the scores mean nothing. Log them as a metric, never optimise them; for meaningful
        scores pass real weights (``ClipScorer(model="local-dir:/folder", pretrained="local")``, a
        checkpoint file or a pretrained tag).

        Args:
            folder: where the model's ``open_clip_config.json`` is written (created if missing).
            seed: the seed of the random weights.
            cache_path: the SQLite embedding memo; None memoises in this process only.
            device: a torch device; None picks "cuda" when available, else "cpu".
        """
        return cls(model=tiny_clip_model(folder), pretrained=None, cache_path=cache_path, seed=seed, device=device)

    def _checkpoints(self) -> list[Path]:
        folder = Path(self.model.removeprefix("local-dir:"))
        return sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)

    def _is_tag(self, value: str) -> bool:
        return value in _open_clip().list_pretrained_tags_by_model(self.model)

    def _setup(self) -> None:
        self._lock = threading.Lock()
        self._net: Any = None
        self._preprocess: Any = None
        self._tokenizer: Any = None
        self._model_id: str | None = None
        self.cache = MemoCache(self.cache_path)

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_lock", "_net", "_preprocess", "_tokenizer", "cache")}
        return state | {"images_encoded": 0, "texts_encoded": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    # ---- identity and loading ------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """Names the weights exactly (architecture, tag or content hash), without loading them."""
        if self._model_id is None:
            if self.model.startswith("local-dir:"):
                folder = Path(self.model.removeprefix("local-dir:"))
                source = "local-dir:" + sha256_file(folder / "open_clip_config.json")[:16]
                if self.pretrained == LOCAL_WEIGHTS:
                    source += "/files:" + _digest(*(sha256_file(p) for p in self._checkpoints()))[:16]
            else:
                source = self.model
            if self.pretrained is None:
                weights = f"random:{self.seed}"
            elif self.pretrained == LOCAL_WEIGHTS:
                weights = ""
            elif self._is_tag(self.pretrained):
                weights = self.pretrained
            else:
                weights = "file:" + sha256_file(self.pretrained)[:16]
            self._model_id = f"clip-v{CLIP_CACHE_VERSION}:{source}" + (f"/{weights}" if weights else "")
        return self._model_id

    @property
    def loaded(self) -> bool:
        """Whether this process has loaded the model (a fully memoised batch never does)."""
        return self._net is not None

    def _load(self) -> Any:
        with self._lock:
            if self._net is None:
                self._net, self._preprocess, self._tokenizer = self._create()
        return self._net

    def _create(self) -> tuple[Any, Any, Any]:
        import torch

        open_clip = _open_clip()
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.pretrained is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                net, _, preprocess = open_clip.create_model_and_transforms(self.model, load_weights=False)
        elif self.pretrained == LOCAL_WEIGHTS:
            net, _, preprocess = open_clip.create_model_and_transforms(self.model, require_pretrained=True)
        else:
            try:
                net, _, preprocess = open_clip.create_model_and_transforms(self.model, pretrained=self.pretrained)
            except RuntimeError as err:
                from huggingface_hub.constants import is_offline_mode

                offline = is_offline_mode()
                raise ConfigError(
                    f"CLIP weights {self.model}/{self.pretrained} could not be loaded"
                    f"{' (HF_HUB_OFFLINE is set, so nothing is downloaded)' if offline else ''}: {err}. "
                    "Supply them in one of three ways: download once where the network is allowed "
                    f"(python -c \"import open_clip; open_clip.create_model('{self.model}', "
                    f"pretrained='{self.pretrained}')\", which fills the Hugging Face cache, HF_HOME); "
                    "pass pretrained='/path/to/open_clip_pytorch_model.bin' (a checkpoint of this "
                    f"architecture); or pass model='local-dir:/path/to/folder', pretrained='{LOCAL_WEIGHTS}' "
                    "for a folder with open_clip_config.json and the weights.") from None
        net = net.to(device).eval()
        return net, preprocess, open_clip.get_tokenizer(self.model)

    # ---- embeddings ----------------------------------------------------------------------------

    def _pictures(self, artifact: Artifact) -> list[Image.Image]:
        if artifact.kind == "video":
            return video_frames(artifact.path, self.video_frames)
        with Image.open(artifact.path) as image:
            return [image.convert("RGB")]

    def _forward(self, encode: Any, batch: list[Any]) -> np.ndarray:
        import torch

        net = self._load()
        device = next(net.parameters()).device
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(batch), self.batch_size):
                chunk = torch.stack(batch[start:start + self.batch_size]).to(device)
                features = encode(net, chunk).float()
                outputs.append(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())
        return np.concatenate(outputs)

    def picture_embeddings(self, artifacts: Sequence[Artifact]) -> list[np.ndarray | None]:
        """Unit embeddings of each artifact's pictures, shape (pictures, dim): 1 for an image, a row
        per sampled frame for a video. None for an artifact whose file cannot be read (logged)."""
        keys = [_digest(self.model_id, a.kind, a.sha256, str(self.video_frames if a.kind == "video" else 1))
                for a in artifacts]
        found = {k: _decode_array(v) for k, v in self.cache.get_many(keys).items()}
        missing = {k: a for k, a in zip(keys, artifacts) if k not in found}
        failed: set[str] = set()
        group: list[tuple[str, int]] = []  # (key, pictures), decoded but not yet encoded
        pictures: list[Any] = []
        for i, (key, artifact) in enumerate(missing.items()):
            try:
                frames = self._pictures(artifact)
            except (OSError, ValueError, av.FFmpegError) as err:
                logger.warning("CLIP cannot read %s %s (%s): %s", artifact.kind, artifact.id, artifact.path, err)
                failed.add(key)
            else:
                self._load()
                pictures += [self._preprocess(frame) for frame in frames]
                group.append((key, len(frames)))
            if pictures and (len(pictures) >= self.batch_size or i == len(missing) - 1):
                found.update(self._encode_pictures(group, pictures))  # bounded memory: one batch at a time
                group, pictures = [], []
        return [None if k in failed else found[k] for k in keys]

    def _encode_pictures(self, group: list[tuple[str, int]], pictures: list[Any]) -> dict[str, np.ndarray]:
        rows = self._forward(lambda net, x: net.encode_image(x), pictures)
        with self._lock:
            self.images_encoded += len(pictures)
        bounds = np.cumsum([0] + [count for _, count in group])
        fresh = {key: rows[bounds[j]:bounds[j + 1]] for j, (key, _) in enumerate(group)}
        self.cache.put_many({k: _encode_array(v) for k, v in fresh.items()})
        return fresh

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """Unit embeddings of ``texts``, shape (len(texts), dim); CLIP truncates long texts."""
        keys = [_digest(self.model_id, "text", text) for text in texts]
        found = {k: _decode_array(v) for k, v in self.cache.get_many(keys).items()}
        missing = {k: t for k, t in zip(keys, texts) if k not in found}
        if missing:
            self._load()
            tokens = list(self._tokenizer(list(missing.values())))
            rows = self._forward(lambda net, x: net.encode_text(x), tokens)
            with self._lock:
                self.texts_encoded += len(missing)
            fresh = dict(zip(missing, rows))
            self.cache.put_many({k: _encode_array(v) for k, v in fresh.items()})
            found.update(fresh)
        return np.stack([found[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)

    def alignment(self, artifacts: Sequence[Artifact], texts: Sequence[str]) -> list[float | None]:
        """Cosine similarity of each artifact with its text (a video: the mean over its frames)."""
        if len(artifacts) != len(texts):
            raise ValueError(f"alignment() got {len(artifacts)} artifacts but {len(texts)} texts.")
        pictures = self.picture_embeddings(artifacts)
        text_rows = self.text_embeddings(texts)
        return [None if p is None else float((p @ t).mean()) for p, t in zip(pictures, text_rows)]

    def consistency(self, artifacts: Sequence[Artifact]) -> float | None:
        """Mean pairwise cosine similarity of the pictures (images and video frames) of ``artifacts``;
        None with fewer than two pictures or an unreadable file."""
        return mean_pairwise_cosine(self.picture_embeddings(artifacts))


def mean_pairwise_cosine(embeddings: Sequence[np.ndarray | None]) -> float | None:
    """Mean dot product over all pairs of rows of the unit ``embeddings``; None with fewer than two
    rows or a missing (None) embedding."""
    if any(e is None for e in embeddings):
        return None
    rows = [row for e in embeddings for row in e]
    if len(rows) < 2:
        return None
    return float(np.mean([a @ b for a, b in itertools.combinations(rows, 2)]))


def visual_deliverables(episode: EpisodeRecord) -> list[Artifact]:
    """The delivered images and videos of an episode, in the order cited."""
    return [a for a in episode.delivered() if a.kind in VISUAL_KINDS]


class ClipAlignment:
    """Text-image alignment of the delivered media, as a component in [0, 1] (CLIPScore style).

    Each delivered image or video is scored ``clip(scale * cosine(text, picture), 0, 1)`` (a video:
    the mean cosine over its sampled frames) and the episode scores the mean. ``scale`` = 2.5 is
    CLIPScore's (Hessel et al., 2021): a raw cosine of 0.4 already counts as a perfect match.

    Args:
        scorer: the CLIP model and memo.
        text: what the media is compared with: "request" (the task's request), "keywords" (its
            content keywords and style) or "prompt" (each artifact's own generation prompt; media
            without one are skipped).
        scale: the CLIPScore weight.
        name: the component's name in logs.

    Returns per episode None when nothing visual was delivered (R_result scores that) or a file
    cannot be read (counted in ``failures`` and logged). ``last_details`` holds, per episode of the
    last call, the raw cosines and ``judge_id``.
    """

    def __init__(self, scorer: ClipScorer, text: str = "request", scale: float = 2.5,
                 name: str = "clip_alignment"):
        if text not in TEXT_SOURCES:
            raise ConfigError(f"ClipAlignment.text ({text!r}) must be one of {TEXT_SOURCES}.")
        if scale <= 0:
            raise ConfigError(f"ClipAlignment.scale ({scale}) must be > 0.")
        self.scorer, self.text, self.scale, self.name = scorer, text, scale, name
        self.failures = 0
        self.last_details: list[dict[str, Any]] = []

    @property
    def judge_id(self) -> str:
        """The model and the scoring rule, logged with every score."""
        return f"{self.scorer.model_id}|alignment:{self.text}:x{self.scale:g}"

    def _text(self, episode: EpisodeRecord, artifact: Artifact) -> str:
        if self.text == "prompt":
            return artifact.prompt
        if self.text == "keywords":
            req = episode.task.requirements
            return ", ".join((*req.keywords, *([f"{req.style} style"] if req.style else ())))
        return episode.task.request

    def __call__(self, episodes: Sequence[EpisodeRecord]) -> list[float | None]:
        pairs = [[(a, self._text(e, a)) for a in visual_deliverables(e)] for e in episodes]
        pairs = [[(a, t) for a, t in p if t] for p in pairs]
        flat = [pair for p in pairs for pair in p]
        cosines = iter(self.scorer.alignment([a for a, _ in flat], [t for _, t in flat]))
        scores, self.last_details = [], []
        for episode, p in zip(episodes, pairs):
            values = [next(cosines) for _ in p]
            if not values or None in values:
                score = None
                if values:
                    self.failures += 1
                    logger.warning("%s: unreadable media in episode %s; score None", self.name, episode.task.task_id)
            else:
                score = float(np.mean([min(1.0, max(0.0, self.scale * v)) for v in values]))
            scores.append(score)
            self.last_details.append({"judge_id": self.judge_id, "score": score, "cosines": values,
                                      "artifacts": [a.id for a, _ in p]})
        return scores

    def __repr__(self) -> str:
        return f"ClipAlignment({self.judge_id!r})"


class ClipConsistency:
    """Consistency of the delivered pictures, for tasks that require it (R_cons on the pixels).

    The score is the mean pairwise cosine similarity of every delivered image and sampled video
    frame, clipped to [0, 1]: the images of a set, or the shots of a video, should show the same
    object, scene or style.

    Args:
        scorer: the CLIP model and memo.
        name: the component's name in logs.

    Returns per episode None when the task requires no consistency, fewer than two pictures were
    delivered, or a file cannot be read (the last counted in ``failures`` and logged).
    """

    def __init__(self, scorer: ClipScorer, name: str = "clip_consistency"):
        self.scorer, self.name = scorer, name
        self.failures = 0
        self.last_details: list[dict[str, Any]] = []

    @property
    def judge_id(self) -> str:
        """The model and the scoring rule, logged with every score."""
        return f"{self.scorer.model_id}|consistency"

    def __call__(self, episodes: Sequence[EpisodeRecord]) -> list[float | None]:
        media = [visual_deliverables(e) if e.task.requirements.consistency else [] for e in episodes]
        embeddings = iter(self.scorer.picture_embeddings([a for m in media for a in m]))
        scores, self.last_details = [], []
        for episode, artifacts in zip(episodes, media):
            rows = [next(embeddings) for _ in artifacts]
            value = mean_pairwise_cosine(rows)
            if any(r is None for r in rows):
                self.failures += 1
                logger.warning("%s: unreadable media in episode %s; score None", self.name, episode.task.task_id)
            score = None if value is None else min(1.0, max(0.0, value))
            scores.append(score)
            self.last_details.append({"judge_id": self.judge_id, "score": score, "cosine": value,
                                      "artifacts": [a.id for a in artifacts]})
        return scores

    def __repr__(self) -> str:
        return f"ClipConsistency({self.judge_id!r})"
