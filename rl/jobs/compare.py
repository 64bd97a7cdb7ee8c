"""Two policies on the same held-out episodes: each one's summary and rows, their margin, the table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from rl.evaluate import MakeRollout, Recorder, play
from rl.train import episode_metrics


def evaluate_policy(policy, make_rollout: MakeRollout | None, tasks: Sequence[Any], seed: int, temperature: float | None,
                    env_options: dict[str, Any], report_dir: Path | None = None, report_episodes: int = 0
                    ) -> tuple[dict[str, Any], list[dict[str, Any]], list[Any]]:
    """Play the held-out episodes once with ``policy``'s weights through the one episode runner.

    Episode ``i`` is ``tasks[i]`` with seed ``seed + i`` (:func:`rl.evaluate.play`), so two policies play
    the same episodes. ``make_rollout`` is the backend (serial, or Ray workers that get the weights). The
    first ``report_episodes`` episodes keep their trajectories and pictures (under ``report_dir``).
    ``policy`` may also be an agent factory (the scripted teacher), played serially in the driver
    (``make_rollout`` None) at its own temperature (``temperature`` None).

    Returns:
        The summary metrics, one row per episode, and the played episodes.
    """
    saved = getattr(policy, "temperature", None)
    if temperature is not None:
        policy.temperature = temperature
    recorder = Recorder(keep_trajectories=report_episodes > 0,
                        report_dir=None if report_dir is None else str(report_dir), captured=report_episodes)
    try:
        found, stats = play(policy, tasks, seed=seed, env_config=env_options, recorder=recorder,
                            make_rollout=make_rollout, progress=False)
    finally:
        if temperature is not None:
            policy.temperature = saved
    rows = []
    for episode in found:
        total = episode.components.get("total")
        rows.append({"task_id": episode.spec.task.task_id, "task_seed": episode.spec.task_seed,
                     "reward": episode.reward, "rubric_total": None if total is None else float(total),
                     "success": total is not None and not math.isnan(total) and total >= 0.999,
                     "turns": len(episode.rewards), "terminated": episode.terminated, "truncated": episode.truncated,
                     "components": {k: (None if v is None else float(v)) for k, v in episode.components.items()},
                     "policy_tokens": episode.policy_tokens, "error": episode.error})
    metrics = episode_metrics(found, stats)
    valid = [r["reward"] for r in rows if not math.isnan(r["reward"])]
    summary = {"episodes": len(rows), "temperature": temperature,
               "reward": sum(valid) / len(valid) if valid else float("nan"),
               "reward_stderr": _stderr(valid),
               "success_rate": sum(r["success"] for r in rows) / len(rows),
               "answered_rate": sum(r["terminated"] for r in rows) / len(rows),
               "truncated_rate": sum(r["truncated"] for r in rows) / len(rows),
               "invalid_rate": 1 - len(valid) / len(rows),
               "episodes_failed": stats.episodes_failed,
               "turns": metrics["turns"], "policy_tokens": metrics["policy_tokens"],
               "components": {k[len("reward/"):]: v for k, v in metrics.items() if k.startswith("reward/")},
               "seconds": stats.wall_seconds}
    return summary, rows, found


def _stderr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


def margin(sft: dict[str, Any], rl: dict[str, Any], sft_rows: Sequence[dict[str, Any]] = (),
           rl_rows: Sequence[dict[str, Any]] = (), teacher: dict[str, Any] | None = None) -> dict[str, float]:
    """RL minus SFT-only of two :func:`evaluate_policy` summaries (reward also relative to SFT-only's).

    With both policies' episode rows (the same episodes in the same order), ``reward_paired_stderr`` is
    the standard error of the mean per-episode difference (episodes both policies could score), which
    removes the tasks' own spread from the comparison. With the ``teacher``'s summary on the same episodes,
    ``teacher_gap_closed`` is the share of the SFT-only policy's gap to the teacher's reward that RL closed
    (``(rl - sft) / (teacher - sft)``; NaN when SFT-only is not below the teacher).
    """
    found = {"reward": rl["reward"] - sft["reward"],
             "reward_relative": (rl["reward"] - sft["reward"]) / abs(sft["reward"]) if sft["reward"] else float("nan"),
             "success_rate": rl["success_rate"] - sft["success_rate"]}
    if sft_rows:
        if [r["task_seed"] for r in sft_rows] != [r["task_seed"] for r in rl_rows]:
            raise ValueError("the paired standard error needs both policies' rows of the same episodes, in order.")
        differences = [b["reward"] - a["reward"] for a, b in zip(sft_rows, rl_rows)
                       if not (math.isnan(a["reward"]) or math.isnan(b["reward"]))]
        found["reward_paired_stderr"] = _stderr(differences)
    if teacher is not None:
        gap = teacher["reward"] - sft["reward"]
        found["teacher_gap_closed"] = found["reward"] / gap if gap > 0 else float("nan")
    return found


def format_comparison(results: dict[str, Any]) -> str:
    """The SFT-only vs RL table of a results dict (``results.json``)."""
    evaluations = results["evaluations"]
    modes = [m for m in ("sampled", "greedy") if m in evaluations["sft"]]
    lines = [f"== held-out: {results['eval']['episodes']} episodes on {results['eval']['tasks']} tasks "
             f"(task seed {results['eval']['task_seed']}) ==",
             f"{'policy':<10}{'mode':<9}{'reward':>14}{'success':>9}{'answered':>10}{'turns':>7}"]
    for mode in modes:
        for name in ("sft", "rl"):
            s = evaluations[name][mode]
            lines.append(f"{name:<10}{mode:<9}{s['reward']:>8.3f} ±{s['reward_stderr']:.3f}"
                         f"{s['success_rate']:>9.1%}{s['answered_rate']:>10.1%}{s['turns']:>7.2f}")
    teacher = results.get("teacher")
    if teacher:
        lines.append(f"{'teacher':<10}{'script':<9}{teacher['reward']:>8.3f} ±{teacher['reward_stderr']:.3f}"
                     f"{teacher['success_rate']:>9.1%}{teacher['answered_rate']:>10.1%}{teacher['turns']:>7.2f}")
    for mode in modes:
        m = results["margin"][mode]
        paired = f" ± {m['reward_paired_stderr']:.3f} paired s.e." if "reward_paired_stderr" in m else ""
        closed = (f"; {m['teacher_gap_closed']:.0%} of the gap to the teacher closed"
                  if not math.isnan(m.get("teacher_gap_closed", math.nan)) else "")
        lines.append(f"RL - SFT ({mode}): reward {m['reward']:+.3f}{paired} ({m['reward_relative']:+.1%}), "
                     f"success {m['success_rate']:+.1%} points{closed}")
    lines.append(f"wall time {results['timing']['total']:.0f} s (limit {results['time_limit_seconds']:.0f} s)")
    if results.get("report"):
        lines.append(f"report: {results['report']['path']}")
    return "\n".join(lines)
