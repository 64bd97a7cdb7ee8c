"""Rollouts: GRPO grouping, the serial and Ray backends agree sample for sample, a worker killed
at any moment (mid-iteration, idle, mid-sync) loses no episode and counts none twice, and an env
that raises fails its episode, not the iteration."""

import functools
import math
import os
import pickle
import signal
import threading
import time

import pytest

from rl.hf import CausalLMPolicy
from rl.rollout import EpisodeSpec, RayRollout, Rollout, SerialRollout, make_specs
from rl.errors import RolloutError
from rl_helpers import ECHO, CrashOnceEnv, RaisingEnv, SlowSyncPolicy, StallEnv, echo_tokenizer, tiny_policy


@pytest.fixture(scope="module")
def saved_policy(tmp_path_factory):
    """A tiny random policy saved to a folder, and a picklable factory that loads it (for workers)."""
    path = str(tmp_path_factory.mktemp("policy"))
    policy = tiny_policy(echo_tokenizer(), max_new_tokens=12)
    policy.save(path)
    return policy, functools.partial(CausalLMPolicy.from_pretrained, path, max_new_tokens=12)


def kill(pid: int) -> None:
    """SIGKILL a worker process and wait until it is gone."""
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def sample_once(rollout, policy, specs, version):
    """Sync ``policy``'s weights as ``version``, sample ``specs`` once, close the rollout."""
    try:
        rollout.set_weights(policy, version=version)
        return rollout.sample(specs)
    finally:
        rollout.close()


def as_data(episodes):
    return [(e.spec, [s.token_ids for s in e.segments], e.rewards) for e in episodes]


def test_make_specs_groups_share_a_task_and_depend_only_on_seed_and_iteration():
    specs = make_specs(seed=3, iteration=5, num_groups=4, group_size=3)
    assert [s.episode_id for s in specs] == list(range(12))
    for g in range(4):
        group = specs[3 * g:3 * g + 3]
        assert {s.group for s in group} == {g} and len({s.task_seed for s in group}) == 1
        assert len({s.sample_seed for s in group}) == 3
    assert make_specs(3, 5, 4, 3) == specs and make_specs(3, 6, 4, 3) != specs
    assert pickle.loads(pickle.dumps(specs)) == specs


def test_serial_rollout_returns_episodes_in_spec_order(saved_policy):
    policy, _ = saved_policy
    specs = make_specs(0, 0, 3, 2)
    episodes, stats = SerialRollout(policy, ECHO.make, 4).sample(specs)
    assert [e.spec for e in episodes] == specs
    assert stats.env_steps == 6 and stats.generate_seconds > 0 and stats.wall_seconds > 0
    # the group's members face the same task
    prompts = [e.segments[0].text for e in episodes]
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3]


@pytest.mark.parametrize("placement", ["colocate", "spread"])
def test_ray_and_serial_backends_give_the_same_samples(ray_session, saved_policy, placement):
    policy, make_policy = saved_policy
    specs = make_specs(1, 0, 4, 4)
    serial, _ = SerialRollout(policy, ECHO.make, 16).sample(specs)
    rollout = RayRollout(make_policy, ECHO.make, num_workers=2, envs_per_worker=3, placement=placement,
                         num_cpus=0.25)
    remote, stats = sample_once(rollout, policy, specs, 7)
    assert as_data(remote) == as_data(serial)
    assert {e.weight_version for e in remote} == {7} and stats.worker_restarts == 0


def test_a_worker_killed_mid_iteration_loses_no_episode(ray_session, saved_policy, tmp_path):
    policy, make_policy = saved_policy
    specs = make_specs(2, 0, 6, 2)
    crash = specs[7]  # the second chunk's last task: the worker dies with episodes half done
    marker = str(tmp_path / "crashed")
    make_env = functools.partial(CrashOnceEnv, marker, crash.task_seed)
    serial, _ = SerialRollout(policy, ECHO.make, 12).sample(specs)
    rollout = RayRollout(make_policy, make_env, num_workers=2, envs_per_worker=4, num_cpus=0.25)
    try:
        rollout.set_weights(policy, version=1)
        pids = set(rollout.worker_pids())
        episodes, stats = rollout.sample(specs)
        new_pids = set(rollout.worker_pids())
    finally:
        rollout.close()
    assert os.path.exists(marker), "the crash did not happen: the test proved nothing"
    assert stats.worker_restarts == 1 and len(pids & new_pids) == 1
    assert [e.spec.episode_id for e in episodes] == list(range(12))
    assert as_data(episodes) == as_data(serial)  # the replacement worker got the weights


