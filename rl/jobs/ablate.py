"""The paper's ablations at the main job's scale: the main job's pipeline in variants, several seeds each.

``python -m rl.cli ablate --seeds 0 1 2 --out runs/ablate`` runs, for each seed, every variant of
:data:`VARIANTS` through :func:`rl.jobs.main_job.run_main_job` (each run in ``<out>/<variant>/seed<k>``),
then writes ``<out>/ablation.json`` (every run's held-out rewards and training curve, and each
comparison's per-seed differences with their mean and standard error), ``<out>/ablation.md`` (the
table) and ``<out>/ablation.svg`` (held-out reward per variant, SFT-only and RL) and
``<out>/ablation_curves.svg`` (mean training reward per iteration per variant).

The comparisons (:data:`COMPARISONS`), each ``b - a`` per seed on the same held-out episodes:

* **PST vs one-stage SFT at the start of RL**: the SFT-only policy of the main job (PST, two stages)
  against one SFT stage with the same total budget; and the RL policies grown from each.
* **VRL vs SFT-only**: the main job's RL policy against its own SFT-only policy.
* **LtrReward vs Result + Format**: GRPO trained on LtrReward (R_plan x R_fine) against GRPO trained on
  the mean of R_result and R_format (``rl_rubric: result_format``); both measured by LtrReward.
* **turn-level vs episode-level credit**: GRPO with ``grpo.credit: turn`` (GiGPO) against episode-level.

The variants that keep PST (``result_format``, ``turn_credit``) start GRPO from the ``main`` run's
SFT-only policy of the same seed (``sft_policy``), so each comparison shares its starting point. A run
whose folder already holds a ``results.json`` of the same configuration is read back, not run again,
so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from rl.config import apply_overrides
from rl.jobs.config import MainJobConfig
from rl.logging import read_metrics
from rl.sft import SFTStage
from visenv.error import ConfigError
from visenv.report.svg import grouped_bars, line_chart


def one_stage(config: MainJobConfig) -> MainJobConfig:
    """PST's stages merged into one SFT stage (the first stage's settings) with their summed budgets."""
    stages = config.stages

    def total(name: str) -> float | None:
        values = [getattr(s, name) for s in stages]
        return None if any(v is None for v in values) else sum(values)

    merged = SFTStage(**{**dataclasses.asdict(stages[0]), "max_steps": total("max_steps"),
                         "max_seconds": total("max_seconds")})
    return dataclasses.replace(config, stages=[merged])


#: variant name -> (what it changes, the change applied to the seed's main-job config, whether it reuses
#: the ``main`` run's SFT-only policy).
VARIANTS: dict[str, tuple[str, Callable[[MainJobConfig], MainJobConfig], bool]] = {
    "main": ("the main job: PST (two stages), GRPO on LtrReward, episode-level credit", lambda c: c, False),
    "one_stage_sft": ("one SFT stage with PST's total budget instead of PST's two", one_stage, False),
    "result_format": ("GRPO on the Result + Format reward instead of LtrReward",
                      lambda c: dataclasses.replace(c, rl_rubric="result_format"), True),
    "turn_credit": ("GRPO with turn-level credit (GiGPO step groups)",
                    lambda c: dataclasses.replace(c, grpo=dataclasses.replace(c.grpo, credit="turn")), True),
}

#: (comparison, (variant, policy) a, (variant, policy) b): the table reports b - a.
COMPARISONS = [
    ("PST vs one-stage SFT, at the start of RL (SFT-only)", ("one_stage_sft", "sft"), ("main", "sft")),
    ("PST vs one-stage SFT, after RL", ("one_stage_sft", "rl"), ("main", "rl")),
    ("VRL vs SFT-only", ("main", "sft"), ("main", "rl")),
    ("LtrReward vs Result + Format (RL)", ("result_format", "rl"), ("main", "rl")),
    ("turn-level vs episode-level credit (RL)", ("main", "rl"), ("turn_credit", "rl")),
]


def run_ablation(base: MainJobConfig, seeds: Sequence[int], variants: Sequence[str], out: str,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every variant on every seed (see the module docstring); returns what ``ablation.json`` holds.

    Args:
        base: the main job's configuration every variant starts from (its ``out`` and ``seed`` are set
            per run).
        seeds: the job seeds.
        variants: names of :data:`VARIANTS`, run in this order per seed.
        out: the ablation's folder.
        log: where progress lines go.
    """
    from rl.jobs.main_job import run_main_job

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or not seeds:
        raise ConfigError(f"variants {list(variants)} must be a non-empty subset of {list(VARIANTS)} and seeds "
                          f"{list(seeds)} non-empty.")
    if any(VARIANTS[v][2] for v in variants) and "main" not in variants:
        raise ConfigError(f"variants {list(variants)} reuse the main variant's SFT-only policy: add 'main'.")
    folder = Path(out)
    runs: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in variants}
    for seed in seeds:
        for name in sorted(variants, key=lambda v: VARIANTS[v][2]):  # the main run first: others start from it
            _, change, reuse = VARIANTS[name]
            run_dir = folder / name / f"seed{seed}"
            config = change(dataclasses.replace(base, out=str(run_dir), seed=seed))
            if reuse:
                config = dataclasses.replace(config, sft_policy=str(folder / "main" / f"seed{seed}" / "sft" / "policy"))
            results = _read_back(run_dir, config)
            if results is None:
                log(f"== ablation: {name}, seed {seed} -> {run_dir}")
                results = run_main_job(config, log=log)
            else:
                log(f"== ablation: {name}, seed {seed}: read back from {run_dir / 'results.json'}")
            runs[name][seed] = summarize(results, run_dir)
    table = compare(runs, seeds)
    payload = {"seeds": list(seeds), "variants": {v: VARIANTS[v][0] for v in variants}, "runs": runs,
               "comparisons": table, "base": base.to_dict()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ablation.json").write_text(json.dumps(payload, indent=1))
    (folder / "ablation.md").write_text(format_table(payload))
    (folder / "ablation.svg").write_text(reward_chart(payload))
    (folder / "ablation_curves.svg").write_text(curve_chart(payload))
    log(format_table(payload))
    return payload


def _read_back(run_dir: Path, config: MainJobConfig) -> dict[str, Any] | None:
    """The results of an earlier run in ``run_dir`` with exactly this configuration, or None."""
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("config") == json.loads(json.dumps(config.to_dict())) else None


def summarize(results: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One run's figures: held-out reward (sampled) of each policy, success, the margin, and GRPO's curve."""
    sampled = {name: results["evaluations"][name]["sampled"] for name in ("sft", "rl")}
    metrics = run_dir / "grpo" / "metrics.jsonl"
    curve = [row["reward"] for row in read_metrics(str(metrics))] if metrics.is_file() else []
    return {"sft": sampled["sft"]["reward"], "rl": sampled["rl"]["reward"],
            "sft_stderr": sampled["sft"]["reward_stderr"], "rl_stderr": sampled["rl"]["reward_stderr"],
            "sft_success": sampled["sft"]["success_rate"], "rl_success": sampled["rl"]["success_rate"],
            "margin_paired_stderr": results["margin"]["sampled"].get("reward_paired_stderr"),
            "iterations": results["grpo"]["iterations"], "seconds": results["timing"]["total"],
            "training_reward": curve}


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (unbiased std / sqrt(n); NaN for fewer than two values)."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return float("nan"), float("nan")
    mean = sum(kept) / len(kept)
    if len(kept) < 2:
        return mean, float("nan")
    return mean, (sum((v - mean) ** 2 for v in kept) / (len(kept) - 1) / len(kept)) ** 0.5


def compare(runs: dict[str, dict[int, dict[str, Any]]], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Each comparison whose variants ran: ``b - a`` per seed, their mean and standard error over seeds."""
    table = []
    for title, (variant_a, policy_a), (variant_b, policy_b) in COMPARISONS:
        if variant_a not in runs or variant_b not in runs:
            continue
        a = [runs[variant_a][s][policy_a] for s in seeds]
        b = [runs[variant_b][s][policy_b] for s in seeds]
        differences = [y - x for x, y in zip(a, b)]
        (mean_a, _), (mean_b, _), (mean, stderr) = mean_stderr(a), mean_stderr(b), mean_stderr(differences)
        table.append({"comparison": title, "a": f"{variant_a}/{policy_a}", "b": f"{variant_b}/{policy_b}",
                      "a_mean": mean_a, "b_mean": mean_b, "difference_per_seed": differences,
                      "difference_mean": mean, "difference_stderr": stderr,
                      "b_better_seeds": sum(d > 0 for d in differences)})
    return table


def _figure(value: float, digits: int = 3, sign: bool = False) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def format_table(payload: dict[str, Any]) -> str:
    """The markdown of the ablation: the per-variant held-out rewards and the comparisons with their s.e."""
    seeds = payload["seeds"]
    lines = [f"Held-out reward (sampled, mean over seeds {', '.join(map(str, seeds))}; ± the standard error over "
             "seeds):", "", "| variant | what changes | SFT-only | RL | RL - SFT | GRPO iterations |",
             "|---|---|---|---|---|---|"]
    for name, runs in payload["runs"].items():
        sft, rl = (mean_stderr([runs[s][key] for s in seeds]) for key in ("sft", "rl"))
        gain = mean_stderr([runs[s]["rl"] - runs[s]["sft"] for s in seeds])
        iterations = sum(runs[s]["iterations"] for s in seeds) / len(seeds)
        lines.append(f"| {name} | {payload['variants'][name]} | {_figure(sft[0])} ± {_figure(sft[1])} | "
                     f"{_figure(rl[0])} ± {_figure(rl[1])} | {_figure(gain[0], sign=True)} ± {_figure(gain[1])} | "
                     f"{iterations:.0f} |")
    lines += ["", "| comparison (b - a) | a | b | mean a | mean b | b - a ± s.e. | seeds where b > a |",
              "|---|---|---|---|---|---|---|"]
    for row in payload["comparisons"]:
        lines.append(f"| {row['comparison']} | {row['a']} | {row['b']} | {_figure(row['a_mean'])} | "
                     f"{_figure(row['b_mean'])} | {_figure(row['difference_mean'], sign=True)} ± "
                     f"{_figure(row['difference_stderr'])} | {row['b_better_seeds']} of {len(seeds)} |")
    return "\n".join(lines) + "\n"


def reward_chart(payload: dict[str, Any]) -> str:
    """Held-out reward per variant (mean over seeds), one bar each for the SFT-only and the RL policy."""
    names = list(payload["runs"])
    seeds = payload["seeds"]
    series = {label: [mean_stderr([payload["runs"][n][s][key] for s in seeds])[0] for n in names]
              for label, key in (("SFT-only", "sft"), ("RL", "rl"))}
    values = [v for row in series.values() for v in row if not math.isnan(v)]
    low = min([0.0, *values])
    return grouped_bars("held-out reward by variant (mean over seeds)", names, series, low=low,
                        high=max([1.0, *values]))


def curve_chart(payload: dict[str, Any]) -> str:
    """The mean training reward per GRPO iteration of each variant (over the seeds that reached it)."""
    series = {}
    for name, runs in payload["runs"].items():
        curves = [run["training_reward"] for run in runs.values()]
        longest = max([len(c) for c in curves] + [0])
        series[name] = [mean_stderr([c[i] for c in curves if len(c) > i])[0] for i in range(longest)]
    return line_chart("training reward per GRPO iteration (mean over seeds)", series)


def add_ablate_command(sub) -> None:
    """Register ``ablate`` on a subparsers object (``func``: namespace -> exit status)."""
    p = sub.add_parser("ablate", help="the paper's ablations at the main job's scale: variants x seeds, a table "
                                      "with standard errors and plots")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="job seeds (default 0 1 2)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help=f"variants to run (default all: {' '.join(VARIANTS)})")
    p.add_argument("--out", default="runs/ablate", help="the ablation's folder (default runs/ablate)")
    p.add_argument("--set", metavar="FIELD=VALUE", action="append", default=[],
                   help="override a MainJobConfig field for every run (as rl main --set), e.g. "
                        "--set grpo_seconds=null --set grpo_max_iterations=60; repeatable")
    p.set_defaults(func=cmd_ablate)


def cmd_ablate(args) -> int:
    from rl.config import parse_sets

    base = apply_overrides(MainJobConfig(), parse_sets(args.set))
    run_ablation(base, args.seeds, args.variants, args.out)
    return 0
