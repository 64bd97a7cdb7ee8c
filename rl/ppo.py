"""PPO (Schulman et al. 2017) for multi-turn episodes, readable top to bottom.

The unit of decision is a turn. A value head on the policy's last hidden state estimates, at the last
token before each policy turn, the value of the state that turn starts from; GAE runs over the turns
with the environment's per-turn rewards; each token of a turn gets its turn's (whitened) advantage.
The loss is the clipped surrogate over policy tokens, plus the clipped value loss over turns, minus
an entropy bonus, plus an optional KL penalty to the reference policy.

Bi-level GAE (``credit: "bilevel"``, ArCHer-style): the value head also estimates the value before
every policy token (its hidden state one position earlier; a turn's first token's value is the turn
value). GAE runs over the turns as above, and each turn's lambda-return is then spread over the turn's
tokens by token-level GAE (:func:`rl.core.bilevel_gae`): every token gets its own advantage, against a
baseline that moves inside the turn, and the value loss covers every policy token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from rl import core
from rl.errors import ConfigError
from rl.learner import Shard
from rl.policy import ChunkedBatches, Scores, TokenBatch, TrainablePolicy
from rl.rollout import Episode

CREDITS = ("turn", "bilevel")


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
        micro_batch_tokens: most padded tokens (rows x longest row) in one forward/backward pass; the
            old-policy pass and every minibatch run in length-sorted chunks within this size, with
            gradients accumulated (the loss is the same as in one pass; padding and peak memory
            shrink). 0 runs each in one pass.
        credit: "turn" (every token of a turn gets its turn's GAE advantage) or "bilevel" (turn-level
            GAE, then token-level GAE inside each turn; see the module docstring).
        token_lam: with ``credit: "bilevel"``, the token level's GAE lambda (its discount is 1).
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
    micro_batch_tokens: int = 4096
    credit: str = "turn"
    token_lam: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.credit not in CREDITS or not 0 <= self.token_lam <= 1:
            raise ConfigError(f"credit ({self.credit!r}) must be one of {CREDITS} and token_lam ({self.token_lam}) "
                              "in [0, 1].")
        if self.episodes_per_iteration < 2:
            raise ConfigError(f"episodes_per_iteration ({self.episodes_per_iteration}) must be at least 2 "
                             "(advantages are whitened over the batch).")
        if self.epochs < 1 or self.minibatch_size < 0:
            raise ConfigError(f"epochs ({self.epochs}) must be >= 1 and minibatch_size ({self.minibatch_size}) >= 0.")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"gamma ({self.gamma}) and lam ({self.lam}) must be in [0, 1].")
        if not 0 < self.clip < 1 or self.value_clip <= 0:
            raise ConfigError(f"clip ({self.clip}) must be in (0, 1) and value_clip ({self.value_clip}) > 0.")
        if self.kl_estimator not in core.KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator ({self.kl_estimator!r}) must be one of {core.KL_ESTIMATORS}.")
        if self.loss_aggregation not in core.LOSS_AGGREGATIONS:
            raise ConfigError(f"loss_aggregation ({self.loss_aggregation!r}) must be one of {core.LOSS_AGGREGATIONS}.")
        if self.micro_batch_tokens < 0:
            raise ConfigError(f"micro_batch_tokens ({self.micro_batch_tokens}) must be >= 0 (0: one pass per minibatch).")
        if self.learning_rate <= 0 or self.kl_coef < 0 or self.value_coef < 0:
            raise ConfigError(f"learning_rate ({self.learning_rate}) must be > 0, kl_coef ({self.kl_coef}) and "
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
        shard: this process's place in a data-parallel learner group (:class:`rl.learner.Shard`), or None
            for a learner of one process. With a shard, every process computes the old log-probs, values
            and advantages of all episodes, runs forward/backward on its share of each minibatch only, with
            the losses normalised over the whole minibatch, and the gradients (value head included) and
            diagnostics are summed over the group before the step: the one-process update.
    """

    off_policy = False
    """The old log-probs and values are the learner's before the update: PPO needs on-policy samples."""

    def __init__(self, policy: TrainablePolicy, reference: TrainablePolicy | None, config: PPOConfig,
                 shard: Shard | None = None):
        if config.kl_coef > 0 and reference is None:
            raise ConfigError(f"kl_coef ({config.kl_coef}) > 0 needs a reference policy; pass one or set kl_coef: 0.")
        self.policy = policy
        self.reference = reference
        self.config = config
        self.value_head = ValueHead(policy.hidden_size).to(policy.device)
        self.optimizer = torch.optim.AdamW([*policy.parameters(), *self.value_head.parameters()],
                                           lr=config.learning_rate, weight_decay=0.0)
        self.shard = shard or Shard(0, 1)  # one process: the only rank of a group of one

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "value_head": self.value_head.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])

    def _values(self, scores: Scores, positions: torch.Tensor) -> torch.Tensor:
        hidden = scores.hidden.gather(1, positions.clamp(min=0)[..., None].expand(-1, -1, scores.hidden.shape[-1]))
        return self.value_head(hidden)

    def _token_values(self, scores: Scores) -> torch.Tensor:
        """``(B, L)``: the value of the state before each token (the head on the previous position's hidden state)."""
        values = self.value_head(scores.hidden)
        return torch.cat([torch.zeros_like(values[:, :1]), values[:, :-1]], 1)

    def update(self, episodes: Sequence[Episode], iteration: int) -> dict[str, float]:
        cfg = self.config
        device = self.policy.device
        # 1. Keep the episodes the environment could score.
        kept = [e for e in episodes if not math.isnan(e.reward)]
        metrics = {"episodes_trained": float(len(kept))}
        if len(kept) < 2:
            return metrics
        rows = len(kept)
        batches = ChunkedBatches([e.segments for e in kept], self.policy.pad_id, cfg.micro_batch_tokens)
        lengths = batches.lengths
        num_turns = max(len(e.rewards) for e in kept)
        rewards = torch.tensor([e.rewards + [0.0] * (num_turns - len(e.rewards)) for e in kept], device=device)

        def aligned(per_row: list[torch.Tensor], key: tuple[int, ...]) -> torch.Tensor:
            """Per-row tensors (each row's real tokens) as the left-padded ``(B, L)`` of the chunk ``key``."""
            width = batches[key].input_ids.shape[1]
            out = torch.zeros(len(key), width, dtype=per_row[key[0]].dtype, device=device)
            for j, i in enumerate(key):
                out[j, width - lengths[i]:] = per_row[i]
            return out

        # 2. Old log-probs and values (chunk by chunk, kept per row), then GAE over turns and whitened
        # advantages per turn.
        old_logprobs: list[torch.Tensor] = [torch.empty(0)] * rows
        ref_logprobs: list[torch.Tensor] = [torch.empty(0)] * rows
        old_values = torch.zeros(rows, num_turns, device=device)
        turn_mask = torch.zeros(rows, num_turns, dtype=torch.bool, device=device)
        bilevel = cfg.credit == "bilevel"
        old_token_values: list[torch.Tensor] = [torch.empty(0)] * rows
        turn_index: list[torch.Tensor] = [torch.empty(0)] * rows
        with torch.no_grad():
            for key in batches.chunks(range(rows)):
                batch = batches[key]
                old = self.policy.score(batch, with_hidden=True)
                positions, has = turn_state_positions(batch, num_turns)
                has = has.to(device)
                old_values[list(key)] = self._values(old, positions.to(device)) * has
                turn_mask[list(key)] = has
                reference = self.reference.score(batch).logprobs if cfg.kl_coef > 0 else None
                token_values = self._token_values(old) if bilevel else None
                width = batch.input_ids.shape[1]
                for j, i in enumerate(key):  # each row's real tokens, the right end of its padded row
                    old_logprobs[i] = old.logprobs[j, width - lengths[i]:]
                    if reference is not None:
                        ref_logprobs[i] = reference[j, width - lengths[i]:]
                    if bilevel:
                        old_token_values[i] = token_values[j, width - lengths[i]:]
                        turn_index[i] = batch.turn_index[j, width - lengths[i]:].to(device)
            if bilevel:  # every row right-aligned in one (rows, longest) layout, turn index -1 on the padding
                longest = max(lengths)
                padded_values = torch.zeros(rows, longest, device=device)
                padded_turns = torch.full((rows, longest), -1, dtype=torch.long, device=device)
                for i in range(rows):
                    padded_values[i, longest - lengths[i]:] = old_token_values[i]
                    padded_turns[i, longest - lengths[i]:] = turn_index[i]
                token_adv, token_returns = core.bilevel_gae(rewards, old_values, turn_mask, padded_values, padded_turns,
                                                            cfg.gamma, cfg.lam, 1.0, cfg.token_lam)
                token_adv = core.masked_whiten(token_adv, padded_turns >= 0)
                token_adv = [token_adv[i, longest - lengths[i]:] for i in range(rows)]
                token_returns = [token_returns[i, longest - lengths[i]:] for i in range(rows)]
            else:
                turn_adv, returns = core.gae(rewards, old_values, turn_mask, cfg.gamma, cfg.lam)
                turn_adv = core.masked_whiten(turn_adv, turn_mask)
        # 3. Epochs of minibatch steps on the clipped losses; the forward/backward passes run chunk by
        # chunk (gradients accumulate; both losses are normalised over the whole minibatch).
        size = cfg.minibatch_size or rows
        shuffle = torch.Generator().manual_seed(cfg.seed * 100_003 + iteration)
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(rows, generator=shuffle).tolist()
            for start in range(0, rows, size):
                minibatch = order[start:start + size]
                keys = batches.chunks(minibatch)
                denominator = max(1.0, sum(core.aggregate_count(batches[k].loss_mask, cfg.loss_aggregation)
                                           for k in keys))
                turns = max(1.0, sum(float(turn_mask[list(k)].sum()) for k in keys))
                tokens = sum(float(batches[k].loss_mask.sum()) for k in keys)
                value_entries = max(tokens, 1.0) if bilevel else turns  # the value loss's mean is over these
                step = dict.fromkeys(["clip_fraction", "entropy", "loss", "value_loss"]
                                     + (["kl"] if cfg.kl_coef > 0 else []), 0.0)
                self.optimizer.zero_grad(set_to_none=True)
                for key, weight in self.shard.passes(lambda shard: batches.chunks(shard.part(minibatch))):
                    batch, index = batches[key], list(key)
                    mask = batch.loss_mask.to(device)
                    scores = self.policy.score(batch, with_hidden=True)
                    if bilevel:
                        advantage = aligned(token_adv, key) * mask
                    else:
                        advantage = turn_adv[index].gather(1, batch.turn_index.to(device).clamp(min=0)) * mask
                    policy_loss, clipped = core.clipped_surrogate(scores.logprobs, aligned(old_logprobs, key),
                                                                  advantage, cfg.clip)
                    per_token = policy_loss - cfg.entropy_coef * scores.entropy
                    share = weight * float(mask.sum()) / max(tokens, 1.0)  # token-weighted means of the diagnostics
                    step["clip_fraction"] += share * core.masked_mean(clipped.float(), mask).item()
                    step["entropy"] += share * core.masked_mean(scores.entropy.detach(), mask).item()
                    if cfg.kl_coef > 0:
                        kl = core.kl_penalty(scores.logprobs, aligned(ref_logprobs, key), cfg.kl_estimator)
                        per_token = per_token + cfg.kl_coef * kl
                        step["kl"] += share * core.masked_mean(kl.detach(), mask).item()
                    if bilevel:  # over every policy token
                        value_loss = (core.clipped_value_loss(self._token_values(scores), aligned(old_token_values, key),
                                                              aligned(token_returns, key), cfg.value_clip)
                                      * mask).sum() / value_entries
                    else:  # over turns
                        positions, _ = turn_state_positions(batch, num_turns)
                        values = self._values(scores, positions.to(device))
                        value_loss = (core.clipped_value_loss(values, old_values[index], returns[index],
                                                              cfg.value_clip) * turn_mask[index]).sum() / value_entries
                    loss = weight * (core.aggregate_sum(per_token, mask, cfg.loss_aggregation) / denominator
                                     + cfg.value_coef * value_loss)
                    loss.backward()
                    step["loss"] += loss.item()
                    step["value_loss"] += weight * value_loss.item()
                # (listed after the passes: with FSDP, from a pass without gradients to the next backward pass
                # the root module holds unsharded parameter objects in place of its shards)
                parameters = [*self.policy.parameters(), *self.value_head.parameters()]
                self.shard.sum_gradients(parameters, step)
                grad_norm = self.shard.clip_gradients(parameters, cfg.max_grad_norm)
                self.optimizer.step()
                step["grad_norm"] = float(grad_norm)
                for key, value in step.items():
                    sums[key] = sums.get(key, 0.0) + value
                steps += 1
        metrics |= {key: value / steps for key, value in sums.items()}
        metrics["value_mean"] = core.masked_mean(old_values, turn_mask).item()
        return metrics
