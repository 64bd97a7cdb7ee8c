"""The distributed learner: two gloo workers (Ray actors), replicas (ddp) or FSDP2 shards (fsdp), take the
one-process update on the same batch, checkpoint rank 0 and resume exactly."""

import functools
import json
import os
import types

import numpy as np
import pytest
import torch

from rl import checkpoint
from rl.cli import main
from rl.errors import ConfigError
from rl.grpo import GRPO, GRPOConfig
from rl.hf import (CHATML_SPECIAL_TOKENS, CausalLMPolicy, QwenVLPolicy, checkpoint_activations, reference_policy,
                   tiny_qwen_vl)
from rl.learner import LearnerGroup, Shard
from rl.ppo import PPO, PPOConfig
from rl.rollout import SerialRollout, make_specs
from rl.sft import SFTStage, run_pst
from rl.tokenizer import train_tokenizer
from rl.train import Trainer
from rl_helpers import LetterEnv, echo_examples, echo_tokenizer, tiny_lora_policy, tiny_policy

# Parameters after the two-worker update and after the one-process update agree to within ATOL (5e-5;
# measured on 2026-12-06 after four GRPO steps at lr 1e-3: 8.1e-6 with ddp and with fsdp; after six SFT
# steps: 1.3e-8 with either): the gradients differ only by float rounding
# (other chunks, another summation order), but AdamW's first steps move a weight by about the learning
# rate (1e-3) whatever its gradient's size, so rounding on a near-zero gradient can show as a small
# share of a step. AdamW is blind to the gradient's scale, so the metrics (the loss and the grad norm
# before clipping) are compared too: a mean instead of a sum over ranks halves the grad norm.
ATOL = 5e-5


@pytest.fixture(scope="module")
def tokenizer():
    return echo_tokenizer()


