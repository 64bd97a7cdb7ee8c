"""Overlap of rollout and update: iteration it is sampled with the weights after update it-2 (staleness
exactly one version after the first iteration), the update corrects with the sampler's log-probs, a
resumed overlapped run samples and logs what the uninterrupted one did, KeepBest keeps the weights
that sampled, a Ray worker killed during an overlapped rollout loses no episode, and the combinations
that cannot work are refused."""

import copy
import functools
import os

import pytest
import torch

from rl import checkpoint
from rl.cli import build_parser
from rl.config import RolloutConfig, TrainConfig, from_dict, load, overrides_from, to_dict
from rl.errors import ConfigError
from rl.grpo import GRPO, GRPOConfig
from rl.ppo import PPO, PPOConfig
from rl.rollout import RayRollout, SerialRollout, make_specs
from rl.train import Callback, KeepBest, Trainer
from rl_helpers import ECHO, CrashOnceEnv, LetterEnv, echo_tokenizer, tiny_policy
from test_rl_rollout import saved_policy  # noqa: F401  (the fixture: a tiny policy and its loader)


@pytest.fixture(scope="module")
def tokenizer():
    torch.set_num_threads(1)
    return echo_tokenizer()


def letters():
    return LetterEnv(turns=2)


class Record(Callback):
    """Each iteration's episodes, and the learner's weights at each rollout end (version ``iteration``)."""

    def __init__(self, policy):
        self.policy = policy
        self.episodes, self.weights = {}, {}

    def on_rollout_end(self, iteration, episodes, stats):
        self.episodes[iteration] = episodes
        self.weights[iteration] = self.policy.get_weights()


def tokens(episodes):
    return [(e.spec, [s.token_ids for s in e.segments], e.rewards) for e in episodes]


def overlapped(tokenizer, mode="sync", iterations=4, directory=None, callbacks=()):
    learner = tiny_policy(tokenizer, max_new_tokens=8)
    rollout = SerialRollout(copy.deepcopy(learner), letters, 16, mode=mode)
    config = GRPOConfig(4, 4, kl_coef=0.0, learning_rate=1e-2, off_policy=True)
    return Trainer(learner, GRPO(learner, None, config), rollout, iterations=iterations, num_groups=4, group_size=4,
                   seed=5, overlap=True, checkpoint_dir=directory, checkpoint_every=2, callbacks=callbacks)


def deterministic(history):
    return [{k: v for k, v in m.items() if not k.startswith("time/") and "per_second" not in k} for m in history]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_iteration_it_is_sampled_by_the_weights_after_update_it_minus_2(tokenizer, mode):
    trainer = overlapped(tokenizer, mode)
    record = Record(trainer.policy)
    trainer.callbacks = [record]
    history = trainer.run()
    assert [{e.weight_version for e in record.episodes[it]} for it in range(4)] == [{0}, {0}, {1}, {2}]
    assert [m["rollout/staleness_max"] for m in history] == [0.0, 1.0, 1.0, 1.0]
    assert [m["rollout/staleness_mean"] for m in history] == [0.0, 1.0, 1.0, 1.0]
    assert all(m["groups_skipped"] < 1.0 for m in history[:3])  # every update moved the weights
    # the label is true: a fresh sampler with the weights of version 1 samples iteration 2's episodes ...
    specs = make_specs(5, 2, 4, 4)
    again = SerialRollout(copy.deepcopy(trainer.policy), letters, 16, mode=mode)
    for version, same in ((1, True), (2, False)):  # ... and version 2's weights would not
        again.policy.set_weights(record.weights[version])
        assert (tokens(again.sample(specs)[0]) == tokens(record.episodes[2])) is same
    # the off-policy correction: the update's old log-probs are the sampler's, which lag from iteration 1 on
    assert history[0]["sampler_logprob_gap"] < 1e-4 < history[1]["sampler_logprob_gap"]
    # the rollout of iteration it + 1 ran during update it (none after the last)
    assert all(0.0 < m["time/update_hidden"] <= 1.0 for m in history[:3]) and history[3]["time/update_hidden"] == 0.0


class Spy(Callback):
    """Logs when the trainer hands a rollout to the stream and when each iteration's rollout came back."""

    def __init__(self, rollout, seed=5, groups=4, group_size=4):
        self.log = []
        submit = rollout.submit

        def logged(specs, version, weights=None):
            iteration = next((it for it in range(10) if make_specs(seed, it, groups, group_size) == list(specs)), None)
            self.log.append(("submit", iteration, version))
            return submit(specs, version, weights)

        rollout.submit = logged

    def on_rollout_end(self, iteration, episodes, stats):
        self.log.append(("end", iteration))


