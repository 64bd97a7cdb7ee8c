"""One rollout contract, two backends: serial (the debugging twin) and Ray (rollout worker actors).

A rollout turns :class:`EpisodeSpec` (which task, which sampling seed) into :class:`Episode`
(token-level segments, per-turn rewards, reward components). Both backends run the same loop,
:func:`run_episodes`, over a pool of environments: the serial backend in this process with the
learner's own policy, the Ray backend inside :class:`RolloutWorker` actors, each holding a policy
copy and ``envs_per_worker`` environments. Because a sample depends only on its spec's seeds and the
weights, both backends return the same episodes for the same specs.

GRPO groups are ``group_size`` consecutive specs with the same ``task_seed``. Ray chunks keep a group
on one worker (``placement="colocate"``) or spread its members over chunks (``"spread"``).

Fault tolerance: an environment that raises fails its episode only (``Episode.error``, counted in
``RolloutStats.episodes_failed``), never the rollout; so does a policy turn the policy could not
produce (``Segment.error``: an API endpoint that kept failing). A Ray worker that dies at any moment (sampling,
idle, receiving weights) is replaced by a fresh worker that first receives the current weights, and
its chunk is re-run there; results are keyed by ``episode_id`` and each is accepted once, so no
episode is lost or counted twice.

Every backend implements :class:`Rollout` (``set_weights``, ``sample``, ``close``), all that
:class:`~rl.train.Trainer` uses. The loop keeps each live episode as its own small state
(``_Live``: reset, step with a sampled turn, observe), and runs in one of two modes (:data:`MODES`):

* ``"sync"`` (the default): one batched ``generate`` for all live episodes, then their env steps
  one after another;
* ``"async"``: env steps (tool calls, the episode-end judge) run on a thread pool, one thread per
  environment, while the policy generates for whichever episodes are ready: a text
  :class:`~rl.hf.CausalLMPolicy` (``engine_served``) through an in-process
  :class:`~rl.engine.hf.HFEngine` (continuous batching: a turn joins the running batch at its next
  decode step, KV caches kept between turns),
  any other policy by batching the episodes that became ready while the previous ``generate`` ran.
  Episodes finish in any order; a sample depends only on its seeds and the weights, so both modes
  return the same episodes for the same specs. Judges are off the hot path too: an environment that
  can defer its end-of-episode scoring (:class:`~visenv.envs.base.DeferredScoring`, e.g.
  :class:`~visenv.envs.visgen.VisGenEnv`) hands the finished episode's score (the rubric and its
  LLM/VLM judges) to a pool of ``max_concurrent_judges`` threads and takes the next spec at once;
  the rewards, their None policy and the judges' caches are the rubric's, as in ``env.step``.

Streaming: in async mode the serial backend keeps one loop running on its own thread
(:class:`EpisodeStream`) and takes batches one ahead (:meth:`SerialRollout.submit`, with the weights
that sample them): the next batch's episodes reset as environments free up and generate as soon as no
episode of the batch before can ask for another turn, i.e. while its last episodes are being scored.
A :class:`~rl.train.Trainer` with ``overlap`` feeds it so; the episodes are those of one call per batch.
The Ray backend does the same on every worker (:meth:`RayRollout.submit`): a dispatcher thread hands
each worker up to :data:`STREAM_DEPTH` chunks, which the worker plays on its own stream.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import gymnasium
import torch

from rl.errors import ConfigError, RolloutError
from rl.policy import POLICY, Conversation, Policy, Segment, TrainablePolicy


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


@dataclass
class _Live:
    """One episode in play: its environment, conversation and what it has gathered so far.

    :meth:`reset` and :meth:`step` touch only this episode (the async loop runs them on env threads),
    :meth:`judge` runs its deferred score (on a judge thread); :meth:`observe` encodes an observation
    with the policy (always on the loop's thread). Each returns the next observation while the episode
    goes on, or the finished (or failed) :class:`Episode`; :meth:`step` of an env that deferred its
    scoring returns the pending score (``ending`` is then set).
    """

    env: Any
    spec: EpisodeSpec
    conversation: Conversation
    weight_version: int
    rewards: list[float] = field(default_factory=list)
    steps: list[tuple[dict[str, Any], float, dict[str, Any]]] = field(default_factory=list)
    backends: Counter = field(default_factory=Counter)
    stats: RolloutStats = field(default_factory=RolloutStats)
    """This episode's env time and steps, added to the runner's when it ends."""
    ending: tuple[Any, bool, bool, float] | None = None
    """The last step awaiting its deferred score: ``(observation, terminated, truncated, step seconds)``."""
    judge_span: tuple[float, float] | None = None
    """When the episode's end was scored (its ending env step, or its deferred score)."""
    released: bool = False
    """The environment went back to the pool before the episode was booked (its score was deferred)."""
    batch: Any = None
    """The runner's batch the episode belongs to."""

    def reset(self) -> dict[str, Any] | Episode:
        """Reset the environment: the first observation, or the failed episode if the env raises."""
        start = time.perf_counter()
        options = None if self.spec.task is None else {"task": self.spec.task}
        try:
            observation, _ = self.env.reset(seed=self.spec.task_seed, options=options)
        except Exception as error:  # the env's failure ends this episode, not the rollout
            return self._failed(f"{type(error).__name__}: {error}", start)
        self.stats.env_seconds += time.perf_counter() - start
        return observation

    def step(self, turn: Segment, finish: Finish | None) -> Any:
        """Step the environment with ``turn`` (already in the conversation): the next observation, the
        finished episode when it ended (or the env raised), or the env's pending score when it deferred
        the scoring of the episode's end (see :meth:`judge`)."""
        start = time.perf_counter()
        if turn.error is not None:  # the policy gave up on this turn: the episode fails, the env is not stepped
            return self._failed(f"PolicyError: {turn.error}", start)  # rl.api.POLICY_ERROR
        try:
            observation, reward, terminated, truncated, info = self.env.step(turn.text)
            pending = self.env.unwrapped.detach_pending_score() if info.get("reward_pending") else None
        except Exception as error:
            return self._failed(f"{type(error).__name__}: {error}", start)
        end = time.perf_counter()
        if pending is not None:
            self.ending = (observation, bool(terminated), bool(truncated), end - start)
            return pending
        if terminated or truncated:
            self.judge_span = (start, end)
        return self._record(observation, reward, terminated, truncated, info, end - start, finish)

    def judge(self, pending: Any, finish: Finish | None, queued: float) -> Episode:
        """Run the deferred score of the episode's last step and finish the episode as :meth:`step`
        would have (the same reward and info); a score that raises fails the episode, as an env step
        that raises does. ``queued``: when the score was handed to the judge pool."""
        start = time.perf_counter()
        self.stats.judge_queue_seconds += start - queued
        observation, terminated, truncated, step_seconds = self.ending
        try:
            reward, info = pending.run()
        except Exception as error:  # a failing judge ends this episode, not the rollout
            self.judge_span = (start, time.perf_counter())
            self.stats.env_seconds += step_seconds
            return self._failed(f"{type(error).__name__}: {error}", start)
        self.judge_span = (start, time.perf_counter())
        return self._record(observation, reward, terminated, truncated, info,
                            step_seconds + self.judge_span[1] - start, finish)

    def _record(self, observation: Any, reward: float, terminated: bool, truncated: bool, info: dict[str, Any],
                elapsed: float, finish: Finish | None) -> Any:
        """Book a step that took ``elapsed`` seconds: the next observation, or the finished episode."""
        stats = self.stats
        stats.env_seconds += elapsed
        stats.env_steps += 1
        self.rewards.append(float(reward))
        self.steps.append((observation, float(reward), info))
        tier = info["tool_result"]["backend"] if info.get("tool_result") else None
        if tier is not None:
            self.backends[tier] += 1
        if terminated or truncated:
            stats.judge_seconds += elapsed
            avoided = float(info.get("cost", {}).get("episode_gpu_seconds_avoided", 0.0))
            episode = Episode(self.spec, self.conversation.segments, self.rewards,
                              dict(info.get("reward_components", {})), bool(terminated), bool(truncated),
                              dict(self.backends), avoided, self.weight_version)
            if finish is not None:
                episode.extra = finish(self.env, episode, self.steps)
            return episode
        if tier is not None:
            tier = tier or "refused"  # no tier answered (an invalid call)
            stats.tool_seconds[tier] = stats.tool_seconds.get(tier, 0.0) + elapsed
        return observation

    def observe(self, policy: Policy, observation: dict[str, Any]) -> None:
        """Append the encoded observation: the episode's turn is ready to generate."""
        start = time.perf_counter()
        self.conversation.segments.append(policy.encode(observation, first=not self.conversation.segments))
        self.stats.env_seconds += time.perf_counter() - start

    def _failed(self, error: str, start: float) -> Episode:
        self.stats.env_seconds += time.perf_counter() - start
        self.stats.episodes_failed += 1
        return Episode(self.spec, self.conversation.segments, self.rewards + [float("nan")], {}, False, False,
                       dict(self.backends), weight_version=self.weight_version,
                       error=error)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode ({mode!r}) must be one of {MODES}: 'sync' (the default) or 'async' (env steps "
                          "on threads, generation never waiting for them).")


def _check_judges(max_concurrent_judges: int) -> None:
    if isinstance(max_concurrent_judges, bool) or not isinstance(max_concurrent_judges, int) \
            or max_concurrent_judges < 0:
        raise ConfigError(f"max_concurrent_judges ({max_concurrent_judges!r}) must be an int >= 0: the size of "
                          f"the async loop's judge pool (default {MAX_CONCURRENT_JUDGES}; 0 scores each episode "
                          "inside its env's last step).")


def _defers_scoring(env: Any) -> bool:
    """Whether ``env`` can hand over its end-of-episode scoring: its base implements
    :class:`~visenv.envs.base.DeferredScoring` and no wrapper between sees the rewards (only
    gymnasium's order, checker and time-limit wrappers, which pass them through, are allowed)."""
    from gymnasium.wrappers import OrderEnforcing, PassiveEnvChecker, TimeLimit

    from visenv.envs.base import DeferredScoring

    while isinstance(env, gymnasium.Wrapper):
        if type(env) not in (OrderEnforcing, PassiveEnvChecker, TimeLimit):
            return False
        env = env.env
    return isinstance(env, DeferredScoring)


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most ``(start, end)`` intervals that overlap at any moment."""
    events = sorted([(end, -1) for _, end in intervals] + [(begin, 1) for begin, _ in intervals])
    most = count = 0
    for _, change in events:
        count += change
        most = max(most, count)
    return most


class _BatchGenerator:
    """``policy.generate`` on its own thread, one batch at a time: the episodes that become ready while
    a batch runs wait for the next one (any policy)."""

    continuous = False

    def __init__(self, policy: Policy):
        self.policy = policy
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="generate")

    def submit(self, lives: list[_Live]) -> list[tuple[Future, list[_Live]]]:
        return [(self._thread.submit(self.policy.generate, [live.conversation for live in lives]), lives)]

    def turns(self, result: list[Segment], lives: list[_Live]) -> list[Segment]:
        return result

    def end(self, live: _Live) -> None:
        """The episode is over (nothing to forget)."""

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)


class _EngineGenerator:
    """A :class:`~rl.hf.CausalLMPolicy` (``engine_served``) through an :class:`~rl.engine.hf.HFEngine`
    on the same model: each turn is a request that joins the running batch at its next decode step,
    each episode is a session (its KV cache kept between turns), and the policy's ``engine_turn``
    makes the sampled tokens its turn."""

    continuous = True

    def __init__(self, policy: Policy, rows: int):
        from rl.engine.hf import HFEngine, HFEngineConfig

        self.policy = policy
        self.engine = HFEngine.from_policy(policy, HFEngineConfig(max_batch_size=rows, max_sessions=rows))

    def submit(self, lives: list[_Live]) -> list[tuple[Future, list[_Live]]]:
        from rl.engine.hf import turn_request

        return [(self.engine.submit(turn_request(self.policy, live.conversation, session=self._session(live))),
                 [live]) for live in lives]

    def turns(self, result, lives: list[_Live]) -> list[Segment]:
        return [self.policy.engine_turn(lives[0].conversation, result)]

    def end(self, live: _Live) -> None:
        self.engine.end_session(self._session(live))

    @staticmethod
    def _session(live: _Live) -> str:
        return str(live.spec.episode_id)

    def close(self) -> None:
        self.engine.close()


def _generator(policy: Policy, rows: int) -> _BatchGenerator | _EngineGenerator:
    """The engine for a CausalLMPolicy that it serves (``engine_served``: text models; the vision
    policies keep their own ``generate``), batches of ``generate`` for any other policy."""
    from rl.hf import CausalLMPolicy

    served = isinstance(policy, CausalLMPolicy) and policy.engine_served
    return _EngineGenerator(policy, rows) if served else _BatchGenerator(policy)


class _BusyClock:
    """The generator's busy time: how long at least one generation call was open (calls begin on the
    loop's thread and end on the generator's)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open = 0
        self._since = 0.0
        self._total = 0.0
        self._idle_since: float | None = None

    def begin(self) -> None:
        with self._lock:
            if not self._open:
                self._since = time.perf_counter()
            self._open += 1

    def end(self) -> None:
        with self._lock:
            self._open -= 1
            if not self._open:
                self._idle_since = time.perf_counter()
                self._total += self._idle_since - self._since

    def read(self, now: float) -> tuple[float, float | None]:
        """The busy seconds up to ``now``, and when the generator was last busy (``now`` while it is)."""
        with self._lock:
            if self._open:
                return self._total + now - self._since, now
            return self._total, self._idle_since