@pytest.mark.parametrize("mode", ["sync", "async"])  # async: the dispatcher that streams chunks to the workers
def test_a_worker_that_hangs_past_the_chunk_timeout_is_replaced_and_loses_no_episode(ray_session, saved_policy,
                                                                                     tmp_path, mode):
    policy, make_policy = saved_policy
    specs = make_specs(4, 0, 4, 2)
    stall = specs[5]  # the second chunk's task: its worker hangs (an hour) in the middle of the chunk
    marker = str(tmp_path / "stalled")
    serial, _ = SerialRollout(policy, ECHO.make, 8).sample(specs)
    rollout = RayRollout(make_policy, functools.partial(StallEnv, stall.task_seed, marker), num_workers=2,
                         envs_per_worker=4, num_cpus=0.25, chunk_timeout_s=8.0, mode=mode)
    try:
        rollout.set_weights(policy, version=1)
        pids = set(rollout.worker_pids())
        begun = time.monotonic()
        episodes, stats = rollout.sample(specs)
        took = time.monotonic() - begun
        new_pids = set(rollout.worker_pids())
    finally:
        rollout.close()
    assert os.path.exists(marker), "no worker hung: the test proved nothing"
    assert stats.worker_restarts == 1 and len(pids & new_pids) == 1  # the hung one was killed and replaced
    assert 8.0 <= took < 600
    assert [e.spec.episode_id for e in episodes] == list(range(8))
    assert as_data(episodes) == as_data(serial)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_worker_that_always_hangs_stops_the_sample_with_a_clear_error(ray_session, saved_policy, mode):
    policy, make_policy = saved_policy
    specs = make_specs(4, 0, 2, 2)
    rollout = RayRollout(make_policy, functools.partial(StallEnv, specs[0].task_seed), num_workers=1,
                         envs_per_worker=4, num_cpus=0.25, max_restarts=1, chunk_timeout_s=3.0, mode=mode)
    try:
        rollout.set_weights(policy, version=1)
        with pytest.raises(RolloutError, match=r"failed 2 times in one call \(max_restarts=1\); the last one hung: a "
                                               r"chunk of 4 episodes ran past chunk_timeout_s \(3 s\)"):
            rollout.sample(specs)
    finally:
        rollout.close()
    with pytest.raises(ValueError, match=r"chunk_timeout_s \(0\) must be null \(wait forever\) or a number"):
        RayRollout(make_policy, ECHO.make, num_workers=1, envs_per_worker=2, num_cpus=0.25, chunk_timeout_s=0)


def test_ray_rollout_checks_its_arguments_before_starting_actors(ray_session, saved_policy):
    _, make_policy = saved_policy
    with pytest.raises(ValueError, match=r"exceed the cluster's CPU"):
        RayRollout(make_policy, ECHO.make, num_workers=3, envs_per_worker=2, num_cpus=1.0)
    with pytest.raises(ValueError, match=r"placement \('random'\)"):
        RayRollout(make_policy, ECHO.make, num_workers=1, envs_per_worker=2, placement="random")


def test_episode_spec_is_what_crosses_to_workers():
    spec = EpisodeSpec(episode_id=1, task_seed=2, sample_seed=3, group=0)
    assert pickle.loads(pickle.dumps(spec)) == spec


def test_stale_weights_sync_on_schedule_and_grpo_uses_the_sampler_logprobs(ray_session, saved_policy):
    from rl.grpo import GRPO, GRPOConfig
    from rl.train import Trainer
    from rl_helpers import LetterEnv

    _, make_policy = saved_policy
    policy = make_policy()
    rollout = RayRollout(make_policy, functools.partial(LetterEnv, 1), num_workers=1, envs_per_worker=16,
                         num_cpus=0.25)
    config = GRPOConfig(4, 4, kl_coef=0.0, learning_rate=1e-2, off_policy=True)
    trainer = Trainer(policy, GRPO(policy, None, config), rollout, iterations=3, num_groups=4, group_size=4,
                      max_staleness=1)
    try:
        history = trainer.run()
    finally:
        rollout.close()
    assert [m["rollout/staleness_max"] for m in history] == [0.0, 1.0, 0.0]
    # iteration 1 sampled with the weights of iteration 0: the learner's log-probs moved away from them
    assert history[0]["sampler_logprob_gap"] < 1e-4 < history[1]["sampler_logprob_gap"]


