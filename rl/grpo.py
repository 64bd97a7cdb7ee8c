"""GRPO (Shao et al., DeepSeekMath 2024) for multi-turn episodes, readable top to bottom.

One iteration: ``tasks_per_iteration`` tasks x ``group_size`` rollouts each (the rollout backend runs
them) -> episode returns -> group-normalised advantages (groups with zero reward variance are
skipped) -> every policy token of an episode gets its episode's advantage -> clipped surrogate plus
``kl_coef`` x KL to the reference (PST) policy, with a named estimator, minus ``entropy_coef`` x the
token's entropy (0 by default) -> aggregated per token or per sequence -> AdamW step(s). Environment
tokens are in the sequences (the policy reads them) but never in the loss.

Turn-level credit (``credit: "turn"``, GiGPO, Feng et al. 2025): each turn's tokens get
``A^E(episode) + step_weight x A^S(turn)``, where ``A^S`` compares the turn's discounted return from
that turn on (the per-turn rewards: VisGen pays ``-error_penalty`` for a failed call and the rubric
at the end) with the turns of the group's other episodes that start from the same state
(:func:`turn_anchors`; :func:`rl.core.turn_credit_advantages`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from rl import core
from rl.errors import ConfigError
from rl.learner import Shard
from rl.policy import POLICY, ChunkedBatches, TrainablePolicy
from rl.rollout import Episode

CREDITS = ("episode", "turn")
ANCHORS = ("history", "turn")


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
        entropy_coef: weight of the per-token entropy in the loss, as in :class:`rl.ppo.PPOConfig`:
            positive rewards entropy (a bonus), negative penalises it (the policy sharpens whatever the
            rewards say; with ``kl_coef`` the reference still holds it). 0: the policy gradient alone.
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
            hold stale weights: ``max_staleness > 0`` or ``overlap``); otherwise the learner's own log-probs before
            the update are used, which is exact on-policy.
        credit: "episode" (every token of an episode gets the episode's advantage: GRPO) or "turn"
            (GiGPO's episode plus step advantage per turn, see the module docstring).
        anchor: with ``credit: "turn"``, which turns form a step group (:func:`turn_anchors`):
            "history" (GiGPO's anchor states: the turns of a group's episodes whose conversation so far
            is the same, token for token) or "turn" (the turns at the same index of a group's
            episodes: per-turn advantages from per-turn rewards, states not compared).
        step_weight: ``omega``, the weight of the step advantage (GiGPO uses 1).
        step_gamma: discount of the per-turn returns the step advantage compares.
        seed: seeds the minibatch shuffling.
    """

    tasks_per_iteration: int = 8
    group_size: int = 8
    learning_rate: float = 3e-4
    warmup_steps: int = 0
    clip: float = 0.2
    kl_coef: float = 0.02
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    loss_aggregation: str = "token"
    scale_rewards: bool = True
    epochs: int = 1
    minibatch_size: int = 0
    max_grad_norm: float = 1.0
    micro_batch_tokens: int = 4096
    off_policy: bool = False
    credit: str = "episode"
    anchor: str = "history"
    step_weight: float = 1.0
    step_gamma: float = 1.0
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
        if self.credit not in CREDITS or self.anchor not in ANCHORS:
            raise ConfigError(f"credit ({self.credit!r}) must be one of {CREDITS} and anchor ({self.anchor!r}) one "
                              f"of {ANCHORS}.")
        if self.step_weight < 0 or not 0 <= self.step_gamma <= 1:
            raise ConfigError(f"step_weight ({self.step_weight}) must be >= 0 and step_gamma ({self.step_gamma}) in "
                              "[0, 1] (GiGPO: 1 and 0.95).")
        if not math.isfinite(self.entropy_coef) or abs(self.entropy_coef) > 1:
            raise ConfigError(f"entropy_coef ({self.entropy_coef}) must be a number in [-1, 1] (0: none; "
                             "0.01 is a usual bonus, a negative weight sharpens).")
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
            one-process update. With FSDP (``shard.sharded``) the ranks also run equally many
            passes (:meth:`rl.learner.Shard.passes`).
    """

    def __init__(self, policy: TrainablePolicy, reference: TrainablePolicy | None, config: GRPOConfig,
                 shard: Shard | None = None):
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
        self.shard = shard or Shard(0, 1)  # one process: the only rank of a group of one

    @property
    def off_policy(self) -> bool:
        """Whether the old log-probs are the sampler's (``config.off_policy``): what stale samples need."""
        return self.config.off_policy

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:  # checkpoints written before the warm-up existed have none
            self.scheduler.load_state_dict(state["scheduler"])

    def advantages(self, episodes: Sequence[Episode]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """The advantages of an iteration's episodes, normalised within each group.

        Returns:
            ``(advantages, turn_mask, keep, metrics)``: ``(B, T)`` advantages (``T`` 1 with episode
            credit: one per episode), the turns each row has, the rows to train on, and metrics of
            the step groups (turn credit only).
        """
        cfg = self.config
        if cfg.credit == "episode":
            rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float32)
            advantages, keep = core.group_advantages(rewards, cfg.group_size, scale=cfg.scale_rewards)
            return advantages[:, None], torch.ones(len(episodes), 1, dtype=torch.bool), keep, {}
        for e in episodes:
            said = sum(s.role == POLICY for s in e.segments)
            if not math.isnan(e.reward) and said != len(e.rewards):
                raise RuntimeError(f"episode {e.spec.episode_id} has {said} policy turns but {len(e.rewards)} turn "
                                   "rewards: turn-level credit needs one reward per policy turn.")
        turns = max(len(e.rewards) for e in episodes)
        rewards = torch.tensor([e.rewards + [0.0] * (turns - len(e.rewards)) for e in episodes], dtype=torch.float32)
        mask = torch.tensor([[t < len(e.rewards) for t in range(turns)] for e in episodes])
        anchors = torch.tensor(turn_anchors(episodes, cfg.group_size, cfg.anchor, turns))
        advantages, keep = core.turn_credit_advantages(rewards, mask, anchors, cfg.group_size, cfg.step_weight,
                                                       cfg.step_gamma, scale=cfg.scale_rewards)
        valid = torch.tensor([not math.isnan(e.reward) for e in episodes])
        _, inverse, counts = torch.unique(anchors[mask & valid[:, None]], return_inverse=True, return_counts=True)
        metrics = {"step_groups_shared": (counts[inverse] >= 2).float().mean().item() if inverse.numel() else 0.0,
                   "step_group_size": counts.float().mean().item() if counts.numel() else 0.0}
        return advantages, mask, keep, metrics

    def update(self, episodes: Sequence[Episode], iteration: int) -> dict[str, float]:
        cfg = self.config
        # 1. Advantages: one per episode (or, with turn credit, per turn), normalised within its group.
        advantages, turn_mask, keep, step_metrics = self.advantages(episodes)
        groups = keep.view(-1, cfg.group_size).any(1)
        metrics = {"groups_skipped": 1.0 - groups.float().mean().item(), "episodes_trained": float(keep.sum()),
                   "kl_coef": cfg.kl_coef, **group_spread(episodes, cfg.group_size), **step_metrics}
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
            def scored(shard: Shard) -> list[tuple[int, ...]]:  # a rank's chunks, each once
                return list(dict.fromkeys(key for mb in minibatches for key in batches.chunks(shard.part(mb))))

            with torch.no_grad():
                for key, _ in self.shard.passes(scored):
                    batch = batches[key]
                    old[key] = batch.sampled_logprobs if cfg.off_policy else self.policy.score(batch).logprobs.detach()
        # 3. Clipped surrogate + KL, one AdamW step per minibatch; the forward/backward passes run chunk
        # by chunk (gradients accumulate; the loss is normalised over the whole minibatch, of every shard).
        sums: dict[str, float] = {}
        for minibatch in minibatches:
            keys = batches.chunks(minibatch)
            denominator = max(1.0, sum(core.aggregate_count(batches[k].loss_mask, cfg.loss_aggregation) for k in keys))
            tokens = sum(float(batches[k].loss_mask.sum()) for k in keys)
            step = dict.fromkeys(["loss", "clip_fraction", "entropy", "sampler_logprob_gap", "advantage_token_mean",
                                  "advantage_token_square", "advantage_positive"]
                                 + (["kl"] if cfg.kl_coef > 0 else []), 0.0)
            self.optimizer.zero_grad(set_to_none=True)
            for key, weight in self.shard.passes(lambda shard: batches.chunks(shard.part(minibatch))):
                batch = batches[key]
                mask = batch.loss_mask.to(self.policy.device)
                scores = self.policy.score(batch)
                logprobs = scores.logprobs
                old_logprobs = logprobs.detach() if exact_detach else old[key].to(logprobs.device)
                adv = advantages[list(key)].to(logprobs.device)  # (rows, 1) per episode or (rows, T) per turn
                if cfg.credit == "turn":
                    adv = adv.gather(1, batch.turn_index.to(logprobs.device).clamp(0, adv.shape[1] - 1))
                per_token, clipped = core.clipped_surrogate(logprobs, old_logprobs, adv, cfg.clip)
                if cfg.entropy_coef:
                    per_token = per_token - cfg.entropy_coef * scores.entropy
                share = weight * float(mask.sum()) / max(tokens, 1.0)  # token-weighted means of the diagnostics
                token_adv = adv.expand_as(logprobs)
                step["advantage_token_mean"] += share * core.masked_mean(token_adv, mask).item()
                step["advantage_token_square"] += share * core.masked_mean(token_adv**2, mask).item()
                step["advantage_positive"] += share * core.masked_mean((token_adv > 0).float(), mask).item()
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
                loss = weight * core.aggregate_sum(per_token, mask, cfg.loss_aggregation) / denominator
                loss.backward()
                step["loss"] += loss.item()
            self.shard.sum_gradients(self.policy.parameters(), step)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
            learning_rate = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            step |= {"grad_norm": float(grad_norm), "learning_rate": learning_rate}
            for key, value in step.items():
                sums[key] = sums.get(key, 0.0) + value
        metrics |= {key: value / len(minibatches) for key, value in sums.items()}
        square = metrics.pop("advantage_token_square")
        metrics["advantage_token_std"] = max(0.0, square - metrics["advantage_token_mean"] ** 2) ** 0.5
        metrics["advantage_abs"] = advantages[rows][turn_mask[rows]].abs().mean().item()
        return {k: v for k, v in metrics.items() if not math.isnan(v)}


