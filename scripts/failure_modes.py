"""What the imperfect episodes of a VisGen evaluation got wrong: counts per kind of mistake.

Reads the JSON that ``python -m rl.cli eval ... --trajectories --out FILE`` writes and prints, over the
episodes whose rubric total is below 1, how many show each mistake, and over all episodes how many lost
VisGen's turn-error penalty. Used for docs/main-job.md ("Why the training reward was flat"):

    python -m rl.cli eval --policy runs/main/sft/policy --tasks runs/main/tasks_heldout.jsonl --seed 777 \
        --max-turns 5 --trajectories --no-report --out runs/sft_eval.json
    python scripts/failure_modes.py runs/sft_eval.json

Mistakes: ``invented_id`` (the answer cites an artifact id the episode never made: the environment says
"not an artifact of this episode"), ``wrong_count`` (the image call's ``n`` differs from the count the
policy's own first think names), ``amount`` (the rubric's amount check failed), ``no_answer`` (the
episode ended without an ``<answer>``), ``format`` (R_format below 1), ``tool`` (R_tool below 1).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys


def mistakes(episode: dict) -> set[str]:
    """The kinds of mistake one episode (an ``rl eval --trajectories`` row) shows."""
    found = set()
    turns = episode.get("trajectory") or []
    actions = [t["action"] for t in turns]
    if any("not an artifact of this episode" in t["observation"] for t in turns):
        found.add("invented_id")
    if not any("<answer>" in a for a in actions):
        found.add("no_answer")
    needs = re.search(r"Needs: (\d+) image", actions[0]) if actions else None
    counts = [int(n) for a in actions for n in re.findall(r'"n": (\d+)', a)]
    if needs and counts and int(needs.group(1)) != counts[-1]:
        found.add("wrong_count")
    if episode["checks"].get("amount") is False:
        found.add("amount")
    components = episode["components"]
    for name, tag in (("R_format", "format"), ("R_tool", "tool")):
        if (components.get(name) if components.get(name) is not None else 1.0) < 1.0:
            found.add(tag)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="the JSON of `rl eval --trajectories --out FILE`")
    args = parser.parse_args(argv)
    episodes = json.load(open(args.results, encoding="utf-8"))["episodes"]
    if not episodes or "trajectory" not in episodes[0]:
        sys.exit(f"{args.results}: no episodes with trajectories (run rl eval with --trajectories)")
    imperfect = [e for e in episodes if (e["components"].get("total") or 0.0) < 0.999]
    kinds = collections.Counter(kind for e in imperfect for kind in mistakes(e))
    penalised = sum(e["reward"] < (e["components"].get("total") or 0.0) - 1e-9 for e in episodes)
    invented = sum("invented_id" in mistakes(e) for e in episodes)
    print(f"{len(episodes)} episodes, {len(imperfect)} with a rubric total below 1; reward "
          f"{sum(e['reward'] for e in episodes) / len(episodes):.3f}")
    for kind, count in kinds.most_common():
        print(f"  {kind:<12} {count:>4} of the imperfect episodes")
    print(f"{penalised} of all episodes lost a turn-error penalty; {invented} cite an invented artifact id")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
