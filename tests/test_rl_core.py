"""rl.core: every function against a case computed by hand (the numbers in the comments)."""

import math

import pytest
import torch

from rl import core


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=0)


def test_group_advantages_by_hand():
    nan = float("nan")
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1, 0.5, nan, 1.5, 0.5])
    adv, keep = core.group_advantages(rewards, 4, eps=0.0)
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    assert close(adv[:4], [1.5, -0.5, -0.5, -0.5])
    # group 2: zero variance -> skipped
    assert not keep[4:8].any() and close(adv[4:8], [0, 0, 0, 0])
    # group 3: NaN left out; mean 5/6, deviations -1/3, 2/3, -1/3, unbiased var 1/3
    s = math.sqrt(1 / 3)
    assert close(adv[8:], [-1 / 3 / s, 0, 2 / 3 / s, -1 / 3 / s])
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True, False, True, True]


def test_group_advantages_unscaled_and_singletons():
    adv, keep = core.group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, scale=False)
    assert close(adv, [0.75, -0.25, -0.25, -0.25]) and keep.all()
    adv, keep = core.group_advantages(torch.tensor([1.0, float("nan")]), 2)
    assert not keep.any() and close(adv, [0, 0])
    with pytest.raises(ValueError, match="divisible by group_size"):
        core.group_advantages(torch.zeros(5), 2)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 1.0], [0.5, 9.0]])
    values = torch.tensor([[0.5, 0.8], [0.2, 7.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv, ret = core.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0: t1 delta = 1 - 0.8 = 0.2; t0 delta = 0.8 - 0.5 = 0.3, adv 0.3 + 0.2 = 0.5
    # row 1: one turn: 0.5 - 0.2 = 0.3; the padded turn is ignored
    assert close(adv, [[0.5, 0.2], [0.3, 0.0]]) and close(ret, [[1.0, 1.0], [0.5, 0.0]])
    adv, ret = core.gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.5)
    # t0 delta = 0.9 * 0.8 - 0.5 = 0.22; adv = 0.22 + 0.9 * 0.5 * 0.2 = 0.31
    assert close(adv, [[0.31, 0.2]]) and close(ret, [[0.81, 1.0]])


def test_kl_estimators_by_hand():
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    # d = ref - logp = log(0.5)
    d = math.log(0.5)
    assert close(core.kl_penalty(logp, ref, "k1"), [-d])
    assert close(core.kl_penalty(logp, ref, "k2"), [0.5 * d * d])
    assert close(core.kl_penalty(logp, ref, "k3"), [0.5 - d - 1])
    assert close(core.kl_penalty(logp, logp, "k3"), [0.0])
    with pytest.raises(ValueError, match="must be one of"):
        core.kl_penalty(logp, ref, "k4")


def test_clipped_surrogate_by_hand():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = core.clipped_surrogate(logp, old, adv, clip=0.2)
    # r=1.5,A=1: min(1.5, 1.2); A=-1: min(-1.5,-1.2); r=0.5,A=1: min(0.5, 0.8); A=-1: min(-0.5,-0.8)
    assert close(loss, [-1.2, 1.5, -0.5, 0.8])
    assert clipped.tolist() == [True, False, False, True]


def test_clipped_value_loss_by_hand():
    loss = core.clipped_value_loss(torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.9]),
                                   torch.tensor([2.0, 2.0]), clip=0.2)
    # first: clipped v 0.7 -> 0.5 * 1.3^2 = 0.845 > 0.5 * 1^2; second: |1 - 0.9| < clip -> 0.5
    assert close(loss, [0.845, 0.5])


def test_aggregate_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert close(core.aggregate(x, mask, "token"), 2.5)  # (1 + 2 + 3 + 4) / 4
    assert close(core.aggregate(x, mask, "sequence"), 3.0)  # (2 + 4) / 2, the empty row left out
    with pytest.raises(ValueError, match="must be one of"):
        core.aggregate(x, mask, "batch")


