"""Write the VisGen task rows verl's RL dataset reads (parquet): ``python examples/verl/make_data.py --out data/visenv``.

Each row holds the request as its prompt, ``agent_name: visenv_agent`` and ``extra_info.task_seed``;
the agent loop (visenv.integrations.verl) plays the episode and scores it with the rubric.
"""

import argparse
from pathlib import Path

from visenv.integrations.verl import task_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/visenv", help="folder for train.parquet and val.parquet")
    parser.add_argument("--train", type=int, default=1024, help="training rows")
    parser.add_argument("--val", type=int, default=64, help="validation rows")
    parser.add_argument("--max-turns", type=int, default=8, help="the environment's turn budget")
    args = parser.parse_args()
    import pandas

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"max_turns": args.max_turns}
    for name, n, seed in (("train", args.train, 0), ("val", args.val, 1)):
        pandas.DataFrame(task_rows(n, seed, config)).to_parquet(out / f"{name}.parquet")
        print(f"wrote {n} rows to {out / f'{name}.parquet'}")


if __name__ == "__main__":
    main()