class _Batch:
    """One call's episodes in a runner: the specs still to begin, the finished episodes, the stats.

    The async loop plays several batches in order (:class:`EpisodeStream`); a batch with ``weights``
    begins generating only when no episode of an earlier batch can ask for another turn, the weights
    set on the policy at that moment, so each episode is sampled by exactly one weight version.
    """

    def __init__(self, specs: Sequence[EpisodeSpec], weight_version: int,
                 weights: dict[str, torch.Tensor] | None = None, start: float | None = None):
        self.specs = list(specs)
        self.queue = deque(self.specs)
        self.weight_version = weight_version
        self.weights = weights
        self.future: Future = Future()
        self.stats = RolloutStats()
        self.done: dict[int, Episode] = {}
        self.judged: list[tuple[float, float]] = []
        self.live = 0
        """Episodes begun and not yet booked (those awaiting a deferred score included)."""
        self.may_generate = 0
        """Episodes begun that may still ask for a turn (neither finished nor handed to the judge pool)."""
        self.generating = False
        """Its episodes may generate (the batches before it have nothing left to generate)."""
        self.start = start
        self.busy_at_start = 0.0
        """The runner's generator busy time (:class:`_BusyClock`) when the batch began."""

    @property
    def finished(self) -> bool:
        return not self.queue and not self.live

    def begin(self, env: Any) -> _Live:
        spec = self.queue.popleft()
        if self.start is None:
            self.start = time.perf_counter()
        self.live += 1
        self.may_generate += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.live)
        return _Live(env, spec, Conversation(seed=spec.sample_seed), self.weight_version, batch=self)

    def book(self, live: _Live, episode: Episode) -> None:
        self.done[episode.spec.episode_id] = episode
        self.stats.add(live.stats)
        if live.judge_span is not None:
            self.judged.append(live.judge_span)
        self.live -= 1

    def close(self, end: float, generate_seconds: float, last_busy: float | None) -> tuple[list[Episode], RolloutStats]:
        """The episodes in spec order and the stats, with the generator's busy time (for any batch) in
        this batch's time and when it was last busy: a batch's drain is filled when the next one generates."""
        start = end if self.start is None else self.start
        stats = self.stats
        stats.generate_seconds = generate_seconds
        stats.max_judges_in_flight = _most_at_once(self.judged)
        stats.runner_seconds = end - start
        stats.drain_seconds = end - last_busy if last_busy is not None and last_busy > start else 0.0
        stats.wall_seconds = stats.runner_seconds  # a caller timing the whole call sets its own
        return [self.done[spec.episode_id] for spec in self.specs], stats


