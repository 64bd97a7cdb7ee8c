"""Build a tool cache from real outputs, then replay episodes from it exactly.

    python examples/build_cache.py --cache runs/example-cache --n 8

The "real" text-to-image tool here is a Python callable that renders procedural pictures whose
colours and shapes follow the prompt (unlike the attribute tier, whose media ignore it): put your
own generator, a diffusion pipeline or an HTTP client, in its place. Three passes over the same
image tasks, played by the scripted teacher:

1. record: chain [exact cache, real] for the text-to-image tools; every miss calls the generator
   and is written through to the cache;
2. replay: a strict chain [exact cache] alone; every text-to-image call must come from the cache
   (a miss would raise BackendMiss), and the episodes get byte-identical pictures;
3. the cache's statistics (``visenv cache stats CACHE`` prints the same).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random

from PIL import Image, ImageDraw

from baselines.workflow_agent import WorkflowAgent
from visenv.envs.visgen import VisGenEnv
from visenv.tasks import make_suite
from visenv.tools.backends import BackendChain, ToolRequest
from visenv.tools.cache import ExactCacheBackend, ToolCache
from visenv.tools.real import GeneratedMedia, Generation, RealBackend
from visenv.tools.specs import tools_in_group


def paint(request: ToolRequest) -> Generation | None:
    """A real (procedural) text-to-image generator: ``n`` PNGs at the tool's resolution for the aspect ratio."""
    if request.spec.group != "text2image":
        return None  # not served: the call passes to the next backend of the chain
    aspect = request.arguments.get("aspect_ratio", "1:1")
    width, height = request.spec.output.resolutions[aspect]
    pictures = []
    for index in range(request.arguments.get("n", 1)):
        digest = hashlib.sha256(f"{request.arguments['prompt']}|{request.seed}|{index}".encode()).digest()
        rng = random.Random(digest)
        picture = Image.new("RGB", (width // 8, height // 8), tuple(digest[:3]))
        draw = ImageDraw.Draw(picture)
        for _ in range(6):
            x, y = rng.randrange(picture.width), rng.randrange(picture.height)
            radius = rng.randrange(4, max(5, picture.width // 4))
            colour = tuple(rng.randrange(256) for _ in "rgb")
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
        buffer = io.BytesIO()
        picture.resize((width, height), Image.Resampling.BICUBIC).save(buffer, format="PNG")
        pictures.append(GeneratedMedia(buffer.getvalue(), ".png"))
    return Generation(media=tuple(pictures))


def play(env: VisGenEnv, tasks, seed: int) -> list[tuple[str, str, str]]:
    """The teacher plays every task; returns (tool, backend, output sha256) of each text-to-image output."""
    teacher, outputs = WorkflowAgent(seed=seed), []
    for i, task in enumerate(tasks):
        observation, _ = env.reset(seed=seed + i, options={"task": task})
        teacher.reset(observation, seed=seed + i)
        done = False
        while not done:
            observation, _, terminated, truncated, info = env.step(teacher.act(observation))
            done = terminated or truncated
            call = info.get("tool_result")
            if call and call["status"] == "ok" and call["tool"] in tools_in_group("text2image"):
                outputs += [(call["tool"], call["backend"], env.unwrapped.record.artifacts[a].sha256)
                            for a in call["outputs"]]
    return outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="runs/example-cache", help="the cache folder (default runs/example-cache)")
    parser.add_argument("--n", type=int, default=8, help="image tasks to play (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="episode seed (default 0)")
    args = parser.parse_args()

    cache = ToolCache(args.cache)
    tasks = make_suite(args.n, 0, modality="image")
    recording = [ExactCacheBackend(cache), RealBackend(paint, cache=cache)]  # a miss calls paint, recorded
    recorder = VisGenEnv(tasks=tasks, backends={"text2image": recording})
    recorded = play(recorder, tasks, args.seed)
    served = {backend: sum(b == backend for _, b, _ in recorded) for backend in sorted({b for _, b, _ in recorded})}
    print(f"record: {len(recorded)} text-to-image outputs, by backend {served}")

    replayer = VisGenEnv(tasks=tasks, backends={"text2image": BackendChain([ExactCacheBackend(cache)], strict=True)})
    replayed = play(replayer, tasks, args.seed)
    identical = [r[2] for r in recorded] == [r[2] for r in replayed]
    print(f"replay: {len(replayed)} outputs, all from the exact cache: "
          f"{all(b == 'exact_cache' for _, b, _ in replayed)}, identical to the recording: {identical}")

    cache.flush()
    stats = cache.stats()
    print(f"cache {args.cache}: {stats['entries']} entries, {stats['blobs']} files, {stats['bytes'] / 1e6:.1f} MB")
    for tool, row in stats["tools"].items():
        print(f"  {tool:26} entries {row['entries']:3}  exact hits {row.get('exact_hit', 0):3}  "
              f"misses {row.get('exact_miss', 0):3}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
