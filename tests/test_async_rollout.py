"""The asynchronous episode loop: the same episodes as the synchronous one (serial and Ray) while
episodes finish in another order, failed episodes still recorded, judges off the hot path (on a
bounded pool, the env free for the next episode), and the simulated latencies of tools and judges
that make the difference measurable."""

import copy
import dataclasses
import functools
import math
import os
import threading
import time

import gymnasium as gym
import pytest
import torch

from baselines.random_agent import RandomAgent
from baselines.workflow_agent import WorkflowAgent
from judge_server import JudgeServer, Reply
from rl import evaluate
from rl.config import RolloutConfig
from rl.hf import CausalLMPolicy, QwenVLPolicy, VisionLMPolicy
from rl.policy import POLICY, AgentPolicy
from rl.errors import RolloutError
from rl.rollout import RayRollout, SerialRollout, make_specs, run_episodes
from rl.train import episode_metrics
from rl_helpers import ECHO, CrashOnceEnv, LetterEnv, RaisingEnv, StallEnv
from test_rl_rollout import saved_policy  # noqa: F401  (the fixture: a tiny policy and its loader)

PLAN_ANSWER = '{"fulfilment": 1, "coherence": 8, "executability": 6, "atomicity": 10, "optimality": 4}'
PLAN_SCORE = (0.8 + 0.6 + 1.0 + 0.4) / 4
from visenv.envs.config import VisGenConfig
from visenv.envs.visgen import VisGenEnv
from visenv.error import ConfigError
from visenv.rewards.judges import OpenAIChatBackend, PlanJudge
from visenv.rewards.rubric import DelayedRubric, Entry, LtrReward
from visenv.rewards.rules import RulePlanReward
from visenv.tasks import make_suite


class LaggyLetterEnv(gym.Wrapper):
    """LetterEnv whose steps take ``lags[task_seed]`` seconds, so that episodes end out of order."""

    def __init__(self, lags: dict[int, float]):
        super().__init__(LetterEnv(turns=3))
        self.lags = lags

    def reset(self, *, seed=None, options=None):
        self.lag = self.lags[seed]
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        time.sleep(self.lag)
        return self.env.step(action)


def finished_at(env, episode, steps):
    """A finish hook: when the episode ended (to see the order they finished in)."""
    return time.perf_counter()


def as_data(episodes):
    """Everything an episode holds but its log-probs (see :func:`assert_same_episodes`)."""
    return [(e.spec, [(s.role, s.text, s.token_ids) for s in e.segments], [str(r) for r in e.rewards], e.components,
             e.terminated, e.truncated, e.backends, e.error) for e in episodes]


def assert_same_episodes(got, expected, tolerance=1e-5):
    """The same tokens, texts, rewards and components; the log-probs equal up to float rounding (the
    async loop batches other rows with each turn, and the engine reuses the KV cache of earlier turns)."""
    assert as_data(got) == as_data(expected)
    logprobs = [[lp for s in e.segments if s.logprobs for lp in s.logprobs] for e in (*got, *expected)]
    assert logprobs[:len(got)] == [pytest.approx(lps, abs=tolerance) for lps in logprobs[len(got):]]


def laggy_specs():
    """Four groups of two, and the env factory whose steps are slowest for the first group and
    instant for the last."""
    specs = make_specs(seed=3, iteration=0, num_groups=4, group_size=2)
    lags = {spec.task_seed: 0.02 * (3 - spec.group) for spec in specs}
    return specs, functools.partial(LaggyLetterEnv, lags)


def test_async_mode_gives_the_sync_episodes_while_they_finish_in_another_order(saved_policy):
    policy, _ = saved_policy
    specs, make_env = laggy_specs()
    runs = {}
    for mode in ("sync", "async"):
        rollout = SerialRollout(policy, make_env, num_envs=4, finish=finished_at, mode=mode)
        try:
            runs[mode] = rollout.sample(specs)
        finally:
            rollout.close()
    (sync, sync_stats), (fast, fast_stats) = runs["sync"], runs["async"]
    assert_same_episodes(fast, sync)
    assert all(len(e.rewards) == 3 and e.segments[1].token_ids for e in fast)
    order = {mode: sorted(range(len(specs)), key=lambda i: episodes[i].extra) for mode, (episodes, _) in runs.items()}
    assert order["sync"] == list(range(len(specs)))  # batch by batch, stepped in turn
    assert order["async"].index(2) < order["async"].index(0)  # the second group's shorter steps overtake
    assert fast_stats.env_steps == sync_stats.env_steps == 24
    assert fast_stats.max_in_flight == sync_stats.max_in_flight == 4
    for stats in (sync_stats, fast_stats):
        assert 0.0 < stats.generate_seconds < stats.runner_seconds
        assert 0.0 < stats.generator_idle_fraction < 1.0


