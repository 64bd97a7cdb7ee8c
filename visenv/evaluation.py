"""Run an agent over a task suite and report the VisGenBench-style objective metrics.

The objective metrics are computed from the delivered artifacts: S-Rate (a valid output of the
requested modality was delivered), amount, duration, storyboard and audio pass rates, plus the
rubric's reward and each component's mean. The subjective dimensions need a VLM grader and are
reported only when one is configured (not yet available: see docs).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tqdm import tqdm

from visenv.envs.visgen import VisGenEnv
from visenv.episode import EpisodeRecord
from visenv.rewards.judges.grader import grade_benchmark
from visenv.tasks import Task

OBJECTIVE_METRICS = ("s_rate", "amount", "duration", "storyboard", "audio")


@dataclass
class EpisodeResult:
    """One evaluated episode."""

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
    gpu_seconds: float
    trajectory: list[dict[str, Any]] = field(default_factory=list)


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
        out["gpu_seconds_avoided"] = sum(r.gpu_seconds for r in rows)
        return out

    groups: dict[str, dict[str, list[EpisodeResult]]] = {"modality": defaultdict(list), "scenario": defaultdict(list)}
    for r in results:
        groups["modality"][r.modality].append(r)
        groups["scenario"][r.scenario].append(r)
    return {"overall": block(results),
            "by_modality": {k: block(v) for k, v in sorted(groups["modality"].items())},
            "by_scenario": {k: block(v) for k, v in sorted(groups["scenario"].items())}}


def run_episode(env: VisGenEnv, agent: Any, task: Task, seed: int, keep_trajectory: bool = False) -> EpisodeResult:
    """Play one task to its end with ``agent`` and collect the result."""
    obs, info = env.reset(seed=seed, options={"task": task})
    agent.reset(obs, seed=seed)
    trajectory: list[dict[str, Any]] = []
    done = False
    reward_sum = 0.0
    while not done:
        action = agent.act(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        reward_sum += reward
        done = terminated or truncated
        if keep_trajectory:
            trajectory.append({"action": action, "observation": obs["text"], "reward": reward,
                               "turn": info["turn"], "tool_result": info["tool_result"]})
    record = env.record
    return EpisodeResult(task_id=task.task_id, scenario=task.scenario, modality=task.requirements.modality,
                         dimension=task.dimension, reward=reward_sum, components=info["reward_components"],
                         checks=info["checks"], turns=len(record.turns), calls=len(record.calls),
                         failed_calls=sum(not c.ok for c in record.calls), gpu_seconds=record.gpu_seconds,
                         trajectory=trajectory)


def evaluate(agent_factory: Callable[[], Any], tasks: Sequence[Task], *, seed: int = 0,
             env_config: dict[str, Any] | None = None, progress: bool = True,
             keep_trajectories: bool = False, grader: Any = None,
             metrics: Mapping[str, Callable] | None = None,
             on_episode: Callable[[EpisodeRecord], None] | None = None
             ) -> tuple[list[EpisodeResult], dict[str, Any]]:
    """Evaluate a fresh agent from ``agent_factory`` on every task, one episode each.

    Episode ``i`` uses seed ``seed + i``, so an evaluation is reproducible.

    Args:
        agent_factory: makes the agent (``reset(observation, seed)`` and ``act(observation)``).
        tasks: the suite.
        seed: the base seed.
        env_config: options of the :class:`VisGenEnv`.
        progress: show a progress bar.
        keep_trajectories: keep every turn in the results.
        grader: a :class:`~visenv.rewards.judges.BenchmarkGrader` scoring the six subjective
            VisGenBench dimensions; without one they (and the paper's O-Score) are None.
        metrics: extra batched components to average in the VisGenBench block (e.g. CLIP alignment).
        on_episode: called with each finished episode's record (its media files still exist).

    Returns:
        The episode results and the summary; ``summary["visgenbench"]`` holds the nine dimensions,
        S-Rate and O-Score (see :func:`visenv.rewards.judges.grade_benchmark`).
    """
    env = VisGenEnv(env_config or {}, tasks=list(tasks))
    agent = agent_factory()
    results, records = [], []
    for i, task in enumerate(tqdm(tasks, desc="evaluate", disable=not progress, leave=False)):
        results.append(run_episode(env, agent, task, seed + i, keep_trajectories))
        records.append(env.record)
        if on_episode is not None:
            on_episode(env.record)
    summary = summarize(results)
    summary["visgenbench"] = grade_benchmark(records, grader=grader, metrics=metrics)
    return results, summary


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


def write_results(path: str | Path, results: Sequence[EpisodeResult], summary: dict[str, Any]) -> None:
    """results.json: the summary and every episode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"summary": summary, "episodes": [r.__dict__ for r in results]}
    path.write_text(json.dumps(payload, indent=1, default=str))
