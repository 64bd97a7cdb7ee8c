"""Cost of the attribute tier: building the default media database, and one simulated call per tool family.

Builds the procedural database into a fresh temporary folder (timed), then times
``AttributeBackend.answer`` on representative calls, each with a new seed per call.

    python benchmarks/attribute_tier.py [--calls 20000] [--out benchmarks/results/attribute_tier.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

from visenv.media import Artifact
from visenv.mediadb import MediaDatabase
from visenv.tools.attribute import AttributeBackend
from visenv.tools.backends import ToolRequest
from visenv.tools.specs import get_tool


def _video(name: str, duration: float) -> Artifact:
    return Artifact(id=name, kind="video", sha256="0" * 64, producer="tool_text2video_veo",
                    attributes={"width": 1280, "height": 720, "duration": duration, "fps": 24, "shots": 1})


def _request(tool: str, arguments: dict, **inputs: tuple[Artifact, ...]) -> ToolRequest:
    return ToolRequest(spec=get_tool(tool), arguments=arguments, inputs=inputs, seed=0)


def representative_requests() -> dict[str, ToolRequest]:
    """A text-to-image, a composite, a trim and two text tools."""
    clips = tuple(_video(f"vid_{i:012d}", 4.0 + i) for i in range(3))
    music = Artifact(id="aud_000000000001", kind="audio", sha256="1" * 64, producer="tool_music_suno",
                     attributes={"duration": 30.0, "sample_rate": 22050})
    return {
        "text2image (n=1)": _request("tool_text2image_qwen", {"prompt": "a lighthouse at dusk"}),
        "text2image (n=4, 16:9)": _request("tool_text2image_qwen", {"prompt": "a lighthouse", "n": 4,
                                                                     "aspect_ratio": "16:9"}),
        "composite (3 clips + audio)": _request("tool_video_composite", {"clips": [c.id for c in clips],
                                                                          "audio": music.id},
                                                clips=clips, audio=(music,)),
        "trim": _request("tool_video_trim_edit", {"video": clips[0].id, "start": 1, "end": 3}, video=clips[:1]),
        "shot_gen (6 shots)": _request("tool_video_shot_gen", {"topic": "tea", "shots": 6, "duration": 30}),
        "task_manager (list)": _request("tool_task_manager", {"action": "list"}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--out", default="benchmarks/results/attribute_tier.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        media = MediaDatabase.default(Path(folder) / "media")
        build_s = time.perf_counter() - start
        backend = AttributeBackend(media)
        per_call_us = {}
        for name, request in representative_requests().items():
            requests = [dataclasses.replace(request, seed=seed) for seed in range(args.calls)]
            for warm in requests[:100]:
                backend.answer(warm)
            start = time.perf_counter()
            for each in requests:
                backend.answer(each)
            per_call_us[name] = (time.perf_counter() - start) / args.calls * 1e6
    print(f"default media database build: {build_s:.1f} s ({len(media)} files)")
    print(f"{'call':32s} {'us/call':>8s}")
    for name, us in per_call_us.items():
        print(f"{name:32s} {us:8.1f}")
    result = {"machine": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
              "build_seconds": round(build_s, 2), "per_call_us": {k: round(v, 2) for k, v in per_call_us.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