def run_episodes(policy: Policy, envs: Sequence[Any], specs: Sequence[EpisodeSpec], weight_version: int = 0,
                 finish: Finish | None = None, mode: str = "sync",
                 max_concurrent_judges: int = MAX_CONCURRENT_JUDGES) -> tuple[list[Episode], RolloutStats]:
    """Play ``specs`` to the end with a pool of environments.

    Every policy and agent is played by this loop: training rollouts, evaluation and the report
    (scripted agents through :class:`~rl.policy.AgentPolicy`). A finished episode frees its environment
    for the next spec, so multi-turn batches stay full. An environment that raises ends its episode
    as a failed one (``Episode.error``, NaN reward, counted in ``stats.episodes_failed``), and so does
    a policy turn that carries ``Segment.error`` (the policy could not produce it, e.g. an API
    endpoint that kept failing); the policy raising is a bug and propagates.

    Args:
        policy: the policy.
        envs: the pool of environments.
        specs: the episodes to play; the result lists them in this order.
        weight_version: recorded on each episode.
        finish: called as ``finish(env, episode, steps)`` when an episode ends normally (the env still
            at its last step; ``steps`` holds ``(observation, reward, info)`` per step, the last one
            scored); its value becomes ``episode.extra``. Must pickle to Ray workers. In async mode it
            runs on the episode's env thread, or on its judge thread when the score was deferred (the
            env is then held until ``finish`` has run).
        mode: ``"sync"`` (one batched ``generate`` per step, then the env steps in turn) or
            ``"async"`` (env steps on threads, generation never waits for them); see the module
            docstring. Both give the same episodes.
        max_concurrent_judges: (async) the judge pool: an env that can defer the scoring of an
            episode's end (:class:`~visenv.envs.base.DeferredScoring`, e.g. VisGenEnv, unwrapped or in
            gymnasium's reward-preserving wrappers) hands it over at the last step, the score (the
            rubric and its judges) runs on a pool of this many threads, and the env takes the next
            spec at once; finished episodes wait for a free slot (``stats.judge_queue_seconds``). 0
            keeps the scoring inside the env's last step (the env waits for it). Sync mode always does.
    """
    _check_mode(mode)
    _check_judges(max_concurrent_judges)
    batch = _Batch(specs, weight_version, start=time.perf_counter())
    if mode == "sync":
        return _run_sync(policy, list(envs), finish, batch)
    loop = _AsyncLoop(policy, envs, finish, max_concurrent_judges)
    try:
        loop.add(batch)
        loop.run(until=batch.future.done)
    finally:
        loop.close()
    return batch.future.result()