def test_aggregate_parts_add_up_over_row_chunks():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    for mode, whole in (("token", 2.5), ("sequence", 3.0)):
        parts = [(core.aggregate_sum(x[rows], mask[rows], mode), core.aggregate_count(mask[rows], mode))
                 for rows in ([0], [1, 2])]
        assert close(sum(p[0] for p in parts) / sum(p[1] for p in parts), whole)
    assert [core.aggregate_count(mask, m) for m in ("token", "sequence")] == [4.0, 2.0]


def test_length_chunks_by_hand():
    lengths = [5, 100, 7, 90, 6]
    # longest first; a chunk grows while rows x its longest row fits in 200 tokens
    assert core.length_chunks(lengths, 200) == [[1, 3], [2, 4, 0]]
    assert core.length_chunks(lengths, 50) == [[1], [3], [2, 4, 0]]  # a row over the limit alone
    assert core.length_chunks(lengths, 0) == [[1, 3, 2, 4, 0]]
    assert core.length_chunks([], 10) == []


def test_masked_mean_and_whiten_by_hand():
    x = torch.tensor([1.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 0])
    assert close(core.masked_mean(x, mask), 2.0)
    assert close(core.masked_whiten(x, mask), [-1.0, 1.0, 0.0], tol=1e-4)  # mean 2, population std 1
    assert close(core.masked_mean(x, torch.zeros(3)), 0.0)


def test_token_logprobs_and_entropy_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # probabilities 0.25, 0.75
    assert close(core.token_logprobs(logits, torch.tensor([[1]])), [[math.log(0.75)]])
    assert close(core.entropy(logits), [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])
    # temperature 2 halves the logits: probabilities 1 / (1 + sqrt 3) and sqrt 3 / (1 + sqrt 3)
    p1 = math.sqrt(3) / (1 + math.sqrt(3))
    assert close(core.token_logprobs(logits, torch.tensor([[1]]), temperature=2.0), [[math.log(p1)]])


def test_returns_to_go_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0: G2 = 2, G1 = 0 + 0.5 * 2 = 1, G0 = 1 + 0.5 * 1 = 1.5; row 1: G1 = 1, G0 = 0.5 + 0.5 * 1 = 1,
    # the padded turn's 9 is ignored
    assert close(core.returns_to_go(rewards, mask, 0.5), [[1.5, 1.0, 2.0], [1.0, 1.0, 0.0]])


def test_anchor_advantages_by_hand():
    returns = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 7.0]])
    anchors = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 3]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    adv = core.anchor_advantages(returns, anchors, mask, eps=0.0)
    # anchor 0: returns 1, 3, 5: mean 3, unbiased std 2 -> -1, 0, 1
    # anchor 1: returns 2, 6: mean 4, unbiased std sqrt(8) -> -2 / sqrt(8), 2 / sqrt(8)
    # anchor 2: masked out -> 0; anchor 3: returns 7, 7 (zero variance) -> 0
    s = 2 / math.sqrt(8)
    assert close(adv, [[-1.0, -s], [0.0, 0.0], [1.0, s], [0.0, 0.0]])
    adv = core.anchor_advantages(returns, anchors, mask, scale=False)
    assert close(adv, [[-2.0, -2.0], [0.0, 0.0], [2.0, 2.0], [0.0, 0.0]])


