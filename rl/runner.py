"""The one episode runner: :func:`run_episodes` plays specs on a pool of environments, and
:class:`EpisodeStream` plays batches of them back to back; every rollout backend runs it (the serial one
in this process, the Ray one inside each worker).

The runner keeps each live episode as its own small state (``_Live``: reset, step with a sampled turn,
observe), and runs in one of two modes (:data:`~rl.episodes.MODES`):

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

Fault tolerance: an environment that raises fails its episode only (``Episode.error``, counted in
``RolloutStats.episodes_failed``), never the rollout; so does a policy turn the policy could not
produce (``Segment.error``: an API endpoint that kept failing).

Streaming: :class:`EpisodeStream` keeps one async loop running on its own thread and takes batches one
ahead, each with the weights that sample it: the next batch's episodes reset as environments free up
and generate as soon as no episode of the batch before can ask for another turn, i.e. while its last
episodes are being scored. The episodes are those of one call per batch.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import gymnasium
import torch

from rl.episodes import MAX_CONCURRENT_JUDGES, MODES, Episode, EpisodeSpec, Finish, RolloutStats
from rl.errors import ConfigError, RolloutError
from rl.policy import Conversation, Policy, Segment


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

    def timed_out(self, error: str) -> Episode:
        """The episode failed because its env call or score ran past the runner's ``step_timeout_s``; that
        call's thread may still write into this episode, so the result holds copies and the episode's
        stats start over."""
        self.stats = RolloutStats(episodes_failed=1)
        return Episode(self.spec, list(self.conversation.segments), list(self.rewards) + [float("nan")], {}, False,
                       False, dict(self.backends), weight_version=self.weight_version, error=error)

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


def check_timeout(seconds: float | None, name: str) -> None:
    """Raise ConfigError unless ``seconds`` is None or a finite number > 0 (``name`` in the message)."""
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not math.isfinite(seconds) or seconds <= 0):
        raise ConfigError(f"{name} ({seconds!r}) must be null (wait forever) or a number of seconds > 0.")


def _check_step_timeout(step_timeout_s: float | None, mode: str) -> None:
    check_timeout(step_timeout_s, "step_timeout_s")
    if step_timeout_s is not None and mode != "async":
        raise ConfigError(f"step_timeout_s ({step_timeout_s!r}) needs mode 'async' (env calls on threads, which a "
                          "call past its time can be left to); the sync loop steps the envs itself. Set it to null.")


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
                 max_concurrent_judges: int = MAX_CONCURRENT_JUDGES,
                 step_timeout_s: float | None = None) -> tuple[list[Episode], RolloutStats]:
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
        step_timeout_s: (async) seconds an env reset or step, or a deferred score, may run: past it the
            episode fails (``Episode.error`` starts with ``StepTimeout``, NaN reward, counted in
            ``stats.episodes_failed``), the call is left to its thread (its result dropped; a daemon
            thread, so a call that never returns does not keep the process alive) and its environment is
            retired: this function cannot make a new one, so its pool shrinks (a ``RolloutError`` when no
            environment is left for the specs still to play; :class:`~rl.rollout.SerialRollout` and the Ray
            workers make a fresh one). None (the default) waits forever. Size it well above the slowest
            real tool call or judge.
    """
    _check_mode(mode)
    _check_judges(max_concurrent_judges)
    _check_step_timeout(step_timeout_s, mode)
    batch = _Batch(specs, weight_version, start=time.perf_counter())
    if mode == "sync":
        return _run_sync(policy, list(envs), finish, batch)
    loop = _AsyncLoop(policy, envs, finish, max_concurrent_judges, step_timeout_s)
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