def close(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def check_workers(strategy, workers, mirror):
    """ddp: both ranks hold the mirror's weights; fsdp: each holds a part of every weight (dim 0), and the
    parts together are the mirror's weights."""
    rank0, rank1 = workers
    if strategy == "ddp":
        assert all(torch.equal(rank0[k], mirror[k]) and torch.equal(rank1[k], mirror[k]) for k in mirror)
    else:
        assert all(rank0[k].shape[0] + rank1[k].shape[0] == mirror[k].shape[0] and rank1[k].shape[0] > 0
                   and torch.equal(torch.cat([rank0[k], rank1[k]]), mirror[k]) for k in mirror)


def test_shard_parts_cover_a_minibatch_once():
    rows = [7, 3, 9, 1, 4]
    parts = [Shard(rank, 2).part(rows) for rank in range(2)]
    assert parts == [[7, 9, 4], [3, 1]]
    assert Shard(2, 3).part([5]) == []


def test_a_learner_group_that_cannot_fit_the_cluster_is_refused_before_any_actor_starts(ray_session, tokenizer):
    make = functools.partial(tiny_policy, tokenizer, max_new_tokens=8)
    with pytest.raises(ConfigError, match=r"learner.num_workers \(5\) x \(num_cpus 0.5, num_gpus 0.0\) exceed the "
                                          r"cluster's CPU 2.0"):
        LearnerGroup(make(), make, num_workers=5, num_cpus=0.5)
    with pytest.raises(ConfigError, match=r"learner.strategy \('zero3'\) must be one of \('ddp', 'fsdp'\)"):
        LearnerGroup(make(), make, num_workers=2, num_cpus=0.5, strategy="zero3")
    with pytest.raises(ConfigError, match=r"learner.mixed_precision \('bfloat16'\) .* needs learner.strategy 'fsdp' "
                                          r"\(got 'ddp'\)"):
        LearnerGroup(make(), make, num_workers=2, num_cpus=0.5, mixed_precision="bfloat16")


def test_fsdp_ranks_pad_to_the_same_number_of_passes():
    chunks = {0: ["a", "b", "c"], 1: ["d"]}
    assert Shard(1, 2).passes(lambda shard: chunks[shard.rank]) == [("d", 1.0)]  # ddp: only its own
    assert Shard(1, 2, sharded=True).passes(lambda shard: chunks[shard.rank]) == [("d", 1.0), ("a", 0.0), ("a", 0.0)]
    assert Shard(0, 2, sharded=True).passes(lambda shard: chunks[shard.rank]) == [("a", 1.0), ("b", 1.0), ("c", 1.0)]
    assert Shard(0, 2, sharded=True).passes(lambda shard: []) == []


def grpo_case(tokenizer):
    """The GRPO equivalence tests' case: a tiny policy factory, a policy and its start weights, two batches of
    4 x 4 two-turn LetterEnv episodes, and GRPO with two minibatches of 8 (two steps an update), per-token
    loss and a KL term."""
    torch.set_num_threads(1)
    make = functools.partial(tiny_policy, tokenizer, max_new_tokens=8)
    policy = make()
    start = policy.get_weights()
    rollout = SerialRollout(policy, lambda: LetterEnv(turns=2), 16)
    batches = [rollout.sample(make_specs(5, it, 4, 4))[0] for it in range(2)]
    config = GRPOConfig(4, 4, learning_rate=1e-3, kl_coef=0.05, minibatch_size=8, micro_batch_tokens=64)
    return make, policy, start, batches, config


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_workers_take_the_one_process_grpo_update(ray_session, tokenizer, strategy):
    make, policy, start, batches, config = grpo_case(tokenizer)
    group_matches_one_process(policy, make, start, batches, config, strategy, same_keys=True,
                              keys=("loss", "kl", "entropy", "grad_norm", "clip_fraction", "episodes_trained"))


def ppo_case(tokenizer):
    """The PPO learner tests' case: as :func:`grpo_case`, with two batches of 12 two-turn LetterEnv episodes
    and PPO with two epochs of two minibatches of 6 episodes, chunked, bi-level credit (a value per token) and KL."""
    torch.set_num_threads(1)
    make = functools.partial(tiny_policy, tokenizer, max_new_tokens=8)
    policy = make()
    start = policy.get_weights()
    rollout = SerialRollout(policy, lambda: LetterEnv(turns=2), 16)
    batches = [rollout.sample(make_specs(6, it, 12, 1))[0] for it in range(2)]
    config = PPOConfig(12, learning_rate=1e-3, kl_coef=0.05, minibatch_size=6, micro_batch_tokens=64,
                       credit="bilevel", token_lam=0.9)
    return make, policy, start, batches, config


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_workers_take_the_one_process_ppo_update(ray_session, tokenizer, strategy):
    make, policy, start, batches, config = ppo_case(tokenizer)
    mirror = make()
    mirror.set_weights(start)
    # fsdp: the policy sharded, the value head whole on every rank (its gradients all-reduced)
    group = LearnerGroup(mirror, make, num_workers=2, num_cpus=0.5, strategy=strategy).start_ppo(config)
    try:
        head = group.state_dict()["value_head"]  # rank 0's value head, which every rank took
        single = PPO(policy, reference_policy(policy), config)
        single.value_head.load_state_dict(head)
        expected = [single.update(episodes, it) for it, episodes in enumerate(batches)]
        got = [group.update(batches[0], 0)]
        state = group.state_dict()  # a checkpoint after the first update
    finally:
        group.close()
    checkpointed, mirror = mirror.get_weights(), make()  # a resume, as Trainer.resume does it: the run starts
    mirror.set_weights(start)  # from the initial weights (the KL reference), then the checkpoint's weights
    resumed = LearnerGroup(mirror, make, num_workers=2, num_cpus=0.5, strategy=strategy).start_ppo(config)
    try:
        mirror.set_weights(checkpointed)
        resumed.load_state_dict(state)  # the mirror's weights, the optimizer and the value head to every rank
        got.append(resumed.update(batches[1], 1))
        workers = resumed.worker_weights()
        state = resumed.state_dict()
    finally:
        resumed.close()
    heads = state["value_head"]
    # the optimizer state is the one-process format: AdamW's moments of the policy's, then the head's parameters
    moments = [single.optimizer.state_dict()["state"][i]["exp_avg"] for i in range(len(state["optimizer"]["state"]))]
    assert [state["optimizer"]["state"][i]["exp_avg"].shape for i in range(len(moments))] == [m.shape for m in moments]
    assert len(moments) == len(start) + 2 and close(dict(enumerate(moments)), {
        i: state["optimizer"]["state"][i]["exp_avg"] for i in range(len(moments))}) < ATOL
    check_workers(strategy, workers, mirror.get_weights())
    assert close(policy.get_weights(), start) > 50 * ATOL
    assert close(policy.get_weights(), mirror.get_weights()) < ATOL
    assert close(single.value_head.state_dict(), heads) < ATOL and close(heads, head) > 50 * ATOL
    for want, have in zip(expected, got):
        assert want.keys() == have.keys()
        for key in ("loss", "value_loss", "kl", "entropy", "grad_norm", "clip_fraction", "value_mean"):
            assert have[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_workers_train_a_lora_policy_as_one_process(ray_session, tokenizer, strategy):
    pytest.importorskip("peft")
    torch.set_num_threads(1)
    make = functools.partial(tiny_lora_policy, tokenizer, max_new_tokens=8)
    policy = make()
    start = policy.get_weights()
    assert start and all("lora_" in name for name in start)  # the trainable weights are the adapters
    base = {n: p.detach().clone() for n, p in policy.model.named_parameters() if not p.requires_grad}
    rollout = SerialRollout(policy, lambda: LetterEnv(turns=1), 16)
    batches = [rollout.sample(make_specs(2, it, 4, 4))[0] for it in range(2)]
    # the reference is the base model (adapters off), on every rank
    config = GRPOConfig(4, 4, learning_rate=1e-2, kl_coef=0.1, minibatch_size=8, micro_batch_tokens=48)
    mirror, got = group_matches_one_process(policy, make, start, batches, config, strategy)
    assert mirror.get_weights().keys() == start.keys()  # only adapters come back from the group
    assert all(torch.equal(p, base[n]) for n, p in mirror.model.named_parameters() if not p.requires_grad)
    assert got[-1]["kl"] > 0  # the adapters moved the policy away from the base model


def group_matches_one_process(policy, make, start, batches, config, strategy, same_keys=False,
                              keys=("loss", "kl", "grad_norm"), **options):
    """The GRPO updates of ``batches`` in one process (on ``policy``, at weights ``start``) and on a group
    of two ``strategy`` workers (on a fresh ``make()`` mirror at ``start``; more LearnerGroup ``options``)
    agree: the weights moved, the driver's mirror equals the one-process weights and every worker's
    replica or shard, and each update's metrics ``keys`` match (with ``same_keys``, the metric names
    too). Returns the mirror and the group's metrics."""
    single = GRPO(policy, reference_policy(policy), config)
    expected = [single.update(episodes, it) for it, episodes in enumerate(batches)]
    mirror = make()
    mirror.set_weights(start)
    group = LearnerGroup(mirror, make, num_workers=2, num_cpus=0.5, strategy=strategy, **options).start_grpo(config)
    try:
        got = [group.update(episodes, it) for it, episodes in enumerate(batches)]
        workers = group.worker_weights()
    finally:
        group.close()
    check_workers(strategy, workers, mirror.get_weights())  # the driver mirrors the group's weights
    assert close(policy.get_weights(), start) > 50 * ATOL  # the update moved the weights
    assert close(policy.get_weights(), mirror.get_weights()) < ATOL
    for want, have in zip(expected, got):
        assert not same_keys or want.keys() == have.keys()
        for key in keys:
            assert have[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    return mirror, got


def layer_calls(policy):
    """Whether gradients were on, for every call of the first decoder layer's MLP (a checkpointed layer
    calls it again when the backward pass recomputes the layer; module hooks do not see that call)."""
    calls = []

    def counted(mlp, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return type(mlp).forward(mlp, *args, **kwargs)

    mlp = policy.model.get_decoder().layers[0].mlp
    mlp.forward = types.MethodType(counted, mlp)  # (a deep copy, e.g. the KL reference, binds its own MLP)
    return calls


def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_grpo_update(tokenizer):
    torch.set_num_threads(1)
    policies = {name: tiny_policy(tokenizer, max_new_tokens=8) for name in ("kept", "recomputed")}
    checkpoint_activations(policies["recomputed"].model)
    calls = {name: layer_calls(policy) for name, policy in policies.items()}
    start = policies["kept"].get_weights()
    episodes = {name: SerialRollout(policy, lambda: LetterEnv(turns=2), 16).sample(make_specs(5, 0, 4, 4))[0]
                for name, policy in policies.items()}
    # sampling is unaffected: the same tokens and log-probs, each layer run once per decoding step
    assert [[s.token_ids for s in e.segments] for e in episodes["kept"]] == \
        [[s.token_ids for s in e.segments] for e in episodes["recomputed"]]
    assert [e.segments[1].logprobs for e in episodes["kept"]] == \
        [e.segments[1].logprobs for e in episodes["recomputed"]]
    assert calls["kept"] == calls["recomputed"] and not any(calls["kept"])
    # two minibatches (old log-probs scored first, without gradients) and a KL term
    config = GRPOConfig(4, 4, learning_rate=1e-3, kl_coef=0.05, minibatch_size=8, micro_batch_tokens=64)
    metrics = {name: GRPO(policy, reference_policy(policy), config).update(episodes["kept"], 0)
               for name, policy in policies.items()}
    kept, recomputed = (policies[name].get_weights() for name in ("kept", "recomputed"))
    assert close(kept, start) > 1e-3  # two AdamW steps of 1e-3
    assert close(kept, recomputed) < 1e-7
    for key in ("loss", "kl", "grad_norm"):
        assert metrics["recomputed"][key] == pytest.approx(metrics["kept"][key], rel=1e-6), key
    with_gradients = {name: sum(made) for name, made in calls.items()}
    assert with_gradients["recomputed"] == 2 * with_gradients["kept"] > 0  # forward, then again in the backward


def test_rl_train_checkpoints_the_layers_of_its_one_process_learner(tokenizer, tmp_path, monkeypatch):
    import rl.cli
    from rl.config import LearnerConfig, PolicyConfig, TrainConfig

    tiny_policy(tokenizer).save(str(tmp_path / "policy"))
    seen = {}

    def run(trainer):
        layers = trainer.policy.model.get_decoder().layers
        seen["layers"] = [(layer.gradient_checkpointing, layer.training, layer.mlp.training) for layer in layers]
        return []

    monkeypatch.setattr(rl.cli.Trainer, "run", run)
    for on in (False, True):
        rl.cli.run_train(TrainConfig(policy=PolicyConfig(model=str(tmp_path / "policy"), device="cpu"), iterations=1,
                                     learner=LearnerConfig(gradient_checkpointing=on), output_dir=str(tmp_path / "run"),
                                     tensorboard=False, progress=False))
        # on: each decoder layer recomputes in backward passes; its submodules stay in eval mode (no dropout)
        assert seen["layers"] == [(on, on, False)] * 2


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_workers_with_gradient_checkpointing_take_the_one_process_update(ray_session, tokenizer, strategy):
    make, policy, start, batches, config = grpo_case(tokenizer)
    group_matches_one_process(policy, make, start, batches, config, strategy, gradient_checkpointing=True)


def direction_cosine(moved, reference, start):
    """The cosine between two updates (``moved - start`` and ``reference - start``, all weights flattened)."""
    a, b = (torch.cat([(w[k] - start[k]).flatten() for k in start]) for w in (moved, reference))
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.slow
def test_fsdp_with_bfloat16_passes_keeps_float32_master_weights_and_takes_about_the_float32_update(ray_session,
                                                                                                   tokenizer):
    make, policy, start, batches, config = grpo_case(tokenizer)
    single = GRPO(policy, reference_policy(policy), config)
    expected = [single.update(episodes, it) for it, episodes in enumerate(batches)]
    mirror = make()
    mirror.set_weights(start)
    group = LearnerGroup(mirror, make, num_workers=2, num_cpus=0.5, strategy="fsdp",
                         mixed_precision="bfloat16").start_grpo(config)
    try:
        got = [group.update(episodes, it) for it, episodes in enumerate(batches)]
        workers = group.worker_weights()
    finally:
        group.close()
    assert all(w.dtype == torch.float32 for shards in workers for w in shards.values())  # the masters
    check_workers("fsdp", workers, mirror.get_weights())
    # bfloat16 passes (8 bits of mantissa) are not the float32 update to float rounding (a weight whose
    # gradient is near 0 can take an AdamW step of the other sign: measured on 2026-12-06 the largest gap
    # was 4.0e-3, the size of the update), but the same update to bfloat16's rounding: the same direction
    # (cosine 0.9991 measured) and the same loss, KL and grad norm to within 1% (0.1%, 5e-6, 6e-5 measured)
    assert close(policy.get_weights(), mirror.get_weights()) > ATOL
    assert direction_cosine(mirror.get_weights(), policy.get_weights(), start) > 0.99
    for want, have in zip(expected, got):
        for key in ("loss", "kl", "grad_norm"):
            assert have[key] == pytest.approx(want[key], rel=1e-2, abs=1e-4), key


@pytest.mark.slow
def test_ppo_on_fsdp_with_bfloat16_passes_takes_about_the_float32_update(ray_session, tokenizer):
    make, policy, start, (episodes, _), config = ppo_case(tokenizer)
    mirror = make()
    mirror.set_weights(start)
    # the policy's passes in bfloat16 (float32 masters), the value head whole and float32 on every rank
    group = LearnerGroup(mirror, make, num_workers=2, num_cpus=0.5, strategy="fsdp",
                         mixed_precision="bfloat16").start_ppo(config)
    try:
        head = group.state_dict()["value_head"]
        got = group.update(episodes, 0)
        workers = group.worker_weights()
        heads = group.state_dict()["value_head"]
    finally:
        group.close()
    single = PPO(policy, reference_policy(policy), config)
    single.value_head.load_state_dict(head)
    want = single.update(episodes, 0)
    assert all(w.dtype == torch.float32 for shards in workers for w in shards.values())
    assert all(v.dtype == torch.float32 for v in heads.values())
    check_workers("fsdp", workers, mirror.get_weights())
    assert close(policy.get_weights(), mirror.get_weights()) > ATOL  # bfloat16's rounding, not float32's
    # measured on 2026-12-07: cosine 0.9991 (policy) and 0.9933 (value head, fed bfloat16 hidden states);
    # loss 0.4 %, KL 0.3 %, grad norm 0.1 %, value loss and value mean < 0.1 % off the float32 update
    assert direction_cosine(mirror.get_weights(), policy.get_weights(), start) > 0.99
    assert direction_cosine(heads, single.value_head.state_dict(), head) > 0.97
    for key in ("loss", "value_loss", "kl", "grad_norm", "value_mean"):
        assert got[key] == pytest.approx(want[key], rel=2e-2, abs=1e-4), key


class SomePixelsEnv(LetterEnv):
    """LetterEnv whose episodes from a seed divisible by 3 show an image every turn, the others none."""

    def __init__(self):
        super().__init__(turns=2, pixels=True)

    def reset(self, *, seed=None, options=None):
        self.show = seed % 3 == 0
        return super().reset(seed=seed, options=options)

    def _observation(self):
        return super()._observation() | {"pixels_mask": np.array([self.show, False], dtype=np.int8)}


def tiny_qwen_vl_policy(tokenizer):
    model, processor = tiny_qwen_vl(tokenizer, "qwen2_5_vl")
    return QwenVLPolicy(model, tokenizer, processor, chat="chatml", max_new_tokens=6)


@pytest.mark.slow
def test_two_fsdp_workers_train_a_qwen_vl_policy_on_chunks_with_and_without_images(ray_session):
    strategy = "fsdp"  # (ddp passed too on 2026-12-06; it has no collective inside a pass to mismatch)
    torch.set_num_threads(1)
    texts = [LetterEnv.prompt(w, t) for w in LetterEnv.WORDS for t in range(3)]
    make = functools.partial(tiny_qwen_vl_policy, train_tokenizer(texts, 400, CHATML_SPECIAL_TOKENS))
    policy = make()
    start = policy.get_weights()
    batches = [SerialRollout(policy, SomePixelsEnv, 16).sample(make_specs(3, it, 4, 4))[0] for it in range(2)]
    with_images = [any(s.images is not None for s in e.segments) for e in batches[0]]
    assert any(with_images) and not all(with_images)
    # small chunks: a rank's chunk may hold images while the other rank's has none (FSDP: same collectives)
    config = GRPOConfig(4, 4, learning_rate=1e-3, kl_coef=0.05, minibatch_size=8, micro_batch_tokens=48)
    mirror, _ = group_matches_one_process(policy, make, start, batches, config, strategy)
    visual = [k for k in start if k.startswith("model.visual.")]
    assert visual and close({k: start[k] for k in visual}, {k: mirror.get_weights()[k] for k in visual}) > 0


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_workers_take_the_one_process_sft_steps(ray_session, tokenizer, tmp_path, strategy):
    torch.set_num_threads(1)
    data = tmp_path / "echo.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in echo_examples(36, 0.5)))
    # batches of 7: the two shards of a batch are uneven (4 + 3); the last batch has one row, none for rank 1
    stages = [SFTStage(str(data), batch_size=7, learning_rate=1e-3)]
    make = functools.partial(tiny_policy, tokenizer, max_new_tokens=8)
    policy = make()
    start = policy.get_weights()
    expected = run_pst(policy, stages, seed=3)
    mirror = make()
    mirror.set_weights(start)
    group = LearnerGroup(mirror, make, num_workers=2, num_cpus=0.5, strategy=strategy)
    steps = []
    try:
        got = group.run_pst(stages, seed=3, on_step=lambda step, metrics: steps.append(step))
        workers = group.worker_weights()
    finally:
        group.close()
    assert steps == [1, 2, 3, 4, 5, 6]
    check_workers(strategy, workers, mirror.get_weights())
    assert close(policy.get_weights(), start) > 50 * ATOL
    assert close(policy.get_weights(), mirror.get_weights()) < ATOL
    assert got[0]["loss"] == pytest.approx(expected[0]["loss"], rel=1e-5)
    assert got[0]["steps"] == expected[0]["steps"] == 6


def deterministic(history):
    return [{k: v for k, v in m.items() if not k.startswith("time/") and "per_second" not in k} for m in history]


def group_trainer(tokenizer, directory, strategy, make=None, **options):
    """A 4-iteration GRPO run on two learner workers (more LearnerGroup ``options``) that checkpoints every 2
    iterations, and its group; the policies come from ``make`` (by default the tiny float32 policy)."""
    make = make or functools.partial(tiny_policy, tokenizer, max_new_tokens=8)
    policy = make()
    config = GRPOConfig(4, 4, kl_coef=0.05, minibatch_size=8, warmup_steps=5)
    group = LearnerGroup(policy, make, num_workers=2, num_cpus=0.5, strategy=strategy, **options).start_grpo(config)
    rollout = SerialRollout(policy, lambda: LetterEnv(turns=2), 16)
    return Trainer(policy, group, rollout, iterations=4, num_groups=4, group_size=4, seed=5,
                   checkpoint_dir=str(directory), checkpoint_every=2), group


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_learner_group_run_checkpoints_rank_0_and_resumes_exactly(ray_session, tokenizer, tmp_path, strategy):
    full, group = group_trainer(tokenizer, tmp_path / "a", strategy)
    try:
        history = full.run()
    finally:
        group.close()
    start = tiny_policy(tokenizer, max_new_tokens=8).get_weights()
    final = full.policy.get_weights()
    assert close(final, start) > 0  # it trained
    path = checkpoint.latest(str(tmp_path / "a"))
    saved = CausalLMPolicy.from_pretrained(os.path.join(path, "policy"), max_new_tokens=8).get_weights()
    assert all(torch.equal(final[k], saved[k]) for k in final)  # the checkpoint holds rank 0's weights
    # the optimizer state is the one-process format: AdamW's moments of every parameter, by index
    optimizer = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)["algorithm"]["optimizer"]
    assert [optimizer["state"][i]["exp_avg"].shape for i in range(len(final))] == [w.shape for w in final.values()]
    resumed, group = group_trainer(tokenizer, tmp_path / "b", strategy)
    try:
        resumed.resume(path.replace("000004", "000002"))  # weights and optimizer go to every rank
        rest = resumed.run()
        workers = group.worker_weights()
    finally:
        group.close()
    assert deterministic(rest) == deterministic(history[2:])
    again = resumed.policy.get_weights()
    assert all(torch.equal(final[k], again[k]) for k in final)
    check_workers(strategy, workers, again)


def bfloat16_policy(tokenizer):
    policy = tiny_policy(tokenizer, max_new_tokens=8)
    policy.model.to(torch.bfloat16)
    return policy


@pytest.mark.slow
def test_fsdp_mixed_precision_checkpoints_the_float32_masters_and_resumes_exactly(ray_session, tokenizer, tmp_path):
    make = functools.partial(bfloat16_policy, tokenizer)  # the driver's copy and the rollouts in bfloat16
    full, group = group_trainer(tokenizer, tmp_path / "a", "fsdp", make, mixed_precision="bfloat16")
    try:
        history = full.run()
    finally:
        group.close()
    path = checkpoint.latest(str(tmp_path / "a"))
    masters = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)["algorithm"]["master_weights"]
    final = full.policy.get_weights()
    assert masters.keys() == final.keys()
    assert all(masters[k].dtype == torch.float32 and final[k].dtype == torch.bfloat16 for k in final)
    assert all(torch.equal(masters[k].to(torch.bfloat16), final[k]) for k in final)  # the driver's: rounded masters
    assert any(not torch.equal(masters[k], final[k].float()) for k in final)  # ... which lose the masters' low bits
    resumed, group = group_trainer(tokenizer, tmp_path / "b", "fsdp", make, mixed_precision="bfloat16")
    try:
        resumed.resume(path.replace("000004", "000002"))  # the masters and optimizer go to every rank
        rest = resumed.run()
        workers = group.worker_weights()
    finally:
        group.close()
    assert deterministic(rest) == deterministic(history[2:])
    assert all(torch.equal(final[k], resumed.policy.get_weights()[k]) for k in final)
    check_workers("fsdp", workers, masters)  # the ranks' shards are the uninterrupted run's masters


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_rl_sft_on_two_learner_workers_saves_the_one_process_policy(ray_session, tmp_path, strategy):
    data = tmp_path / "echo.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in echo_examples(60, 0.5)))
    common = ["sft", "--set", f"stages=[{{visual: {data}, batch_size: 9, max_steps: 3}}]",
              "--set", "tiny={vocab_size: 400, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}"]
    assert main([*common, "--output_dir", str(tmp_path / "one")]) == 0
    assert main([*common, "--output_dir", str(tmp_path / "two"), "--learner.num_workers", "2",
                 "--learner.num_cpus", "0.5", "--learner.strategy", strategy]) == 0
    one, two = (CausalLMPolicy.from_pretrained(str(tmp_path / name / "policy")).get_weights() for name in ("one", "two"))
    assert close(one, two) < ATOL
    logged = {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in ("one", "two")}
    assert [row["step"] for row in logged["two"]] == [1, 2, 3]  # rank 0's step metrics reach the driver's log
    losses = {name: [row["sft_loss"] for row in rows] for name, rows in logged.items()}
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-5)
    assert losses["one"][2] < losses["one"][0]  # it trained
