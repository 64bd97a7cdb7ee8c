"""The training loop both algorithms share: sync weights, roll out, update, log, checkpoint.

An *algorithm* is any object with ``update(episodes, iteration) -> metrics``,
``state_dict()`` / ``load_state_dict()`` and ``off_policy`` (:class:`~rl.grpo.GRPO`, :class:`~rl.ppo.PPO`);
the loop owns everything around it. Four callbacks are the extension points (:class:`Callback`);
:class:`KeepBest` (keep the weights of the best stretch of training reward) and :class:`Budget` (stop on a
time or iteration budget) are two.

Weight versions: version ``v`` is the learner's weights before update ``v`` (version 0 the initial
weights). Without overlap, iteration ``it`` samples with version ``it`` (or up to ``max_staleness``
older). With ``overlap=True`` iteration ``it + 1`` is sampled on a rollout thread while update ``it``
runs, so it samples with version ``max(0, it - 1)`` (the weights after update ``it - 2``): staleness
exactly one version after the first iteration, never more, and each episode sampled by one version.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter, deque
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, Sequence

import torch

from rl import checkpoint
from rl.errors import ConfigError
from rl.policy import TrainablePolicy
from rl.rollout import Episode, Rollout, RolloutStats, SerialRollout, make_specs


class Algorithm(Protocol):
    off_policy: bool
    """True when ``update`` takes the old policy's log-probs from the sampler (the episodes' segments), as
    samples from stale weights need; read only when the trainer overlaps rollout and update."""

    def update(self, episodes: Sequence[Episode], iteration: int) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Callback:
    """Hooks into :class:`Trainer`; override the ones you need."""

    def on_start(self, trainer: "Trainer") -> None:
        """Before the first iteration (after a resume, if any)."""

    def on_rollout_end(self, iteration: int, episodes: Sequence[Episode], stats: RolloutStats) -> None:
        """After an iteration's episodes came back, before the update."""

    def on_step(self, iteration: int, metrics: dict[str, float]) -> bool:
        """After an iteration's update and logging; return True to stop training."""
        return False

    def on_end(self, history: list[dict[str, float]]) -> None:
        """After the last iteration; ``history`` holds every iteration's metrics of this run."""


class KeepBest(Callback):
    """Keeps the weights that sampled the best stretch of training reward, to restore after training.

    Model selection on the training signal, at no extra rollouts: after each iteration's rollout (before
    its update) the mean episode reward of the last ``window`` iterations is compared with the best so
    far; when it is higher, the current weights (those that sampled the newest iteration of the window)
    are copied. RL on a small policy can climb and then drift off (entropy and length rise, reward
    falls); the last weights are then worse than ones it passed. ``restore()`` puts the best back.

    A window of several iterations averages over many tasks, so one lucky batch does not win; the
    selected stretch is still an upward-biased estimate of that policy's reward (it won a maximum), so
    measure the restored policy on held-out tasks.

    With stale samplers (a :class:`Trainer` with ``overlap`` or ``max_staleness``) the newest iteration
    of a window was sampled by older weights than the learner's: the keeper then copies the learner's
    weights at every rollout end (one copy per version the samplers may lag, held in memory) and keeps
    the copy of the version that sampled (``Episode.weight_version``). A window whose sampling weights
    it never saw (the first iterations after a resume) is not a candidate.

    Args:
        policy: the trained policy (its ``get_weights()`` / ``set_weights()`` are used).
        window: iterations averaged; a window is a candidate once it is full.

    Attributes:
        best_iteration: the newest iteration of the best window (None until a window is full).
        best_reward: that window's mean episode reward.
    """

    def __init__(self, policy: TrainablePolicy, window: int = 5):
        if window < 1:
            raise ConfigError(f"window ({window}) must be at least 1.")
        self.policy = policy
        self.window = window
        self.recent: deque[list[float]] = deque(maxlen=window)
        self.best_iteration: int | None = None
        self.best_reward = -math.inf
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.lag = 0
        self.versions: dict[int, dict[str, torch.Tensor]] = {}
        """With stale samplers: the learner's weights of the last ``lag + 1`` versions."""

    def on_start(self, trainer: "Trainer") -> None:
        self.lag = trainer.max_staleness + int(trainer.overlap)

    def on_rollout_end(self, iteration: int, episodes: Sequence[Episode], stats: RolloutStats) -> None:
        if self.lag:  # the learner holds version ``iteration`` until this iteration's update
            self.versions[iteration] = self.policy.get_weights()
            self.versions = {v: w for v, w in self.versions.items() if v >= iteration - self.lag}
        self.recent.append([e.reward for e in episodes if not math.isnan(e.reward)])
        rewards = [r for rewards in self.recent for r in rewards]
        if len(self.recent) < self.window or not rewards:
            return
        mean = sum(rewards) / len(rewards)
        if mean <= self.best_reward:
            return
        weights = self.versions.get(min(e.weight_version for e in episodes)) if self.lag else self.policy.get_weights()
        if weights is not None:
            self.best_iteration, self.best_reward = iteration, mean
            self.best_weights = weights

    def restore(self) -> bool:
        """Set the policy to the best weights; False (nothing changed) when no window was full."""
        if self.best_weights is None:
            return False
        self.policy.set_weights(self.best_weights)
        return True


