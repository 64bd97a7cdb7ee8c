"""One rollout contract, two backends: serial (the debugging twin) and Ray (rollout worker actors).

A rollout turns :class:`EpisodeSpec` (which task, which sampling seed) into :class:`Episode`
(token-level segments, per-turn rewards, reward components). Both backends run the same loop,
:func:`run_episodes`, over a pool of environments: the serial backend in this process with the
learner's own policy, the Ray backend inside :class:`RolloutWorker` actors, each holding a policy
copy and ``envs_per_worker`` environments. Because a sample depends only on its spec's seeds and the
weights, both backends return the same episodes for the same specs.

GRPO groups are ``group_size`` consecutive specs with the same ``task_seed``. Ray chunks keep a group
on one worker (``placement="colocate"``) or spread its members over chunks (``"spread"``).

Fault tolerance (Ray): a chunk whose worker dies is re-run on a fresh worker that first receives the
current weights; results are keyed by ``episode_id`` and each is accepted once, so no episode is lost
or counted twice.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from rl.policy import POLICY, Conversation, Policy, Segment


@dataclass(frozen=True)
class EpisodeSpec:
    """What one episode is: the task (by reset seed) and the policy's sampling seed.

    Attributes:
        episode_id: unique within an iteration; results are returned in this order.
        task_seed: ``env.reset(seed=task_seed)``; all members of a GRPO group share it.
        sample_seed: seeds the policy's sampling noise for this episode.
        group: the GRPO group (the task's index in the iteration).
    """

    episode_id: int
    task_seed: int
    sample_seed: int
    group: int


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


@dataclass
class RolloutStats:
    """Where a rollout's time went. Seconds of generation and env are summed over workers."""

    wall_seconds: float = 0.0
    generate_seconds: float = 0.0
    env_seconds: float = 0.0
    env_steps: int = 0
    worker_restarts: int = 0

    def add(self, other: "RolloutStats") -> None:
        self.generate_seconds += other.generate_seconds
        self.env_seconds += other.env_seconds
        self.env_steps += other.env_steps


def run_episodes(policy: Policy, envs: Sequence[Any], specs: Sequence[EpisodeSpec],
                 weight_version: int = 0) -> tuple[list[Episode], RolloutStats]:
    """Play ``specs`` to the end with a pool of environments, one batched ``generate`` per step.

    A finished episode frees its environment for the next spec, so multi-turn batches stay full.
    """
    stats = RolloutStats()
    queue = deque(specs)
    free = list(envs)
    active: list[tuple[Any, EpisodeSpec, Conversation, list[float], dict[str, Any]]] = []
    done: dict[int, Episode] = {}
    while queue or active:
        while queue and free:
            env, spec = free.pop(), queue.popleft()
            start = time.perf_counter()
            observation, _ = env.reset(seed=spec.task_seed)
            stats.env_seconds += time.perf_counter() - start
            conv = Conversation(seed=spec.sample_seed)
            conv.segments.append(policy.encode(observation, first=True))
            active.append((env, spec, conv, [], {"backends": Counter(), "gpu_seconds": 0.0}))
        start = time.perf_counter()
        turns = policy.generate([a[2] for a in active])
        stats.generate_seconds += time.perf_counter() - start
        still = []
        for (env, spec, conv, rewards, extra), turn in zip(active, turns):
            conv.segments.append(turn)
            start = time.perf_counter()
            observation, reward, terminated, truncated, info = env.step(turn.text)
            stats.env_seconds += time.perf_counter() - start
            stats.env_steps += 1
            rewards.append(float(reward))
            if info.get("tool_result"):
                extra["backends"][info["tool_result"]["backend"]] += 1
            if terminated or truncated:
                done[spec.episode_id] = Episode(
                    spec, conv.segments, rewards, dict(info.get("reward_components", {})), bool(terminated),
                    bool(truncated), dict(extra["backends"]),
                    float(info.get("cost", {}).get("episode_gpu_seconds_avoided", 0.0)), weight_version)
                free.append(env)
            else:
                start = time.perf_counter()
                conv.segments.append(policy.encode(observation, first=False))
                stats.env_seconds += time.perf_counter() - start
                still.append((env, spec, conv, rewards, extra))
        active = still
    return [done[spec.episode_id] for spec in specs], stats


class SerialRollout:
    """Runs episodes in this process with the learner's own policy (always the latest weights).

    Args:
        policy: the policy (the learner's object itself; nothing is copied).
        make_env: a zero-argument callable returning a gymnasium environment.
        num_envs: environments in the pool: the batch size of each ``generate``.
    """

    def __init__(self, policy: Policy, make_env: Callable[[], Any], num_envs: int):
        if num_envs < 1:
            raise ValueError(f"num_envs ({num_envs}) must be at least 1.")
        self.policy = policy
        self.envs = [make_env() for _ in range(num_envs)]
        self.weight_version = 0

    def set_weights(self, weights: dict[str, torch.Tensor] | None, version: int) -> None:
        """Record the version; the serial backend shares the learner's weights already."""
        self.weight_version = version

    def sample(self, specs: Sequence[EpisodeSpec]) -> tuple[list[Episode], RolloutStats]:
        start = time.perf_counter()
        episodes, stats = run_episodes(self.policy, self.envs, specs, self.weight_version)
        stats.wall_seconds = time.perf_counter() - start
        return episodes, stats

    def close(self) -> None:
        for env in self.envs:
            env.close()


class RolloutWorker:
    """A Ray actor's body: a policy copy and a pool of environments.

    Args:
        make_policy: zero-argument callable building the policy (weights come by :meth:`set_weights`).
        make_env: zero-argument callable building one environment.
        num_envs: environments in the pool.
        torch_threads: intra-op threads for this worker's torch (1 avoids oversubscription).
    """

    def __init__(self, make_policy: Callable[[], Policy], make_env: Callable[[], Any], num_envs: int,
                 torch_threads: int):
        torch.set_num_threads(torch_threads)
        self.policy = make_policy()
        self.envs = [make_env() for _ in range(num_envs)]
        self.weight_version = -1

    def set_weights(self, weights: dict[str, torch.Tensor], version: int) -> int:
        self.policy.set_weights(weights)
        self.weight_version = version
        return version

    def sample(self, specs: Sequence[EpisodeSpec]) -> tuple[list[Episode], RolloutStats]:
        return run_episodes(self.policy, self.envs, specs, self.weight_version)

    def pid(self) -> int:
        return os.getpid()


class RayRollout:
    """Runs episodes in Ray actors; the same results as :class:`SerialRollout` for the same specs.

    Ray must be initialised (``ray.init()``, or ``ray.init(address="auto")`` to join a cluster)
    before this is built. Workers ask for ``num_cpus`` / ``num_gpus`` each; chunks of
    ``envs_per_worker`` episodes go to whichever worker is free.

    Args:
        make_policy: picklable zero-argument callable that builds the policy in a worker.
        make_env: picklable zero-argument callable that builds one environment.
        num_workers: rollout worker actors.
        envs_per_worker: environments per worker, and episodes per chunk.
        placement: ``"colocate"`` (a chunk holds whole GRPO groups, in order) or ``"spread"`` (the
            members of a group go to different chunks).
        num_cpus: CPUs each worker reserves (fractions allowed).
        num_gpus: GPUs each worker reserves (fractions allowed; 0 on CPU-only machines).
        torch_threads: torch threads inside each worker.
        max_restarts: worker deaths tolerated in one ``sample`` call before it gives up.
    """

    def __init__(self, make_policy: Callable[[], Policy], make_env: Callable[[], Any], num_workers: int,
                 envs_per_worker: int, placement: str = "colocate", num_cpus: float = 1.0,
                 num_gpus: float = 0.0, torch_threads: int = 1, max_restarts: int = 3):
        import ray

        if num_workers < 1 or envs_per_worker < 1:
            raise ValueError(f"num_workers ({num_workers}) and envs_per_worker ({envs_per_worker}) must be >= 1.")
        if placement not in ("colocate", "spread"):
            raise ValueError(f"placement ({placement!r}) must be 'colocate' or 'spread'.")
        if not ray.is_initialized():
            raise RuntimeError("RayRollout needs Ray running: call ray.init() (or ray.init(address='auto') "
                               "to join a cluster) first.")
        available = ray.cluster_resources()
        if num_workers * num_cpus > available.get("CPU", 0) or num_workers * num_gpus > available.get("GPU", 0):
            raise ValueError(f"{num_workers} workers x (num_cpus {num_cpus}, num_gpus {num_gpus}) exceed the "
                             f"cluster's CPU {available.get('CPU', 0)} / GPU {available.get('GPU', 0)}: "
                             "lower num_workers or the per-worker resources.")
        self._ray = ray
        self._actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(RolloutWorker)
        self._args = (make_policy, make_env, envs_per_worker, torch_threads)
        self.envs_per_worker = envs_per_worker
        self.placement = placement
        self.max_restarts = max_restarts
        self.workers = [self._actor.remote(*self._args) for _ in range(num_workers)]
        self._weights: tuple[Any, int] | None = None

    def set_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Ship ``weights`` to every worker through the object store (one copy, shared by all)."""
        ref = self._ray.put(weights)
        self._weights = (ref, version)
        self._ray.get([w.set_weights.remote(ref, version) for w in self.workers])

    def _chunks(self, specs: Sequence[EpisodeSpec]) -> list[list[EpisodeSpec]]:
        size = self.envs_per_worker
        if self.placement == "colocate":
            return [list(specs[i:i + size]) for i in range(0, len(specs), size)]
        count = -(-len(specs) // size)
        return [list(specs[j::count]) for j in range(count)]

    def _replace(self, index: int) -> None:
        self._ray.kill(self.workers[index])
        self.workers[index] = self._actor.remote(*self._args)
        if self._weights is not None:
            self._ray.get(self.workers[index].set_weights.remote(*self._weights))

    def sample(self, specs: Sequence[EpisodeSpec]) -> tuple[list[Episode], RolloutStats]:
        from ray.exceptions import RayActorError

        start = time.perf_counter()
        stats = RolloutStats()
        pending = deque(self._chunks(specs))
        running: dict[Any, tuple[int, list[EpisodeSpec]]] = {}
        results: dict[int, Episode] = {}

        def submit(index: int) -> None:
            chunk = pending.popleft()
            running[self.workers[index].sample.remote(chunk)] = (index, chunk)

        for index in range(min(len(self.workers), len(pending))):
            submit(index)
        while running:
            [ref], _ = self._ray.wait(list(running), num_returns=1)
            index, chunk = running.pop(ref)
            try:
                episodes, chunk_stats = self._ray.get(ref)
            except RayActorError:
                stats.worker_restarts += 1
                if stats.worker_restarts > self.max_restarts:
                    raise RuntimeError(f"Rollout workers died {stats.worker_restarts} times in one iteration "
                                       f"(max_restarts={self.max_restarts}); see the Ray logs.") from None
                self._replace(index)
                pending.appendleft(chunk)
            else:
                stats.add(chunk_stats)
                for episode in episodes:
                    if episode.spec.episode_id in results:
                        raise RuntimeError(f"Episode {episode.spec.episode_id} came back twice.")
                    results[episode.spec.episode_id] = episode
            if pending:
                submit(index)
        stats.wall_seconds = time.perf_counter() - start
        return [results[spec.episode_id] for spec in specs], stats

    def worker_pids(self) -> list[int]:
        return self._ray.get([w.pid.remote() for w in self.workers])

    def close(self) -> None:
        for worker in self.workers:
            self._ray.kill(worker)
        self.workers = []