def turn_anchors(episodes: Sequence[Episode], group_size: int, anchor: str, turns: int) -> list[list[int]]:
    """The anchor-state id of each policy turn of each episode (``turns`` columns, -1 padding).

    Ids are unique across groups (``group_size`` consecutive episodes); within a group two turns share
    an id when, with ``anchor``:

    * ``"history"``: the conversation before them is the same, every environment and policy segment
      (its token ids; its text for a text-only policy). This is VisGen's environment state exactly:
      the environment is deterministic given the task and the turns so far (tool seeds derive from the
      reset seed and the call count), and its rubric scores the whole trajectory (plan, tool choice,
      consistency, failed calls), so two turns face the same future only when everything before them
      is the same. A coarser key (the latest observation alone, as GiGPO uses on ALFWorld) would merge
      turns whose rewards are decided by different pasts. Every first turn of a group shares one id.
    * ``"turn"``: they are the same turn (index) of their episodes.
    """
    ids: dict[tuple, int] = {}
    table = []
    for number, episode in enumerate(episodes):
        group, row, history = number // group_size, [], []
        for segment in episode.segments:
            if segment.role == POLICY:
                key = (group, len(row)) if anchor == "turn" else (group, tuple(history))
                row.append(ids.setdefault(key, len(ids)))
            history.append((segment.role, tuple(segment.token_ids) if segment.token_ids else segment.text))
        table.append((row + [-1] * turns)[:turns])
    return table