class Budget(Callback):
    """Stops training when a wall-time or iteration budget is spent, or before it would overrun a deadline.

    Budgets count from :meth:`on_start`; they are checked after each iteration, so the iteration running
    when time runs out finishes.

    Args:
        seconds: wall-time budget of the run, or None for none.
        iterations: most iterations this run makes (a resumed run counts from where it resumed), or None.
        deadline: a ``time.perf_counter()`` instant that training must not run past, or None: training
            stops when the next iteration, if it took as long as the last, would end after it.
    """

    def __init__(self, seconds: float | None = None, iterations: int | None = None, deadline: float | None = None):
        if (seconds is not None and seconds < 0) or (iterations is not None and iterations < 1):
            raise ConfigError(f"seconds ({seconds}) must be None or >= 0 and iterations ({iterations}) None or >= 1.")
        self.seconds = seconds
        self.iterations = iterations
        self.deadline = deadline
        self.start = self.previous = time.perf_counter()
        self.done = 0

    def on_start(self, trainer: "Trainer") -> None:
        self.start = self.previous = time.perf_counter()
        self.done = 0

    def on_step(self, iteration: int, metrics: dict[str, float]) -> bool:
        now = time.perf_counter()
        last, self.previous = now - self.previous, now
        self.done += 1
        return ((self.seconds is not None and now - self.start >= self.seconds)
                or (self.iterations is not None and self.done >= self.iterations)
                or (self.deadline is not None and now + last > self.deadline))


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def episode_metrics(episodes: Sequence[Episode], stats: RolloutStats) -> dict[str, float]:
    """Rewards (total and by component), lengths, throughput, tool tiers and costs of a rollout, and where
    its time went (episodes in flight, generator idle share, tool waits by tier, judge waits, judges in
    flight and the time finished episodes queued for a judge slot)."""
    rewards = [e.reward for e in episodes]
    valid = [r for r in rewards if not math.isnan(r)]
    mean = _nanmean(rewards)
    metrics = {
        "reward": mean,
        "reward_std": (sum((r - mean) ** 2 for r in valid) / len(valid)) ** 0.5 if valid else float("nan"),
        "invalid_episodes": 1.0 - len(valid) / len(episodes),
        "turns": sum(len(e.rewards) for e in episodes) / len(episodes),
        "policy_tokens": sum(e.policy_tokens for e in episodes) / len(episodes),
        "truncated": sum(e.truncated for e in episodes) / len(episodes),
        "gpu_seconds_avoided": sum(e.gpu_seconds for e in episodes),
        "tokens_per_second": sum(e.policy_tokens for e in episodes) / max(stats.wall_seconds, 1e-9),
        "env_steps_per_second": stats.env_steps / max(stats.wall_seconds, 1e-9),
        "time/rollout": stats.wall_seconds,
        "time/generate": stats.generate_seconds,
        "time/env": stats.env_seconds,
        "worker_restarts": float(stats.worker_restarts),
        "episodes_failed": float(stats.episodes_failed),
        "rollout/max_in_flight": float(stats.max_in_flight),
        "time/generator_idle_fraction": stats.generator_idle_fraction,
        "time/generator_drain": stats.drain_seconds,
        "time/judge_wait": stats.judge_seconds,
        "time/judge_queue": stats.judge_queue_seconds,
        "rollout/max_judges_in_flight": float(stats.max_judges_in_flight),
    }
    metrics |= {f"time/tool_wait/{tier}": seconds for tier, seconds in stats.tool_seconds.items()}
    components: dict[str, list[float]] = {}
    for episode in episodes:
        for name, value in episode.components.items():
            if value is not None:
                components.setdefault(name, []).append(float(value))
    metrics |= {f"reward/{name}": _nanmean(values) for name, values in components.items()}
    tiers = Counter()
    for episode in episodes:
        tiers.update(episode.backends)
    total = sum(tiers.values())
    metrics |= {f"tier/{name}": count / total for name, count in tiers.items()}
    return metrics