def test_async_mode_records_failed_episodes_and_plays_the_rest(saved_policy):
    policy, _ = saved_policy
    specs = make_specs(0, 0, 3, 2)
    runs = {}
    for mode in ("sync", "async"):
        envs = [RaisingEnv(specs[2].task_seed) for _ in range(2)]
        runs[mode] = run_episodes(policy, envs, specs, mode=mode)
    (sync, _), (fast, stats) = runs["sync"], runs["async"]
    assert_same_episodes(fast, sync)
    assert [e.error is not None for e in fast] == [False, False, True, True, False, False]
    assert fast[2].error == "OverflowError: int too large to convert to float" and math.isnan(fast[2].reward)
    assert stats.episodes_failed == 2


def visgen(scale: float, judge_seconds: float = 0.0) -> VisGenEnv:
    return VisGenEnv(tool_latency_scale=scale, max_turns=4, rubric=DelayedRubric("ltr", judge_seconds))


def test_tool_latency_sleeps_the_cost_model_latency_on_virtual_tiers():
    call = '<tool_call>{"name": "tool_text2image_gemini", "arguments": {"prompt": "a red fox"}}</tool_call>'
    seconds = {}
    for scale in (0.0, 0.0, 0.02):  # the first call builds the procedural media database
        env = visgen(scale)
        env.reset(seed=0)
        start = time.perf_counter()
        _, _, _, _, info = env.step(f"<think>draw</think><plan>1. tool_text2image_gemini</plan>{call}")
        seconds[scale] = time.perf_counter() - start
        assert info["tool_result"]["backend"] != "real" and info["cost"]["latency_seconds"] == 8.0
    assert seconds[0.02] >= 0.02 * 8.0 > 2 * seconds[0.0]


class TaggedPolicy(CausalLMPolicy):
    """A text policy whose turns say how they were sampled: by the engine or by ``generate``."""

    def generate(self, conversations):
        return [dataclasses.replace(turn, text="generate:" + turn.text) for turn in super().generate(conversations)]

    def engine_turn(self, conversation, result):
        turn = super().engine_turn(conversation, result)
        return dataclasses.replace(turn, text="engine:" + turn.text)


def test_the_async_loop_serves_text_policies_and_their_subclasses_through_the_engine(saved_policy):
    _, make_policy = saved_policy
    policy = TaggedPolicy(make_policy().model, make_policy().tokenizer, max_new_tokens=12)
    specs = make_specs(7, 0, 2, 2)
    runs = {mode: run_episodes(policy, [LetterEnv() for _ in range(2)], specs, mode=mode)[0]
            for mode in ("sync", "async")}
    turns = {mode: [s for e in episodes for s in e.segments if s.role == POLICY] for mode, episodes in runs.items()}
    assert all(s.text.startswith("generate:") for s in turns["sync"])
    assert all(s.text.startswith("engine:") for s in turns["async"])  # engine_turn made each turn
    assert [(s.text.split(":", 1)[1], s.token_ids) for s in turns["async"]] == \
        [(s.text.split(":", 1)[1], s.token_ids) for s in turns["sync"]]
    assert CausalLMPolicy.engine_served and not VisionLMPolicy.engine_served and not QwenVLPolicy.engine_served