def _run_sync(policy: Policy, free: list[Any], finish: Finish | None,
              batch: _Batch) -> tuple[list[Episode], RolloutStats]:
    """The sync loop of :func:`run_episodes`: one batched ``generate`` for every live episode, then
    their env steps in turn."""
    clock = _BusyClock()
    active: list[_Live] = []

    def settle(live: _Live, outcome: Any) -> bool:
        """Encode an observation (True: the turn is ready), or book the finished episode and free its env."""
        if not isinstance(outcome, Episode):
            live.observe(policy, outcome)
            return True
        batch.book(live, outcome)
        free.append(live.env)
        return False

    while batch.queue or active:
        while batch.queue and free:
            live = batch.begin(free.pop())
            if settle(live, live.reset()):
                active.append(live)
        if not active:
            continue
        clock.begin()
        turns = policy.generate([live.conversation for live in active])
        clock.end()
        for live, turn in zip(active, turns, strict=True):
            live.conversation.segments.append(turn)
        active = [live for live, turn in zip(active, turns) if settle(live, live.step(turn, finish))]
    end = time.perf_counter()
    return batch.close(end, *clock.read(end))


class _AsyncLoop:
    """The async loop of :func:`run_episodes` and :class:`EpisodeStream`: env work on one thread per
    environment, deferred end-of-episode scores on ``judges`` threads, turns generated as episodes
    become ready; every outcome is settled on the thread that calls :meth:`run`.

    Batches (:class:`_Batch`) are played in the order they were added. An environment freed by one
    batch takes the next spec, of the same batch or of the next one (its reset runs at once). A batch
    without weights generates at once, with the weights of the one before. A batch with weights waits,
    its episodes reset and encoded, until no episode of the batches before it can ask for a turn (all
    finished or awaiting their deferred score), then its weights are set on the policy and it generates.
    So the next batch fills the generator's idle time while the last episodes of the one before are
    scored (and, without a weight switch, while its last turns wait on tools), and no episode sees two
    weight versions.
    """

    def __init__(self, policy: Policy, envs: Sequence[Any], finish: Finish | None, judges: int):
        self.policy = policy
        self.finish = finish
        self.free = list(envs)
        self.envs_pool = ThreadPoolExecutor(len(envs), thread_name_prefix="env")
        self.judge_pool = ThreadPoolExecutor(max(judges, 1), thread_name_prefix="judge")
        self.generator = _generator(policy, len(envs))
        self.deferring = [env.unwrapped for env in envs if judges and _defers_scoring(env)]
        for base in self.deferring:  # switched back in close()
            base.defer_scoring = True
        self.batches: deque[_Batch] = deque()
        self.stepping: dict[Future, _Live] = {}
        self.generating: dict[Future, list[_Live]] = {}
        self.judging: dict[Future, _Live] = {}
        self.ready: list[_Live] = []
        self.held: list[_Live] = []
        """Episodes of a batch that may not generate yet, their first observation encoded."""
        self.clock = _BusyClock()
        self.lock = threading.Lock()
        self.inbox: deque[_Batch] = deque()
        self.doorbell: Future = Future()

    def add(self, batch: _Batch) -> None:
        """Queue ``batch`` (from any thread); :meth:`run` plays it after those added before."""
        with self.lock:
            self.inbox.append(batch)
            if not self.doorbell.done():
                self.doorbell.set_result(None)

    def run(self, until: Callable[[], bool]) -> None:
        """Play the added batches (and those added meanwhile) until ``until()`` holds; each finished
        batch's future gets ``(episodes, stats)``."""
        while True:
            self._advance()
            if until():
                return
            if self.ready and (self.generator.continuous or not self.generating):
                for future, lives in self.generator.submit(self.ready):
                    self._time(future)
                    self.generating[future] = lives
                self.ready = []
            finished, _ = wait([*self.stepping, *self.generating, *self.judging, self.doorbell],
                               return_when=FIRST_COMPLETED)
            for future in finished:
                if future in self.judging:
                    live = self.judging.pop(future)
                    self._book(live, future.result())
                elif future in self.stepping:
                    self._stepped(self.stepping.pop(future), future.result())
                elif future in self.generating:
                    lives = self.generating.pop(future)
                    for live, turn in zip(lives, self.generator.turns(future.result(), lives), strict=True):
                        live.conversation.segments.append(turn)
                        self.stepping[self.envs_pool.submit(live.step, turn, self.finish)] = live

    def _advance(self) -> None:
        """Take new batches, close finished ones, let the next batch generate when its turn has come,
        and begin episodes in the free environments."""
        with self.lock:
            self.batches.extend(self.inbox)
            self.inbox.clear()
            if self.doorbell.done():
                self.doorbell = Future()
        now = time.perf_counter()
        for batch in [b for b in self.batches if b.finished or (b.start is None and b.future.cancelled())]:
            self.batches.remove(batch)
            if batch.start is None and not batch.future.set_running_or_notify_cancel():
                continue  # cancelled before any of its episodes began
            busy, last = self.clock.read(now)
            batch.future.set_result(batch.close(now, busy - batch.busy_at_start, last))
        before_done = before_generating = True  # of the batches before: none can ask for a turn / all may generate
        for batch in self.batches:
            if not batch.generating:
                if batch.weights is not None and before_done:  # a weight switch: nothing else generating
                    assert not self.generating and not self.ready, "a batch generated past its weight switch"
                    self.policy.set_weights(batch.weights)
                    batch.weights = None
                elif batch.weights is not None or not before_generating:
                    break
                batch.generating = True
                self.ready += [live for live in self.held if live.batch is batch]
                self.held = [live for live in self.held if live.batch is not batch]
            before_done = before_done and not batch.queue and not batch.may_generate
            before_generating = batch.generating
        while self.free:
            batch = next((b for b in self.batches if b.queue), None)
            if batch is None:
                break
            if batch.start is None:
                if not batch.future.set_running_or_notify_cancel():
                    self.batches.remove(batch)  # cancelled before any of its episodes began
                    continue
                batch.busy_at_start = self.clock.read(time.perf_counter())[0]
            live = batch.begin(self.free.pop())
            self.stepping[self.envs_pool.submit(live.reset)] = live

    def _stepped(self, live: _Live, outcome: Any) -> None:
        """An env reset or step came back: on to the judge pool, booked, or ready to generate."""
        if live.ending is not None:  # the env deferred its score
            self._ended(live)
            if self.finish is None:  # else finish needs the env at its last step
                self._release(live)
            queued = time.perf_counter()
            self.judging[self.judge_pool.submit(live.judge, outcome, self.finish, queued)] = live
        elif isinstance(outcome, Episode):
            self._ended(live)
            self._book(live, outcome)
        else:
            live.observe(self.policy, outcome)
            (self.ready if live.batch.generating else self.held).append(live)

    def _ended(self, live: _Live) -> None:
        """The episode asks for no more turns."""
        live.batch.may_generate -= 1
        self.generator.end(live)

    def _book(self, live: _Live, episode: Episode) -> None:
        live.batch.book(live, episode)
        if not live.released:
            self._release(live)

    def _release(self, live: _Live) -> None:
        """Give the episode's environment back to the pool (the next spec may take it)."""
        live.released = True
        self.free.append(live.env)

    def _time(self, future: Future) -> None:
        self.clock.begin()
        future.add_done_callback(lambda _: self.clock.end())

    def close(self) -> None:
        self.envs_pool.shutdown(wait=True, cancel_futures=True)
        self.judge_pool.shutdown(wait=True, cancel_futures=True)
        for base in self.deferring:
            base.defer_scoring = False
        self.generator.close()


