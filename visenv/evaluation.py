"""Read evaluated episodes: the VisGenBench-style summary, the results table and results.json.

This module plays nothing: episodes are played by the one episode runner of the trainer
(:func:`rl.evaluate.evaluate`, ``rl.rollout.run_episodes``), which turns each finished episode into
an :class:`EpisodeResult`. The objective metrics are computed from the delivered artifacts: S-Rate
(a valid output of the requested modality was delivered), amount, duration, storyboard and audio
pass rates, plus the rubric's reward and each component's mean. The six subjective dimensions come
from a VLM grader (:class:`~visenv.rewards.judges.BenchmarkGrader`, see
:func:`~visenv.rewards.judges.grade_benchmark`) when one is given, and are None otherwise.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

OBJECTIVE_METRICS = ("s_rate", "amount", "duration", "storyboard", "audio")


@dataclass
class EpisodeResult:
    """One evaluated episode (``error``: why the environment failed it, or None)."""

    task_id: str
    scenario: str
    modality: str
    dimension: str | None
    reward: float
    components: dict[str, float | None]
    checks: dict[str, bool | None]
    turns: int
    calls: int
    failed_calls: int
    gpu_seconds_avoided: float
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def summarize(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Means of reward, components and checks, overall, by modality and by scenario."""

    def block(rows: Sequence[EpisodeResult]) -> dict[str, Any]:
        out: dict[str, Any] = {"episodes": len(rows), "reward": _mean([r.reward for r in rows])}
        for metric in OBJECTIVE_METRICS:
            out[metric] = _mean([float(r.checks[metric]) for r in rows if r.checks.get(metric) is not None])
        names = sorted({k for r in rows for k in r.components})
        out["components"] = {k: _mean([r.components.get(k) for r in rows]) for k in names}
        out["turns"] = _mean([r.turns for r in rows])
        out["failed_call_rate"] = (sum(r.failed_calls for r in rows) / max(1, sum(r.calls for r in rows)))
        out["gpu_seconds_avoided"] = sum(r.gpu_seconds_avoided for r in rows)
        out["episodes_failed"] = sum(r.error is not None for r in rows)
        return out

    groups: dict[str, dict[str, list[EpisodeResult]]] = {"modality": defaultdict(list), "scenario": defaultdict(list)}
    for r in results:
        groups["modality"][r.modality].append(r)
        groups["scenario"][r.scenario].append(r)
    return {"overall": block(results),
            "by_modality": {k: block(v) for k, v in sorted(groups["modality"].items())},
            "by_scenario": {k: block(v) for k, v in sorted(groups["scenario"].items())}}


def format_table(summary: dict[str, Any], title: str = "") -> str:
    """A plain-text results table: overall, by modality, by scenario."""
    cols = ("reward", "s_rate", "amount", "duration", "storyboard", "audio")
    header = f"{'group':<28}{'n':>5}" + "".join(f"{c:>11}" for c in cols)

    def row(name: str, block: dict[str, Any]) -> str:
        cells = "".join(f"{'-' if block[c] is None else format(block[c], '.3f'):>11}" for c in cols)
        return f"{name:<28}{block['episodes']:>5}{cells}"

    lines = [title, header, "-" * len(header), row("overall", summary["overall"])] if title else \
        [header, "-" * len(header), row("overall", summary["overall"])]
    lines += [row(k, v) for k, v in summary["by_modality"].items()]
    lines.append("-" * len(header))
    lines += [row(k, v) for k, v in summary["by_scenario"].items()]
    comps = summary["overall"]["components"]
    lines.append("components: " + ", ".join(f"{k}={'-' if v is None else format(v, '.3f')}" for k, v in comps.items()))
    return "\n".join(lines)


def write_results(path: str | Path, results: Sequence[EpisodeResult], summary: dict[str, Any],
                  suite: Mapping[str, Any] | None = None) -> None:
    """results.json: the suite that was played, the summary and every episode.

    Args:
        path: the file.
        results: the episodes.
        summary: their :func:`summarize` (with the VisGenBench block).
        suite: how to rebuild the played suite and seeds, so that ``visenv report`` needs no suite
            arguments: ``{"tasks": FILE}`` or ``{"suite": NAME, "n": N, "task_seed": S, "scenarios": [...]}``,
            plus the evaluation ``seed`` and the environment options ``env_config``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"suite": dict(suite or {}), "summary": summary, "episodes": [r.__dict__ for r in results]}
    path.write_text(json.dumps(payload, indent=1, default=str))
