"""The semantic tier against the attribute tier: cost per call, and fidelity to prompt-faithful outputs.

1. Times ``SemanticBackend.answer`` and ``AttributeBackend.answer`` on the same calls (a new seed per
   call, so every semantic answer renders a new file): a text-to-image, a 4-image batch, a 10 s
   text-to-video and a composite of three clips.
2. Runs :func:`visenv.tools.fidelity.fidelity_report` on held-out text-to-image calls whose "real"
   outputs are prompt-faithful pictures: each prompt's ask (subjects, counts, colours, text) drawn
   at 512 px with identities and poses of its own (a stand-in for a real generator that follows
   the prompt; no real outputs exist offline). ``c_tool`` by the pHash proxy and by the colour
   histogram proxy; ``as_asked`` is the
   share of a tier's outputs whose truth shows the prompt (None where outputs carry no truth).

    python benchmarks/semantic_tier.py [--calls 200] [--out benchmarks/results/semantic_tier.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from visenv.media import Artifact
from visenv.mediadb import MediaDatabase
from visenv.scene import parse_prompt, realise, render_image
from visenv.tools.attribute import AttributeBackend
from visenv.tools.backends import ToolRequest
from visenv.tools.cache_io import read_calls
from visenv.tools.fidelity import ColourHistogramSimilarity, PerceptualHashSimilarity, fidelity_report
from visenv.tools.semantic import SemanticBackend
from visenv.tools.specs import get_tool

PROMPTS = ("two red cars on a street", "three blue foxes in snow", "one green tree, a sign that says \"OPEN\"",
           "four yellow stars at night", "a purple robot and two orange cats", "five pink cups on a table",
           "a white boat, the words \"SAIL\"", "three brown dogs in a park", "one teal lamp and a black clock",
           "two grey elephants", "a red kite over six green trees", "an orange rocket, the text \"GO\"")


def requests(clips: tuple[Artifact, ...]) -> dict[str, ToolRequest]:
    t2i, t2v = get_tool("tool_text2image_seed"), get_tool("tool_text2video_veo")
    return {
        "text2image (n=1)": ToolRequest(t2i, {"prompt": PROMPTS[0]}, {}, 0),
        "text2image (n=4)": ToolRequest(t2i, {"prompt": PROMPTS[1], "n": 4}, {}, 0),
        "text2video (8 s)": ToolRequest(t2v, {"prompt": PROMPTS[2], "duration": 8}, {}, 0),
        "composite (3 clips)": ToolRequest(get_tool("tool_video_composite"), {"clips": [c.id for c in clips]},
                                           {"clips": clips}, 0),
    }


def time_calls(backend, calls: int, clips) -> dict[str, float]:
    out = {}
    for name, request in requests(clips).items():
        start = time.perf_counter()
        for seed in range(calls):
            backend.answer(ToolRequest(request.spec, request.arguments, request.inputs, seed + 1))
        out[name] = round((time.perf_counter() - start) / calls * 1000, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="calls per row (default 200)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="semantic-bench-"))
    media = MediaDatabase.default()
    semantic = SemanticBackend(media, root=folder / "rendered")
    attribute = AttributeBackend(media)
    t2v = get_tool("tool_text2video_veo")
    clips = tuple(semantic.answer(ToolRequest(t2v, {"prompt": p, "duration": 4}, {}, i)).outputs[0]
                  for i, p in enumerate(PROMPTS[:3]))
    clips = tuple(Artifact(id=f"vid_{i:012d}", kind="video", sha256=c.sha256, attributes=c.attributes,
                           producer=t2v.name, path=c.path, content=c.content) for i, c in enumerate(clips))
    timing = {"semantic": time_calls(semantic, args.calls, clips), "attribute": time_calls(attribute, args.calls, clips)}

    lines = []
    for i, prompt in enumerate(PROMPTS):
        render_image(realise(parse_prompt(prompt), {}, 1000 + i), 512, 512).save(folder / f"{i}.png")
        lines.append(json.dumps({"tool": "tool_text2image_seed", "arguments": {"prompt": prompt}, "file": f"{i}.png",
                                 "seed": i + 1}))
    (folder / "calls.jsonl").write_text("\n".join(lines) + "\n")
    heldout = read_calls(folder / "calls.jsonl")
    tiers = {"attribute": attribute, "semantic": semantic,
             "semantic (fidelity 0.8)": SemanticBackend(media, 0.8, root=folder / "rendered")}
    reports = {metric.name: fidelity_report(heldout, tiers, metric)
               for metric in (PerceptualHashSimilarity(), ColourHistogramSimilarity())}

    print(f"ms per call ({args.calls} calls each, new seed per call)")
    print(f"{'call':<22} {'semantic':>9} {'attribute':>10}")
    for name in timing["semantic"]:
        print(f"{name:<22} {timing['semantic'][name]:>9.2f} {timing['attribute'][name]:>10.3f}")
    print(f"\nfidelity_report on {len(heldout)} prompt-faithful held-out images: c_tool by metric")
    headers = [f"{name} (chance {report['chance']:.2f})" for name, report in reports.items()]
    print(f"{'tier':<24} " + " ".join(f"{h:>40}" for h in headers) + f" {'as_asked':>8}")
    for name in tiers:
        scores = [report["tiers"][name]["c_tool"] for report in reports.values()]
        asked = next(iter(reports.values()))["tiers"][name]["as_asked"]
        print(f"{name:<24} " + " ".join(f"{score:>40.3f}" for score in scores)
              + f" {'-' if asked is None else f'{asked:.3f}':>8}")
    if args.out:
        record = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d"),
                  "machine": platform.platform(), "python": platform.python_version(),
                  "ms_per_call": timing, "fidelity_report": reports}
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