class EpisodeStream:
    """Batches of episodes played back to back by one async loop on its own thread, each next batch
    starting while the one before is being scored (see :class:`_AsyncLoop`).

    What :class:`SerialRollout` runs in async mode, and what lets a :class:`~rl.train.Trainer` with
    ``overlap`` hand over the next iteration's specs and weights before the current rollout returns:
    the generator then works through the end of each batch (its final tool calls and judges) instead
    of waiting for it.

    Args:
        policy: the policy (:meth:`submit`'s weights are set on it, so give the stream its own copy when
            another thread trains the learner's).
        envs: the pool of environments (the stream's alone while it runs).
        finish, max_concurrent_judges: as :func:`run_episodes`.
    """

    def __init__(self, policy: Policy, envs: Sequence[Any], finish: Finish | None = None,
                 max_concurrent_judges: int = MAX_CONCURRENT_JUDGES):
        _check_judges(max_concurrent_judges)
        self._loop = _AsyncLoop(policy, envs, finish, max_concurrent_judges)
        self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="episode-stream", daemon=True)
        self._thread.start()

    def submit(self, specs: Sequence[EpisodeSpec], version: int,
               weights: dict[str, torch.Tensor] | None = None) -> Future:
        """Queue a batch: a future of ``(episodes in spec order, stats)``. With ``weights`` its episodes
        begin generating once the batches before it have nothing left to generate, with ``weights`` set on
        the policy first; without, at once, with the weights of the batch before (or the policy's own).
        ``version`` is recorded on each episode. A future cancelled before any of its episodes began is
        dropped."""
        if self._error is not None:
            raise RolloutError(f"The episode stream stopped on an error, so it takes no more batches: "
                               f"{type(self._error).__name__}: {self._error}") from self._error
        if self._closing:
            raise RolloutError("The episode stream is closed; make a new one.")
        batch = _Batch(specs, version, weights)
        self._loop.add(batch)
        return batch.future

    def generator_busy_seconds(self) -> float:
        """How long the generator has been busy (at least one turn being sampled) since the stream began."""
        return self._loop.clock.read(time.perf_counter())[0]

    def _serve(self) -> None:
        try:
            self._loop.run(until=lambda: self._closing and not self._loop.batches and not self._loop.inbox)
        except BaseException as error:  # a policy bug: every batch waiting on this loop gets it
            self._error = error
            with self._loop.lock:
                waiting = [*self._loop.batches, *self._loop.inbox]
            for batch in waiting:
                if not batch.future.done():  # pending or running (a cancelled one is done)
                    batch.future.set_exception(error)

    def close(self) -> None:
        """Finish the batches whose episodes began (those not begun are cancelled), then release the
        threads; the environments stay open."""
        with self._loop.lock:
            waiting = [*self._loop.batches, *self._loop.inbox]
        for batch in waiting:
            if batch.start is None:
                batch.future.cancel()
        self._closing = True
        self._loop.add(_Batch([], 0))  # rings the loop awake (an empty batch finishes at once)
        self._thread.join()
        self._loop.close()


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
    """

    def __init__(self, policy: Policy, make_env: Callable[[], Any], num_envs: int, finish: Finish | None = None,
                 mode: str = "sync", max_concurrent_judges: int = MAX_CONCURRENT_JUDGES):
        if num_envs < 1:
            raise ConfigError(f"num_envs ({num_envs}) must be at least 1.")
        _check_mode(mode)
        _check_judges(max_concurrent_judges)
        self.policy = policy
        self.envs = [make_env() for _ in range(num_envs)]
        self.finish = finish
        self.mode = mode
        self.max_concurrent_judges = max_concurrent_judges
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
            self._stream = EpisodeStream(self.policy, self.envs, self.finish, self.max_concurrent_judges)
        return self._stream.submit(specs, version, weights)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        for env in self.envs:
            env.close()


class RolloutWorker:
    """A Ray actor's body: a policy copy and a pool of environments.

    Args:
        make_policy: zero-argument callable building the policy (weights come by :meth:`set_weights`).
        make_env: zero-argument callable building one environment.
        num_envs: environments in the pool.
        torch_threads: intra-op threads for this worker's torch (1 avoids oversubscription).
        finish: the runner's end-of-episode hook, run in the worker (see :func:`run_episodes`).
        mode: the runner's mode in the worker, ``"sync"`` or ``"async"``.
        max_concurrent_judges: (async) the runner's judge pool in the worker.
    """

    def __init__(self, make_policy: Callable[[], Policy], make_env: Callable[[], Any], num_envs: int,
                 torch_threads: int, finish: Finish | None = None, mode: str = "sync",
                 max_concurrent_judges: int = MAX_CONCURRENT_JUDGES):
        torch.set_num_threads(torch_threads)
        self.policy = make_policy()
        self.envs = [make_env() for _ in range(num_envs)]
        self.finish = finish
        self.mode = mode
        self.max_concurrent_judges = max_concurrent_judges
        self.weight_version = -1
        self._stream: EpisodeStream | None = None
        self._stream_weights: int | None = None  # the weights key of the last chunk handed to the stream
        self._lock = threading.Lock()

    def set_weights(self, weights: dict[str, torch.Tensor], version: int) -> int:
        self.policy.set_weights(weights)
        self.weight_version = version
        return version

    def sample(self, specs: Sequence[EpisodeSpec]) -> tuple[list[Episode], RolloutStats]:
        return run_episodes(self.policy, self.envs, specs, self.weight_version, self.finish, self.mode,
                            self.max_concurrent_judges)

    def play(self, specs: Sequence[EpisodeSpec], version: int, weights: tuple[int, Any] | None
             ) -> tuple[list[Episode], RolloutStats]:
        """(async mode) Play a chunk on this worker's :class:`EpisodeStream`, after the chunks handed to
        it before (up to :data:`STREAM_DEPTH` calls run at once): the next chunk's episodes begin while the
        one before is being scored. ``weights``: ``(key, [object ref])`` of the weights that sample the
        chunk, fetched only when the key differs from the last chunk's (the stream sets them when no
        earlier episode can ask for a turn), or None to keep the weights the worker has; ``version`` is
        recorded on the episodes."""
        with self._lock:  # chunks reach the stream in the order their calls got here
            if self._stream is None:
                self._stream = EpisodeStream(self.policy, self.envs, self.finish, self.max_concurrent_judges)
            tensors = None
            if weights is not None and weights[0] != self._stream_weights:
                import ray

                tensors = ray.get(weights[1][0])
                self._stream_weights = weights[0]
            future = self._stream.submit(specs, version, tensors)
        return future.result()

    def pid(self) -> int:
        return os.getpid()


STREAM_DEPTH = 2
"""Chunks a Ray worker holds at once in async mode: the one playing and the next, which begins as the
first one's last episodes are scored."""