def test_a_streaming_rollout_gets_each_iteration_one_ahead_and_samples_what_the_threaded_overlap_does(tokenizer):
    histories = {}
    for mode in ("sync", "async"):  # sync: iteration it + 1 sampled on a thread once it returned; async: streamed
        trainer = overlapped(tokenizer, mode)
        record = Record(trainer.policy)
        trainer.callbacks = [record]
        if mode == "async":
            assert trainer.rollout.streams
            spy = Spy(trainer.rollout)
            trainer.callbacks.append(spy)
        histories[mode] = (deterministic(trainer.run()), {it: tokens(e) for it, e in record.episodes.items()})
        trainer.rollout.close()
    (sync, sampled), (streamed, got) = histories["sync"], histories["async"]
    assert got == sampled  # the same tokens and rewards every iteration; the metrics equal up to the log-probs'
    assert streamed == [pytest.approx(m, rel=1e-4, abs=1e-6) for m in sync]  # float rounding (engine vs generate)
    # the next iteration is always queued before this one's rollout is waited for, with the version that samples it
    assert spy.log == [("submit", 0, 0), ("submit", 1, 0), ("end", 0), ("submit", 2, 1), ("end", 1),
                       ("submit", 3, 2), ("end", 2), ("end", 3)]


def test_a_streamed_run_that_stops_early_drops_the_iteration_it_queued(tokenizer):
    class StopAt(Callback):
        def on_step(self, iteration, metrics):
            return iteration == 1

    trainer = overlapped(tokenizer, "async", iterations=6, callbacks=[StopAt()])
    spy = Spy(trainer.rollout)
    trainer.callbacks.append(spy)
    assert len(trainer.run()) == 2 and trainer.queued == {}
    assert spy.log[-1] == ("submit", 3, 2)  # queued during update 1, then dropped or played unused
    episodes, _ = trainer.rollout.sample(make_specs(5, 9, 2, 2))  # the stream is free again
    assert len(episodes) == 4
    trainer.rollout.close()


def test_without_overlap_nothing_is_stale_or_hidden(tokenizer):
    learner = tiny_policy(tokenizer, max_new_tokens=8)
    trainer = Trainer(learner, GRPO(learner, None, GRPOConfig(4, 4, kl_coef=0.0)), SerialRollout(learner, letters, 16),
                      iterations=2, num_groups=4, group_size=4)
    history = trainer.run()
    assert [(m["rollout/staleness_max"], m["time/update_hidden"]) for m in history] == [(0.0, 0.0)] * 2


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_overlapped_run_resumes_to_the_same_episodes_and_metrics(tokenizer, tmp_path, mode):
    full = overlapped(tokenizer, mode, directory=str(tmp_path / "a"))
    history = full.run()
    middle = str(tmp_path / "a" / "iter_000002")
    sampler, version = checkpoint.load_sampler(middle)
    assert version == 1  # iteration 2 is sampled with the weights after update 0
    resumed = overlapped(tokenizer, mode, directory=str(tmp_path / "b"))
    resumed.resume(middle)
    assert resumed.iteration == 2
    assert any(not torch.equal(sampler[k], v) for k, v in resumed.policy.get_weights().items())
    rest = resumed.run()
    final, again = full.policy.get_weights(), resumed.policy.get_weights()
    if mode == "sync":
        assert deterministic(rest) == deterministic(history[2:])
        assert all(torch.equal(final[k], again[k]) for k in final)
    else:  # the engine's log-probs depend on which rows share a decode step, at float rounding
        assert deterministic(rest) == [pytest.approx(m, rel=1e-4, abs=1e-6) for m in deterministic(history[2:])]
        assert [m["reward"] for m in rest] == [m["reward"] for m in history[2:]]  # the same samples
        assert all(torch.allclose(final[k], again[k], rtol=0, atol=1e-6) for k in final)
    # the sampler's weights are what makes it exact: without them (the checkpoint of a run without overlap) the
    # first iteration samples with the learner's
    bare, weights = str(tmp_path / "bare"), tiny_policy(tokenizer, max_new_tokens=8)
    checkpoint.save(bare, weights, *checkpoint.load(middle, weights))
    assert checkpoint.load_sampler(bare) is None
    other = overlapped(tokenizer, mode)
    other.resume(bare)
    diverged = other.run()
    assert [m["rollout/staleness_max"] for m in diverged] == [0.0, 1.0]
    assert deterministic(diverged) != deterministic(history[2:])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_keep_best_keeps_the_weights_that_sampled_the_best_window(tokenizer, mode):
    trainer = overlapped(tokenizer, mode, iterations=5)
    record = Record(trainer.policy)
    keeper = KeepBest(trainer.policy, window=1)
    trainer.callbacks = [record, keeper]
    history = trainer.run()
    best = keeper.best_iteration
    assert history[best]["reward"] == max(m["reward"] for m in history)
    sampled_by = max(0, best - 1)
    assert all(torch.equal(keeper.best_weights[k], v) for k, v in record.weights[sampled_by].items())
    assert len(keeper.versions) <= 2  # one version behind, no more
    if best > 0:  # the learner's weights of that iteration did not sample it
        assert any(not torch.equal(keeper.best_weights[k], v) for k, v in record.weights[best].items())


