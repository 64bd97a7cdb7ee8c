"""Write the noisy ToolEcho teacher's chat trajectories as JSONL: the SFT data of configs/toolecho_grpo.yaml.

    python scripts/toolecho_data.py runs/toolecho/teacher.jsonl            # 3200 trajectories, seed 0

The teacher is the one of examples/grpo_ray.py: it makes the requested tool call half the time and a
well-formed call with random arguments otherwise, so a policy imitating it writes valid calls but must
learn from RL to copy the request.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from grpo_ray import teacher_examples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the JSONL file to write")
    parser.add_argument("--count", type=int, default=3200, help="trajectories (default 3200)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the tasks and the teacher's mistakes (default 0)")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        for messages in teacher_examples(args.count, args.seed):
            handle.write(json.dumps({"messages": messages}) + "\n")
    print(f"{args.count} trajectories written to {args.out}")


if __name__ == "__main__":
    main()