@pytest.mark.slow
def test_a_worker_killed_while_idle_is_replaced_at_the_next_sample_or_sync(ray_session, saved_policy):
    policy, make_policy = saved_policy
    first, second = make_specs(4, 0, 3, 2), make_specs(4, 1, 3, 2)
    serial = SerialRollout(policy, ECHO.make, 6)
    expected = [as_data(serial.sample(specs)[0]) for specs in (first, second)]
    rollout = RayRollout(make_policy, ECHO.make, num_workers=2, envs_per_worker=3, num_cpus=0.25)
    try:
        assert isinstance(rollout, Rollout) and isinstance(serial, Rollout)
        rollout.set_weights(policy, version=0)
        assert as_data(rollout.sample(first)[0]) == expected[0]
        kill(rollout.worker_pids()[0])  # between iterations, no sync (stale weights allowed): sample replaces it
        episodes, stats = rollout.sample(second)
        assert stats.worker_restarts == 1 and as_data(episodes) == expected[1]
        kill(rollout.worker_pids()[1])  # between iterations, then the weights sync replaces it
        rollout.set_weights(policy, version=1)
        episodes, stats = rollout.sample(first)
        assert stats.worker_restarts == 1 and as_data(episodes) == expected[0]
        assert {e.weight_version for e in episodes} == {1}
    finally:
        rollout.close()


@pytest.mark.slow
def test_a_worker_killed_during_set_weights_is_replaced_and_synced(ray_session, saved_policy, tmp_path):
    policy, _ = saved_policy
    path = str(tmp_path / "policy")
    policy.save(path)
    make_policy = functools.partial(SlowSyncPolicy.from_pretrained, path, max_new_tokens=12)
    specs = make_specs(5, 0, 2, 2)
    expected = as_data(SerialRollout(policy, ECHO.make, 4).sample(specs)[0])
    rollout = RayRollout(make_policy, ECHO.make, num_workers=2, envs_per_worker=2, num_cpus=0.25)
    try:
        pids = rollout.worker_pids()
        sync = threading.Thread(target=rollout.set_weights, args=(policy, 3))
        sync.start()
        time.sleep(1.0)  # both workers are inside their 3-second set_weights
        kill(pids[0])
        sync.join(timeout=120)
        assert not sync.is_alive()
        new_pids = rollout.worker_pids()
        assert new_pids[0] != pids[0] and new_pids[1] == pids[1]
        episodes, stats = rollout.sample(specs)
    finally:
        rollout.close()
    assert stats.worker_restarts == 1  # the death during the sync is counted in the next sample
    assert as_data(episodes) == expected and {e.weight_version for e in episodes} == {3}


@pytest.mark.parametrize("backend", ["serial", "ray"])
def test_an_env_that_raises_fails_its_episode_not_the_rollout(request, saved_policy, backend):
    policy, make_policy = saved_policy
    specs = make_specs(6, 0, 4, 2)
    bad = specs[2].task_seed  # the second group's task
    expected = SerialRollout(policy, ECHO.make, 4).sample(specs)[0]
    if backend == "serial":
        rollout = SerialRollout(policy, functools.partial(RaisingEnv, bad), 4)
    else:
        request.getfixturevalue("ray_session")
        rollout = RayRollout(make_policy, functools.partial(RaisingEnv, bad), num_workers=2, envs_per_worker=2,
                             num_cpus=0.25)
    episodes, stats = sample_once(rollout, policy, specs, 0)
    failed = [e for e in episodes if e.error is not None]
    assert [e.spec.episode_id for e in failed] == [2, 3] and stats.episodes_failed == 2
    assert all(e.error == "OverflowError: int too large to convert to float" and math.isnan(e.reward)
               for e in failed)
    kept = [i for i in range(8) if i not in (2, 3)]
    assert as_data([episodes[i] for i in kept]) == as_data([expected[i] for i in kept])


def test_the_trainer_counts_failed_episodes_and_trains_on_the_rest(saved_policy):
    from rl.grpo import GRPO, GRPOConfig
    from rl.train import Trainer

    policy, _ = saved_policy
    specs = make_specs(0, 0, 2, 2)
    trained = tiny_policy(echo_tokenizer(), max_new_tokens=12)
    rollout = SerialRollout(trained, functools.partial(RaisingEnv, specs[0].task_seed), 4)
    trainer = Trainer(trained, GRPO(trained, None, GRPOConfig(2, 2, kl_coef=0.0)), rollout, iterations=1,
                      num_groups=2, group_size=2)
    [metrics] = trainer.run()
    assert metrics["episodes_failed"] == 2.0 and metrics["groups_skipped"] >= 0.5  # the failed group is left out