def group_spread(episodes: Sequence[Episode], group_size: int) -> dict[str, float]:
    """How much the rewards differ inside GRPO's groups, the signal GRPO learns from.

    ``group_reward_std``: the mean over groups of the (population) std of their valid rewards;
    ``groups_zero_variance``: the share of groups whose valid rewards are all equal (or fewer than two);
    ``group_std/<component>``: the mean within-group std of each reward component of the last step
    (which components tell a group's episodes apart).
    """
    def mean_std(values: list[list[float]]) -> tuple[float, float]:
        stds = []
        for group in values:
            kept = [v for v in group if v is not None and not math.isnan(v)]
            mean = sum(kept) / len(kept) if kept else 0.0
            stds.append((sum((v - mean) ** 2 for v in kept) / len(kept)) ** 0.5 if len(kept) >= 2 else 0.0)
        return sum(stds) / len(stds), sum(s == 0 for s in stds) / len(stds)

    grouped = [episodes[i:i + group_size] for i in range(0, len(episodes), group_size)]
    spread, zero = mean_std([[e.reward for e in group] for group in grouped])
    metrics = {"group_reward_std": spread, "groups_zero_variance": zero}
    names = sorted({name for e in episodes for name in e.components})
    for name in names:
        values = [[e.components.get(name) for e in group] for group in grouped]
        metrics[f"group_std/{name}"] = mean_std([[float(v) for v in g if v is not None] for g in values])[0]
    return metrics
