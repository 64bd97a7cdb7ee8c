"""Gather what the report shows: run an evaluation with pictures, or replay a results.json for them.

Both paths follow :func:`visenv.evaluation.evaluate` exactly: episode ``i`` plays task ``i``, reset
with seed ``seed + i``. :func:`evaluate_run` plays the agent and captures each episode's artifacts
right after its last step (:func:`evaluate_with_report` adds the page); :func:`replay_captures` re-plays the
recorded actions of a results.json in a fresh environment, which reproduces the same artifacts
(the tools are seeded by the episode seed and call index), and checks that every replayed reward
equals the recorded one, so a wrong suite, seed or environment setting is reported, never drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from visenv.envs.visgen import VisGenEnv
from visenv.episode import EpisodeRecord
from visenv.error import ConfigError
from visenv.evaluation import EpisodeResult, act_each, evaluate
from visenv.report.media import EpisodeCapture, capture_episode
from visenv.report.page import Run, write_report
from visenv.tasks import Task


def evaluate_run(agent_factory: Callable[[], Any], tasks: Sequence[Task], report_dir: str | Path, *, name: str = "",
                 seed: int = 0, env_config: Mapping[str, Any] | None = None, grader: Any = None,
                 metrics: Mapping[str, Callable] | None = None, progress: bool = True, num_envs: int = 1,
                 act_batch: Callable[..., list[str]] = act_each) -> Run:
    """:func:`visenv.evaluation.evaluate` with trajectories kept and each episode's pictures written.

    The pictures go to ``report_dir/media``; the returned :class:`~visenv.report.page.Run` is what
    :func:`~visenv.report.page.write_report` (one run) or :func:`~visenv.report.page.write_comparison`
    (several, named) draw.

    Args:
        agent_factory: makes an agent (any object with ``reset(observation, seed)`` and ``act(observation)``).
        tasks: the suite; one episode per task.
        report_dir: the report folder.
        name: the run's name on a comparison page.
        seed: episode ``i`` is reset with ``seed + i`` (as in ``evaluate``).
        env_config: options of the :class:`~visenv.envs.visgen.VisGenEnv`.
        grader: a :class:`~visenv.rewards.judges.BenchmarkGrader` for the subjective dimensions, or None.
        metrics: logged (not optimised) batched components by name, e.g. ``{"clip_alignment":
            ClipAlignment(scorer)}``; each becomes a column of the page's metrics table (see ``evaluate``).
        progress: show a progress bar.
        num_envs: episodes played at once, in lock-step (see ``evaluate``).
        act_batch: ``(agents, observations) -> actions`` of a lock-step batch (see ``evaluate``).

    Returns:
        The run: the results and summary of ``evaluate(..., keep_trajectories=True)``, the captures
        and the grades (None without a grader).
    """
    captures: list[EpisodeCapture] = []
    results, summary = evaluate(agent_factory, tasks, seed=seed, env_config=dict(env_config or {}),
                                progress=progress, keep_trajectories=True, grader=grader, metrics=metrics,
                                on_episode=lambda record: captures.append(capture_episode(record, report_dir)),
                                num_envs=num_envs, act_batch=act_batch)
    grades = None
    if grader is not None:
        grades = [row["score"] for row in summary["visgenbench"]["episodes"]]
    return Run(name, results, summary, captures, grades)


def evaluate_with_report(agent_factory: Callable[[], Any], tasks: Sequence[Task], report_dir: str | Path, *,
                         seed: int = 0, env_config: Mapping[str, Any] | None = None, grader: Any = None,
                         metrics: Mapping[str, Callable] | None = None, progress: bool = True,
                         title: str = "visenv benchmark report", num_envs: int = 1,
                         act_batch: Callable[..., list[str]] = act_each
                         ) -> tuple[list[EpisodeResult], dict[str, Any]]:
    """:func:`visenv.evaluation.evaluate` with trajectories kept, plus ``report.html`` and its pictures.

    Write results.json beside the page with :func:`visenv.evaluation.write_results`, as ``rl eval`` does.

    Args:
        agent_factory: makes the agent (any object with ``reset(observation, seed)`` and ``act(observation)``).
        tasks: the suite; one episode per task.
        report_dir: where report.html and media/ are written.
        seed: episode ``i`` is reset with ``seed + i`` (as in ``evaluate``).
        env_config: options of the :class:`~visenv.envs.visgen.VisGenEnv`.
        grader: a :class:`~visenv.rewards.judges.BenchmarkGrader` for the subjective dimensions, or None.
        metrics: logged (not optimised) batched components by name; each becomes a column of the
            page's metrics table (see :func:`evaluate_run`).
        progress: show a progress bar.
        title: the page title.
        num_envs: episodes played at once (as in ``evaluate``).
        act_batch: one turn for several agents at once (as in ``evaluate``; e.g.
            :func:`rl.agent.act_together` batches a policy's ``generate``).

    Returns:
        The episode results and the summary, the same as ``evaluate(..., keep_trajectories=True)``.
    """
    run = evaluate_run(agent_factory, tasks, report_dir, seed=seed, env_config=env_config, grader=grader,
                       metrics=metrics, progress=progress, num_envs=num_envs, act_batch=act_batch)
    write_report(report_dir, run.results, run.summary, run.captures, run.grades, title)
    return list(run.results), dict(run.summary)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def replay_captures(episodes: Sequence[Mapping[str, Any]], tasks: Sequence[Task], report_dir: str | Path, *,
                    seed: int = 0, env_config: Mapping[str, Any] | None = None
                    ) -> tuple[list[EpisodeCapture], list[EpisodeRecord]]:
    """Re-play recorded episodes to recover their artifacts; write their pictures under ``report_dir``.

    Args:
        episodes: the ``episodes`` of a results.json written with trajectories.
        tasks: the suite the evaluation used, in its order.
        report_dir: the report folder.
        seed: the evaluation's seed.
        env_config: the evaluation's environment options.

    Returns:
        Per episode its capture and its replayed record (for a grader).

    Raises:
        ConfigError: the episodes do not match the suite, hold no trajectory, or replay to another
            reward (another seed or environment setting was used).
    """
    if len(episodes) != len(tasks):
        raise ConfigError(f"results hold {len(episodes)} episodes but the suite has {len(tasks)} tasks: pass the "
                          "suite the evaluation used (same --suite/--n/--task-seed or --tasks).")
    env = VisGenEnv(dict(env_config or {}), tasks=list(tasks))
    captures, records = [], []
    for i, (episode, task) in enumerate(zip(episodes, tasks)):
        if episode["task_id"] != task.task_id:
            raise ConfigError(f"episode {i} played task {episode['task_id']!r} but task {i} of the suite is "
                              f"{task.task_id!r}: pass the suite the evaluation used.")
        if not episode["trajectory"]:
            raise ConfigError(f"episode {i} ({task.task_id}) has no trajectory: evaluate with "
                              "keep_trajectories=True (`rl eval --trajectories`).")
        env.reset(seed=seed + i, options={"task": task})
        total = 0.0
        for step in episode["trajectory"]:
            total += env.step(step["action"])[1]
        if not _same(total, float(episode["reward"])):
            raise ConfigError(f"episode {i} ({task.task_id}) replays to reward {total:.6f}, not the recorded "
                              f"{float(episode['reward']):.6f}: pass the seed and environment options the "
                              "evaluation used.")
        records.append(env.record)
        captures.append(capture_episode(env.record, report_dir))
    return captures, records