def test_agents_play_visgen_with_latency_the_same_in_both_modes_and_the_waits_are_measured():
    policy = AgentPolicy(RandomAgent)
    specs = make_specs(1, 0, 3, 2)
    runs = {(mode, judges): run_episodes(policy, [visgen(0.002, 0.02) for _ in range(3)], specs, mode=mode,
                                         max_concurrent_judges=judges)
            for mode, judges in (("sync", 16), ("async", 16), ("async", 1), ("async", 0))}
    sync, _ = runs["sync", 16]
    for episodes, _ in runs.values():  # judges on the pool (16 or 1 at a time) or inside the env's step
        assert_same_episodes(episodes, sync)
    fast, stats = runs["async", 16]
    assert sum(sum(e.backends.values()) for e in fast) > 0
    assert stats.judge_seconds >= 0.02 * len(specs)
    assert stats.tool_seconds["attribute"] > 0
    assert set(stats.tool_seconds) <= {tier or "refused" for e in fast for tier in e.backends}
    metrics = episode_metrics(fast, stats)
    assert metrics["rollout/max_in_flight"] >= 3.0  # those awaiting a judge count too
    assert metrics["time/judge_wait"] == stats.judge_seconds
    assert metrics["time/judge_queue"] == stats.judge_queue_seconds >= 0.0
    assert metrics["rollout/max_judges_in_flight"] == stats.max_judges_in_flight >= 1
    assert 0.0 <= metrics["time/generator_idle_fraction"] <= 1.0
    assert all(metrics[f"time/tool_wait/{tier}"] > 0 for tier in stats.tool_seconds)
    for _, run_stats in runs.values():  # the last turn's episode is scored (0.02 s) after the generator's last turn
        assert 0.02 <= run_stats.drain_seconds < run_stats.runner_seconds
        assert run_stats.generator_idle_fraction_before_drain < run_stats.generator_idle_fraction
    assert metrics["time/generator_drain"] == stats.drain_seconds
    inline = runs["async", 0][1]  # the scoring inside the env's last step: one episode per env at most
    assert inline.max_in_flight == 3 and inline.judge_queue_seconds == 0.0
    assert runs["async", 1][1].max_judges_in_flight == 1 == runs["sync", 16][1].max_judges_in_flight