class WeightsSnapshot:
    """Trainable weights held at one version: what an overlapping :class:`Trainer` gives
    ``Rollout.set_weights`` in place of the policy (the backends read only ``get_weights()``)."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights = weights

    def get_weights(self) -> dict[str, torch.Tensor]:
        return self.weights


class Trainer:
    """Runs iterations of roll out -> update, with weight sync, logging and checkpoints.

    Args:
        policy: the learner's policy.
        algorithm: the update (GRPO or PPO).
        rollout: any :class:`~rl.rollout.Rollout` backend (:class:`~rl.rollout.SerialRollout`,
            :class:`~rl.rollout.RayRollout`).
        iterations: the last iteration (exclusive) to run to; a resumed run continues to it.
        num_groups: tasks per iteration.
        group_size: rollouts per task.
        seed: seeds every iteration's tasks and sampling noise (with the iteration number).
        max_staleness: iterations the rollout workers' weights may lag behind the learner's
            (0: sync before every iteration, exact on-policy).
        overlap: sample iteration ``it + 1`` on a rollout thread while update ``it`` runs. Iteration
            ``it`` is then sampled with weights version ``max(0, it - 1)`` (staleness exactly 1 after the
            first iteration), the update must take the old log-probs from the sampler
            (``algorithm.off_policy``), ``max_staleness`` must be 0, and the rollout must sample with its
            own weights (a :class:`~rl.rollout.SerialRollout` given a copy of the policy, or Ray workers).
            Checkpoints then also hold the sampler's weights, so a resumed run samples what the
            uninterrupted one did. A rollout that streams (``rollout.streams``: a
            :class:`~rl.rollout.SerialRollout` or :class:`~rl.rollout.RayRollout` in async mode) is handed each iteration's specs and weights
            one iteration ahead (:meth:`~rl.rollout.SerialRollout.submit`), so iteration ``it + 1`` starts
            generating as soon as no episode of iteration ``it`` needs a turn (while its last tool calls and
            judges run), with the same weights and so the same episodes; other rollouts sample iteration
            ``it + 1`` on a thread once iteration ``it`` has returned.
        logger: a :class:`~rl.logging.MetricsLogger`, or None.
        checkpoint_dir: where checkpoints go, or None for none.
        checkpoint_every: save every this many iterations (and at the end); 0 only at the end.
        callbacks: :class:`Callback` objects, called in order.
    """

    def __init__(self, policy: TrainablePolicy, algorithm: Algorithm, rollout: Rollout, *, iterations: int,
                 num_groups: int, group_size: int, seed: int = 0, max_staleness: int = 0, overlap: bool = False,
                 logger: Any = None, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
                 callbacks: Sequence[Callback] = ()):
        if overlap:
            _check_overlap(policy, algorithm, rollout, max_staleness)
        self.policy = policy
        self.algorithm = algorithm
        self.rollout = rollout
        self.iterations = iterations
        self.num_groups = num_groups
        self.group_size = group_size
        self.seed = seed
        self.max_staleness = max_staleness
        self.overlap = overlap
        self.logger = logger
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.callbacks = list(callbacks)
        self.iteration = 0
        self.synced_version: int | None = None
        self.sampler: tuple[dict[str, torch.Tensor], int] | None = None
        """With overlap: the weights the rollout samples the next iteration with, and their version."""
        self.queued: dict[int, tuple[Future, dict[str, torch.Tensor], int]] = {}
        """(streaming overlap) Rollouts queued on the rollout, by iteration: future, weights, version."""
        self.finished: dict[Future, float] = {}
        """(streaming overlap) When each queued rollout finished."""

    def save(self) -> str:
        """Write a checkpoint of the current iteration; returns its folder."""
        path = os.path.join(self.checkpoint_dir, f"iter_{self.iteration:06d}")
        checkpoint.save(path, self.policy, self.algorithm.state_dict(), self.iteration,
                        sampler=self.sampler if self.overlap else None)
        return path

    def resume(self, path: str) -> None:
        """Continue from a checkpoint folder: weights, optimizer and iteration are restored (with overlap,
        the sampler's weights too; a checkpoint without them samples its first iteration with its weights)."""
        state, self.iteration = checkpoint.load(path, self.policy)
        self.algorithm.load_state_dict(state)
        self.sampler = checkpoint.load_sampler(path) if self.overlap else None
        self.synced_version = None

    def _specs(self, iteration: int):
        return make_specs(self.seed, iteration, self.num_groups, self.group_size)

    def _sample(self, iteration: int) -> tuple[list[Episode], RolloutStats, float]:
        """Sample ``iteration`` with the weights synced so far; also returns when it finished."""
        episodes, stats = self.rollout.sample(self._specs(iteration))
        return episodes, stats, time.perf_counter()

    def _sync(self, iteration: int) -> None:
        """Give the rollout the weights that sample ``iteration`` (unless it holds them already)."""
        if not self.overlap:
            if self.synced_version is None or iteration - self.synced_version > self.max_staleness:
                self.rollout.set_weights(self.policy, iteration)
                self.synced_version = iteration
            return
        if self.sampler is None:  # the first iteration of a run: the learner's weights
            self.sampler = (self.policy.get_weights(), iteration)
        weights, version = self.sampler
        if self.synced_version != version:
            self.rollout.set_weights(WeightsSnapshot(weights), version)
            self.synced_version = version

    def _streamed(self, iteration: int, weights: dict[str, torch.Tensor], version: int) -> None:
        """(streaming overlap) Queue ``iteration``'s rollout with the weights of ``version``."""
        if iteration < self.iterations:
            future = self.rollout.submit(self._specs(iteration), version, weights)
            future.add_done_callback(lambda f: self.finished.setdefault(f, time.perf_counter()))
            self.queued[iteration] = (future, weights, version)

    def run(self) -> list[dict[str, float]]:
        """Train to ``iterations``; returns the metrics of every iteration run."""
        history: list[dict[str, float]] = []
        for callback in self.callbacks:
            callback.on_start(self)
        stream = self.overlap and getattr(self.rollout, "streams", False)
        background = ThreadPoolExecutor(1, thread_name_prefix="rollout") if self.overlap and not stream else None
        pending: Future | None = None  # the next iteration's rollout, running while this update runs
        self.queued, self.finished = {}, {}
        if stream and self.iteration < self.iterations:  # the first two iterations go at once (see _streamed)
            if self.sampler is None:  # the first iteration of a run: the learner's weights
                self.sampler = (self.policy.get_weights(), self.iteration)
            self._streamed(self.iteration, *self.sampler)
            self._streamed(self.iteration + 1, self.policy.get_weights(), self.iteration)
        try:
            while self.iteration < self.iterations:
                it = self.iteration
                begun = time.perf_counter()
                if stream:
                    episodes, stats = self.queued.pop(it)[0].result()
                    pending = self.queued[it + 1][0] if it + 1 in self.queued else None
                elif pending is None:
                    self._sync(it)
                    episodes, stats, _ = self._sample(it)
                else:
                    episodes, stats, _ = pending.result()
                    pending = None
                waited = time.perf_counter() - begun
                for callback in self.callbacks:
                    callback.on_rollout_end(it, episodes, stats)
                if stream:
                    if it + 1 in self.queued:
                        self.sampler = self.queued[it + 1][1:]  # version it samples iteration it + 1
                elif self.overlap:
                    if self.sampler is None or self.sampler[1] != it:
                        self.sampler = (self.policy.get_weights(), it)  # version it samples iteration it + 1
                    if it + 1 < self.iterations:
                        self._sync(it + 1)
                        pending = background.submit(self._sample, it + 1)
                start = time.perf_counter()
                metrics = self.algorithm.update(episodes, it)
                end = time.perf_counter()
                hidden = 0.0
                if pending is not None:  # the share of the update during which the next rollout ran
                    if stream:
                        finished = self.finished.get(pending, end) if pending.done() else end
                    else:
                        finished = pending.result()[2] if pending.done() else end
                    hidden = min(1.0, max(0.0, (finished - start) / max(end - start, 1e-9)))
                if stream:  # the weights after update it sample iteration it + 2
                    self._streamed(it + 2, self.policy.get_weights(), it + 1)
                metrics |= {"time/update": end - start, "time/update_hidden": hidden, "time/rollout_wait": waited,
                            "time/iteration": end - begun}
                metrics |= episode_metrics(episodes, stats)
                lags = [it - e.weight_version for e in episodes]
                metrics |= {"rollout/staleness_mean": sum(lags) / len(lags), "rollout/staleness_max": float(max(lags))}
                history.append(metrics)
                self.iteration = it + 1
                if self.logger is not None:
                    self.logger.log(it, metrics)
                stop = any([callback.on_step(it, metrics) for callback in self.callbacks])
                due = self.checkpoint_every and self.iteration % self.checkpoint_every == 0
                if self.checkpoint_dir and (stop or due or self.iteration == self.iterations):
                    self.save()
                if stop:
                    break
        finally:
            if background is not None:  # a rollout left running (training stopped or failed) ends, unused
                background.shutdown(wait=True)
            for future, _, _ in self.queued.values():  # streamed: those not begun are dropped, the rest end
                if not future.cancel():
                    futures.wait([future])
            self.queued, self.finished = {}, {}
        for callback in self.callbacks:
            callback.on_end(history)
        return history


def _check_overlap(policy: TrainablePolicy, algorithm: Algorithm, rollout: Rollout, max_staleness: int) -> None:
    """Refuse what overlapping rollout and update cannot do correctly (see ``Trainer``'s ``overlap``)."""
    if max_staleness:
        raise ConfigError(f"max_staleness ({max_staleness}) must be 0 with overlap: overlap already samples each "
                          "iteration with the weights one update behind the learner. Set max_staleness to 0.")
    if not algorithm.off_policy:
        raise ConfigError(f"overlap samples each iteration with the weights one update behind the learner, so the "
                          f"update must take the old log-probs from the sampler, and {type(algorithm).__name__} "
                          "does not (off_policy False). Use GRPO with GRPOConfig(off_policy=True) "
                          "(grpo.off_policy: true), or overlap off.")
    if isinstance(rollout, SerialRollout) and rollout.policy is policy:
        raise ConfigError("overlap needs a rollout that samples with its own copy of the weights, but this "
                          "SerialRollout samples with the learner's policy object, which the update changes while "
                          "the next rollout runs. Build it with a copy: SerialRollout(copy.deepcopy(policy), ...) "
                          "(RolloutConfig.build does this when overlap is on).")
