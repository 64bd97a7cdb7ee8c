"""Helpers shared by the cache, nearest and real-backend tests: small real media files and requests."""

from __future__ import annotations

import io
import os
import wave
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from visenv.media import Artifact, sha256_file
from visenv.tools.backends import MediaOutput, ToolRequest
from visenv.tools.real import GeneratedMedia, Generation
from visenv.tools.specs import get_tool


def png_bytes(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    """A PNG of random pixels: distinct bytes for every seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(folder: str | os.PathLike, name: str, seed: int, size: tuple[int, int] = (24, 16)) -> Path:
    """Write :func:`png_bytes` to ``folder/name`` and return the path."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(seed, size))
    return path


def image_output(path: str | os.PathLike, prompt: str = "") -> MediaOutput:
    """A MediaOutput for an image file, with its measured size."""
    with Image.open(path) as image:
        attributes = {"width": image.width, "height": image.height}
    return MediaOutput("image", sha256_file(path), str(path), attributes, prompt)


def image_artifact(path: str | os.PathLike, artifact_id: str) -> Artifact:
    """An episode artifact backed by an image file."""
    with Image.open(path) as image:
        attributes = {"width": image.width, "height": image.height}
    return Artifact(id=artifact_id, kind="image", sha256=sha256_file(path), attributes=attributes,
                    producer="test", path=str(path))


def request(tool: str, arguments: Mapping[str, Any], seed: int = 0,
            inputs: Mapping[str, tuple[Artifact, ...]] | None = None) -> ToolRequest:
    """A ToolRequest for ``tool``."""
    return ToolRequest(get_tool(tool), dict(arguments), dict(inputs or {}), seed)


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    """A silent mono 16-bit WAV of ``seconds``."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as track:
        track.setnchannels(1)
        track.setsampwidth(2)
        track.setframerate(rate)
        track.writeframes(b"\x00\x00" * int(seconds * rate))
    return buffer.getvalue()


def local_generator(req):
    """A real (if simple) generator: pictures, speech-length silence, and text."""
    kind = req.spec.output.kind
    if kind == "image":
        return Generation(media=tuple(GeneratedMedia(png_bytes(req.seed + i), ".png")
                                      for i in range(req.arguments.get("n", 1))))
    if kind == "audio":
        words = len(req.arguments["text"].split())
        return Generation(media=(GeneratedMedia(wav_bytes(words / 2.5), ".wav", {"voice": "narrator"}),))
    if kind == "text":
        return Generation(text=f"refined: {req.arguments['prompt']}")
    return None
