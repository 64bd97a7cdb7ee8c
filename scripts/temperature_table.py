"""The main job's SFT-only and RL policies on their held-out episodes at several sampling temperatures.

For each seed's run folder (what ``python -m rl.cli main --seed K --out DIR`` or ``rl ablate`` writes), plays
both policies on the run's 256 held-out episodes (the job's own episode seeds: ``--seed`` the run's seed + 777) at each
temperature with ``python -m rl.cli eval --trajectories``, and reports the reward, the rubric total, the
turn-error penalty, the success rate and how many episodes cite an invented artifact id
(:mod:`scripts.failure_modes`), beside the teacher's reward from the run's results.json. Used for
docs/main-job.md ("Where the rest of the gap is"):

    python scripts/temperature_table.py --runs runs/ablate/main --seeds 0 1 2 --temperatures 1.0 0.5 \
        --out benchmarks/results/main_job_temperature.json

At temperature 1.0 the rewards are the job's own ``evaluations.{sft,rl}.sampled.reward``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from failure_modes import mistakes  # noqa: E402  (a sibling script)


def summarise(episodes: list[dict]) -> dict:
    """Reward, rubric total, penalty, success and invented-id count of ``rl eval --trajectories`` rows."""
    n = len(episodes)
    totals = [e["components"].get("total") or 0.0 for e in episodes]
    return {"episodes": n,
            "reward": sum(e["reward"] for e in episodes) / n,
            "rubric_total": sum(totals) / n,
            "turn_error_penalty": sum(t - e["reward"] for t, e in zip(totals, episodes)) / n,
            "success_rate": sum(t >= 0.999 for t in totals) / n,
            "episodes_citing_invented_id": sum("invented_id" in mistakes(e) for e in episodes)}


def evaluate(policy: str, tasks: str, seed: int, temperature: float, max_turns: int) -> dict:
    """One ``rl eval`` run of ``policy`` on ``tasks`` (the job's held-out episodes), summarised."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "eval.json")
        subprocess.run([sys.executable, "-m", "rl.cli", "eval", "--policy", policy, "--tasks", tasks,
                        "--seed", str(seed), "--max-turns", str(max_turns), "--temperature", str(temperature),
                        "--trajectories", "--no-report", "--out", out], check=True, stdout=subprocess.DEVNULL)
        with open(out, encoding="utf-8") as handle:
            return summarise(json.load(handle)["episodes"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/ablate/main", help="folder holding seedK/ run folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        run = os.path.join(args.runs, f"seed{seed}")
        try:
            with open(os.path.join(run, "results.json"), encoding="utf-8") as handle:
                results = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            sys.exit(f"{run}: no readable results.json ({exc}); run `python -m rl.cli main --seed {seed} --out {run}`")
        max_turns = results["config"]["env"]["options"]["max_turns"]
        episode_seed = results["config"]["seed"] + 777  # the job's held-out episode i: seed + 777 + i
        for temperature in args.temperatures:
            for name in ("sft", "rl"):
                row = {"seed": seed, "policy": name, "temperature": temperature, "teacher": results["teacher"]["reward"],
                       **evaluate(os.path.join(run, name, "policy"), os.path.join(run, "tasks_heldout.jsonl"),
                                  episode_seed, temperature, max_turns)}
                rows.append(row)
                print(f"seed {seed} {name:<3} T={temperature:<4} reward {row['reward']:.3f} rubric total "
                      f"{row['rubric_total']:.3f} penalty {row['turn_error_penalty']:.3f} success "
                      f"{row['success_rate']:.1%} invented ids {row['episodes_citing_invented_id']}/{row['episodes']} "
                      f"(teacher {row['teacher']:.3f})", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"command": " ".join(["python", "scripts/temperature_table.py", *(argv or sys.argv[1:])]),
                       "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
