"""Real processes killed (SIGKILL) mid-save and mid-training: what is on disk stays loadable, reruns work.

The writers are forked from the test process (the tiny model is already built, so a child starts in
milliseconds) and killed at random moments; the parent then checks the folders as a rerun would.
"""

import copy
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch
from transformers.utils import logging as transformers_logging

from rl import checkpoint
from rl.grpo import GRPO, GRPOConfig
from rl.hf import CausalLMPolicy, reference_policy
from rl.logging import MetricsLogger, read_metrics
from rl.rollout import SerialRollout
from rl.train import Callback, Trainer
from rl_helpers import LetterEnv, echo_tokenizer, tiny_policy
from rl.errors import CheckpointError, ConfigError

FORK = multiprocessing.get_context("fork")


def forked(target, *args):
    """Start ``target(*args)`` in a forked child (see the fixture ``forkable``)."""
    child = FORK.Process(target=target, args=args)
    child.start()
    return child


@pytest.fixture(scope="module")
def tokenizer():
    return echo_tokenizer()


@pytest.fixture(autouse=True)
def forkable():
    """One torch thread (the forked writers inherit it; tiny models also run faster so on a busy machine)
    and no transformers progress bars: tqdm's lock is shared with forked children, and a child killed
    while holding it would block the parent's next bar forever."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers_logging.disable_progress_bar()
    yield
    transformers_logging.enable_progress_bar()
    torch.set_num_threads(threads)


def _save_forever(policy, directory: str) -> None:
    """The writer: checkpoint after checkpoint (and the policy folder in between), as a trainer saves."""
    found = checkpoint.latest(directory)
    iteration = 0 if found is None else int(found[-6:])
    while True:
        iteration += 1
        checkpoint.save(os.path.join(directory, f"iter_{iteration:06d}"), policy, {"step": iteration}, iteration)
        policy.save(os.path.join(directory, "policy"))


def _save_once(policy, directory: str) -> None:
    """One iteration of the writer, to time it."""
    checkpoint.save(os.path.join(directory, "iter_000001"), policy, {"step": 1}, 1)
    policy.save(os.path.join(directory, "policy"))


def _assert_loadable(directory: str, fresh) -> int:
    """Every folder under its final name is complete and loads; returns the newest checkpoint's iteration."""
    for name in os.listdir(directory):
        if not name.startswith("."):
            assert checkpoint.incomplete(os.path.join(directory, name)) is None, name
    found = checkpoint.latest(directory)
    iteration = 0
    if found is not None:
        state, iteration = checkpoint.load(found, fresh)
        assert state == {"step": iteration} and found.endswith(f"iter_{iteration:06d}")
    if os.path.exists(os.path.join(directory, "policy")):
        CausalLMPolicy.from_pretrained(os.path.join(directory, "policy"), max_new_tokens=4)
    return iteration


@pytest.mark.slow
def test_saves_killed_at_random_moments_leave_loadable_folders(tokenizer, tmp_path):
    policy, fresh = tiny_policy(tokenizer), tiny_policy(tokenizer, seed=1)
    directory = str(tmp_path / "run")
    os.makedirs(directory)
    rng = random.Random(0)
    start = time.perf_counter()  # how long a forked writer takes to start and write one checkpoint and policy
    probe = forked(_save_once, policy, str(tmp_path / "probe"))  # (forking a big test process is slow late in a
    probe.join()                                                  # full run: the kills must span that too)
    assert probe.exitcode == 0
    window = 3 * (time.perf_counter() - start)
    mid_save, newest = 0, 0
    for _ in range(30):
        child = forked(_save_forever, policy, directory)
        time.sleep(rng.uniform(0.0, window))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        mid_save += any(name.startswith(".") for name in os.listdir(directory))
        iteration = _assert_loadable(directory, fresh)
        assert iteration >= newest  # a kill never loses a checkpoint that was complete
        newest = iteration
    assert mid_save >= 5  # the kills did land inside saves, so the checks above were not vacuous
    assert newest >= 3
    # a rerun resumes after the newest complete checkpoint and cleans what the killed saves left
    checkpoint.save(os.path.join(directory, f"iter_{newest + 1:06d}"), policy, {"step": newest + 1}, newest + 1)
    policy.save(os.path.join(directory, "policy"))
    assert not [n for n in os.listdir(directory) if n.startswith(f".iter_{newest + 1:06d}.") or n.startswith(".policy.")]
    assert _assert_loadable(directory, fresh) == newest + 1
    weights = policy.get_weights()
    assert all(torch.equal(weights[k], v) for k, v in fresh.get_weights().items())


