"""The pure math shared by the algorithms: advantages, KL estimators, clipped losses, aggregation.

Every function here is stateless, works on ``torch`` tensors, and is tested against a case computed
by hand in ``tests/test_rl_core.py``. Shapes: ``B`` rows (episodes), ``L`` token positions, ``T``
turns. Turn-level credit (GiGPO's step groups) and bi-level (turn, token) GAE are here too. Masks are 1 (or True) where a value counts.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rl.errors import ConfigError

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token", "sequence")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is set; 0 where nothing is set (never NaN)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``values`` shifted to mean 0 and scaled to (population) std 1 over the masked entries."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask.to(values.dtype)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages: each reward minus its group's mean, over the group's std.

    Groups are ``group_size`` consecutive entries (rollouts of the same task). NaN rewards (the
    environment could not score an episode) take no part in their group's statistics. The std is
    the unbiased one, as in DeepSeekMath and TRL.

    Args:
        rewards: ``(num_groups * group_size,)`` episode rewards; NaN marks an invalid reward.
        group_size: rollouts per group.
        scale: divide by the group std; False keeps only the mean baseline (Dr. GRPO).
        eps: added to the std.

    Returns:
        ``(advantages, keep)``: advantages (0 where not kept) and a bool mask of the entries to
        train on. An entry is dropped when its reward is NaN, or when its group has fewer than two
        valid rewards or zero variance (every advantage would be 0: nothing to learn, only cost).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} must be 1-D with a length divisible "
                         f"by group_size ({group_size}).")
    grouped = rewards.view(-1, group_size).to(torch.float64)
    valid = ~torch.isnan(grouped)
    count = valid.sum(1, keepdim=True)
    filled = torch.where(valid, grouped, torch.zeros_like(grouped))
    mean = filled.sum(1, keepdim=True) / count.clamp(min=1)
    var = (torch.where(valid, grouped - mean, torch.zeros_like(grouped)) ** 2).sum(1, keepdim=True)
    std = (var / (count - 1).clamp(min=1)).sqrt()
    keep = valid & (count >= 2) & (std > 0)
    advantages = grouped - mean
    if scale:
        advantages = advantages / (std + eps)
    advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
    return advantages.view(-1).to(rewards.dtype), keep.view(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the turns of episodes that all end terminally.

    Args:
        rewards: ``(B, T)`` reward after each turn.
        values: ``(B, T)`` value of the state each turn starts from.
        mask: ``(B, T)`` 1 for the turns an episode has (a prefix of each row).
        gamma: discount per turn.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` and 0 outside ``mask``; the value after an
        episode's last turn is 0.
    """
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantage
    returns = (advantages + values) * mask
    return advantages, returns


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Each turn's discounted return from that turn on: ``G_t = r_t + gamma * G_{t+1}`` (0 outside ``mask``).

    Args:
        rewards: ``(B, T)`` reward after each turn.
        mask: ``(B, T)`` the turns each row has (a prefix of the row).
        gamma: discount per turn.
    """
    mask = mask.to(rewards.dtype)
    returns = torch.zeros_like(rewards)
    following = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        following = (rewards[:, t] + gamma * following) * mask[:, t]
        returns[:, t] = following
    return returns


def anchor_advantages(returns: torch.Tensor, anchors: torch.Tensor, mask: torch.Tensor, scale: bool = True,
                      eps: float = 1e-6) -> torch.Tensor:
    """GiGPO's step-level advantages: each turn's return against the turns that share its anchor state.

    Turns with the same anchor id (the same environment state, across a group's episodes) form a step
    group; each turn's advantage is its return minus the step group's mean, over the group's unbiased
    std when ``scale``. A step group of one turn, or one whose returns are all equal, gives 0.

    Args:
        returns: ``(B, T)`` the return from each turn on (:func:`returns_to_go`).
        anchors: ``(B, T)`` integer anchor-state id of each turn; ids must be unique across episode
            groups (two tasks never share a state).
        mask: ``(B, T)`` the turns that take part.
        scale: divide by the step group's std (False: mean baseline only).
        eps: added to the std.

    Returns:
        ``(B, T)`` step advantages, 0 outside ``mask``.
    """
    mask = mask.bool()
    values = returns[mask].to(torch.float64)
    _, inverse = torch.unique(anchors[mask], return_inverse=True)
    groups = int(inverse.max()) + 1 if inverse.numel() else 0
    count = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(values))
    mean = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, values) / count
    deviation = values - mean[inverse]
    var = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, deviation**2) / (count - 1).clamp(min=1)
    std = var.sqrt()
    informative = (count >= 2) & (std > 0)
    advantage = deviation / (std[inverse] + eps) if scale else deviation
    advantage = torch.where(informative[inverse], advantage, torch.zeros_like(advantage))
    out = torch.zeros(returns.shape, dtype=torch.float64)
    out[mask] = advantage
    return out.to(returns.dtype)


def turn_credit_advantages(rewards: torch.Tensor, mask: torch.Tensor, anchors: torch.Tensor, group_size: int,
                           weight: float, gamma: float, scale: bool = True,
                           eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """GiGPO (Feng et al. 2025): per-turn advantages ``A^E(episode) + weight * A^S(turn)``.

    ``A^E`` is GRPO's episode advantage (:func:`group_advantages` of the episode returns, the sums of
    the turn rewards); ``A^S`` is the step advantage (:func:`anchor_advantages` of each turn's
    discounted :func:`returns_to_go` among the turns with the same anchor state). A row with a NaN
    reward is left out of both levels.

    Args:
        rewards: ``(B, T)`` reward after each turn (NaN: the environment could not score it).
        mask: ``(B, T)`` the turns each row has (a prefix of the row).
        anchors: ``(B, T)`` anchor-state ids (see :func:`anchor_advantages`).
        group_size: episodes per GRPO group (consecutive rows).
        weight: ``omega``, the step advantage's weight.
        gamma: discount of the step returns.
        scale: normalise both levels by their std (False: Dr. GRPO's mean baselines).
        eps: added to the stds.

    Returns:
        ``(advantages, keep)``: ``(B, T)`` advantages (0 outside ``mask`` and on dropped rows) and a
        bool ``(B,)`` of the rows to train on: a valid row whose episode advantage is kept (see
        :func:`group_advantages`) or which has a non-zero step advantage.
    """
    mask = mask.bool()
    invalid = (torch.isnan(rewards) & mask).any(1)
    clean = torch.where(mask & ~invalid[:, None], rewards, torch.zeros_like(rewards))
    episode_returns = torch.where(invalid, torch.full_like(clean[:, 0], float("nan")), clean.sum(1))
    episode, keep = group_advantages(episode_returns, group_size, scale=scale, eps=eps)
    steps_mask = mask & ~invalid[:, None]
    step = anchor_advantages(returns_to_go(clean, steps_mask, gamma), anchors, steps_mask, scale=scale, eps=eps)
    keep = keep | (~invalid & (step != 0).any(1))
    advantages = (episode[:, None] + weight * step) * (steps_mask & keep[:, None]).to(rewards.dtype)
    return advantages, keep


def token_gae(targets: torch.Tensor, values: torch.Tensor, turn_index: torch.Tensor, gamma: float,
              lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the tokens inside each policy turn, the turn's target paid at its last token.

    Within turn ``k`` of a row (its tokens are where ``turn_index == k``, contiguous), token ``i`` has
    value ``v_i``; ``delta_i = gamma * v_{i+1} - v_i`` and, at the turn's last token,
    ``delta = targets[k] - v_i``; advantages are ``delta_i + gamma * lam * A_{i+1}`` within the turn.
    With ``gamma = lam = 1`` every token's advantage is ``targets[k] - v_i``.

    Args:
        targets: ``(B, T)`` what each turn is worth at its end (e.g. the turn-level lambda-return).
        values: ``(B, L)`` value of the state before each token.
        turn_index: ``(B, L)`` the policy turn of each token, -1 for environment tokens and padding.
        gamma: discount per token.
        lam: GAE lambda per token.

    Returns:
        ``(advantages, returns)``, both ``(B, L)`` and 0 where ``turn_index`` is -1.
    """
    advantages = torch.zeros_like(values)
    following_turn = torch.full_like(turn_index[:, 0], -1)
    following_value = torch.zeros_like(values[:, 0])
    following_advantage = torch.zeros_like(values[:, 0])
    for position in reversed(range(values.shape[1])):
        turn = turn_index[:, position]
        inside = turn >= 0
        last = inside & (following_turn != turn)
        target = targets.gather(1, turn.clamp(min=0)[:, None]).squeeze(1)
        delta = torch.where(last, target, gamma * following_value) - values[:, position]
        advantage = torch.where(last, delta, delta + gamma * lam * following_advantage) * inside
        advantages[:, position] = advantage
        following_turn, following_value, following_advantage = turn, values[:, position], advantage
    inside = (turn_index >= 0).to(values.dtype)
    return advantages, (advantages + values) * inside


def bilevel_gae(rewards: torch.Tensor, turn_values: torch.Tensor, turn_mask: torch.Tensor,
                token_values: torch.Tensor, turn_index: torch.Tensor, gamma: float, lam: float,
                token_gamma: float = 1.0, token_lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bi-level GAE (ArCHer-style, Zhou et al. 2024): :func:`gae` over turns, then :func:`token_gae` within each turn.

    The turn level runs GAE with the turn rewards and turn values; each turn's lambda-return
    ``A_t + V_t`` is then the target its last token is paid, and token-level GAE with the token values
    spreads it over the turn's tokens. When a turn's first token value is its turn value (the state the
    turn starts from) and ``token_gamma = token_lam = 1``, the first token's advantage is the turn's
    advantage and later tokens get ``return - v_i``: a baseline that moves inside the turn.

    Args:
        rewards, turn_values, turn_mask: ``(B, T)`` as in :func:`gae`.
        token_values: ``(B, L)`` value of the state before each token.
        turn_index: ``(B, L)`` the policy turn of each token, -1 elsewhere.
        gamma, lam: the turn level's discount and lambda.
        token_gamma, token_lam: the token level's.

    Returns:
        ``(advantages, returns)`` per token, ``(B, L)``, 0 outside policy tokens.
    """
    _, turn_returns = gae(rewards, turn_values, turn_mask, gamma, lam)
    return token_gae(turn_returns, token_values, turn_index, token_gamma, token_lam)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy.

    Estimators (Schulman, "Approximating KL divergence", 2020), with ``d = ref - logp``:
    ``k1 = -d`` (unbiased, high variance, can be negative), ``k2 = d**2 / 2`` (biased, low
    variance), ``k3 = exp(d) - d - 1`` (unbiased, non-negative; the one GRPO uses).
    """
    if estimator not in KL_ESTIMATORS:
        raise ConfigError(f"kl estimator {estimator!r} must be one of {KL_ESTIMATORS}.")
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    return torch.expm1(d) - d


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped policy loss per token (to minimise), and where the clip was active.

    ``loss = -min(r * A, clip(r, 1 - clip, 1 + clip) * A)`` with ``r = exp(logprobs - old_logprobs)``.
    ``advantages`` broadcasts against ``logprobs`` (e.g. ``(B, 1)`` for one value per sequence).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """PPO's clipped value loss per entry: ``0.5 * max((v - R)^2, (clip(v, v_old +- clip) - R)^2)``."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a ``(B, L)`` per-token loss to a scalar over the masked tokens.

    ``"token"``: the mean over all masked tokens of the batch (every token weighs the same; long
    sequences weigh more; DAPO). ``"sequence"``: the mean over tokens within each sequence, then over
    sequences that have any (every sequence weighs the same; the original GRPO).
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ConfigError(f"loss aggregation {mode!r} must be one of {LOSS_AGGREGATIONS}.")
    if mode == "token":
        return masked_mean(per_token, mask)
    rows = mask.sum(1) > 0
    return masked_mean(per_token, mask, dim=1)[rows].mean() if rows.any() else per_token.sum() * 0.0


def aggregate_sum(per_token: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The numerator of :func:`aggregate`; with :func:`aggregate_count` it adds up over row chunks.

    ``sum(aggregate_sum) / sum(aggregate_count)`` over the row chunks of a batch equals
    :func:`aggregate` of the whole batch, so a learner can run forward/backward passes chunk by chunk
    (each chunk padded only to its own longest row) and take one optimizer step.
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ConfigError(f"loss aggregation {mode!r} must be one of {LOSS_AGGREGATIONS}.")
    mask = mask.to(per_token.dtype)
    if mode == "token":
        return (per_token * mask).sum()
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()


def aggregate_count(mask: torch.Tensor, mode: str) -> float:
    """The denominator of :func:`aggregate`: masked tokens ("token") or rows that have any ("sequence")."""
    if mode not in LOSS_AGGREGATIONS:
        raise ConfigError(f"loss aggregation {mode!r} must be one of {LOSS_AGGREGATIONS}.")
    return float(mask.sum()) if mode == "token" else float((mask.sum(1) > 0).sum())


def length_chunks(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Split row indices into chunks of similar length whose padded size stays within ``max_tokens``.

    Rows are sorted by length (longest first) and a chunk grows while ``rows x longest row`` fits in
    ``max_tokens``; a row longer than ``max_tokens`` gets a chunk of its own. ``max_tokens <= 0``
    keeps every row in one chunk.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if max_tokens <= 0:
        return [order] if order else []
    chunks: list[list[int]] = []
    for i in order:
        if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= max_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / temperature)`` at ``token_ids``: ``(B, L, V), (B, L) -> (B, L)``."""
    logits = logits.float() / temperature
    picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last axis: ``(..., V) -> (...)``."""
    logits = logits.float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)