def test_overlap_refuses_what_it_cannot_do_correctly(tokenizer):
    learner = tiny_policy(tokenizer, max_new_tokens=8)
    own = SerialRollout(copy.deepcopy(learner), letters, 4)
    good = GRPO(learner, None, GRPOConfig(2, 2, kl_coef=0.0, off_policy=True))
    make = functools.partial(Trainer, iterations=1, num_groups=2, group_size=2, overlap=True)
    with pytest.raises(ConfigError, match=r"GRPO does not \(off_policy False\).*GRPOConfig\(off_policy=True\)"):
        make(learner, GRPO(learner, None, GRPOConfig(2, 2, kl_coef=0.0)), own)
    with pytest.raises(ConfigError, match=r"PPO does not .* Use GRPO"):
        make(learner, PPO(learner, None, PPOConfig(2)), own)
    with pytest.raises(ConfigError, match=r"max_staleness \(1\) must be 0 with overlap"):
        make(learner, good, own, max_staleness=1)
    with pytest.raises(ConfigError, match=r"samples with the learner's policy object.*copy.deepcopy\(policy\)"):
        make(learner, good, SerialRollout(learner, letters, 4))
    with pytest.raises(ConfigError, match=r"rollout.overlap: true with algorithm 'grpo'.*grpo.off_policy: true"):
        TrainConfig(policy={"model": "m"}, rollout=RolloutConfig(overlap=True))
    with pytest.raises(ConfigError, match=r"rollout.overlap: true with algorithm 'ppo'"):
        from_dict(TrainConfig, {"algorithm": "ppo", "policy": {"model": "m"}, "rollout": {"overlap": True}})
    with pytest.raises(ConfigError, match=r"rollout.max_staleness \(1\) must be 0 with rollout.overlap"):
        RolloutConfig(backend="ray", overlap=True, max_staleness=1)
    with pytest.raises(ConfigError, match=r"rollout.overlap: expected true or false"):
        from_dict(TrainConfig, {"rollout": {"overlap": "yes"}})


def test_overlap_config_round_trips_and_the_serial_backend_samples_with_a_copy(tokenizer):
    args = build_parser().parse_args(["train", "--policy.model", "m", "--rollout.overlap", "true",
                                      "--set", "grpo.off_policy=true"])
    config = load(TrainConfig, None, overrides_from(args))
    assert config.rollout.overlap and config.grpo.off_policy
    assert from_dict(TrainConfig, to_dict(config)) == config
    assert not load(TrainConfig, None, {"policy.model": "m"}).rollout.overlap  # off by default
    learner = tiny_policy(tokenizer, max_new_tokens=8)
    rollout = RolloutConfig(num_envs=2, overlap=True).build(learner, None, letters)
    assert rollout.policy is not learner and rollout.policy.model is not learner.model
    weights = learner.get_weights()
    assert all(torch.equal(weights[k], v) for k, v in rollout.policy.get_weights().items())
    assert RolloutConfig(num_envs=2).build(learner, None, letters).policy is learner


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])  # async: Ray streams too (RayRollout.submit)
def test_a_ray_worker_killed_during_an_overlapped_rollout_loses_no_episode(ray_session, saved_policy, tmp_path, mode):
    _, make_policy = saved_policy
    crash = make_specs(7, 1, 4, 2)[5]  # iteration 1, sampled while update 0 runs
    make_env = functools.partial(CrashOnceEnv, str(tmp_path / "crashed"), crash.task_seed)
    runs, spy = {}, None
    for backend in ("serial", "ray"):
        learner = make_policy()
        if backend == "serial":
            rollout = SerialRollout(make_policy(), ECHO.make, 8, mode=mode)
        else:  # async: four chunks an iteration on two workers, each holding two at once
            rollout = RayRollout(make_policy, make_env, num_workers=2, envs_per_worker=4 if mode == "sync" else 2,
                                 num_cpus=0.25, mode=mode)
            assert rollout.streams == (mode == "async")
        record = Record(learner)
        config = GRPOConfig(4, 2, kl_coef=0.0, learning_rate=1e-2, off_policy=True)
        trainer = Trainer(learner, GRPO(learner, None, config), rollout, iterations=3, num_groups=4, group_size=2,
                          seed=7, overlap=True, callbacks=[record])
        if backend == "ray" and mode == "async":
            spy = Spy(rollout, seed=7, groups=4, group_size=2)
            trainer.callbacks.append(spy)
        try:
            runs[backend] = (trainer.run(), record.episodes)
        finally:
            rollout.close()
    assert os.path.exists(tmp_path / "crashed"), "the crash did not happen: the test proved nothing"
    (serial, expected), (remote, got) = runs["serial"], runs["ray"]
    restarts = [m["worker_restarts"] for m in remote]
    if mode == "sync":
        assert restarts == [0.0, 1.0, 0.0]
    else:  # the death is charged to the oldest batch the dead worker held: iteration 0's or 1's
        assert sum(restarts) == 1.0 and restarts[2] == 0.0
        assert spy.log == [("submit", 0, 0), ("submit", 1, 0), ("end", 0), ("submit", 2, 1), ("end", 1), ("end", 2)]
    assert [m["rollout/staleness_max"] for m in remote] == [0.0, 1.0, 1.0]
    for it in range(3):
        assert [e.spec.episode_id for e in got[it]] == list(range(8))
        assert tokens(got[it]) == tokens(expected[it])
    assert [{e.weight_version for e in got[it]} for it in range(3)] == [{0}, {0}, {1}]
