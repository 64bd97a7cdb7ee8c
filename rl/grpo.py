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
from typing import Sequence

import torch

from rl import core
from rl.policy import TokenBatch, TrainablePolicy
from rl.rollout import Episode


@dataclass
class GRPOConfig:
    """GRPO hyperparameters.

    Attributes:
        tasks_per_iteration: tasks (groups) sampled per iteration.
        group_size: rollouts per task; the paper's example uses 4, TINY-POLICY measurements 8.
        learning_rate: AdamW learning rate.
        clip: PPO clip range of the probability ratio.
        kl_coef: weight of the KL penalty to the reference policy (0 turns the reference off).
        kl_estimator: "k1", "k2" or "k3" (see :func:`rl.core.kl_penalty`).
        loss_aggregation: "token" (every policy token weighs the same) or "sequence" (every
            episode weighs the same, as in the original GRPO).
        scale_rewards: divide advantages by the group std (False: Dr. GRPO, mean baseline only).
        epochs: passes over each iteration's episodes.
        minibatch_size: episodes per optimizer step; 0 takes all kept episodes in one step.
        max_grad_norm: gradient clipping norm.
        off_policy: use the sampler's log-probs as the old policy (needed when rollout workers may
            hold stale weights, ``max_staleness > 0``); otherwise the learner's own log-probs before
            the update are used, which is exact on-policy.
        seed: seeds the minibatch shuffling.
    """

    tasks_per_iteration: int = 8
    group_size: int = 8
    learning_rate: float = 3e-4
    clip: float = 0.2
    kl_coef: float = 0.02
    kl_estimator: str = "k3"
    loss_aggregation: str = "token"
    scale_rewards: bool = True
    epochs: int = 1
    minibatch_size: int = 0
    max_grad_norm: float = 1.0
    off_policy: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tasks_per_iteration", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be at least 1.")
        if self.group_size < 2:
            raise ValueError(f"group_size ({self.group_size}) must be at least 2: GRPO's baseline is the "
                             "group mean, so a group of one has nothing to compare with.")
        if self.kl_estimator not in core.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator ({self.kl_estimator!r}) must be one of {core.KL_ESTIMATORS}.")
        if self.loss_aggregation not in core.LOSS_AGGREGATIONS:
            raise ValueError(f"loss_aggregation ({self.loss_aggregation!r}) must be one of {core.LOSS_AGGREGATIONS}.")
        if not 0 < self.clip < 1:
            raise ValueError(f"clip ({self.clip}) must be in (0, 1); 0.2 is usual.")
        if self.learning_rate <= 0 or self.kl_coef < 0 or self.minibatch_size < 0:
            raise ValueError(f"learning_rate ({self.learning_rate}) must be > 0, kl_coef ({self.kl_coef}) and "
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
    """

    def __init__(self, policy: TrainablePolicy, reference: TrainablePolicy | None, config: GRPOConfig):
        if config.kl_coef > 0 and reference is None:
            raise ValueError(f"kl_coef ({config.kl_coef}) > 0 needs a reference policy; pass one or set kl_coef: 0.")
        self.policy = policy
        self.reference = reference
        self.config = config
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=config.learning_rate, weight_decay=0.0)
        self.group_size = config.group_size

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

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
        minibatches = []
        for _ in range(cfg.epochs):
            order = rows[torch.randperm(len(rows), generator=shuffle)]
            minibatches += [order[i:i + size] for i in range(0, len(order), size)]
        batches = {}

        def batch_of(index: torch.Tensor) -> TokenBatch:
            key = tuple(index.tolist())
            if key not in batches:
                batches[key] = TokenBatch.from_segments([episodes[i].segments for i in key], self.policy.pad_id)
            return batches[key]

        # 2. The old policy's log-probs: the sampler's, or the learner's before this update.
        exact_detach = len(minibatches) == 1 and not cfg.off_policy
        old = {}
        if not exact_detach:
            with torch.no_grad():
                for index in minibatches:
                    batch = batch_of(index)
                    old[tuple(index.tolist())] = (batch.sampled_logprobs if cfg.off_policy
                                                  else self.policy.score(batch).logprobs.detach())
        # 3. Clipped surrogate + KL, one AdamW step per minibatch.
        sums: dict[str, float] = {}
        for index in minibatches:
            batch = batch_of(index)
            mask = batch.loss_mask.to(self.policy.device)
            scores = self.policy.score(batch)
            logprobs = scores.logprobs
            old_logprobs = logprobs.detach() if exact_detach else old[tuple(index.tolist())].to(logprobs.device)
            adv = advantages[index].to(logprobs.device)[:, None]
            per_token, clipped = core.clipped_surrogate(logprobs, old_logprobs, adv, cfg.clip)
            step = {"clip_fraction": core.masked_mean(clipped.float(), mask).item(),
                    "entropy": core.masked_mean(scores.entropy.detach(), mask).item(),
                    "sampler_logprob_gap": core.masked_mean(
                        (logprobs.detach() - batch.sampled_logprobs.to(logprobs.device)).abs(), mask).item()}
            if cfg.kl_coef > 0:
                with torch.no_grad():
                    ref_logprobs = self.reference.score(batch).logprobs
                kl = core.kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator)
                per_token = per_token + cfg.kl_coef * kl
                step["kl"] = core.masked_mean(kl.detach(), mask).item()
            loss = core.aggregate(per_token, mask, cfg.loss_aggregation)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            step |= {"loss": loss.item(), "grad_norm": float(grad_norm)}
            for key, value in step.items():
                sums[key] = sums.get(key, 0.0) + value
        metrics |= {key: value / len(minibatches) for key, value in sums.items()}
        metrics["advantage_abs"] = advantages[rows].abs().mean().item()
        return {k: v for k, v in metrics.items() if not math.isnan(v)}
