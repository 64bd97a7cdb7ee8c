"""Teacher data (VisGenData in miniature): play tasks with the scripted teacher, filter, write chat JSONL.

The pipeline follows the paper's data funnel (PAPER.md section 5: queries -> trajectories -> those
that pass LtrReward and a VLM grader):

1. the scripted teacher (:class:`baselines.workflow_agent.WorkflowAgent`, with a configurable
   mistake rate so that the data is realistic and leaves room for RL) plays ``num_tasks`` tasks of a
   suite in :class:`~visenv.envs.visgen.VisGenEnv`, episode ``i`` reset with seed ``seed + i``;
2. a trajectory is dropped when the turn budget truncated it, when its reward is invalid (a required
   judge of the rubric failed), or when the rubric's total (``info["reward_components"]["total"]``
   on the last step; LtrReward unless ``env`` sets another rubric) is below ``min_reward``;
3. the survivors are scored by the optional extra ``judges`` (batched reward components, e.g.
   :class:`~visenv.rewards.judges.PlanJudge`); a judge that answers None drops the trajectory as
   ``judge_failed:<name>``, a score below ``min_judge_score`` as ``below_judge:<name>``;
4. the rest are written as JSONL, one trajectory per line, in the format of
   :func:`rl.sft.load_chat_jsonl`::

       {"messages": [{"role": "user", "content": <reset observation text>},
                     {"role": "assistant", "content": <turn 1>},
                     {"role": "tool", "content": <observation after turn 1>}, ...,
                     {"role": "assistant", "content": <the answer turn>}],
        "task_id": "...", "reward": 0.95}

   The observation after the final turn is left out (no action follows it). With
   ``include_tool_docs`` a ``system`` message with the environment's tool documentation opens each
   trajectory; leave it off when the policy brings its own system prompt (``rl.sft`` then uses it).
   With ``images`` each tool message also lists the pictures the environment showed with it
   (``"images": ["<name>_images/<hash>.png", ...]``, relative to the JSONL file's folder: VisGen's
   ``pixels`` rows that ``pixels_mask`` marks, the latest images and video middle frames at the
   env's ``pixel_size``, newest first), for VLM SFT; each picture is written once.

Command line: ``python -m rl.cli data build --out data/visgen.jsonl --n 200`` (see :func:`add_data_commands`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image
from tqdm import tqdm

from baselines.workflow_agent import MISTAKES, WorkflowAgent
from visenv.envs.config import CONTENT_TIERS, TASK_SUITES, VisGenConfig
from visenv.envs.visgen import VisGenEnv
from visenv.episode import EpisodeRecord
from visenv.error import ConfigError
from visenv.imports import import_object
from visenv.rewards.rubric import RUBRICS
from visenv.tasks import Task, load_tasks, make_suite

TRUNCATED = "truncated"
INVALID_REWARD = "invalid_reward"
BELOW_THRESHOLD = "below_threshold"


@dataclass
class DataConfig:
    """Settings of :func:`build_dataset`.

    Attributes:
        out: the JSONL file to write (its folder is created; an existing file is replaced).
        num_tasks: how many tasks the teacher plays (one trajectory each).
        tasks: "all", "image" or "video" (the built-in scenarios) or a path to a JSONL task file
            (then its first ``num_tasks`` tasks are played).
        task_seed: seed of the built-in suite (the evaluation commands default to task seed 10,000,
            another suite).
        seed: episode ``i`` is reset with ``seed + i``; also seeds the teacher's mistakes.
        mistake_rate: probability that the teacher makes one mistake in an episode.
        mistakes: kinds of mistake the teacher draws from (see :data:`baselines.workflow_agent.MISTAKES`).
        reflect: whether the teacher writes a ``<reflection>`` on each result.
        inspect: the teacher analyses each generated output, reflects on what it shows and revises on a
            defect (:class:`~baselines.workflow_agent.WorkflowAgent`'s ``inspect``; meant for
            ``env={"content": "semantic", "tool_fidelity": 0.8, "max_turns": 90}``).
        min_reward: trajectories whose rubric total is below this are dropped.
        judges: extra judges by name: batched components ``judge(records) -> list[float | None]``.
        min_judge_score: trajectories scoring below this with any judge are dropped.
        include_tool_docs: open each trajectory with a system message holding the tool documentation.
        images: list on each tool message the pictures the environment showed with it (PNG files
            in ``<out stem>_images/`` next to ``out``), for VLM SFT; the env then observes pixels
            (``env["pixel_size"]`` sets their side).
        env: options of the environment (:class:`~visenv.envs.config.VisGenConfig` fields other
            than the task suite, e.g. ``{"rubric": "r1", "max_turns": 40}``).
    """

    out: str
    num_tasks: int = 200
    tasks: str = "all"
    task_seed: int = 0
    seed: int = 0
    mistake_rate: float = 0.3
    mistakes: tuple[str, ...] = MISTAKES
    reflect: bool = True
    inspect: bool = False
    min_reward: float = 0.5
    judges: Mapping[str, Any] = field(default_factory=dict)
    min_judge_score: float = 0.5
    include_tool_docs: bool = False
    images: bool = False
    env: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.out, str) or not self.out:
            raise ConfigError(f"out ({self.out!r}) must be the path of the JSONL file to write.")
        if isinstance(self.num_tasks, bool) or not isinstance(self.num_tasks, int) or self.num_tasks < 1:
            raise ConfigError(f"num_tasks ({self.num_tasks!r}) must be a positive integer.")
        if self.tasks not in TASK_SUITES and not os.path.isfile(self.tasks):
            raise ConfigError(f"tasks ({self.tasks!r}) must be one of {TASK_SUITES} or the path of an "
                              "existing JSONL task file (write one with `visenv tasks --out FILE`).")
        if self.inspect and not self.reflect:
            raise ConfigError("inspect=True needs reflect=True: the inspecting teacher writes the reflections.")
        if not 0.0 <= self.mistake_rate <= 1.0:
            raise ConfigError(f"mistake_rate ({self.mistake_rate}) must be in [0, 1], e.g. 0.3.")
        self.mistakes = tuple(self.mistakes)
        unknown = sorted(set(self.mistakes) - set(MISTAKES))
        if not self.mistakes or unknown:
            raise ConfigError(f"mistakes {list(self.mistakes)} must be a non-empty subset of {MISTAKES}.")
        for name in ("min_reward", "min_judge_score"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ConfigError(f"{name} ({value!r}) must be a number, e.g. 0.5.")
        for name, judge in self.judges.items():
            if not callable(judge):
                raise ConfigError(f"judges[{name!r}] ({judge!r}) must be a batched component "
                                  "judge(records) -> list[float | None].")
        if "tasks" in self.env:
            raise ConfigError("env must not set 'tasks': the suite is DataConfig.tasks (with num_tasks, task_seed).")
        VisGenConfig.from_any(dict(self.env))  # raises on unknown or invalid environment options

    def suite(self) -> list[Task]:
        """The tasks the teacher plays."""
        if self.tasks in TASK_SUITES:
            return make_suite(self.num_tasks, self.task_seed, modality=None if self.tasks == "all" else self.tasks)
        tasks = load_tasks(self.tasks)[:self.num_tasks]
        if not tasks:
            raise ConfigError(f"The task file {self.tasks!r} holds no task.")
        return tasks


@dataclass
class Funnel:
    """What :func:`build_dataset` did: trajectories generated, kept and dropped by reason.

    Attributes:
        out: the JSONL file written.
        generated: trajectories the teacher played.
        kept: trajectories written.
        dropped: reason -> count: ``truncated``, ``invalid_reward``, ``below_threshold``,
            ``judge_failed:<name>``, ``below_judge:<name>`` (each trajectory counts once, under
            the first reason that applies, in that order).
        mistakes_generated: generated trajectories in which the teacher made a deliberate mistake.
        mistakes_kept: of those, how many were kept (the filter let them through).
        mean_reward_kept: the mean rubric total of the kept trajectories (None when none was kept).
        reflections_generated: generated trajectories with at least one ``<reflection>``.
        revisions_generated: generated trajectories in which the teacher found a defect with the
            analysis tools and revised (edited or regenerated) an output.
        revisions_kept: of those, how many were kept.
    """

    out: str
    generated: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    mistakes_generated: int = 0
    mistakes_kept: int = 0
    mean_reward_kept: float | None = None
    reflections_generated: int = 0
    revisions_generated: int = 0
    revisions_kept: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return dataclasses.asdict(self)

    def format(self) -> str:
        """The funnel as a few lines of text."""
        share = f" ({self.kept / self.generated:.0%})" if self.generated else ""
        mean = "-" if self.mean_reward_kept is None else f"{self.mean_reward_kept:.3f}"
        lines = [f"generated {self.generated}", f"kept      {self.kept}{share}, mean reward {mean}"]
        lines += [f"dropped   {count:>4}  {reason}" for reason, count in sorted(self.dropped.items())]
        lines.append(f"teacher mistakes: {self.mistakes_generated} generated, {self.mistakes_kept} kept")
        lines.append(f"reflections: {self.reflections_generated} trajectories reflect; {self.revisions_generated} "
                     f"revised a defective output, {self.revisions_kept} of them kept")
        lines.append(f"wrote {self.out}")
        return "\n".join(lines)


@dataclass
class _Trajectory:
    messages: list[dict[str, Any]]
    record: EpisodeRecord
    total: float | None
    mistake: str | None
    revised: bool = False
    pictures: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def reflected(self) -> bool:
        return any(step.turn.reflection for step in self.record.turns)


def _play(env: VisGenEnv, teacher: WorkflowAgent, task: Task, seed: int, system: str | None,
          images: str | None) -> _Trajectory:
    """Play one task with the teacher: the chat messages, the record and the rubric's total (with
    ``images``, the folder name of the pictures, the tool messages list the pictures shown)."""
    obs, _ = env.reset(seed=seed, options={"task": task})
    teacher.reset(obs, seed=seed)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": obs["text"]})
    pictures: dict[str, np.ndarray] = {}
    while True:
        action = teacher.act(obs)
        messages.append({"role": "assistant", "content": action})
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            total = info["reward_components"].get("total") if info["reward_valid"] else None
            return _Trajectory(messages, env.record, total, teacher.mistake, bool(sum(teacher.revisions.values())),
                               pictures)
        messages.append({"role": "tool", "content": obs["text"]})
        if images is not None:
            shown = obs["pixels"][obs["pixels_mask"].astype(bool)]
            names = [f"{images}/{hashlib.sha256(picture.tobytes()).hexdigest()[:20]}.png" for picture in shown]
            pictures.update(zip(names, shown))
            if names:
                messages[-1]["images"] = names


def _screen(trajectory: _Trajectory, min_reward: float) -> str | None:
    """The reason to drop a trajectory on its own merits, or None to keep it."""
    if trajectory.record.truncated:
        return TRUNCATED
    if trajectory.total is None or math.isnan(trajectory.total):
        return INVALID_REWARD
    if trajectory.total < min_reward:
        return BELOW_THRESHOLD
    return None


def _judge(survivors: list[_Trajectory], judges: Mapping[str, Any], min_score: float,
           dropped: Counter) -> list[_Trajectory]:
    """The survivors that every judge scored at least ``min_score`` (one batched call per judge)."""
    for name, judge in judges.items():
        if not survivors:
            break
        scores = judge([t.record for t in survivors])
        if len(scores) != len(survivors):
            raise RuntimeError(f"Judge {name!r} returned {len(scores)} scores for {len(survivors)} trajectories.")
        kept = []
        for trajectory, score in zip(survivors, scores):
            if score is None:
                dropped[f"judge_failed:{name}"] += 1
            elif score < min_score:
                dropped[f"below_judge:{name}"] += 1
            else:
                kept.append(trajectory)
        survivors = kept
    return survivors


def build_dataset(config: DataConfig, progress: bool = False) -> Funnel:
    """Play, filter and write the teacher's trajectories (see the module docstring).

    Args:
        config: the settings.
        progress: show a progress bar.

    Returns:
        The funnel. The JSONL file is written whole or not at all (temporary file, then rename).
    """
    tasks = config.suite()
    env = VisGenEnv({**config.env, "observe_pixels": True} if config.images else dict(config.env), tasks=tasks)
    images = f"{Path(config.out).stem}_images" if config.images else None
    teacher = WorkflowAgent(seed=config.seed, mistake_rate=config.mistake_rate, reflect=config.reflect,
                            mistakes=config.mistakes, inspect=config.inspect)
    system = env.system_prompt if config.include_tool_docs else None
    funnel = Funnel(out=config.out)
    dropped: Counter = Counter()
    survivors = []
    for i, task in enumerate(tqdm(tasks, desc="teacher", disable=not progress, leave=False)):
        trajectory = _play(env, teacher, task, config.seed + i, system, images)
        funnel.generated += 1
        funnel.mistakes_generated += trajectory.mistake is not None
        funnel.reflections_generated += trajectory.reflected
        funnel.revisions_generated += trajectory.revised
        reason = _screen(trajectory, config.min_reward)
        if reason is None:
            survivors.append(trajectory)
        else:
            dropped[reason] += 1
    kept = _judge(survivors, config.judges, config.min_judge_score, dropped)
    _write_jsonl(config.out, kept)
    funnel.kept = len(kept)
    funnel.dropped = dict(dropped)
    funnel.mistakes_kept = sum(t.mistake is not None for t in kept)
    funnel.revisions_kept = sum(t.revised for t in kept)
    funnel.mean_reward_kept = sum(t.total for t in kept) / len(kept) if kept else None
    return funnel


def _write_jsonl(path: str, trajectories: list[_Trajectory]) -> None:
    """The trajectories as JSONL (whole or not at all), after the pictures their messages name."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for t in trajectories:
        for name, picture in t.pictures.items():
            if not (target.parent / name).exists():
                (target.parent / name).parent.mkdir(exist_ok=True)
                Image.fromarray(picture).save(target.parent / name)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for t in trajectories:
            line = {"messages": t.messages, "task_id": t.record.task.task_id, "reward": round(t.total, 6)}
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(temporary, target)