class OverlapRubric:
    """The LTR rubric after a ``seconds`` wait, counting the calls that run at once (shared by envs)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.rubric = LtrReward()
        self.lock = threading.Lock()
        self.running = self.most = self.calls = 0

    def __call__(self, records):
        with self.lock:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        return self.rubric(records)


def test_a_finished_episodes_judge_does_not_block_the_next_episode_in_its_env():
    rubric = OverlapRubric(0.3)
    env = VisGenEnv(max_turns=3, rubric=rubric)
    episodes, stats = run_episodes(AgentPolicy(RandomAgent), [env], make_specs(4, 0, 6, 1), mode="async",
                                   max_concurrent_judges=3)
    assert rubric.calls == 6 and all(e.error is None and len(e.rewards) <= 3 for e in episodes)
    # one env, yet several judges at once: it played the next episodes while the earlier ones were judged
    assert rubric.most >= 2 and stats.max_judges_in_flight >= 2 and stats.max_in_flight >= 2
    assert env.defer_scoring is False  # the runner's opt-in ends with the rollout
    inline = OverlapRubric(0.0)
    run_episodes(AgentPolicy(RandomAgent), [VisGenEnv(max_turns=3, rubric=inline)], make_specs(4, 0, 6, 1),
                 mode="async", max_concurrent_judges=0)
    assert inline.calls == 6 and inline.most == 1


class TaggedAgentPolicy(AgentPolicy):
    """The random agent with a tag for weights: each ``generate`` logs the tag it ran with and whose
    conversations it served (by sampling seed)."""

    def __init__(self):
        super().__init__(RandomAgent)
        self.tag, self.log = None, []

    def set_weights(self, weights):
        self.tag = int(weights["tag"])

    def get_weights(self):
        return {"tag": torch.tensor(self.tag)}

    def generate(self, conversations):
        self.log.append((self.tag, {c.seed for c in conversations}, time.perf_counter()))
        return super().generate(conversations)


def test_a_stream_starts_the_next_batch_while_the_last_episodes_of_one_are_judged():
    policy = TaggedAgentPolicy()
    rollout = SerialRollout(policy, lambda: visgen(0.0, 0.4), 4, mode="async")
    first, second = make_specs(2, 0, 6, 1), make_specs(2, 1, 6, 1)
    resolved = {}
    try:
        futures = [rollout.submit(specs, version, {"tag": torch.tensor(version)})
                   for version, specs in ((0, first), (1, second))]
        futures[0].add_done_callback(lambda _: resolved.setdefault("first", time.perf_counter()))
        (got_first, stats_first), (got_second, _) = [future.result(timeout=120) for future in futures]
    finally:
        rollout.close()
    for got, specs in ((got_first, first), (got_second, second)):  # each batch as if played alone
        assert_same_episodes(got, run_episodes(AgentPolicy(RandomAgent), [visgen(0.0, 0.0)], specs)[0])
    assert [e.weight_version for e in got_first + got_second] == [0] * 6 + [1] * 6
    # each generate call served one batch with that batch's weights, all of the first batch's calls first
    seeds = {0: {s.sample_seed for s in first}, 1: {s.sample_seed for s in second}}
    assert all(served <= seeds[tag] for tag, served, _ in policy.log)
    tags = [tag for tag, _, _ in policy.log]
    assert tags == sorted(tags) and set(tags) == {0, 1}
    # ... and the second batch generated while the first one's last judges (0.4 s each) ran
    assert min(at for tag, _, at in policy.log if tag == 1) < resolved["first"] - 0.1
    assert stats_first.drain_seconds < 0.4 <= stats_first.judge_seconds / 6


class BrokenAgentPolicy(AgentPolicy):
    def __init__(self):
        super().__init__(RandomAgent)

    def generate(self, conversations):
        raise ValueError("a bug in the policy")


def assert_every_batch_fails(rollout, error, stopped):
    """Two batches queued on a rollout whose policy raises: both get the error, and a later submit is
    refused with a RolloutError matching ``stopped``."""
    try:
        futures = [rollout.submit(make_specs(3, it, 2, 1), it) for it in range(2)]
        for future in futures:
            with pytest.raises(error, match="a bug in the policy"):
                future.result(timeout=120)
        with pytest.raises(RolloutError, match=stopped):
            rollout.submit(make_specs(3, 2, 2, 1), 2)
    finally:
        rollout.close()


def test_a_stream_drops_a_cancelled_batch_and_passes_a_policy_error_to_every_waiting_batch():
    rollout = SerialRollout(AgentPolicy(RandomAgent), lambda: visgen(0.0, 0.05), 2, mode="async")
    try:
        kept, dropped = rollout.submit(make_specs(3, 0, 4, 1), 0), rollout.submit(make_specs(3, 1, 4, 1), 1)
        assert dropped.cancel()  # its episodes had not begun: they never will
        episodes, _ = kept.result(timeout=60)
        assert [e.spec.episode_id for e in episodes] == [0, 1, 2, 3] and all(e.error is None for e in episodes)
        assert rollout.sample(make_specs(3, 2, 2, 1))[0][0].weight_version == 0  # sample goes through the stream
    finally:
        rollout.close()
    assert_every_batch_fails(SerialRollout(BrokenAgentPolicy(), lambda: visgen(0.0, 0.0), 2, mode="async"),
                             ValueError, "stream stopped on an error.*ValueError: a bug in the policy")
    with pytest.raises(ConfigError, match="submit needs mode 'async'"):
        SerialRollout(AgentPolicy(RandomAgent), lambda: visgen(0.0, 0.0), 1).submit(make_specs(3, 0, 1, 1), 0)


def test_the_judge_pool_bounds_the_judges_running_at_once():
    rubric = OverlapRubric(0.1)
    specs = make_specs(5, 0, 10, 1)
    episodes, stats = run_episodes(AgentPolicy(RandomAgent), [VisGenEnv(max_turns=2, rubric=rubric) for _ in range(5)],
                                   specs, mode="async", max_concurrent_judges=2)
    assert rubric.calls == 10 and rubric.most == 2 == stats.max_judges_in_flight
    assert stats.judge_queue_seconds > 0.0  # finished episodes waited for a slot
    assert [e.spec for e in episodes] == specs


class FlakyPlan:
    """R_plan that raises on one task (a judge's bug) and answers None on another (a judge that failed)."""

    def __init__(self, raises: str, fails: str):
        self.raises, self.fails, self.plan = raises, fails, RulePlanReward()

    def __call__(self, records):
        if any(r.task.task_id == self.raises for r in records):
            raise RuntimeError("judge down")
        return [None if r.task.task_id == self.fails else score for r, score in zip(records, self.plan(records))]


def test_a_raising_judge_fails_only_its_episode_and_a_failed_judge_invalidates_its_reward():
    specs = make_specs(1, 0, 3, 2)
    probe = VisGenEnv()
    task_ids = [probe.reset(seed=spec.task_seed)[1]["task_id"] for spec in specs[::2]]
    assert len(set(task_ids)) == 3
    rubric = LtrReward(plan=Entry(FlakyPlan(raises=task_ids[1], fails=task_ids[2]), required=True))
    runs = {(mode, judges): run_episodes(AgentPolicy(RandomAgent), [VisGenEnv(max_turns=3, rubric=rubric)
                                                                     for _ in range(2)],
                                         specs, mode=mode, max_concurrent_judges=judges)
            for mode, judges in (("sync", 2), ("async", 2), ("async", 0))}
    sync, _ = runs["sync", 2]
    for episodes, stats in runs.values():
        assert_same_episodes(episodes, sync)
        assert stats.episodes_failed == 2
    fast = runs["async", 2][0]
    assert [e.error for e in fast] == [None, None, "RuntimeError: judge down", "RuntimeError: judge down", None, None]
    assert [math.isnan(e.reward) for e in fast] == [False, False, True, True, True, True]
    components = fast[4].components  # the "invalid" policy: R_plan and the total are None (left out of info)
    assert "R_fine" in components and "R_plan" not in components and "total" not in components


def test_llm_judges_over_http_on_the_pool_give_the_sync_rewards_and_fill_the_same_cache(tmp_path):
    with JudgeServer(lambda payload, number: Reply(content=PLAN_ANSWER)) as server:
        judge = PlanJudge(OpenAIChatBackend(server.url, "judge-model"), cache_path=str(tmp_path / "judge.sqlite"))
        rubric = LtrReward(plan=Entry(judge, required=True))
        specs = make_specs(6, 0, 2, 2)

        def play(mode):
            return run_episodes(AgentPolicy(WorkflowAgent), [VisGenEnv(rubric=rubric) for _ in range(2)], specs,
                                mode=mode, max_concurrent_judges=2)

        fast, stats = play("async")  # the judge asks the server from the pool's threads
        asked, hits = len(server.requests), judge.cache_hits
        sync, _ = play("sync")  # the same rubric in the env's step: every answer from the cache
        assert 0 < asked == len(server.requests) and judge.cache_hits == hits + len(specs)
    assert_same_episodes(fast, sync)
    assert stats.judge_queue_seconds > 0.0 and all(e.components["R_plan"] == PLAN_SCORE for e in fast)


def test_a_reward_wrapper_keeps_the_scoring_in_the_env_and_sees_the_full_reward():
    def make_env():
        return gym.wrappers.TransformReward(VisGenEnv(max_turns=3), lambda reward: 2 * reward - 1)

    specs = make_specs(2, 0, 2, 1)
    runs = [run_episodes(AgentPolicy(RandomAgent), [make_env() for _ in range(2)], specs, mode=mode)
            for mode in ("sync", "async")]
    assert_same_episodes(runs[1][0], runs[0][0])
    assert runs[1][1].judge_queue_seconds == 0.0


def test_an_evaluation_in_async_mode_records_the_same_episodes_as_in_sync_mode():
    tasks = make_suite(4, 3)

    def rollout(mode):
        return lambda policy, make_env, finish: SerialRollout(policy, make_env, 2, finish, mode=mode,
                                                              max_concurrent_judges=2)

    runs = {mode: evaluate.play(RandomAgent, tasks, recorder=evaluate.Recorder(keep_trajectories=True),
                                make_rollout=rollout(mode), progress=False) for mode in ("sync", "async")}
    results = {mode: [dataclasses.asdict(r) for r in evaluate.results_of(episodes)]
               for mode, (episodes, _) in runs.items()}
    assert results["async"] == results["sync"]
    assert runs["sync"][1].judge_queue_seconds == 0.0 < runs["async"][1].judge_queue_seconds  # scored on the pool
    # the last step's reward in the trajectory is the scored one, not the pending step reward
    assert all(sum(t["reward"] for t in r["trajectory"]) == pytest.approx(r["reward"]) for r in results["async"])
    assert all("R_plan" in r["components"] for r in results["async"])


@pytest.mark.slow
def test_ray_workers_in_async_mode_give_the_serial_sync_episodes(ray_session, saved_policy):
    policy, make_policy = saved_policy
    specs, make_env = laggy_specs()
    serial = SerialRollout(policy, make_env, num_envs=4)
    ray = RayRollout(make_policy, make_env, num_workers=2, envs_per_worker=4, num_cpus=0.5, mode="async")
    try:
        expected, _ = serial.sample(specs)
        ray.set_weights(policy, version=1)
        got, stats = ray.sample(specs)
    finally:
        serial.close()
        ray.close()
    assert_same_episodes(got, expected)
    assert stats.env_steps == 24 and stats.runner_seconds > 0


@pytest.mark.slow
def test_an_async_worker_killed_mid_iteration_loses_no_episode(ray_session, saved_policy, tmp_path):
    policy, make_policy = saved_policy
    specs = make_specs(2, 0, 8, 2)  # 8 chunks of 2 for 2 workers: each holds two at once (STREAM_DEPTH)
    marker = str(tmp_path / "crashed")
    make_env = functools.partial(CrashOnceEnv, marker, specs[6].task_seed)  # dies on an env thread
    expected, _ = run_episodes(policy, [ECHO.make() for _ in range(4)], specs)
    rollout = RayRollout(make_policy, make_env, num_workers=2, envs_per_worker=2, num_cpus=0.25, mode="async")
    try:
        rollout.set_weights(policy, version=1)
        got, stats = rollout.sample(specs)
    finally:
        rollout.close()
    assert os.path.exists(marker), "the crash did not happen: the test proved nothing"
    assert stats.worker_restarts == 1  # the dead worker's chunks (the one playing and the next) ran again
    assert_same_episodes(got, expected)


class StampedLetterEnv(LaggyLetterEnv):
    """LaggyLetterEnv that remembers when its episode began (wall clock: compared across processes)."""

    def reset(self, *, seed=None, options=None):
        self.began = time.time()
        return super().reset(seed=seed, options=options)


def stamped(env, episode, steps):
    """A finish hook: which worker played the episode, when it began and when it ended."""
    return os.getpid(), env.began, time.time()


def perturbed(weights, scale):
    generator = torch.Generator().manual_seed(0)
    return {k: v + scale * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in weights.items()}


@pytest.mark.slow
def test_ray_workers_stream_chunks_back_to_back_each_batch_with_its_own_weights(ray_session, saved_policy):
    policy, make_policy = saved_policy
    specs, _ = laggy_specs()
    lags = {spec.task_seed: 0.02 * (3 - spec.group) for spec in specs} | {
        spec.task_seed: 0.03 * spec.group for spec in make_specs(3, 1, 4, 2)}
    make_env = functools.partial(StampedLetterEnv, lags)
    batches = [(specs, 1, policy.get_weights()), (make_specs(3, 1, 4, 2), 2, perturbed(policy.get_weights(), 0.5))]
    expected = []
    for batch_specs, _, weights in batches:  # each batch alone, in this process, sync mode
        alone = copy.deepcopy(policy)
        alone.set_weights(weights)
        expected.append(run_episodes(alone, [make_env() for _ in range(4)], batch_specs)[0])
    # the second batch's weights matter: with the first batch's it samples other tokens
    assert tokens_of(expected[1]) != tokens_of(run_episodes(policy, [make_env() for _ in range(4)], batches[1][0])[0])
    rollout = RayRollout(make_policy, make_env, num_workers=2, envs_per_worker=2, num_cpus=0.5, mode="async",
                         finish=stamped, placement="spread")  # a chunk: a slow and a fast episode
    try:
        assert rollout.streams
        futures = [rollout.submit(*batch) for batch in batches]
        got = [future.result(timeout=300) for future in futures]
        again, _ = rollout.sample(batches[1][0])  # sample goes through the stream, with the last weights
    finally:
        rollout.close()
    for (episodes, stats), want, (_, version, _) in zip(got, expected, batches):
        assert_same_episodes(episodes, want, tolerance=2e-4)  # perturbed weights: larger logits, larger rounding
        assert {e.weight_version for e in episodes} == {version} and stats.worker_restarts == 0
        assert stats.env_steps == 24
    assert_same_episodes(again, expected[1], tolerance=2e-4)
    # 8 chunks of 2 on 2 workers: a worker began a chunk's episode before its chunk ahead had ended
    chunks = [[episodes[j].extra, episodes[j + 4].extra] for episodes, _ in got for j in range(4)]  # "spread"
    overlapped = [(a, b) for a in chunks for b in chunks if a is not b and a[0][0] == b[0][0]
                  and min(began for _, began, _ in b) > min(began for _, began, _ in a)
                  and min(began for _, began, _ in b) < max(end for _, _, end in a)]
    assert overlapped, "no worker played two chunks at once: nothing streamed"


@pytest.mark.slow
def test_a_policy_error_in_a_streaming_ray_worker_reaches_every_waiting_batch(ray_session):
    rollout = RayRollout(BrokenAgentPolicy, functools.partial(visgen, 0.0, 0.0), num_workers=1, envs_per_worker=2,
                         num_cpus=0.5, mode="async")
    assert_every_batch_fails(rollout, Exception, "(?s)dispatcher stopped on an error.*a bug in the policy")
    sync = RayRollout(BrokenAgentPolicy, functools.partial(visgen, 0.0, 0.0), num_workers=1, envs_per_worker=1,
                      num_cpus=0.5)
    try:
        with pytest.raises(ConfigError, match="RayRollout.submit needs mode 'async'"):
            sync.submit(make_specs(3, 0, 1, 1), 0)
    finally:
        sync.close()


def tokens_of(episodes):
    return [[s.token_ids for s in e.segments] for e in episodes]


def test_latency_and_mode_settings_validate_themselves(saved_policy):
    for bad in (-0.5, float("inf"), float("nan"), "fast", True):
        with pytest.raises(ConfigError, match="tool_latency_scale"):
            VisGenConfig(tool_latency_scale=bad)
    with pytest.raises(ConfigError, match="DelayedRubric.seconds"):
        DelayedRubric("ltr", -1.0)
    with pytest.raises(ConfigError, match="rollout.mode"):
        RolloutConfig(mode="parallel")
    with pytest.raises(ConfigError, match="mode .'threads'. must be one of"):
        run_episodes(saved_policy[0], [LetterEnv()], make_specs(0, 0, 1, 1), mode="threads")
    with pytest.raises(ConfigError, match="mode"):
        SerialRollout(saved_policy[0], LetterEnv, num_envs=1, mode="threads")
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="max_concurrent_judges"):
            RolloutConfig(max_concurrent_judges=bad)
        with pytest.raises(ConfigError, match=r"max_concurrent_judges \(.*\) must be an int >= 0"):
            run_episodes(saved_policy[0], [LetterEnv()], make_specs(0, 0, 1, 1), max_concurrent_judges=bad)


