"""What a rollout plays and returns: :class:`EpisodeSpec` (which task, which sampling seed), the finished
:class:`Episode` (token-level segments, per-turn rewards, reward components) and :class:`RolloutStats`
(where the time went). Shared by the episode runner (:mod:`rl.runner`) and every rollout backend
(:mod:`rl.rollout`, :mod:`rl.ray_rollout`).

GRPO groups are ``group_size`` consecutive specs with the same ``task_seed`` (:func:`make_specs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rl.policy import POLICY, Segment


@dataclass(frozen=True)
class EpisodeSpec:
    """What one episode is: the task (by reset seed) and the policy's sampling seed.

    Attributes:
        episode_id: unique within an iteration; results are returned in this order.
        task_seed: ``env.reset(seed=task_seed)``; all members of a GRPO group share it.
        sample_seed: seeds the policy's sampling noise for this episode.
        group: the GRPO group (the task's index in the iteration).
        task: when set, the task itself, given to the env as ``reset(seed=task_seed,
            options={"task": task})`` (an evaluation's explicit suite); None lets the seed choose.
    """

    episode_id: int
    task_seed: int
    sample_seed: int
    group: int
    task: Any = None


def make_specs(seed: int, iteration: int, num_groups: int, group_size: int) -> list[EpisodeSpec]:
    """The specs of one iteration: ``num_groups`` tasks x ``group_size`` samples, groups consecutive.

    Seeds derive from ``(seed, iteration)`` alone, so resuming at an iteration draws the same tasks and
    noise as an uninterrupted run.
    """
    rng = torch.Generator().manual_seed(seed * 7919 + iteration)
    task_seeds = torch.randint(0, 2**31 - 1, (num_groups,), generator=rng).tolist()
    sample_seeds = torch.randint(0, 2**31 - 1, (num_groups * group_size,), generator=rng).tolist()
    return [EpisodeSpec(g * group_size + k, task_seeds[g], sample_seeds[g * group_size + k], g)
            for g in range(num_groups) for k in range(group_size)]


@dataclass
class Episode:
    """A finished episode.

    Attributes:
        spec: the spec it ran.
        segments: the conversation, environment and policy turns alternating (the final
            observation, which no turn follows, is not encoded).
        rewards: the environment's reward after each policy turn (NaN when it could not score).
        components: the reward components of the last step (``info["reward_components"]``).
        terminated: the episode ended itself (``<answer>``, or a one-turn env).
        truncated: the environment cut it (turn or character budget).
        backends: tool calls per answering backend tier (``info["tool_result"]["backend"]``).
        gpu_seconds: GPU-seconds the virtual tiers saved: what the real tools would have taken for the
            calls a virtual tier answered (``info["cost"]["episode_gpu_seconds_avoided"]``).
        weight_version: the weights version that sampled it.
        error: why the environment failed the episode (``"TypeError: ..."``), or why the policy could
            not produce a turn (``"PolicyError: ..."``), or None; a failed
            episode ends at the failing step with a NaN reward, so the trainers leave it out.
        extra: what the runner's ``finish`` hook returned for it (e.g. an evaluation's record).
    """

    spec: EpisodeSpec
    segments: list[Segment]
    rewards: list[float]
    components: dict[str, float | None]
    terminated: bool
    truncated: bool
    backends: dict[str, int] = field(default_factory=dict)
    gpu_seconds: float = 0.0
    weight_version: int = 0
    error: str | None = None
    extra: Any = None

    @property
    def reward(self) -> float:
        """The episode return (NaN when any step's reward is invalid)."""
        return float(sum(self.rewards))

    def messages(self) -> list[dict[str, str]]:
        """The episode as chat messages (observations as "user"), the format :mod:`rl.sft` reads."""
        return [{"role": "assistant", "content": s.text} if s.role == POLICY else
                {"role": "user", "content": s.observation["text"] if s.observation else s.text}
                for s in self.segments]

    @property
    def policy_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.segments if s.role == POLICY)


MODES = ("sync", "async")
"""How :func:`run_episodes` interleaves generation and env steps (see the module docstring)."""

MAX_CONCURRENT_JUDGES = 16
"""The async loop's default judge pool: deferred end-of-episode scores running at once (see :func:`run_episodes`)."""


@dataclass
class RolloutStats:
    """Where a rollout's time went, and what went wrong. Seconds are summed over workers (and, in
    async mode, over the env and judge threads: parts overlap); :meth:`add` sums everything but the
    wall time and the ``max_*`` counts (the most of any one runner).

    Attributes:
        generate_seconds: time the generator was busy (at least one turn being sampled).
        runner_seconds: wall time of the episode runners (what ``generate_seconds`` is a part of).
        drain_seconds: the runners' time after their generator's last turn: the batch's final tool
            calls and end-of-episode scores, when nothing is left to generate (a fixed batch always
            ends so; overlapping the next batch is what fills it). Part of ``runner_seconds``.
        env_seconds: time in env resets and steps and in encoding observations.
        tool_seconds: env steps with a tool call that did not end the episode, by answering tier
            (``"refused"``: calls that no tier answered, e.g. invalid arguments).
        judge_seconds: the episode-ending env steps (where the rubric and its judges score), and the
            deferred scores of those ending steps (async mode: see :func:`run_episodes`).
        judge_queue_seconds: time finished episodes waited for a free slot of the judge pool.
        max_in_flight: the most episodes live at once in one runner (those awaiting their deferred score
            included, so it may exceed the environments).
        max_judges_in_flight: the most episodes being scored at once in one runner (an ending env step,
            or a deferred score on the judge pool).
    """

    wall_seconds: float = 0.0
    generate_seconds: float = 0.0
    runner_seconds: float = 0.0
    drain_seconds: float = 0.0
    env_seconds: float = 0.0
    tool_seconds: dict[str, float] = field(default_factory=dict)
    judge_seconds: float = 0.0
    judge_queue_seconds: float = 0.0
    env_steps: int = 0
    max_in_flight: int = 0
    max_judges_in_flight: int = 0
    worker_restarts: int = 0
    episodes_failed: int = 0

    @property
    def generator_idle_fraction(self) -> float:
        """The share of the runners' time in which the generator sampled nothing."""
        return 1.0 - self.generate_seconds / self.runner_seconds if self.runner_seconds else 0.0

    @property
    def generator_idle_fraction_before_drain(self) -> float:
        """The same share up to the generator's last turn (the drain left out: ``drain_seconds``)."""
        active = self.runner_seconds - self.drain_seconds
        return max(0.0, 1.0 - self.generate_seconds / active) if active > 0 else 0.0

    def add(self, other: "RolloutStats") -> None:
        self.generate_seconds += other.generate_seconds
        self.runner_seconds += other.runner_seconds
        self.drain_seconds += other.drain_seconds
        self.env_seconds += other.env_seconds
        for tier, seconds in other.tool_seconds.items():
            self.tool_seconds[tier] = self.tool_seconds.get(tier, 0.0) + seconds
        self.judge_seconds += other.judge_seconds
        self.judge_queue_seconds += other.judge_queue_seconds
        self.env_steps += other.env_steps
        self.max_in_flight = max(self.max_in_flight, other.max_in_flight)
        self.max_judges_in_flight = max(self.max_judges_in_flight, other.max_judges_in_flight)
        self.episodes_failed += other.episodes_failed
        self.worker_restarts += other.worker_restarts


Finish = Callable[[Any, Episode, list], Any]
"""The runner's end-of-episode hook: ``finish(env, episode, steps) -> episode.extra``."""