def _load_judge(spec: str) -> tuple[str, Any]:
    """``NAME=package.module:factory`` -> (NAME, factory())."""
    name, sep, target = spec.partition("=")
    if not name or not sep:
        raise ConfigError(f"--judge ({spec!r}) must be NAME=package.module:factory, where factory() "
                          "returns a judge, e.g. plan=myjudges:plan_judge.")
    return name, import_object(target, f"--judge {name}=", "plan=myjudges:plan_judge")()


def cmd_data_build(args: argparse.Namespace) -> int:
    """Play tasks with the scripted teacher, keep the good trajectories, write chat JSONL."""
    env = {"rubric": args.rubric}
    if args.max_turns is not None:
        env["max_turns"] = args.max_turns
    if args.content != "attribute":
        env["content"] = args.content
    if args.tool_fidelity is not None:
        env["tool_fidelity"] = args.tool_fidelity
    if args.pixel_size is not None:
        env["pixel_size"] = args.pixel_size
    config = DataConfig(out=args.out, num_tasks=args.n, tasks=args.tasks or args.suite, task_seed=args.task_seed,
                        seed=args.seed, mistake_rate=args.mistake_rate,
                        mistakes=tuple(args.mistakes.split(",")) if args.mistakes else MISTAKES,
                        reflect=not args.no_reflect, inspect=args.inspect, min_reward=args.min_reward,
                        judges=dict(_load_judge(spec) for spec in args.judge), min_judge_score=args.min_judge_score,
                        include_tool_docs=args.tool_docs, images=args.images, env=env)
    funnel = build_dataset(config, progress=not args.quiet)
    print(funnel.format())
    if args.funnel:
        Path(args.funnel).write_text(json.dumps(funnel.to_dict(), indent=1))
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data build`` on a subparsers object; the command sets ``func`` (namespace -> exit status).

    Returns:
        The ``data`` parser.
    """
    data = subparsers.add_parser("data", help="build teacher trajectories for SFT", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("build", help="play tasks with the scripted teacher, filter, write chat JSONL",
                       description=cmd_data_build.__doc__)
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--n", type=int, default=200, help="tasks to play (default 200)")
    p.add_argument("--suite", choices=TASK_SUITES, default="all", help="built-in scenarios (default: all 42)")
    p.add_argument("--tasks", help="a JSONL task file instead of the built-in suite")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the built-in suite (default 0)")
    p.add_argument("--seed", type=int, default=0, help="episode and teacher seed (default 0)")
    p.add_argument("--mistake-rate", type=float, default=0.3, help="chance of one teacher mistake per episode")
    p.add_argument("--mistakes", help=f"comma-separated mistake kinds (default: all of {','.join(MISTAKES)})")
    p.add_argument("--no-reflect", action="store_true", help="the teacher writes no <reflection>")
    p.add_argument("--min-reward", type=float, default=0.5, help="drop trajectories whose reward is below this")
    p.add_argument("--inspect", action="store_true",
                   help="the teacher analyses its outputs, reflects and revises on a defect (use --content semantic)")
    p.add_argument("--rubric", choices=RUBRICS, default="ltr", help="the environment's rubric (default ltr)")
    p.add_argument("--content", choices=CONTENT_TIERS, default="attribute", help="the environment's media tier")
    p.add_argument("--tool-fidelity", type=float, help="with --content semantic: chance a generation comes out as asked")
    p.add_argument("--max-turns", type=int, help="the environment's turn budget (default: the environment's)")
    p.add_argument("--judge", action="append", default=[], metavar="NAME=MODULE:FACTORY",
                   help="an extra judge: factory() returns a batched component; repeatable")
    p.add_argument("--min-judge-score", type=float, default=0.5, help="drop trajectories a judge scores below this")
    p.add_argument("--tool-docs", action="store_true", help="open each trajectory with the tool documentation")
    p.add_argument("--images", action="store_true",
                   help="list on each tool message the pictures the env showed (PNG files in <out stem>_images/), "
                        "for VLM SFT")
    p.add_argument("--pixel-size", type=int, help="with --images: side of the pictures (default: the env's, 64)")
    p.add_argument("--funnel", help="also write the funnel as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_build)
    return data