class StallOnceRubric:
    """The LTR rubric, except that its first call does not return for a minute: a judge that hung (a minute, so
    that a runner that failed to leave it would fail the test rather than hang it)."""

    def __init__(self):
        self.rubric, self.calls, self.lock = LtrReward(), 0, threading.Lock()

    def __call__(self, records):
        with self.lock:
            self.calls += 1
            first = self.calls == 1
        if first:
            time.sleep(60)
        return self.rubric(records)


def test_an_env_call_past_step_timeout_fails_its_episode_and_the_rest_play_on():
    specs = make_specs(6, 0, 6, 1)
    stall = specs[2].task_seed  # this episode's reset never returns
    envs = [StallEnv(stall, seconds=60) for _ in range(2)]
    begun = time.monotonic()
    episodes, stats = run_episodes(AgentPolicy(RandomAgent), envs, specs, mode="async", step_timeout_s=1.0)
    took = time.monotonic() - begun
    assert 1.0 <= took < 50
    assert [e.error is not None for e in episodes] == [False, False, True, False, False, False]
    assert episodes[2].error.startswith("StepTimeout: the env reset or step ran past step_timeout_s (1 s)")
    assert math.isnan(episodes[2].reward) and stats.episodes_failed == 1
    expected, _ = run_episodes(AgentPolicy(RandomAgent), [ECHO.make()], [s for i, s in enumerate(specs) if i != 2])
    assert as_data([e for i, e in enumerate(episodes) if i != 2]) == as_data(expected)  # played on one env
    # with no env left for the specs still to play: a clear error, not a hang
    with pytest.raises(RolloutError, match=r"Every environment hung past step_timeout_s \(0.5 s\)"):
        run_episodes(AgentPolicy(RandomAgent), [StallEnv(stall, seconds=60)], specs[2:4], mode="async",
                     step_timeout_s=0.5)


