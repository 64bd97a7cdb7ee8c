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

from visenv.envs.visgen import VisGenEnv, gpu_seconds_avoided
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
    gpu_seconds_avoided: float
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
        out["gpu_seconds_avoided"] = sum(r.gpu_seconds_avoided for r in rows)
        return out

    groups: dict[str, dict[str, list[EpisodeResult]]] = {"modality": defaultdict(list), "scenario": defaultdict(list)}
    for r in results:
        groups["modality"][r.modality].append(r)
        groups["scenario"][r.scenario].append(r)
    return {"overall": block(results),
            "by_modality": {k: block(v) for k, v in sorted(groups["modality"].items())},
            "by_scenario": {k: block(v) for k, v in sorted(groups["scenario"].items())}}


def act_each(agents: Sequence[Any], observations: Sequence[dict[str, Any]]) -> list[str]:
    """The default ``act_batch`` of :func:`run_episodes`: each agent's ``act`` on its own observation."""
    return [agent.act(observation) for agent, observation in zip(agents, observations)]


def run_episodes(envs: Sequence[VisGenEnv], agents: Sequence[Any], tasks: Sequence[Task], seeds: Sequence[int],
                 keep_trajectory: bool = False,
                 act_batch: Callable[[Sequence[Any], Sequence[dict[str, Any]]], list[str]] = act_each
                 ) -> list[EpisodeResult]:
    """Play one task per environment to its end, in lock-step, and collect the results.

    Episode ``k`` resets ``envs[k]`` with ``seeds[k]`` and ``tasks[k]`` and is played by
    ``agents[k]``. Each step asks ``act_batch`` once for the turns of all unfinished episodes, so an
    agent that can act on several episodes at once (a policy's batched ``generate``) does; by default
    each agent acts on its own. The environments are left at their episodes' ends (their
    ``record`` and media files are still there).

    Args:
        envs: one environment per episode.
        agents: one agent per episode (``reset(observation, seed)`` and ``act(observation)``).
        tasks: the task of each episode.
        seeds: the reset seed of each episode (the agent's seed too).
        keep_trajectory: keep every turn in the results.
        act_batch: ``(agents, observations) -> actions`` for the unfinished episodes.
    """
    observations = []
    for env, agent, task, seed in zip(envs, agents, tasks, seeds, strict=True):
        observation, _ = env.reset(seed=seed, options={"task": task})
        agent.reset(observation, seed=seed)
        observations.append(observation)
    returns = [0.0] * len(envs)
    infos: list[dict[str, Any]] = [{} for _ in envs]
    trajectories: list[list[dict[str, Any]]] = [[] for _ in envs]
    active = list(range(len(envs)))
    while active:
        actions = act_batch([agents[k] for k in active], [observations[k] for k in active])
        still = []
        for k, action in zip(active, actions, strict=True):
            observations[k], reward, terminated, truncated, infos[k] = envs[k].step(action)
            returns[k] += reward
            if keep_trajectory:
                trajectories[k].append({"action": action, "observation": observations[k]["text"], "reward": reward,
                                        "turn": infos[k]["turn"], "tool_result": infos[k]["tool_result"]})
            if not (terminated or truncated):
                still.append(k)
        active = still
    results = []
    for env, task, reward, info, trajectory in zip(envs, tasks, returns, infos, trajectories):
        record = env.record
        results.append(EpisodeResult(
            task_id=task.task_id, scenario=task.scenario, modality=task.requirements.modality,
            dimension=task.dimension, reward=reward, components=info["reward_components"], checks=info["checks"],
            turns=len(record.turns), calls=len(record.calls), failed_calls=sum(not c.ok for c in record.calls),
            gpu_seconds_avoided=sum(map(gpu_seconds_avoided, record.calls)), trajectory=trajectory))
    return results


def run_episode(env: VisGenEnv, agent: Any, task: Task, seed: int, keep_trajectory: bool = False) -> EpisodeResult:
    """Play one task to its end with ``agent`` and collect the result."""
    return run_episodes([env], [agent], [task], [seed], keep_trajectory)[0]


def evaluate(agent_factory: Callable[[], Any], tasks: Sequence[Task], *, seed: int = 0,
             env_config: dict[str, Any] | None = None, progress: bool = True,
             keep_trajectories: bool = False, grader: Any = None,
             metrics: Mapping[str, Callable] | None = None,
             on_episode: Callable[[EpisodeRecord], None] | None = None, num_envs: int = 1,
             act_batch: Callable[[Sequence[Any], Sequence[dict[str, Any]]], list[str]] = act_each
             ) -> tuple[list[EpisodeResult], dict[str, Any]]:
    """Evaluate fresh agents from ``agent_factory`` on every task, one episode each.

    Episode ``i`` plays task ``i`` with seed ``seed + i``, so an evaluation is reproducible. Episodes
    run ``num_envs`` at a time (:func:`run_episodes`); with one environment they run one after the
    other in the same environment and with the same agent.

    Args:
        agent_factory: makes an agent (``reset(observation, seed)`` and ``act(observation)``); one
            per environment.
        tasks: the suite.
        seed: the base seed.
        env_config: options of the :class:`VisGenEnv`.
        progress: show a progress bar.
        keep_trajectories: keep every turn in the results.
        grader: a :class:`~visenv.rewards.judges.BenchmarkGrader` scoring the six subjective
            VisGenBench dimensions; without one they (and the paper's O-Score) are None.
        metrics: extra batched components to average in the VisGenBench block (e.g. CLIP alignment).
        on_episode: called with each finished episode's record, in episode order (its media files
            still exist).
        num_envs: episodes played at once, in lock-step, each in its own environment.
        act_batch: ``(agents, observations) -> actions`` for the unfinished episodes of a lock-step
            batch (see :func:`run_episodes`); by default each agent acts on its own.

    Returns:
        The episode results and the summary; ``summary["visgenbench"]`` holds the nine dimensions,
        S-Rate and O-Score (see :func:`visenv.rewards.judges.grade_benchmark`).

    Raises:
        ValueError: ``num_envs`` is below 1.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs ({num_envs}) must be at least 1.")
    envs = [VisGenEnv(env_config or {}, tasks=list(tasks)) for _ in range(min(num_envs, max(1, len(tasks))))]
    agents = [agent_factory() for _ in envs]
    results, records = [], []
    with tqdm(total=len(tasks), desc="evaluate", disable=not progress, leave=False) as bar:
        for start in range(0, len(tasks), len(envs)):
            batch = tasks[start:start + len(envs)]
            seeds = [seed + start + k for k in range(len(batch))]
            results += run_episodes(envs[:len(batch)], agents[:len(batch)], batch, seeds, keep_trajectories,
                                    act_batch)
            for env in envs[:len(batch)]:
                records.append(env.record)
                if on_episode is not None:
                    on_episode(env.record)
            bar.update(len(batch))
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
