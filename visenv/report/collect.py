"""Recover the report's pictures from a results.json, whose records the episode runner wrote.

An evaluation (:func:`rl.evaluate.evaluate_run`, played by the one episode runner) captures each
episode's artifacts right after its last step. For a results.json without pictures,
:func:`replay_captures` re-plays the recorded actions in a fresh environment, following the
evaluation exactly (episode ``i`` plays task ``i``, reset with seed ``seed + i``), which reproduces
the same artifacts (the tools are seeded by the episode seed and call index), and checks that every
replayed reward equals the recorded one, so a wrong suite, seed or environment setting is reported,
never drawn. :func:`suite_of` rebuilds the suite a results.json records.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from visenv.envs.visgen import VisGenEnv
from visenv.episode import EpisodeRecord
from visenv.error import ConfigError
from visenv.report.media import EpisodeCapture, capture_episode
from visenv.tasks import Task, load_tasks, make_suite


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


def suite_of(recorded: Mapping[str, Any]) -> list[Task]:
    """The suite a results.json's ``suite`` entry names (see :func:`visenv.evaluation.write_results`).

    Raises:
        ConfigError: the entry names neither a tasks file nor a built-in suite.
    """
    if recorded.get("tasks"):
        return load_tasks(recorded["tasks"])
    if "n" not in recorded or "task_seed" not in recorded:
        raise ConfigError(f"the results' suite entry {dict(recorded)!r} names neither a tasks file nor a built-in "
                          "suite (n, task_seed): pass --tasks or --suite/--n/--task-seed.")
    suite = recorded.get("suite", "all")
    return make_suite(recorded["n"], recorded["task_seed"], modality=None if suite == "all" else suite,
                      scenarios=recorded.get("scenarios"))