def test_turn_credit_advantages_by_hand():
    nan = float("nan")
    rewards = torch.tensor([[-0.05, 1.0], [0.0, 1.0], [0.0, 0.4],    # group 1
                            [1.0, 0.0], [0.0, 1.0], [nan, 0.0]])     # group 2
    mask = torch.ones(6, 2, dtype=torch.bool)
    # group 1: every first turn starts from the task's state (anchor 0); rows 1 and 2 reach the same state
    # after it (anchor 1), row 0 another one (anchor 2). Group 2: turns compared by turn index (3, 4).
    anchors = torch.tensor([[0, 2], [0, 1], [0, 1], [3, 4], [3, 4], [3, 4]])
    adv, keep = core.turn_credit_advantages(rewards, mask, anchors, group_size=3, weight=0.5, gamma=1.0, scale=False)
    # group 1: returns 0.95, 1.0, 0.4, mean 0.78333: A^E = 0.16667, 0.21667, -0.38333
    # returns to go: row 0 [0.95, 1.0], row 1 [1.0, 1.0], row 2 [0.4, 0.4]
    # A^S turn 0 = A^E (the same returns); turn 1: anchor 1 rows 1, 2: mean 0.7 -> +0.3, -0.3; anchor 2 alone -> 0
    # A = A^E + 0.5 A^S: row 0 [0.25, 0.16667], row 1 [0.325, 0.36667], row 2 [-0.575, -0.53333]
    # group 2: row 5 is invalid (NaN); returns 1, 1: zero variance, A^E = 0
    # returns to go: row 3 [1, 0], row 4 [1, 1]: turn 0 equal -> 0; turn 1: mean 0.5 -> -0.5, +0.5
    # A: row 3 [0, -0.25], row 4 [0, 0.25]; kept for their step advantage although A^E is 0
    assert close(adv, [[0.25, 1 / 6], [0.325, 0.36667],
                       [-0.575, -0.53333], [0.0, -0.25], [0.0, 0.25], [0.0, 0.0]], tol=1e-4)
    assert keep.tolist() == [True, True, True, True, True, False]


def test_token_gae_by_hand():
    targets = torch.tensor([[1.0, 2.0]])
    # an environment token, turn 0's two tokens, an environment token, turn 1's three tokens
    turn_index = torch.tensor([[-1, 0, 0, -1, 1, 1, 1]])
    values = torch.tensor([[9.0, 0.5, 0.6, 9.0, 1.0, 1.5, 1.8]])
    adv, ret = core.token_gae(targets, values, turn_index, gamma=1.0, lam=1.0)
    # gamma = lam = 1: target - value: turn 0 1 - 0.5, 1 - 0.6; turn 1 2 - 1, 2 - 1.5, 2 - 1.8
    assert close(adv, [[0.0, 0.5, 0.4, 0.0, 1.0, 0.5, 0.2]])
    assert close(ret, [[0.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0]])
    adv, _ = core.token_gae(targets, values, turn_index, gamma=0.9, lam=0.5)
    # turn 1: last token 2 - 1.8 = 0.2; middle: delta 0.9 * 1.8 - 1.5 = 0.12, + 0.45 * 0.2 = 0.21;
    # first: delta 0.9 * 1.5 - 1.0 = 0.35, + 0.45 * 0.21 = 0.4445
    # turn 0: last 1 - 0.6 = 0.4; first: delta 0.9 * 0.6 - 0.5 = 0.04, + 0.45 * 0.4 = 0.22
    assert close(adv, [[0.0, 0.22, 0.4, 0.0, 0.4445, 0.21, 0.2]])


def test_bilevel_gae_by_hand():
    rewards, turn_values, turn_mask = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.8]]), torch.tensor([[1, 1]])
    turn_index = torch.tensor([[-1, 0, 0, -1, 1, 1]])
    token_values = torch.tensor([[0.0, 0.5, 0.6, 0.0, 0.8, 0.9]])  # each turn's first token: its turn value
    adv, ret = core.bilevel_gae(rewards, turn_values, turn_mask, token_values, turn_index, gamma=0.9, lam=0.5)
    # turn level (as in test_gae_by_hand): advantages 0.31, 0.2; lambda-returns 0.81, 1.0
    # token level (gamma = lam = 1): return - value: 0.81 - 0.5 = 0.31 (the turn's advantage), 0.81 - 0.6;
    # 1 - 0.8 = 0.2 (the turn's advantage), 1 - 0.9
    assert close(adv, [[0.0, 0.31, 0.21, 0.0, 0.2, 0.1]])
    assert close(ret, [[0.0, 0.81, 0.81, 0.0, 1.0, 1.0]])