def test_a_judge_past_step_timeout_fails_its_episode_and_a_serial_rollout_keeps_its_envs():
    first, second = make_specs(7, 0, 5, 1), make_specs(7, 1, 3, 1)
    # the same episodes without a hung judge (in sync mode; also builds the media database and the tools'
    # indexes of this test session's fresh home, seconds that would otherwise count against the limit)
    expected = [run_episodes(AgentPolicy(RandomAgent), [VisGenEnv(max_turns=3)], specs)[0] for specs in (first, second)]
    rubric = StallOnceRubric()
    rollout = SerialRollout(AgentPolicy(RandomAgent), lambda: VisGenEnv(max_turns=3, rubric=rubric), 2, mode="async",
                            step_timeout_s=2.0)
    try:
        episodes, stats = rollout.sample(first)
        again, _ = rollout.sample(second)  # the rollout goes on
    finally:
        rollout.close()
    failed = [i for i, e in enumerate(episodes) if e.error is not None]
    assert len(failed) == 1 and stats.episodes_failed == 1 and rubric.calls == 5 + 3
    assert episodes[failed[0]].error.startswith("StepTimeout: the end-of-episode score ran past step_timeout_s (2 s)")
    assert math.isnan(episodes[failed[0]].reward)
    assert as_data([e for i, e in enumerate(episodes) if i not in failed]) == \
        as_data([e for i, e in enumerate(expected[0]) if i not in failed])
    assert as_data(again) == as_data(expected[1])
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(ConfigError, match="step_timeout_s"):
            RolloutConfig(mode="async", step_timeout_s=bad)
    with pytest.raises(ConfigError, match=r"rollout.step_timeout_s \(5\) needs rollout.mode 'async'"):
        RolloutConfig(step_timeout_s=5)
    with pytest.raises(ConfigError, match=r"step_timeout_s \(5\) needs mode 'async'"):
        run_episodes(AgentPolicy(RandomAgent), [ECHO.make()], make_specs(7, 0, 1, 1), step_timeout_s=5)
    assert RolloutConfig(mode="async", step_timeout_s=30).step_timeout_s == 30


