"""The pure math shared by the algorithms: advantages, KL estimators, clipped losses, aggregation.

Every function here is stateless, works on ``torch`` tensors, and is tested against a case computed
by hand in ``tests/test_rl_core.py``. Shapes: ``B`` rows (episodes), ``L`` token positions, ``T``
turns. Masks are 1 (or True) where a value counts.
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
