"""Procedural media for the default media database: seeded PNG images, MP4 clips and WAV tracks.

The attribute tier (:mod:`visenv.tools.attribute`) answers a tool call with a file drawn from a
media database. The default database is made here, once, from fixed seeds: it needs no download and
holds real files that Pillow, PyAV and :mod:`wave` open with the recorded attributes.

Contents (:func:`write_default_media`):

- images: 3 PNGs (a two-colour gradient with a few flat shapes) at every resolution that a
  default text-to-image tool can produce (:func:`visenv.resolutions.image_resolutions`);
- video: H.264 MP4 (yuv420p, 24 fps, moving shapes), 2 clips for each of 1280x720 and 720x1280 and
  each of 4, 5, 6, 8 and 10 seconds;
- audio: 16-bit mono 22050 Hz WAV (a sine chord over a kick drum beat), 2 tracks for each of 5, 10,
  15, 30 and 60 seconds.

Changing what is built changes the database: bump :data:`DEFAULT_MEDIA_VERSION` so that caches
built by older versions are not reused.
"""

from __future__ import annotations

import io
import wave
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw

from visenv.media import BlobStore
from visenv.resolutions import VIDEO_RESOLUTIONS, image_resolutions

DEFAULT_MEDIA_VERSION = 1
IMAGES_PER_RESOLUTION = 3
VIDEO_DURATIONS = (4, 5, 6, 8, 10)
VIDEO_FPS = 24
AUDIO_DURATIONS = (5, 10, 15, 30, 60)
AUDIO_SAMPLE_RATE = 22050
CLIPS_PER_SETTING = 2


def png_image(width: int, height: int, seed: int) -> bytes:
    """A PNG of a diagonal two-colour gradient with four to six flat ellipses and rectangles."""
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
    image = Image.fromarray(corners).resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    for _ in range(int(rng.integers(4, 7))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        side = int(rng.integers(short // 10, short // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + side, y + side), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def mp4_video(width: int, height: int, seconds: int, fps: int, seed: int) -> bytes:
    """An H.264 MP4 (libx264 ultrafast, yuv420p) of a box and a disc crossing a gradient.

    Frames are drawn directly in the yuv420p planes, so no colour conversion runs per frame.
    """
    rng = np.random.default_rng(seed)
    frame = np.empty((height * 3 // 2, width), np.uint8)
    luma = frame[:height]
    chroma_u = frame[height:height + height // 4].reshape(height // 2, width // 2)
    chroma_v = frame[height + height // 4:].reshape(height // 2, width // 2)
    lo, hi = sorted(rng.integers(30, 220, 2))
    background_y = np.tile(np.linspace(lo, hi, width).astype(np.uint8), (height, 1))
    background_u, background_v = (int(c) for c in rng.integers(60, 196, 2))
    box = max(16, min(width, height) // 6) // 2 * 2
    grid = np.arange(box) - box / 2 + 0.5
    disc = grid[None, :] ** 2 + grid[:, None] ** 2 <= (box / 2) ** 2
    box_colour, disc_colour = rng.integers(16, 240, (2, 3))
    n_frames = seconds * fps

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 2 * fps
        stream.options = {"preset": "ultrafast", "crf": "30"}
        for index in range(n_frames):
            t = index / max(1, n_frames - 1)
            luma[:] = background_y
            chroma_u[:] = background_u
            chroma_v[:] = background_v
            bx = int(t * (width - box)) // 2 * 2
            by = (height // 3) // 2 * 2
            luma[by:by + box, bx:bx + box] = box_colour[0]
            chroma_u[by // 2:(by + box) // 2, bx // 2:(bx + box) // 2] = box_colour[1]
            chroma_v[by // 2:(by + box) // 2, bx // 2:(bx + box) // 2] = box_colour[2]
            dx = (width - box) // 2 // 2 * 2
            dy = int(abs(np.sin(np.pi * 2 * t)) * (height - box)) // 2 * 2
            luma[dy:dy + box, dx:dx + box][disc] = disc_colour[0]
            chroma_u[dy // 2:(dy + box) // 2, dx // 2:(dx + box) // 2][disc[::2, ::2]] = disc_colour[1]
            chroma_v[dy // 2:(dy + box) // 2, dx // 2:(dx + box) // 2][disc[::2, ::2]] = disc_colour[2]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="yuv420p")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def wav_audio(seconds: int, sample_rate: int, seed: int) -> bytes:
    """A 16-bit mono WAV: a three-note sine chord over a decaying kick drum on every beat."""
    rng = np.random.default_rng(seed)
    t = np.arange(seconds * sample_rate) / sample_rate
    root = 110.0 * 2 ** (int(rng.integers(0, 12)) / 12)
    third = 4 if rng.random() < 0.5 else 3
    chord = sum(np.sin(2 * np.pi * root * 2 ** (step / 12) * t) for step in (0, third, 7)) / 3
    beat = 60.0 / float(rng.integers(80, 141))
    since_beat = t % beat
    kick = np.sin(2 * np.pi * 60.0 * since_beat) * np.exp(-since_beat * 18.0)
    return wav_bytes((0.25 * chord + 0.45 * kick) * 32767, sample_rate)


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """A 16-bit mono WAV of ``samples`` (already scaled to the int16 range)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def write_default_media(blobs: BlobStore) -> list[tuple[str, str, str, dict[str, Any]]]:
    """Write the default media into ``blobs``.

    Returns:
        One (sha256, kind, path relative to ``blobs.root``, attributes) per file, in build order.
    """
    records: list[tuple[str, str, str, dict[str, Any]]] = []

    def store(data: bytes, suffix: str, kind: str, attributes: dict[str, Any]) -> None:
        sha, path = blobs.put_bytes(data, suffix)
        records.append((sha, kind, path.relative_to(blobs.root).as_posix(), attributes))

    seed = 0
    for width, height in image_resolutions():
        for _ in range(IMAGES_PER_RESOLUTION):
            seed += 1
            store(png_image(width, height, seed), ".png", "image", {"width": width, "height": height})
    for width, height in VIDEO_RESOLUTIONS.values():
        for seconds in VIDEO_DURATIONS:
            for _ in range(CLIPS_PER_SETTING):
                seed += 1
                store(mp4_video(width, height, seconds, VIDEO_FPS, seed), ".mp4", "video",
                      {"width": width, "height": height, "duration": float(seconds), "fps": VIDEO_FPS})
    for seconds in AUDIO_DURATIONS:
        for _ in range(CLIPS_PER_SETTING):
            seed += 1
            store(wav_audio(seconds, AUDIO_SAMPLE_RATE, seed), ".wav", "audio",
                  {"duration": float(seconds), "sample_rate": AUDIO_SAMPLE_RATE})
    return records
