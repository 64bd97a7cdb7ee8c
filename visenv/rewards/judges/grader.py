"""VisGenBench scoring: the nine dimensions, S-Rate and O-Score (PAPER.md section 6).

Each benchmark task probes one dimension (``task.dimension``). The three objective dimensions are
measured by the result checks: visual amount (:class:`~visenv.rewards.checks.AmountCheck`), video
duration (:class:`~visenv.rewards.checks.DurationCheck`) and video storyboard
(:class:`~visenv.rewards.checks.StoryboardCheck`). The six subjective ones need a
:class:`~visenv.rewards.judges.judges.BenchmarkGrader`; without one they are reported as None.
S-Rate is the share of episodes that delivered an output of the requested modality.

O-Score is the mean of the dimension scores and S-Rate, over the dimensions the suite holds tasks
for (all nine on the full benchmark; seven on an image-only suite, which has no video duration or
storyboard tasks). It is None without a grader, on a suite without benchmark tasks (no task has a
dimension), or when a dimension has tasks but no score (every grading request failed). A single
failed grading (None) is left out of its dimension's mean and counted in ``grader_failures``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from visenv.episode import EpisodeRecord
from visenv.rewards.checks import run_checks
from visenv.rewards.judges.judges import BenchmarkGrader
from visenv.rewards.judges.templates import GRADER
from visenv.tasks import DIMENSIONS

SUBJECTIVE_DIMENSIONS = tuple(GRADER)
OBJECTIVE_DIMENSIONS = {"visual_amount": "amount", "video_duration": "duration", "video_storyboard": "storyboard"}
"""Objective dimension -> the result check that measures it."""


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _block(rows: Sequence[dict[str, Any]], graded: bool, metric_names: Sequence[str]) -> dict[str, Any]:
    dimensions = {d: _mean([r["score"] for r in rows if r["dimension"] == d]) for d in DIMENSIONS
                  if any(r["dimension"] == d for r in rows)}
    s_rate = _mean([r["s_rate"] for r in rows])
    complete = graded and bool(dimensions) and s_rate is not None and all(v is not None for v in dimensions.values())
    return {"episodes": len(rows), "s_rate": s_rate, "dimensions": dimensions,
            "o_score": _mean([s_rate, *dimensions.values()]) if complete else None,
            **{name: _mean([r[name] for r in rows]) for name in metric_names}}


def grade_benchmark(records: Sequence[EpisodeRecord], grader: BenchmarkGrader | None = None,
                    metrics: Mapping[str, Callable[[Sequence[EpisodeRecord]], list[float | None]]] | None = None
                    ) -> dict[str, Any]:
    """Score finished episodes on VisGenBench.

    Args:
        records: the episodes' :class:`~visenv.episode.EpisodeRecord` s (their media files must
            still exist for the grader and the metrics).
        grader: the VLM grader of the subjective dimensions; None reports them as None.
        metrics: extra batched components to average, by name (e.g. ``{"clip_alignment":
            ClipAlignment(scorer)}``); a None score is left out of the mean.

    Returns:
        ``{"overall": block, "by_modality": {modality: block}, "episodes": rows, "grader_id",
        "grader_failures", "metric_ids"}``. A block holds ``episodes``, ``s_rate``,
        ``dimensions`` (name -> mean score, for the dimensions present), ``o_score`` and each
        metric's mean; a row holds ``task_id``, ``modality``, ``dimension``, ``s_rate``,
        ``score`` (the episode's score on its dimension) and each metric.
    """
    metrics = dict(metrics or {})
    grades = grader(records) if grader is not None else [None] * len(records)
    columns = {name: metric(records) for name, metric in metrics.items()}
    rows, failures = [], 0
    for i, (record, grade) in enumerate(zip(records, grades)):
        checks = run_checks(record)
        dimension = record.task.dimension
        if dimension in OBJECTIVE_DIMENSIONS:
            passed = checks[OBJECTIVE_DIMENSIONS[dimension]]
            score = None if passed is None else float(passed)
        else:
            score = grade if dimension in SUBJECTIVE_DIMENSIONS else None
            failures += grader is not None and dimension in SUBJECTIVE_DIMENSIONS and grade is None
        rows.append({"task_id": record.task.task_id, "modality": record.task.requirements.modality,
                     "dimension": dimension, "s_rate": float(bool(checks["s_rate"])), "score": score,
                     **{name: column[i] for name, column in columns.items()}})
    graded = grader is not None
    modalities = sorted({r["modality"] for r in rows})
    return {"overall": _block(rows, graded, list(metrics)),
            "by_modality": {m: _block([r for r in rows if r["modality"] == m], graded, list(metrics))
                            for m in modalities},
            "episodes": rows, "grader_id": grader.judge_id if graded else None, "grader_failures": failures,
            "metric_ids": {name: getattr(metric, "judge_id", repr(metric)) for name, metric in metrics.items()}}


def format_benchmark(result: dict[str, Any]) -> str:
    """A plain-text VisGenBench table: one row per block (overall, each modality), one column per
    dimension, then S-Rate and O-Score."""
    names = [d for d in DIMENSIONS if d in result["overall"]["dimensions"]]
    header = f"{'group':<10}{'n':>5}" + "".join(f"{d[:11]:>12}" for d in names) + f"{'S-Rate':>9}{'O-Score':>9}"

    def cell(value: float | None, width: int) -> str:
        return f"{'-' if value is None else format(value, '.3f'):>{width}}"

    def row(name: str, block: dict[str, Any]) -> str:
        return (f"{name:<10}{block['episodes']:>5}" + "".join(cell(block["dimensions"].get(d), 12) for d in names)
                + cell(block["s_rate"], 9) + cell(block["o_score"], 9))

    lines = [header, "-" * len(header), row("overall", result["overall"])]
    lines += [row(m, block) for m, block in result["by_modality"].items()]
    lines.append(f"grader: {result['grader_id'] or 'none (subjective dimensions not graded)'}; "
                 f"failed gradings: {result['grader_failures']}")
    return "\n".join(lines)