class _Threads:
    """Daemon threads that run submitted calls (``size`` at a time, in order), where a call that runs too
    long can be written off (:meth:`abandon`): its thread is left to finish it, the result dropped, and a
    fresh thread takes its place. Daemon threads, so a call that never returns (a hung tool or judge)
    does not keep the process from exiting."""

    def __init__(self, size: int, name: str):
        self._name = name
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started: dict[Future, tuple[float, threading.Thread]] = {}  # running: when they began, where
        self._threads: set[threading.Thread] = set()
        self._spawned = 0
        for _ in range(size):
            self._spawn()

    def _spawn(self) -> None:
        self._spawned += 1
        thread = threading.Thread(target=self._work, name=f"{self._name}-{self._spawned}", daemon=True)
        self._threads.add(thread)
        thread.start()

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            future, call, args = task
            if not future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._started[future] = (time.monotonic(), threading.current_thread())
            error = result = None
            try:
                result = call(*args)
            except BaseException as raised:  # handed to the future, as ThreadPoolExecutor does
                error = raised
            with self._lock:
                if self._started.pop(future, None) is None:  # written off meanwhile: a fresh thread took over
                    return
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def submit(self, call: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._tasks.put((future, call, args))
        return future

    def started(self, future: Future) -> float | None:
        """When the call of ``future`` began (``time.monotonic()``), or None if it is not running."""
        with self._lock:
            begun = self._started.get(future)
        return None if begun is None else begun[0]

    def abandon(self, future: Future) -> bool:
        """Write off the running call of ``future`` (it never resolves; its thread is left to it and a
        fresh one takes its place): True, or False if it is not running (it just returned)."""
        with self._lock:
            begun = self._started.pop(future, None)
            if begun is None:
                return False
            self._threads.discard(begun[1])
        self._spawn()
        return True

    def shutdown(self) -> None:
        """Cancel the calls not begun, then wait for the threads to finish the calls they run (not for
        the calls written off)."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        threads = list(self._threads)
        for _ in threads:
            self._tasks.put(None)
        for thread in threads:
            thread.join()


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

    def __init__(self, policy: Policy, envs: Sequence[Any], finish: Finish | None, judges: int,
                 step_timeout_s: float | None = None, make_env: Callable[[], Any] | None = None):
        self.policy = policy
        self.finish = finish
        self.judges = judges
        self.step_timeout_s = step_timeout_s
        self.make_env = make_env
        self.free: list[Any] = []
        self.deferring: list[Any] = []
        for env in envs:
            self._pool(env)
        self.envs_pool = _Threads(len(envs), "env")
        self.judge_pool = _Threads(max(judges, 1), "judge")
        self.generator = _generator(policy, len(envs))
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
            self.ring(batch)

    def ring(self, batch: _Batch) -> None:
        """:meth:`add` with ``lock`` held."""
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
                               timeout=self._next_deadline(), return_when=FIRST_COMPLETED)
            self._expire()  # also when others finished: a hung call is cut however busy the loop is
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

    def _next_deadline(self) -> float | None:
        """Seconds until the first running env call or score passes ``step_timeout_s`` (None: no limit)."""
        if self.step_timeout_s is None:
            return None
        begun = [b for b in (*(self.envs_pool.started(f) for f in self.stepping),
                             *(self.judge_pool.started(f) for f in self.judging)) if b is not None]
        if not begun:  # nothing running yet: look again soon (a queued call may begin meanwhile)
            return self.step_timeout_s
        return max(0.0, min(begun) + self.step_timeout_s - time.monotonic())

    def _expire(self) -> None:
        """Fail the episodes whose env call or score ran past ``step_timeout_s``: the call is written off
        (its thread left to it), its environment retired (replaced when the runner can make one)."""
        if self.step_timeout_s is None:
            return
        now = time.monotonic()
        for running, pool, what in ((self.stepping, self.envs_pool, "env reset or step"),
                                    (self.judging, self.judge_pool, "end-of-episode score")):
            for future in list(running):
                begun = pool.started(future)
                if begun is None or now - begun < self.step_timeout_s or not pool.abandon(future):
                    continue
                live = running.pop(future)
                if running is self.stepping:
                    self._ended(live)
                if not live.released:  # its env is (or may be) in the call written off: never reused
                    live.released = True
                    self._retire(live.env)
                live.batch.book(live, live.timed_out(
                    f"StepTimeout: the {what} ran past step_timeout_s ({self.step_timeout_s:g} s); its environment "
                    "was retired"))
        alive = self.free or self.stepping or self.judging or self.generating or self.ready or self.held
        if not alive and any(b.queue for b in self.batches):
            raise RolloutError(f"Every environment hung past step_timeout_s ({self.step_timeout_s:g} s) and none can "
                               "be made anew (run_episodes has no env factory): no episode can run. See the failed "
                               "episodes' errors.")

    def _pool(self, env: Any) -> None:
        """Add ``env`` to the free environments (switched to deferred scoring when the judge pool is on)."""
        if self.judges and _defers_scoring(env):
            env.unwrapped.defer_scoring = True  # switched back in close()
            self.deferring.append(env.unwrapped)
        self.free.append(env)

    def _retire(self, env: Any) -> None:
        """Drop an environment stuck in a call written off, and add a fresh one when there is a factory."""
        if self.make_env is not None:
            self._pool(self.make_env())

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
        self.envs_pool.shutdown()
        self.judge_pool.shutdown()
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
        finish, max_concurrent_judges, step_timeout_s: as :func:`run_episodes`.
        make_env: makes an environment in place of one retired by ``step_timeout_s`` (None: the pool shrinks).
    """

    def __init__(self, policy: Policy, envs: Sequence[Any], finish: Finish | None = None,
                 max_concurrent_judges: int = MAX_CONCURRENT_JUDGES, step_timeout_s: float | None = None,
                 make_env: Callable[[], Any] | None = None):
        _check_judges(max_concurrent_judges)
        _check_step_timeout(step_timeout_s, "async")
        self._loop = _AsyncLoop(policy, envs, finish, max_concurrent_judges, step_timeout_s, make_env)
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
        batch = _Batch(specs, version, weights)
        with self._loop.lock:  # checked under the lock: a batch queued here is always played or failed
            if self._error is not None:
                raise RolloutError(f"The episode stream stopped on an error, so it takes no more batches: "
                                   f"{type(self._error).__name__}: {self._error}") from self._error
            if self._closing:
                raise RolloutError("The episode stream is closed; make a new one.")
            self._loop.ring(batch)
        return batch.future

    def generator_busy_seconds(self) -> float:
        """How long the generator has been busy (at least one turn being sampled) since the stream began."""
        return self._loop.clock.read(time.perf_counter())[0]

    def _serve(self) -> None:
        try:
            self._loop.run(until=lambda: self._closing and not self._loop.batches and not self._loop.inbox)
        except BaseException as error:  # a policy bug: every batch waiting on this loop gets it
            with self._loop.lock:
                self._error = error
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
