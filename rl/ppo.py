"""PPO (Schulman et al. 2017) for multi-turn episodes, readable top to bottom.

The unit of decision is a turn. A value head on the policy's last hidden state estimates, at the last
token before each policy turn, the value of the state that turn starts from; GAE runs over the turns
with the environment's per-turn rewards; each token of a turn gets its turn's (whitened) advantage.
The loss is the clipped surrogate over policy tokens, plus the clipped value loss over turns, minus
an entropy bonus, plus an optional KL penalty to the reference policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from rl import core
from rl.policy import Scores, TokenBatch, TrainablePolicy
from rl.rollout import Episode


@dataclass
class PPOConfig:
    """PPO hyperparameters.

    Attributes:
        episodes_per_iteration: episodes sampled per iteration (one per task).
        learning_rate: AdamW learning rate (policy and value head).
        gamma: discount per turn.
        lam: GAE lambda.
        clip: clip range of the probability ratio.
        value_clip: clip range of the value change per update.
        value_coef: weight of the value loss.
        entropy_coef: weight of the entropy bonus.
        kl_coef: weight of the KL penalty to the reference policy (0: no reference).
        kl_estimator: "k1", "k2" or "k3".
        loss_aggregation: "token" or "sequence" (see :func:`rl.core.aggregate`).
        epochs: passes over each iteration's episodes.
        minibatch_size: episodes per optimizer step; 0 for all in one.
        max_grad_norm: gradient clipping norm.
        seed: seeds the minibatch shuffling.
    """

    episodes_per_iteration: int = 64
    learning_rate: float = 3e-4
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_aggregation: str = "token"
    epochs: int = 2
    minibatch_size: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.episodes_per_iteration < 2:
            raise ValueError(f"episodes_per_iteration ({self.episodes_per_iteration}) must be at least 2 "
                             "(advantages are whitened over the batch).")
        if self.epochs < 1 or self.minibatch_size < 0:
            raise ValueError(f"epochs ({self.epochs}) must be >= 1 and minibatch_size ({self.minibatch_size}) >= 0.")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma ({self.gamma}) and lam ({self.lam}) must be in [0, 1].")
        if not 0 < self.clip < 1 or self.value_clip <= 0:
            raise ValueError(f"clip ({self.clip}) must be in (0, 1) and value_clip ({self.value_clip}) > 0.")
        if self.kl_estimator not in core.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator ({self.kl_estimator!r}) must be one of {core.KL_ESTIMATORS}.")
        if self.loss_aggregation not in core.LOSS_AGGREGATIONS:
            raise ValueError(f"loss_aggregation ({self.loss_aggregation!r}) must be one of {core.LOSS_AGGREGATIONS}.")
        if self.learning_rate <= 0 or self.kl_coef < 0 or self.value_coef < 0:
            raise ValueError(f"learning_rate ({self.learning_rate}) must be > 0, kl_coef ({self.kl_coef}) and "
                             f"value_coef ({self.value_coef}) >= 0.")


class ValueHead(torch.nn.Module):
    """A linear value estimate on the policy's last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.bias)
        torch.nn.init.normal_(self.linear.weight, std=1.0 / hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def turn_state_positions(batch: TokenBatch, num_turns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row and policy turn: the position of the token just before the turn (the state it
    starts from), and a mask of the turns the row has. Shapes ``(B, T)``."""
    turns = torch.arange(num_turns)
    is_turn = batch.turn_index[:, None, :] == turns[None, :, None]  # (B, T, L)
    has = is_turn.any(-1)
    first = torch.where(has, is_turn.float().argmax(-1), torch.ones_like(has, dtype=torch.long))
    return first - 1, has


class PPO:
    """The PPO update: episodes in, one optimisation of policy and value head out.

    Args:
        policy: the policy to train.
        reference: the frozen reference policy for the KL penalty (None when ``kl_coef`` is 0).
        config: hyperparameters.
    """

    def __init__(self, policy: TrainablePolicy, reference: TrainablePolicy | None, config: PPOConfig):
        if config.kl_coef > 0 and reference is None:
            raise ValueError(f"kl_coef ({config.kl_coef}) > 0 needs a reference policy; pass one or set kl_coef: 0.")
        self.policy = policy
        self.reference = reference
        self.config = config
        self.value_head = ValueHead(policy.model.config.get_text_config().hidden_size).to(policy.device)
        self.optimizer = torch.optim.AdamW([*policy.parameters(), *self.value_head.parameters()],
                                           lr=config.learning_rate, weight_decay=0.0)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "value_head": self.value_head.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])

    def _values(self, scores: Scores, positions: torch.Tensor) -> torch.Tensor:
        hidden = scores.hidden.gather(1, positions.clamp(min=0)[..., None].expand(-1, -1, scores.hidden.shape[-1]))
        return self.value_head(hidden)

    def update(self, episodes: Sequence[Episode], iteration: int) -> dict[str, float]:
        cfg = self.config
        device = self.policy.device
        # 1. Keep the episodes the environment could score; build their batch once.
        kept = [e for e in episodes if not math.isnan(e.reward)]
        metrics = {"episodes_trained": float(len(kept))}
        if len(kept) < 2:
            return metrics
        batch = TokenBatch.from_segments([e.segments for e in kept], self.policy.pad_id)
        num_turns = max(len(e.rewards) for e in kept)
        positions, turn_mask = turn_state_positions(batch, num_turns)
        positions, turn_mask = positions.to(device), turn_mask.to(device)
        rewards = torch.tensor([e.rewards + [0.0] * (num_turns - len(e.rewards)) for e in kept], device=device)
        mask = batch.loss_mask.to(device)
        # 2. Old log-probs and values, then GAE over turns and whitened advantages per token.
        with torch.no_grad():
            old = self.policy.score(batch, with_hidden=True)
            old_values = self._values(old, positions) * turn_mask
            turn_adv, returns = core.gae(rewards, old_values, turn_mask, cfg.gamma, cfg.lam)
            turn_adv = core.masked_whiten(turn_adv, turn_mask)
            token_adv = turn_adv.gather(1, batch.turn_index.to(device).clamp(min=0)) * mask
            ref_logprobs = self.reference.score(batch).logprobs if cfg.kl_coef > 0 else None
        # 3. Epochs of minibatch steps on the clipped losses.
        rows = len(kept)
        size = cfg.minibatch_size or rows
        shuffle = torch.Generator().manual_seed(cfg.seed * 100_003 + iteration)
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(rows, generator=shuffle)
            for start in range(0, rows, size):
                index = order[start:start + size]
                sub = TokenBatch.from_segments([kept[i].segments for i in index], self.policy.pad_id)
                cols = slice(batch.input_ids.shape[1] - sub.input_ids.shape[1], None)  # left padding aligns right
                index = index.to(device)
                scores = self.policy.score(sub, with_hidden=True)
                sub_mask = mask[index, cols]
                policy_loss, clipped = core.clipped_surrogate(scores.logprobs, old.logprobs[index, cols],
                                                              token_adv[index, cols], cfg.clip)
                per_token = policy_loss - cfg.entropy_coef * scores.entropy
                step = {"clip_fraction": core.masked_mean(clipped.float(), sub_mask).item(),
                        "entropy": core.masked_mean(scores.entropy.detach(), sub_mask).item()}
                if cfg.kl_coef > 0:
                    kl = core.kl_penalty(scores.logprobs, ref_logprobs[index, cols], cfg.kl_estimator)
                    per_token = per_token + cfg.kl_coef * kl
                    step["kl"] = core.masked_mean(kl.detach(), sub_mask).item()
                sub_positions, _ = turn_state_positions(sub, num_turns)
                values = self._values(scores, sub_positions.to(device))
                value_loss = core.masked_mean(
                    core.clipped_value_loss(values, old_values[index], returns[index], cfg.value_clip),
                    turn_mask[index])
                loss = core.aggregate(per_token, sub_mask, cfg.loss_aggregation) + cfg.value_coef * value_loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [*self.policy.parameters(), *self.value_head.parameters()], cfg.max_grad_norm)
                self.optimizer.step()
                step |= {"loss": loss.item(), "value_loss": value_loss.item(), "grad_norm": float(grad_norm)}
                for key, value in step.items():
                    sums[key] = sums.get(key, 0.0) + value
                steps += 1
        metrics |= {key: value / steps for key, value in sums.items()}
        metrics["value_mean"] = core.masked_mean(old_values, turn_mask).item()
        return metrics
