"""Does looking help? The reflecting teacher against the plain one on the semantic tier, at a set tool fidelity.

Plays a VisGenBench-shaped suite (every ``--stride``-th task of :func:`visenv.tasks.suite.visgenbench`,
so that every dimension keeps its share) in ``VisGenEnv(content="semantic", tool_fidelity=F,
rubric="r1+percept")`` with two scripted teachers on the same tasks and episode seeds:
``WorkflowAgent(inspect=False)`` (reflects "came back as expected" on every result) and
``WorkflowAgent(inspect=True)`` (analyses each generated output, names the defects it sees,
edits or regenerates). Delivered-media correctness is R_percept (the share of delivered media that
show what was asked, plus consistency where required, read from the tier's ground truth);
"perfect" is the share of episodes with R_percept = 1; "defect-free media" the share of delivered
images and videos whose truth lists no defect.

    python benchmarks/reflection.py [--fidelity 0.8] [--stride 5] [--out benchmarks/results/reflection.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from statistics import mean

from baselines.workflow_agent import WorkflowAgent
from visenv.envs.visgen import VisGenEnv
from visenv.tasks.suite import visgenbench


def play(tasks, inspect: bool, fidelity: float, max_turns: int) -> dict:
    env = VisGenEnv(content="semantic", tool_fidelity=fidelity, rubric="r1+percept", tasks=tasks, max_turns=max_turns)
    agent = WorkflowAgent(seed=0, inspect=inspect)
    rows = []
    start = time.perf_counter()
    for index, task in enumerate(tasks):
        obs, _ = env.reset(seed=index, options={"task": index})
        agent.reset(obs)
        done = False
        while not done:
            obs, _, terminated, truncated, info = env.step(agent.act(obs))
            done = terminated or truncated
        components = info["reward_components"]
        media = [a for a in env.record.delivered() if a.kind in ("image", "video") and a.content is not None]
        rows.append({"modality": task.requirements.modality, "dimension": task.dimension,
                     "percept": components.get("R_percept"), "reflect": components.get("R_reflect"),
                     "total": components.get("total"), "truncated": truncated, "turns": len(env.record.turns),
                     "media": len(media), "clean_media": sum(not a.content["defects"] for a in media),
                     "defects_found": agent.defects_found, "revisions": sum(agent.revisions.values())})
    seconds = time.perf_counter() - start

    def summary(selected: list[dict]) -> dict:
        scored = [r for r in selected if r["percept"] is not None]
        return {"episodes": len(selected), "percept": round(mean(r["percept"] for r in scored), 4),
                "perfect": round(mean(r["percept"] == 1.0 for r in scored), 4),
                "clean_media": round(sum(r["clean_media"] for r in selected) / max(1, sum(r["media"] for r in selected)), 4),
                "reflect": round(mean(r["reflect"] for r in selected if r["reflect"] is not None), 4),
                "total": round(mean(r["total"] for r in selected if r["total"] is not None), 4),
                "turns": round(mean(r["turns"] for r in selected), 2),
                "truncated": sum(r["truncated"] for r in selected),
                "revisions": sum(r["revisions"] for r in selected)}

    return {"all": summary(rows), "image": summary([r for r in rows if r["modality"] == "image"]),
            "video": summary([r for r in rows if r["modality"] == "video"]), "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fidelity", type=float, default=0.8, help="tool_fidelity of every tool (default 0.8)")
    parser.add_argument("--stride", type=int, default=5, help="play every stride-th VisGenBench task (default 5: 240)")
    parser.add_argument("--bench-seed", type=int, default=0, help="seed of the VisGenBench suite")
    parser.add_argument("--max-turns", type=int, default=120, help="the environment's turn budget")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    tasks = visgenbench(args.bench_seed)[::args.stride]
    results = {name: play(tasks, inspect, args.fidelity, args.max_turns)
               for name, inspect in (("plain", False), ("reflecting", True))}
    print(f"{len(tasks)} VisGenBench tasks (every {args.stride}th), semantic tier, tool_fidelity {args.fidelity}")
    print(f"{'teacher':<11} {'subset':<6} {'episodes':>8} {'R_percept':>9} {'perfect':>8} {'clean media':>11} "
          f"{'R_reflect':>9} {'R1 total':>8} {'turns':>6} {'trunc':>5} {'revisions':>9}")
    for name, result in results.items():
        for subset in ("all", "image", "video"):
            r = result[subset]
            print(f"{name:<11} {subset:<6} {r['episodes']:>8} {r['percept']:>9.3f} {r['perfect']:>8.3f} "
                  f"{r['clean_media']:>11.3f} {r['reflect']:>9.3f} {r['total']:>8.3f} {r['turns']:>6.1f} "
                  f"{r['truncated']:>5} {r['revisions']:>9}")
        print(f"{name:<11} {result['seconds']:.1f} s")
    if args.out:
        record = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d"),
                  "machine": platform.platform(), "python": platform.python_version(),
                  "tasks": len(tasks), "fidelity": args.fidelity, "results": results}
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=1)


if __name__ == "__main__":
    main()
