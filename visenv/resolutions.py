"""Output resolutions shared by the default tools and the default media database.

The default text-to-image tools (:mod:`visenv.tools.specs`) produce images at
:func:`aspect_resolutions` of their long side, and the video tools at :data:`VIDEO_RESOLUTIONS`;
the procedural media database (:mod:`visenv.procedural_media`) holds files at exactly these sizes,
so that the attribute tier draws a file of the simulated resolution. Both read them from here.
"""

from __future__ import annotations

IMAGE_SIDES = (1024, 1328, 1536, 2048)
"""The long sides of the default text-to-image tools (Gemini and Hunyuan, Qwen, GPT, Seedream)."""
VIDEO_RESOLUTIONS = {"16:9": (1280, 720), "9:16": (720, 1280)}
"""Aspect ratio -> (width, height) of generated and animated video."""


def aspect_resolutions(side: int) -> dict[str, tuple[int, int]]:
    """Aspect ratio -> resolution with the long side ``side`` (square side ``side``)."""
    short34 = side * 3 // 4
    short169 = (side * 9 // 16) // 8 * 8
    return {"1:1": (side, side), "16:9": (side, short169), "9:16": (short169, side),
            "4:3": (side, short34), "3:4": (short34, side)}


def image_resolutions(sides: tuple[int, ...] = IMAGE_SIDES) -> list[tuple[int, int]]:
    """Every (width, height) of :func:`aspect_resolutions` for ``sides``, sorted."""
    return sorted({res for side in sides for res in aspect_resolutions(side).values()})