def test_latest_skips_incomplete_checkpoints_and_damaged_ones_are_refused(tokenizer, tmp_path):
    policy = tiny_policy(tokenizer)
    for iteration in (1, 2, 3):
        checkpoint.save(str(tmp_path / f"iter_{iteration:06d}"), policy, {}, iteration)
    with open(tmp_path / "iter_000003" / "trainer.pt", "r+b") as handle:
        handle.truncate(100)  # as a kill during torch.save did before saves were atomic
    os.remove(tmp_path / "iter_000002" / checkpoint.MARKER)
    assert checkpoint.latest(str(tmp_path)) == str(tmp_path / "iter_000001")
    with pytest.raises(CheckpointError, match=r"iter_000003 is incomplete or damaged: trainer.pt should have \d+ bytes"):
        checkpoint.load(str(tmp_path / "iter_000003"), policy)
    with pytest.raises(CheckpointError, match="iter_000002 is incomplete or damaged: it has no completion marker"):
        checkpoint.load(str(tmp_path / "iter_000002"), policy)


def test_policy_folder_left_by_a_killed_save_is_refused(tokenizer, tmp_path):
    policy, folder = tiny_policy(tokenizer), str(tmp_path / "policy")
    policy.save(folder)
    (tmp_path / "policy" / "config.json").write_bytes(b"")  # the 0-byte config.json of issue 12
    with pytest.raises(ConfigError, match=r"policy folder .* is incomplete: config.json should have \d+ bytes, found 0"):
        CausalLMPolicy.from_pretrained(folder)
    policy.save(folder)  # saving again replaces the damaged save
    assert checkpoint.incomplete(folder) is None
    CausalLMPolicy.from_pretrained(folder)
    # a folder without the marker (a save from before markers, or someone else's files)
    (tmp_path / "policy" / "config.json").write_bytes(b"")
    os.remove(tmp_path / "policy" / checkpoint.MARKER)
    with pytest.raises(ConfigError, match="no completion marker rl_complete.json and its config.json is unreadable"):
        CausalLMPolicy.from_pretrained(folder)
    with pytest.raises(ConfigError, match="holds files that rl did not save"):
        policy.save(folder)  # a save replaces the folder whole, so it keeps off files it did not write


def make_trainer(tokenizer, directory, callbacks=(), overlap=False):
    policy = tiny_policy(tokenizer, max_new_tokens=8)
    algorithm = GRPO(policy, reference_policy(policy), GRPOConfig(2, 2, kl_coef=0.05, minibatch_size=4,
                                                                  off_policy=overlap))
    sampler = copy.deepcopy(policy) if overlap else policy
    return Trainer(policy, algorithm, SerialRollout(sampler, lambda: LetterEnv(turns=2), 4), iterations=3,
                   num_groups=2, group_size=2, seed=3, overlap=overlap,
                   checkpoint_dir=os.path.join(directory, "checkpoints"), checkpoint_every=1, callbacks=callbacks)


def train_resuming(tokenizer, directory: str, callbacks=(), overlap=False) -> Trainer:
    """What ``rl train`` does: resume from the newest complete checkpoint, continue the log, run."""
    trainer = make_trainer(tokenizer, directory, callbacks, overlap)
    found = checkpoint.latest(trainer.checkpoint_dir)
    if found is not None:
        trainer.resume(found)
    trainer.logger = MetricsLogger(directory, tensorboard=False, initial=trainer.iteration)
    try:
        trainer.run()
    finally:
        trainer.logger.close()
    return trainer


def logged(directory: str) -> list[tuple[int, float]]:
    return [(r["step"], r["reward"]) for r in read_metrics(os.path.join(directory, "metrics.jsonl"))]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_resumed_run_logs_each_step_once(tokenizer, tmp_path, overlap):
    class Killed(Exception):
        pass

    class KillAfterLogging(Callback):  # as a kill between logging step 1 and the checkpoint after it
        def on_step(self, iteration, metrics):
            if iteration == 1:
                raise Killed
            return False

    interrupted = str(tmp_path / "interrupted")
    with pytest.raises(Killed):
        train_resuming(tokenizer, interrupted, [KillAfterLogging()], overlap)
    assert [step for step, _ in logged(interrupted)] == [0, 1]
    assert checkpoint.latest(os.path.join(interrupted, "checkpoints")).endswith("iter_000001")
    with open(os.path.join(interrupted, "metrics.jsonl"), "a") as handle:
        handle.write('{"step": 2, "rew')  # and a line that a killed writer left cut short
    resumed = train_resuming(tokenizer, interrupted, (), overlap)
    straight = train_resuming(tokenizer, str(tmp_path / "straight"), (), overlap)
    assert logged(interrupted) == logged(str(tmp_path / "straight"))  # steps 0-2, once each, same rewards
    final, again = straight.policy.get_weights(), resumed.policy.get_weights()
    assert all(torch.equal(final[k], again[k]) for k in final)


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True])
def test_training_killed_at_random_moments_resumes_to_the_same_log(tokenizer, tmp_path, overlap):
    straight = str(tmp_path / "straight")
    start = time.perf_counter()
    train_resuming(tokenizer, straight, (), overlap)
    duration = time.perf_counter() - start
    directory, rng, kills = str(tmp_path / "killed"), random.Random(1), 0
    for _ in range(4):
        child = forked(train_resuming, tokenizer, directory, (), overlap)
        time.sleep(rng.uniform(0.0, duration / 3))
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.join()
    assert kills >= 2
    train_resuming(tokenizer, directory, (), overlap)
    assert logged(directory) == logged(straight)
