"""GRPO (Shao et al., DeepSeekMath 2024) for multi-turn episodes, readable top to bottom.

One iteration: ``tasks_per_iteration`` tasks x ``group_size`` rollouts each (the rollout backend runs
them) -> episode returns -> group-normalised advantages (groups with zero reward variance are
skipped) -> every policy token of an episode gets its episode's advantage -> clipped surrogate plus
``kl_coef`` x KL to the reference (PST) policy, with a named estimator -> aggregated per token or per
sequence -> AdamW step(s). Environment tokens are in the sequences (the policy reads them) but never
in the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from rl import core
from rl.errors import ConfigError
from rl.policy import ChunkedBatches, TrainablePolicy
from rl.rollout import Episode

if TYPE_CHECKING:
    from rl.learner import Shard


@dataclass
class GRPOConfig:
    """GRPO hyperparameters.

    Attributes:
        tasks_per_iteration: tasks (groups) sampled per iteration.
        group_size: rollouts per task; the paper's example uses 4, TINY-POLICY measurements 8.
        learning_rate: AdamW learning rate.
        warmup_steps: the learning rate rises linearly from ``learning_rate / warmup_steps`` to
            ``learning_rate`` over the first ``warmup_steps`` optimizer steps (0: no warm-up). A policy
            fresh from SFT sits in a sharp optimum; full-size first steps can push it off before the
            group baselines mean much.
        clip: PPO clip range of the probability ratio.
        kl_coef: weight of the KL penalty to the reference policy (0 turns the reference off).
        kl_estimator: "k1", "k2" or "k3" (see :func:`rl.core.kl_penalty`).
        loss_aggregation: "token" (every policy token weighs the same) or "sequence" (every
            episode weighs the same, as in the original GRPO).
        scale_rewards: divide advantages by the group std (False: Dr. GRPO, mean baseline only).
        epochs: passes over each iteration's episodes.
        minibatch_size: episodes per optimizer step; 0 takes all kept episodes in one step.
        max_grad_norm: gradient clipping norm.
        micro_batch_tokens: most padded tokens (rows x longest row) in one forward/backward pass; a
            minibatch is split into length-sorted chunks within this size and their gradients are
            accumulated (the loss is the same as in one pass; padding and peak memory shrink). 0 runs
            each minibatch in one pass.
        off_policy: use the sampler's log-probs as the old policy (needed when rollout workers may
            hold stale weights, ``max_staleness > 0``); otherwise the learner's own log-probs before
            the update are used, which is exact on-policy.
        seed: seeds the minibatch shuffling.
    """

    tasks_per_iteration: int = 8
    group_size: int = 8
    learning_rate: float = 3e-4
    warmup_steps: int = 0
    clip: float = 0.2
    kl_coef: float = 0.02
    kl_estimator: str = "k3"
    loss_aggregation: str = "token"
    scale_rewards: bool = True
    epochs: int = 1
    minibatch_size: int = 0
    max_grad_norm: float = 1.0
    micro_batch_tokens: int = 4096
    off_policy: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tasks_per_iteration", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be at least 1.")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) must be >= 0 (0: no warm-up).")
        if self.group_size < 2:
            raise ConfigError(f"group_size ({self.group_size}) must be at least 2: GRPO's baseline is the "
                             "group mean, so a group of one has nothing to compare with.")
        if self.kl_estimator not in core.KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator ({self.kl_estimator!r}) must be one of {core.KL_ESTIMATORS}.")
        if self.loss_aggregation not in core.LOSS_AGGREGATIONS:
            raise ConfigError(f"loss_aggregation ({self.loss_aggregation!r}) must be one of {core.LOSS_AGGREGATIONS}.")
        if not 0 < self.clip < 1:
            raise ConfigError(f"clip ({self.clip}) must be in (0, 1); 0.2 is usual.")
        if self.micro_batch_tokens < 0:
            raise ConfigError(f"micro_batch_tokens ({self.micro_batch_tokens}) must be >= 0 (0: one pass per minibatch).")
        if self.learning_rate <= 0 or self.kl_coef < 0 or self.minibatch_size < 0:
            raise ConfigError(f"learning_rate ({self.learning_rate}) must be > 0, kl_coef ({self.kl_coef}) and "
                             f"minibatch_size ({self.minibatch_size}) >= 0.")

    @property
    def episodes_per_iteration(self) -> int:
        return self.tasks_per_iteration * self.group_size


class GRPO:
    """The GRPO update: episodes in, one optimisation of the policy out.

    Args:
        policy: the policy to train.
        reference: the frozen reference policy for the KL penalty (None when ``kl_coef`` is 0).
        config: hyperparameters.
        shard: this process's place in a data-parallel learner group (:class:`rl.learner.Shard`), or None
            for a learner of one process. With a shard, every process holds all of the iteration's
            episodes and computes the same advantages and minibatches; it runs forward/backward on its
            share of each minibatch only, with the loss normalised over the whole minibatch, and the
            gradients (and diagnostics) are summed over the group before the step: the update is the
            one-process update.
    """

    def __init__(self, policy: TrainablePolicy, reference: TrainablePolicy | None, config: GRPOConfig,
                 shard: "Shard | None" = None):
        if config.kl_coef > 0 and reference is None:
            raise ConfigError(f"kl_coef ({config.kl_coef}) > 0 needs a reference policy; pass one or set kl_coef: 0.")
        self.policy = policy
        self.reference = reference
        self.config = config
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=config.learning_rate, weight_decay=0.0)
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        self.group_size = config.group_size
        self.shard = shard

    def _mine(self, minibatch: list[int]) -> list[int]:
        """The rows of a minibatch that this process runs (all of them without a shard)."""
        return minibatch if self.shard is None else self.shard.part(minibatch)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:  # checkpoints written before the warm-up existed have none
            self.scheduler.load_state_dict(state["scheduler"])

    def update(self, episodes: Sequence[Episode], iteration: int) -> dict[str, float]:
        cfg = self.config
        # 1. Advantages: one per episode, normalised within its group.
        rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float32)
        advantages, keep = core.group_advantages(rewards, cfg.group_size, scale=cfg.scale_rewards)
        groups = keep.view(-1, cfg.group_size).any(1)
        metrics = {"groups_skipped": 1.0 - groups.float().mean().item(), "episodes_trained": float(keep.sum())}
        rows = keep.nonzero().flatten()
        if len(rows) == 0:
            return metrics
        size = cfg.minibatch_size or len(rows)
        shuffle = torch.Generator().manual_seed(cfg.seed * 100_003 + iteration)
        minibatches: list[list[int]] = []
        for _ in range(cfg.epochs):
            order = rows[torch.randperm(len(rows), generator=shuffle)].tolist()
            minibatches += [order[i:i + size] for i in range(0, len(order), size)]
        batches = ChunkedBatches([e.segments for e in episodes], self.policy.pad_id, cfg.micro_batch_tokens)

        # 2. The old policy's log-probs: the sampler's, or the learner's before this update.
        exact_detach = len(minibatches) == 1 and not cfg.off_policy
        old: dict[tuple[int, ...], torch.Tensor] = {}
        if not exact_detach:
            with torch.no_grad():
                for minibatch in minibatches:
                    for key in batches.chunks(self._mine(minibatch)):
                        if key not in old:
                            batch = batches[key]
                            old[key] = (batch.sampled_logprobs if cfg.off_policy
                                        else self.policy.score(batch).logprobs.detach())
        # 3. Clipped surrogate + KL, one AdamW step per minibatch; the forward/backward passes run chunk
        # by chunk (gradients accumulate; the loss is normalised over the whole minibatch, of every shard).
        sums: dict[str, float] = {}
        for minibatch in minibatches:
            keys = batches.chunks(minibatch)
            denominator = max(1.0, sum(core.aggregate_count(batches[k].loss_mask, cfg.loss_aggregation) for k in keys))
            tokens = sum(float(batches[k].loss_mask.sum()) for k in keys)
            step = dict.fromkeys(["loss", "clip_fraction", "entropy", "sampler_logprob_gap"]
                                 + (["kl"] if cfg.kl_coef > 0 else []), 0.0)
            self.optimizer.zero_grad(set_to_none=True)
            for key in batches.chunks(self._mine(minibatch)):
                batch = batches[key]
                mask = batch.loss_mask.to(self.policy.device)
                scores = self.policy.score(batch)
                logprobs = scores.logprobs
                old_logprobs = logprobs.detach() if exact_detach else old[key].to(logprobs.device)
                adv = advantages[list(key)].to(logprobs.device)[:, None]
                per_token, clipped = core.clipped_surrogate(logprobs, old_logprobs, adv, cfg.clip)
                share = float(mask.sum()) / max(tokens, 1.0)  # token-weighted means of the diagnostics
                step["clip_fraction"] += share * core.masked_mean(clipped.float(), mask).item()
                step["entropy"] += share * core.masked_mean(scores.entropy.detach(), mask).item()
                step["sampler_logprob_gap"] += share * core.masked_mean(
                    (logprobs.detach() - batch.sampled_logprobs.to(logprobs.device)).abs(), mask).item()
                if cfg.kl_coef > 0:
                    with torch.no_grad():
                        ref_logprobs = self.reference.score(batch).logprobs
                    kl = core.kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator)
                    per_token = per_token + cfg.kl_coef * kl
                    step["kl"] += share * core.masked_mean(kl.detach(), mask).item()
                loss = core.aggregate_sum(per_token, mask, cfg.loss_aggregation) / denominator
                loss.backward()
                step["loss"] += loss.item()
            if self.shard is not None:
                self.shard.sum_gradients(self.policy.parameters(), step)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
            learning_rate = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            step |= {"grad_norm": float(grad_norm), "learning_rate": learning_rate}
            for key, value in step.items():
                sums[key] = sums.get(key, 0.0) + value
        metrics |= {key: value / len(minibatches) for key, value in sums.items()}
        metrics["advantage_abs"] = advantages[rows].abs().mean().item()
        return {k: v for k, v in metrics.items() if not math.isnan(v)}