STREAM_POLL_S = 0.05
"""How often the Ray dispatcher looks for new batches while a worker has a free slot."""


def check_chunk_timeout(seconds: float | None, name: str = "chunk_timeout_s") -> None:
    """Raise ConfigError unless ``seconds`` is None or a finite number > 0 (``name`` in the message)."""
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not math.isfinite(seconds) or seconds <= 0):
        raise ConfigError(f"{name} ({seconds!r}) must be null (wait forever) or a number of seconds > 0.")


def check_cluster_fits(actors: str, count: int, num_cpus: float, num_gpus: float) -> None:
    """Raise ConfigError unless ``count`` Ray actors of ``num_cpus`` / ``num_gpus`` each fit the running
    cluster (else they would wait forever); ``actors`` names them in the message."""
    import ray

    total = ray.cluster_resources()
    if count * num_cpus > total.get("CPU", 0) or count * num_gpus > total.get("GPU", 0):
        raise ConfigError(f"{actors} x (num_cpus {num_cpus}, num_gpus {num_gpus}) exceed the cluster's CPU "
                          f"{total.get('CPU', 0)} / GPU {total.get('GPU', 0)}: lower num_workers or the per-worker "
                          "resources.")


class RayRollout:
    """Runs episodes in Ray actors; the same results as :class:`SerialRollout` for the same specs.

    Ray must be initialised (``ray.init()``, or ``ray.init(address="auto")`` to join a cluster)
    before this is built. Workers ask for ``num_cpus`` / ``num_gpus`` each; chunks of
    ``envs_per_worker`` episodes go to whichever worker is free.

    A worker that dies at any moment (while sampling, idle between iterations, or while receiving
    weights) is replaced by a fresh one that first receives the current weights, and its unfinished
    chunk is re-run there; results are keyed by ``episode_id`` and each is accepted once, so no
    episode is lost or counted twice. With ``chunk_timeout_s`` a worker that has not returned its
    chunk that long after it got it (an env step, tool or judge that never returns) is killed and
    handled the same way. Deaths are counted in ``RolloutStats.worker_restarts`` of the
    next ``sample`` (those during ``set_weights`` included).

    In async mode the workers stream (:meth:`submit`, ``streams`` is True): each holds up to
    :data:`STREAM_DEPTH` chunks and plays them back to back on its :class:`EpisodeStream`; the weights
    travel with the chunks (no sync call), a dead or hung worker's chunks all re-run, and its death is
    counted in the stats of the oldest batch it held.

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
        max_restarts: worker deaths (hung workers included) tolerated in one ``set_weights`` or
            ``sample`` call before it gives up.
        finish: the runner's end-of-episode hook, run inside the workers (picklable).
        mode: the runner's mode inside each worker, ``"sync"`` or ``"async"`` (see :func:`run_episodes`).
        max_concurrent_judges: (async) each worker's judge pool (see :func:`run_episodes`).
        chunk_timeout_s: seconds a worker may take over one chunk, counted from when it was handed
            the chunk; past it the worker counts as hung: killed, replaced and the chunk re-run. None
            waits forever.
    """

    def __init__(self, make_policy: Callable[[], Policy], make_env: Callable[[], Any], num_workers: int,
                 envs_per_worker: int, placement: str = "colocate", num_cpus: float = 1.0,
                 num_gpus: float = 0.0, torch_threads: int = 1, max_restarts: int = 3,
                 finish: Finish | None = None, mode: str = "sync", max_concurrent_judges: int = MAX_CONCURRENT_JUDGES,
                 chunk_timeout_s: float | None = None):
        import ray

        if num_workers < 1 or envs_per_worker < 1:
            raise ConfigError(f"num_workers ({num_workers}) and envs_per_worker ({envs_per_worker}) must be >= 1.")
        check_chunk_timeout(chunk_timeout_s)
        if placement not in ("colocate", "spread"):
            raise ConfigError(f"placement ({placement!r}) must be 'colocate' or 'spread'.")
        _check_mode(mode)
        _check_judges(max_concurrent_judges)
        if not ray.is_initialized():
            raise RolloutError("RayRollout needs Ray running: call ray.init() (or ray.init(address='auto') "
                               "to join a cluster) first.")
        check_cluster_fits(f"{num_workers} workers", num_workers, num_cpus, num_gpus)
        self._ray = ray
        concurrency = STREAM_DEPTH + 1 if mode == "async" else 1  # + 1: pid() while chunks play
        self._actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
                                 max_concurrency=concurrency)(RolloutWorker)
        self._args = (make_policy, make_env, envs_per_worker, torch_threads, finish, mode, max_concurrent_judges)
        self.envs_per_worker = envs_per_worker
        self.placement = placement
        self.max_restarts = max_restarts
        self.chunk_timeout_s = chunk_timeout_s
        self.mode = mode
        self.workers = [self._actor.remote(*self._args) for _ in range(num_workers)]
        self._weights: tuple[Any, int] | None = None
        self._restarts = 0  # deaths since the last sample's stats
        # streaming (async mode): batches played by a dispatcher thread, see submit()
        self._keys = itertools.count()
        self._box: tuple[int, list] | None = None  # the weights the last submitted batch samples with
        self._version = -1  # the version set_weights gave (episodes record it)
        self._wake = threading.Condition()
        self._inbox: deque[_RayBatch] = deque()
        self._closing = False
        self._error: BaseException | None = None
        self._dispatcher: threading.Thread | None = None

    @property
    def streams(self) -> bool:
        """Whether :meth:`submit` can queue batches (async mode)."""
        return self.mode == "async"

    def set_weights(self, policy: TrainablePolicy, version: int) -> None:
        """Ship ``policy``'s weights to the workers through the object store (one copy, shared by all): in
        sync mode to every worker now, in async mode with the next chunks (each worker fetches them once)."""
        if self.streams:
            self._box = (next(self._keys), [self._ray.put(policy.get_weights())])
            self._version = version
            return
        self._weights = (self._ray.put(policy.get_weights()), version)
        self._sync(range(len(self.workers)), 0)

    def _sync(self, indices: Sequence[int], deaths: int) -> int:
        """Give the current weights to the workers at ``indices``; a worker that dies meanwhile is
        replaced and the replacement synced. ``deaths``: so far in this call; returns the new count."""
        from ray.exceptions import RayActorError

        if self._weights is None:
            return deaths
        pending = {self.workers[i].set_weights.remote(*self._weights): i for i in indices}
        while pending:
            [ref], _ = self._ray.wait(list(pending), num_returns=1)
            index = pending.pop(ref)
            try:
                self._ray.get(ref)
            except RayActorError:
                deaths = self._died(index, deaths)
                pending[self.workers[index].set_weights.remote(*self._weights)] = index
        return deaths

    def _died(self, index: int, deaths: int, why: str = "died") -> int:
        """Replace the dead (or hung) worker at ``index`` (not yet synced); the deaths counted so far."""
        deaths += 1
        self._restarts += 1
        if deaths > self.max_restarts:
            raise RolloutError(f"Rollout workers failed {deaths} times in one call (max_restarts="
                               f"{self.max_restarts}); the last one {why}. See the Ray logs.")
        self._ray.kill(self.workers[index])
        self.workers[index] = self._actor.remote(*self._args)
        return deaths

    def _chunks(self, specs: Sequence[EpisodeSpec]) -> list[list[EpisodeSpec]]:
        size = self.envs_per_worker
        if self.placement == "colocate":
            return [list(specs[i:i + size]) for i in range(0, len(specs), size)]
        count = -(-len(specs) // size)
        return [list(specs[j::count]) for j in range(count)]

    def sample(self, specs: Sequence[EpisodeSpec]) -> tuple[list[Episode], RolloutStats]:
        from ray.exceptions import RayActorError

        if self.streams:
            return self.submit(specs, self._version).result()
        start = time.perf_counter()
        stats = RolloutStats()
        deaths = 0
        pending = deque(self._chunks(specs))
        running: dict[Any, tuple[int, list[EpisodeSpec]]] = {}
        results: dict[int, Episode] = {}
        deadlines: dict[Any, float] = {}  # with chunk_timeout_s: when each running chunk counts as hung

        def submit(index: int) -> None:
            chunk = pending.popleft()
            ref = self.workers[index].sample.remote(chunk)
            running[ref] = (index, chunk)
            if self.chunk_timeout_s is not None:
                deadlines[ref] = time.monotonic() + self.chunk_timeout_s

        for index in range(min(len(self.workers), len(pending))):
            submit(index)
        while running:
            timeout = max(0.0, min(deadlines.values()) - time.monotonic()) if deadlines else None
            ready, _ = self._ray.wait(list(running), num_returns=1, timeout=timeout)
            ref = ready[0] if ready else min(deadlines, key=deadlines.get)  # none ready: the first deadline passed
            deadlines.pop(ref, None)
            index, chunk = running.pop(ref)
            failed = None if ready else (f"hung: a chunk of {len(chunk)} episodes ran past chunk_timeout_s "
                                         f"({self.chunk_timeout_s:g} s), e.g. an env step, tool or judge that never "
                                         "returned")
            if ready:
                try:
                    episodes, chunk_stats = self._ray.get(ref)
                except RayActorError:  # died while sampling, or idle since the last call
                    failed = "died"
            if failed:
                deaths = self._sync([index], self._died(index, deaths, failed))
                pending.appendleft(chunk)
            else:
                stats.add(chunk_stats)
                for episode in episodes:
                    if episode.spec.episode_id in results:
                        raise RuntimeError(f"Episode {episode.spec.episode_id} came back twice.")
                    results[episode.spec.episode_id] = episode
            if pending:
                submit(index)
        stats.worker_restarts, self._restarts = self._restarts, 0
        stats.wall_seconds = time.perf_counter() - start
        return [results[spec.episode_id] for spec in specs], stats

    def submit(self, specs: Sequence[EpisodeSpec], version: int,
               weights: dict[str, torch.Tensor] | None = None) -> Future:
        """(async mode) Queue a batch: a future of ``(episodes in spec order, stats)``, as
        :meth:`SerialRollout.submit` (same arguments, same episodes).

        A dispatcher thread hands each worker up to :data:`STREAM_DEPTH` chunks at once, those of
        earlier batches first; a worker plays them back to back on its :class:`EpisodeStream`
        (:meth:`RolloutWorker.play`), so its next chunk generates while the last episodes of the one
        before are scored, within an iteration and, fed one iteration ahead by a
        :class:`~rl.train.Trainer` with ``overlap``, across iterations. ``weights`` go to the object
        store once and travel with the batch's chunks as a reference (a worker fetches a version once);
        without, the batch samples with the weights of the batch before (or of :meth:`set_weights`).
        A worker that dies or hangs past ``chunk_timeout_s`` is replaced and its chunks re-run
        (``max_restarts`` per batch); a future cancelled before any of its chunks went out is dropped.
        """
        if not self.streams:
            raise ConfigError("RayRollout.submit needs mode 'async' (sync workers play one chunk per call).")
        if self._error is not None:
            raise RolloutError(f"The rollout's dispatcher stopped on an error, so it takes no more batches: "
                               f"{type(self._error).__name__}: {self._error}") from self._error
        if self._closing or not self.workers:
            raise RolloutError("The rollout is closed; make a new one.")
        if weights is not None:
            self._box = (next(self._keys), [self._ray.put(weights)])
        batch = _RayBatch(specs, version, self._box, self._chunks(specs))
        with self._wake:
            self._inbox.append(batch)
            self._wake.notify()
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(target=self._serve, name="ray-dispatch", daemon=True)
                self._dispatcher.start()
        return batch.future

    def _serve(self) -> None:
        batches: list[_RayBatch] = []
        try:
            self._dispatch(batches)
        except BaseException as error:  # workers failing past max_restarts, a policy bug: every batch gets it
            self._error = error
            with self._wake:
                batches += self._inbox
                self._inbox.clear()
            for batch in batches:
                if not batch.future.done():
                    batch.future.set_exception(error)

    def _dispatch(self, batches: list["_RayBatch"]) -> None:
        """The dispatcher's loop (see :meth:`submit`): ``batches`` in submission order, until closing
        and every begun batch has finished."""
        from ray.exceptions import RayActorError

        slots: list[list[tuple[Any, _RayBatch, list[EpisodeSpec]]]] = [[] for _ in self.workers]
        since = [0.0] * len(self.workers)  # when each worker's first chunk in flight became its first
        flight: dict[Any, int] = {}  # object ref -> worker index

        def hand(index: int) -> bool:
            while True:
                batch = next((b for b in batches if b.pending), None)
                if batch is None:
                    return False
                if batch.start is not None:
                    break
                if batch.future.set_running_or_notify_cancel():
                    batch.start = time.perf_counter()
                    break
                batches.remove(batch)  # cancelled before any of its chunks went out
            chunk = batch.pending.popleft()
            ref = self.workers[index].play.remote(chunk, batch.version, batch.box)
            if not slots[index]:
                since[index] = time.monotonic()
            slots[index].append((ref, batch, chunk))
            flight[ref] = index
            batch.running += 1
            return True

        def lost(index: int, why: str) -> None:  # the worker died or hung: replace it, re-run its chunks
            batch = slots[index][0][1]
            batch.deaths += 1
            batch.stats.worker_restarts += 1
            if batch.deaths > self.max_restarts:
                raise RolloutError(f"Rollout workers failed {batch.deaths} times in one call (max_restarts="
                                   f"{self.max_restarts}); the last one {why}. See the Ray logs.")
            self._ray.kill(self.workers[index])
            self.workers[index] = self._actor.remote(*self._args)
            for ref, owner, chunk in reversed(slots[index]):
                del flight[ref]
                owner.running -= 1
                owner.pending.appendleft(chunk)
            slots[index] = []

        while True:
            with self._wake:
                for batch in self._inbox:
                    if batch.pending:
                        batches.append(batch)
                    elif batch.future.set_running_or_notify_cancel():  # no specs: done at once
                        batch.future.set_result(([], RolloutStats()))
                self._inbox.clear()
                if self._closing:  # batches not begun are dropped
                    for batch in [b for b in batches if b.start is None]:
                        batch.future.cancel()
                        batches.remove(batch)
                if not flight and not any(b.pending for b in batches):
                    if self._closing:
                        return
                    self._wake.wait()
                    continue
            for index in range(len(self.workers)):
                while len(slots[index]) < STREAM_DEPTH and hand(index):
                    pass
            free = any(len(slot) < STREAM_DEPTH for slot in slots)
            deadline = (min(since[i] for i, slot in enumerate(slots) if slot) + self.chunk_timeout_s
                        if self.chunk_timeout_s is not None else None)
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if free:  # a batch submitted meanwhile may fill the free slots
                timeout = STREAM_POLL_S if timeout is None else min(timeout, STREAM_POLL_S)
            ready, _ = self._ray.wait(list(flight), num_returns=1, timeout=timeout)
            if not ready:
                if deadline is not None and time.monotonic() >= deadline:
                    index = min((i for i, slot in enumerate(slots) if slot), key=since.__getitem__)
                    chunk = slots[index][0][2]
                    lost(index, f"hung: a chunk of {len(chunk)} episodes ran past chunk_timeout_s "
                                f"({self.chunk_timeout_s:g} s), e.g. an env step, tool or judge that never returned")
                continue
            ref = ready[0]
            index = flight[ref]
            try:
                episodes, chunk_stats = self._ray.get(ref)
            except RayActorError:  # died while playing, or idle since its last chunk
                lost(index, "died")
                continue
            del flight[ref]
            position = next(n for n, slot in enumerate(slots[index]) if slot[0] == ref)
            _, batch, _ = slots[index].pop(position)
            if position == 0:
                since[index] = time.monotonic()
            batch.running -= 1
            batch.stats.add(chunk_stats)
            for episode in episodes:
                if episode.spec.episode_id in batch.results:
                    raise RuntimeError(f"Episode {episode.spec.episode_id} came back twice.")
                batch.results[episode.spec.episode_id] = episode
            if not batch.pending and not batch.running:
                batches.remove(batch)
                batch.stats.wall_seconds = time.perf_counter() - batch.start
                batch.future.set_result(([batch.results[spec.episode_id] for spec in batch.specs], batch.stats))

    def worker_pids(self) -> list[int]:
        return self._ray.get([w.pid.remote() for w in self.workers])

    def close(self) -> None:
        """(async mode: batches not begun are cancelled, begun ones finish first) Kill the workers."""
        with self._wake:
            self._closing = True
            for batch in self._inbox:
                batch.future.cancel()
            self._wake.notify()
        if self._dispatcher is not None:
            self._dispatcher.join()
            self._dispatcher = None
        for worker in self.workers:
            self._ray.kill(worker)
        self.workers = []


class _RayBatch:
    """One :meth:`RayRollout.submit` batch on the dispatcher: its chunks not yet handed out, how many are
    out, the episodes back so far, the summed stats and the deaths charged to it."""

    def __init__(self, specs: Sequence[EpisodeSpec], version: int, box: tuple[int, list] | None,
                 chunks: list[list[EpisodeSpec]]):
        self.specs = list(specs)
        self.version = version
        self.box = box
        self.pending = deque(chunks)
        self.running = 0
        self.results: dict[int, Episode] = {}
        self.stats = RolloutStats()
        self.deaths = 0
        self.start: float | None = None
        self.future: Future = Future()