@pytest.mark.slow
def test_a_hung_env_call_in_a_ray_worker_fails_its_episode_and_the_worker_plays_on(ray_session, saved_policy):
    policy, make_policy = saved_policy
    specs = make_specs(8, 0, 4, 2)
    stall = specs[3].task_seed  # a group of two: both its resets hang (a minute)
    rollout = RayRollout(make_policy, functools.partial(StallEnv, stall, seconds=60), num_workers=1, envs_per_worker=4,
                         num_cpus=0.5, mode="async", step_timeout_s=3.0)
    try:
        rollout.set_weights(policy, version=1)
        episodes, stats = rollout.sample(specs)
    finally:
        rollout.close()
    assert [e.error is not None for e in episodes] == [False, False, True, True, False, False, False, False]
    assert all(e.error.startswith("StepTimeout: the env reset or step ran past step_timeout_s (3 s)")
               for e in episodes[2:4])
    assert stats.worker_restarts == 0 and stats.episodes_failed == 2  # the worker made fresh envs, kept its chunk
    expected, _ = run_episodes(policy, [ECHO.make() for _ in range(4)], specs)
    assert_same_episodes([e for i, e in enumerate(episodes) if i not in (2, 3)],
                         [e for i, e in enumerate(expected) if i not in (2, 3)])


@pytest.mark.slow
def test_a_streaming_ray_rollout_drops_a_batch_cancelled_before_its_chunks_went_out(ray_session):
    rollout = RayRollout(functools.partial(AgentPolicy, RandomAgent), functools.partial(visgen, 0.0, 0.2),
                         num_workers=1, envs_per_worker=2, num_cpus=0.5, mode="async", chunk_timeout_s=120)
    try:
        kept = rollout.submit(make_specs(3, 0, 4, 1), 0)  # two chunks: the worker's two slots
        dropped = rollout.submit(make_specs(3, 1, 4, 1), 1)
        assert dropped.cancel(), "the second batch went out at once: the test proved nothing"
        episodes, _ = kept.result(timeout=120)
        assert [e.spec.episode_id for e in episodes] == [0, 1, 2, 3] and all(e.error is None for e in episodes)
        time.sleep(0.5)  # the dispatcher idles (nothing in flight), then a batch comes and is cancelled at once
        rollout.submit(make_specs(3, 3, 2, 1), 3).cancel()
        again, _ = rollout.sample(make_specs(3, 2, 2, 1))  # the dispatcher goes on
        assert [e.error for e in again] == [None, None]
    finally:
        rollout.close()
