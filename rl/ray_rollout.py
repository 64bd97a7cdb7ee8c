"""The Ray rollout backend: :class:`RayRollout` runs episodes in :class:`RolloutWorker` actors, each a
policy copy and a pool of environments playing chunks of specs with the episode runner
(:mod:`rl.runner`); the same results as :class:`~rl.rollout.SerialRollout` for the same specs.

Workers that die or hang past ``chunk_timeout_s`` are replaced and their chunks re-run, with no episode
lost or counted twice. In async mode the workers stream: a dispatcher thread hands each up to
:data:`STREAM_DEPTH` chunks, which it plays back to back on its :class:`~rl.runner.EpisodeStream`.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import torch

from rl.episodes import MAX_CONCURRENT_JUDGES, Episode, EpisodeSpec, Finish, RolloutStats
from rl.errors import ConfigError, RolloutError
from rl.policy import Policy, TrainablePolicy
from rl.runner import EpisodeStream, _check_judges, _check_mode, _check_step_timeout, check_timeout, run_episodes


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
                 max_concurrent_judges: int = MAX_CONCURRENT_JUDGES, step_timeout_s: float | None = None):
        torch.set_num_threads(torch_threads)
        self.policy = make_policy()
        self.make_env = make_env
        self.envs = [make_env() for _ in range(num_envs)]
        self.step_timeout_s = step_timeout_s
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
                            self.max_concurrent_judges, self.step_timeout_s)

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
                self._stream = EpisodeStream(self.policy, self.envs, self.finish, self.max_concurrent_judges,
                                             self.step_timeout_s, self.make_env)
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
    check_timeout(seconds, name)


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
        step_timeout_s: (async) each worker's runner limit on one env call or deferred score (see
            :func:`~rl.runner.run_episodes`): past it the episode fails and the worker makes a fresh
            environment, without losing the chunk's other episodes. None waits forever.
    """

    def __init__(self, make_policy: Callable[[], Policy], make_env: Callable[[], Any], num_workers: int,
                 envs_per_worker: int, placement: str = "colocate", num_cpus: float = 1.0,
                 num_gpus: float = 0.0, torch_threads: int = 1, max_restarts: int = 3,
                 finish: Finish | None = None, mode: str = "sync", max_concurrent_judges: int = MAX_CONCURRENT_JUDGES,
                 chunk_timeout_s: float | None = None, step_timeout_s: float | None = None):
        import ray

        if num_workers < 1 or envs_per_worker < 1:
            raise ConfigError(f"num_workers ({num_workers}) and envs_per_worker ({envs_per_worker}) must be >= 1.")
        check_chunk_timeout(chunk_timeout_s)
        _check_step_timeout(step_timeout_s, mode)
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
        self._args = (make_policy, make_env, envs_per_worker, torch_threads, finish, mode, max_concurrent_judges,
                      step_timeout_s)
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
        if weights is not None:
            self._box = (next(self._keys), [self._ray.put(weights)])
        batch = _RayBatch(specs, version, self._box, self._chunks(specs))
        with self._wake:  # checked under the lock: a batch queued here is always played or failed
            if self._error is not None:
                raise RolloutError(f"The rollout's dispatcher stopped on an error, so it takes no more batches: "
                                   f"{type(self._error).__name__}: {self._error}") from self._error
            if self._closing or not self.workers:
                raise RolloutError("The rollout is closed; make a new one.")
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
            with self._wake:
                self._error = error
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
            if not flight:  # what was pending had been cancelled
                continue
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
