"""One rollout contract, two backends: serial (the debugging twin, here) and Ray (rollout worker actors,
:mod:`rl.ray_rollout`).

A rollout turns :class:`~rl.episodes.EpisodeSpec` (which task, which sampling seed) into
:class:`~rl.episodes.Episode` (token-level segments, per-turn rewards, reward components). Both backends
run the same loop, :func:`~rl.runner.run_episodes` (:mod:`rl.runner`), over a pool of environments: the
serial backend in this process with the learner's own policy, the Ray backend inside
:class:`~rl.ray_rollout.RolloutWorker` actors, each holding a policy copy and ``envs_per_worker``
environments. Because a sample depends only on its spec's seeds and the weights, both backends return
the same episodes for the same specs, in either mode of the runner (``"sync"``, ``"async"``).

GRPO groups are ``group_size`` consecutive specs with the same ``task_seed``. Ray chunks keep a group
on one worker (``placement="colocate"``) or spread its members over chunks (``"spread"``).

Fault tolerance: an environment that raises fails its episode only, never the rollout (see
:mod:`rl.runner`). A Ray worker that dies at any moment (sampling, idle, receiving weights) is replaced
by a fresh worker that gets the current weights, and its chunks re-run there; results are keyed by
``episode_id`` and each is accepted once, so no episode is lost or counted twice.

Every backend implements :class:`Rollout` (``set_weights``, ``sample``, ``close``), all that
:class:`~rl.train.Trainer` uses. In async mode both also stream (``streams``, ``submit``): the serial
backend keeps one :class:`~rl.runner.EpisodeStream` and takes batches one ahead with the weights that
sample them; the Ray backend's dispatcher hands each worker up to :data:`~rl.ray_rollout.STREAM_DEPTH`
chunks, which the worker plays on its own stream. A :class:`~rl.train.Trainer` with ``overlap`` feeds
them so: the next iteration generates while the current one's last episodes are scored.

The names of :mod:`rl.episodes`, :mod:`rl.runner` and :mod:`rl.ray_rollout` are importable from here too.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from rl.episodes import MAX_CONCURRENT_JUDGES, MODES, Episode, EpisodeSpec, Finish, RolloutStats, make_specs
from rl.errors import ConfigError
from rl.policy import Policy, TrainablePolicy
from rl.ray_rollout import STREAM_DEPTH, RayRollout, RolloutWorker, check_chunk_timeout, check_cluster_fits
from rl.runner import EpisodeStream, _check_judges, _check_mode, _check_step_timeout, run_episodes

__all__ = ["MAX_CONCURRENT_JUDGES", "MODES", "STREAM_DEPTH", "Episode", "EpisodeSpec", "EpisodeStream", "Finish",
           "RayRollout", "Rollout", "RolloutStats", "RolloutWorker", "SerialRollout", "check_chunk_timeout",
           "check_cluster_fits", "make_specs", "run_episodes"]


@runtime_checkable
class Rollout(Protocol):
    """What :class:`~rl.train.Trainer` needs from a rollout backend (:class:`SerialRollout`,
    :class:`RayRollout`, or a user's own).
    """

    def set_weights(self, policy: TrainablePolicy, version: int) -> None:
        """Make the samplers use ``policy``'s current weights, recorded as ``version`` on the episodes.

        A backend that samples with the learner's own policy object copies nothing."""
        ...

    def sample(self, specs: Sequence[EpisodeSpec]) -> tuple[list[Episode], RolloutStats]:
        """Play ``specs``: the episodes in spec order, each exactly once, and where the time went."""
        ...

    def close(self) -> None:
        """Release environments and workers."""
        ...


class SerialRollout:
    """Runs episodes in this process with the learner's own policy (always the latest weights).

    In async mode the episodes run on an :class:`EpisodeStream` (one async loop on its own thread, its
    pools and engine kept between calls), and :meth:`submit` queues a batch with its own weights: what a
    :class:`~rl.train.Trainer` with ``overlap`` uses to start the next iteration while the current one
    is being scored (``streams`` is True).

    Args:
        policy: the policy (the learner's object itself; nothing is copied).
        make_env: a zero-argument callable returning a gymnasium environment.
        num_envs: environments in the pool: the batch size of each ``generate``.
        finish: the runner's end-of-episode hook (see :func:`run_episodes`), or None.
        mode: the runner's mode, ``"sync"`` or ``"async"`` (see :func:`run_episodes`).
        max_concurrent_judges: (async) the runner's judge pool (see :func:`run_episodes`).
        step_timeout_s: (async) the runner's limit on one env call or deferred score (see
            :func:`run_episodes`); an environment it retires is replaced by a fresh one.
    """

    def __init__(self, policy: Policy, make_env: Callable[[], Any], num_envs: int, finish: Finish | None = None,
                 mode: str = "sync", max_concurrent_judges: int = MAX_CONCURRENT_JUDGES,
                 step_timeout_s: float | None = None):
        if num_envs < 1:
            raise ConfigError(f"num_envs ({num_envs}) must be at least 1.")
        _check_mode(mode)
        _check_judges(max_concurrent_judges)
        _check_step_timeout(step_timeout_s, mode)
        self.policy = policy
        self.make_env = make_env
        self.envs = [make_env() for _ in range(num_envs)]
        self.finish = finish
        self.mode = mode
        self.max_concurrent_judges = max_concurrent_judges
        self.step_timeout_s = step_timeout_s
        self.weight_version = 0
        self._stream: EpisodeStream | None = None

    @property
    def streams(self) -> bool:
        """Whether :meth:`submit` can queue batches (async mode)."""
        return self.mode == "async"

    def set_weights(self, policy: TrainablePolicy, version: int) -> None:
        """Record the version; copy ``policy``'s weights only when it is not this rollout's own policy."""
        if policy is not self.policy:
            self.policy.set_weights(policy.get_weights())
        self.weight_version = version

    def sample(self, specs: Sequence[EpisodeSpec]) -> tuple[list[Episode], RolloutStats]:
        if self.streams:
            return self.submit(specs, self.weight_version).result()
        start = time.perf_counter()
        episodes, stats = run_episodes(self.policy, self.envs, specs, self.weight_version, self.finish, self.mode,
                                       self.max_concurrent_judges)
        stats.wall_seconds = time.perf_counter() - start
        return episodes, stats

    def submit(self, specs: Sequence[EpisodeSpec], version: int,
               weights: dict[str, torch.Tensor] | None = None) -> Future:
        """(async mode) Queue a batch on the stream: a future of ``(episodes, stats)``, played after the
        batches queued before it (see :meth:`EpisodeStream.submit`); ``weights`` are set on this rollout's
        policy when its episodes begin generating, so with weights give the rollout its own copy of the
        policy."""
        if not self.streams:
            raise ConfigError("SerialRollout.submit needs mode 'async' (the sync loop plays one batch per call).")
        if self._stream is None:
            self._stream = EpisodeStream(self.policy, self.envs, self.finish, self.max_concurrent_judges,
                                         self.step_timeout_s, self._fresh_env)
        return self._stream.submit(specs, version, weights)

    def _fresh_env(self) -> Any:
        """An environment in place of one retired by ``step_timeout_s`` (closed with the rest)."""
        env = self.make_env()
        self.envs.append(env)
        return env

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        for env in self.envs:
            env.close()
