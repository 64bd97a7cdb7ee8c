"""Evaluate any policy or agent on a task suite, through the one episode runner (:func:`rl.rollout.run_episodes`).

A *player* is a :class:`~rl.policy.Policy` (a transformers policy, the API policy) or an agent
factory (a baseline class, or any zero-argument callable returning an object with
``reset(observation, seed)`` / ``act(observation)``), which plays through :class:`~rl.policy.AgentPolicy`.
Episode ``i`` plays ``tasks[i]`` in a :class:`~visenv.envs.visgen.VisGenEnv` reset with seed
``seed + i`` and samples with conversation seed ``seed + i``, so an evaluation is reproducible and
every player meets the same tasks with the same seeds::

    results, summary = evaluate(WorkflowAgent, tasks, seed=0)                  # a scripted agent
    results, summary = evaluate(policy, tasks, seed=0, num_envs=16)             # a policy, batched
    run = evaluate_run(policy, tasks, "runs/eval", name="RL", keep_trajectories=True)  # with pictures
    write_policy_report({"SFT-only": sft, "RL (GRPO)": rl}, heldout, "runs/main/report", episodes=32, seed=777)

The records, the summary and the report's data come from :mod:`visenv.evaluation` and
:mod:`visenv.report` (which read records and never play).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm import tqdm

from rl.errors import ConfigError
from rl.policy import POLICY, AgentPolicy, Policy, TrainablePolicy
from rl.rollout import Episode, EpisodeSpec, Finish, Rollout, RolloutStats, SerialRollout
from visenv.envs.visgen import VisGenEnv, gpu_seconds_avoided
from visenv.episode import EpisodeRecord
from visenv.evaluation import EpisodeResult, summarize
from visenv.report import Run, capture_episode, write_comparison, write_report
from visenv.rewards.checks import run_checks
from visenv.rewards.judges.grader import grade_benchmark
from visenv.tasks import Task

MakeRollout = Callable[[Policy, Callable[[], Any], Finish], Rollout]
"""``make_rollout(policy, make_env, finish) -> Rollout``: the backend an evaluation plays on."""


def as_policy(player: Policy | Callable[[], Any]) -> Policy:
    """A policy as it is; an agent factory as an :class:`~rl.policy.AgentPolicy`."""
    return player if isinstance(player, Policy) else AgentPolicy(player)


def evaluation_specs(tasks: Sequence[Task], seed: int) -> list[EpisodeSpec]:
    """Episode ``i``: task ``tasks[i]``, reset and sampling seed ``seed + i`` (its own group)."""
    return [EpisodeSpec(i, seed + i, seed + i, i, task) for i, task in enumerate(tasks)]


@dataclass
class Recorder:
    """The runner's ``finish`` hook of an evaluation: what each finished episode leaves behind.

    Runs where the episode ran (in a Ray worker too), while the environment still holds its
    artifacts. Returns ``{"record", "trajectory", "capture", "none_policy"}`` (the last: how the
    rubric scored a failed required component).

    Attributes:
        keep_trajectories: keep every turn (action, observation text, reward, turn summary, tool result).
        report_dir: where the pictures of captured episodes go (None: no pictures).
        captured: episodes with ``episode_id`` below this get their pictures written.
    """

    keep_trajectories: bool = False
    report_dir: str | None = None
    captured: int = 0

    def __call__(self, env: Any, episode: Episode, steps: list) -> dict[str, Any]:
        record = env.unwrapped.record
        trajectory = []
        if self.keep_trajectories:
            actions = [s.text for s in episode.segments if s.role == POLICY]
            trajectory = [{"action": action, "observation": observation["text"], "reward": reward,
                           "turn": info["turn"], "tool_result": info.get("tool_result")}
                          for action, (observation, reward, info) in zip(actions, steps, strict=True)]
        return {"record": record, "trajectory": trajectory, "capture": self.capture(episode, record),
                "none_policy": env.unwrapped.rubric.none_policy}

    def capture(self, episode: Episode, record: EpisodeRecord) -> Any:
        if self.report_dir is None or episode.spec.episode_id >= self.captured:
            return None
        return capture_episode(record, self.report_dir)


def play(player: Policy | Callable[[], Any], tasks: Sequence[Task], *, seed: int = 0,
         env_config: Mapping[str, Any] | None = None, num_envs: int = 1, recorder: Recorder | None = None,
         make_rollout: MakeRollout | None = None, progress: bool = True) -> tuple[list[Episode], RolloutStats]:
    """Play one episode per task (see the module docstring); the runner's episodes, each with its
    record in ``episode.extra`` (a failed episode, whose env raised, gets an empty record of its task).

    Args:
        player: a policy or an agent factory.
        tasks: the suite, one episode per task.
        seed: the base seed.
        env_config: options of the :class:`~visenv.envs.visgen.VisGenEnv`.
        num_envs: episodes played at once by the default serial backend (one batched generate per step).
        recorder: what to keep of each episode (default: the record only).
        make_rollout: the backend, e.g. Ray workers (default: :class:`~rl.rollout.SerialRollout` with
            ``num_envs`` environments); a :class:`~rl.policy.TrainablePolicy`'s weights are synced to it.
        progress: show a progress bar (the episodes are then played in about ten rounds).

    Raises:
        ConfigError: ``num_envs`` is below 1.
    """
    if num_envs < 1:
        raise ConfigError(f"num_envs ({num_envs}) must be at least 1.")
    policy = as_policy(player)
    recorder = recorder or Recorder()
    make_env = functools.partial(VisGenEnv, dict(env_config or {}), tasks=list(tasks))
    if make_rollout is None:
        rollout: Rollout = SerialRollout(policy, make_env, min(num_envs, max(1, len(tasks))), recorder)
    else:
        rollout = make_rollout(policy, make_env, recorder)
    specs = evaluation_specs(tasks, seed)
    size = max(num_envs, -(-len(specs) // 10)) if progress else max(1, len(specs))
    episodes, stats = [], RolloutStats()
    try:
        if isinstance(policy, TrainablePolicy):
            rollout.set_weights(policy, 0)
        with tqdm(total=len(specs), desc="evaluate", disable=not progress, leave=False) as bar:
            for start in range(0, len(specs), size):
                found, part = rollout.sample(specs[start:start + size])
                episodes += found
                stats.add(part)
                stats.wall_seconds += part.wall_seconds
                bar.update(len(found))
    finally:
        rollout.close()
    for episode in episodes:
        if episode.extra is None:  # the env failed the episode: nothing was delivered
            record = EpisodeRecord(task=episode.spec.task)
            episode.extra = {"record": record, "trajectory": [], "capture": recorder.capture(episode, record)}
    return episodes, stats


def results_of(episodes: Sequence[Episode]) -> list[EpisodeResult]:
    """The evaluation records of played episodes (what results.json and the report hold)."""
    results = []
    for episode in episodes:
        record: EpisodeRecord = episode.extra["record"]
        task = record.task
        results.append(EpisodeResult(
            task_id=task.task_id, scenario=task.scenario, modality=task.requirements.modality,
            dimension=task.dimension, reward=episode.reward, components=episode.components,
            checks=run_checks(record), turns=len(record.turns), calls=len(record.calls),
            failed_calls=sum(not c.ok for c in record.calls),
            gpu_seconds_avoided=sum(map(gpu_seconds_avoided, record.calls)),
            trajectory=episode.extra["trajectory"], error=episode.error))
    return results


def evaluate_run(player: Policy | Callable[[], Any], tasks: Sequence[Task], report_dir: str | Path | None = None, *,
                 name: str = "", seed: int = 0, env_config: Mapping[str, Any] | None = None, num_envs: int = 1,
                 keep_trajectories: bool = True, grader: Any = None, metrics: Mapping[str, Callable] | None = None,
                 make_rollout: MakeRollout | None = None, progress: bool = True) -> Run:
    """Evaluate ``player`` on ``tasks``: the records, the summary and (with ``report_dir``) the pictures.

    Args:
        player: a policy or an agent factory (see the module docstring).
        tasks: the suite, one episode per task.
        report_dir: where each episode's pictures go (``report_dir/media``); None writes none.
        name: the run's name on a comparison page.
        seed: episode ``i`` is reset and sampled with ``seed + i``.
        env_config: options of the :class:`~visenv.envs.visgen.VisGenEnv`.
        num_envs: episodes played at once (see :func:`play`).
        keep_trajectories: keep every turn in the results (the report shows them).
        grader: a :class:`~visenv.rewards.judges.BenchmarkGrader` scoring the six subjective
            VisGenBench dimensions; without one they (and the paper's O-Score) are None.
        metrics: logged (not optimised) batched components by name, e.g. ``{"clip_alignment":
            ClipAlignment(scorer)}``, averaged in the VisGenBench block.
        make_rollout: the backend (see :func:`play`).
        progress: show a progress bar.

    Returns:
        The :class:`~visenv.report.Run`: results, summary (``summary["visgenbench"]``: the nine
        dimensions, S-Rate and O-Score), captures (None without ``report_dir``) and grades.
    """
    recorder = Recorder(keep_trajectories, None if report_dir is None else str(report_dir),
                        len(tasks) if report_dir is not None else 0)
    episodes, _ = play(player, tasks, seed=seed, env_config=env_config, num_envs=num_envs, recorder=recorder,
                       make_rollout=make_rollout, progress=progress)
    return run_of(name, episodes, grader, metrics)


def run_of(name: str, episodes: Sequence[Episode], grader: Any = None,
           metrics: Mapping[str, Callable] | None = None) -> Run:
    """The :class:`~visenv.report.Run` of played episodes: results, summary with the VisGenBench block, captures."""
    results = results_of(episodes)
    summary = summarize(results)
    summary["visgenbench"] = grade_benchmark([e.extra["record"] for e in episodes], grader=grader, metrics=metrics)
    summary["reward_none_policy"] = next((e.extra["none_policy"] for e in episodes if "none_policy" in e.extra), None)
    captures = [e.extra["capture"] for e in episodes]
    grades = [row["score"] for row in summary["visgenbench"]["episodes"]] if grader is not None else None
    return Run(name, results, summary, None if None in captures else captures, grades)


def evaluate(player: Policy | Callable[[], Any], tasks: Sequence[Task], *, seed: int = 0,
             env_config: Mapping[str, Any] | None = None, num_envs: int = 1, keep_trajectories: bool = False,
             grader: Any = None, metrics: Mapping[str, Callable] | None = None,
             make_rollout: MakeRollout | None = None, progress: bool = True
             ) -> tuple[list[EpisodeResult], dict[str, Any]]:
    """Evaluate ``player`` on every task, one episode each: ``(results, summary)`` (see :func:`evaluate_run`)."""
    run = evaluate_run(player, tasks, None, seed=seed, env_config=env_config, num_envs=num_envs,
                       keep_trajectories=keep_trajectories, grader=grader, metrics=metrics,
                       make_rollout=make_rollout, progress=progress)
    return list(run.results), dict(run.summary)


def evaluate_with_report(player: Policy | Callable[[], Any], tasks: Sequence[Task], report_dir: str | Path, *,
                         title: str = "visenv benchmark report", **options: Any
                         ) -> tuple[list[EpisodeResult], dict[str, Any]]:
    """:func:`evaluate_run` with trajectories, plus ``report_dir/report.html``: ``(results, summary)``.

    ``options`` are those of :func:`evaluate_run`. Write results.json beside the page with
    :func:`visenv.evaluation.write_results`, as ``visenv eval`` does.
    """
    run = evaluate_run(player, tasks, report_dir, keep_trajectories=True, **options)
    write_report(report_dir, run.results, run.summary, run.captures, run.grades, title)
    return list(run.results), dict(run.summary)


def write_comparison_report(runs: Sequence[Run], report_dir: str | Path, title: str, *, preface: str = "",
                            headline: str | None = None, **described: Any) -> dict[str, Any]:
    """Write ``report.html`` comparing ``runs`` (their pictures already under ``report_dir/media``) and
    ``results.json`` beside it: ``described`` plus, per run name, its ``summary`` and ``episodes``.
    ``preface`` (HTML) and ``headline`` (text) are passed to :func:`visenv.report.render_comparison`."""
    write_comparison(report_dir, runs, title, preface, headline)
    payload = {**described, "policies": {run.name: {"summary": run.summary, "episodes": [vars(r) for r in run.results]}
                                         for run in runs}}
    (Path(report_dir) / "results.json").write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    return payload


def write_policy_report(policies: Mapping[str, Policy], tasks: Sequence[Task], report_dir: str | Path, *,
                        episodes: int, seed: int, env_options: Mapping[str, Any] | None = None,
                        batch_size: int = 32, torch_threads: int | None = 1,
                        metrics: Mapping[str, Callable] | None = None, title: str = "policy comparison"
                        ) -> dict[str, Any]:
    """Play the same held-out episodes with each named policy; write one report.html comparing them.

    Episode ``i`` plays ``tasks[i % len(tasks)]`` reset and sampled with seed ``seed + i`` (as in
    :func:`evaluate`): every policy meets the same tasks with the same seeds. Writes
    ``report_dir/report.html`` (the VisGenBench and objective tables with one row per policy, reward
    charts with one series per policy, each episode's trajectories labelled by policy), the pictures
    under ``report_dir/media`` and ``report_dir/results.json``.

    Args:
        policies: name -> policy (or agent factory), in the order shown.
        tasks: the held-out suite.
        report_dir: the report folder.
        episodes: episodes per policy.
        seed: the base seed of the environments and of the sampling.
        env_options: options of the environment (e.g. ``{"max_turns": 5}``).
        batch_size: episodes played at once, with one batched ``generate`` per step.
        torch_threads: torch's CPU threads while playing (restored afterwards); None keeps the current
            setting. One thread is the fast choice for small models on a shared machine.
        metrics: logged (not optimised) batched components by name, computed on each policy's episodes.
        title: the page title.

    Returns:
        What results.json holds: ``seed``, ``episodes``, ``env_options``, the played ``tasks`` (ids)
        and, per policy name, its ``summary`` and ``episodes``.

    Raises:
        ValueError: no policies, no tasks, or ``episodes``, ``batch_size`` or ``torch_threads`` below 1.
    """
    if not policies:
        raise ConfigError("write_policy_report needs at least one policy, e.g. {'SFT-only': policy}.")
    if not tasks:
        raise ConfigError("write_policy_report needs at least one task: pass the held-out suite.")
    if episodes < 1 or batch_size < 1 or (torch_threads is not None and torch_threads < 1):
        raise ConfigError(f"episodes ({episodes}), batch_size ({batch_size}) and torch_threads ({torch_threads}) "
                         "must be at least 1.")
    played = [tasks[i % len(tasks)] for i in range(episodes)]
    options = dict(env_options or {})
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads or threads)
    try:
        runs = [evaluate_run(policy, played, report_dir, name=name, seed=seed, env_config=options,
                             num_envs=batch_size, metrics=metrics, progress=False)
                for name, policy in policies.items()]
    finally:
        torch.set_num_threads(threads)
    return write_comparison_report(runs, report_dir, title, seed=seed, episodes=episodes, env_options=options,
                                   tasks=[t.task_id for t in played])
