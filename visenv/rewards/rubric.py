"""Composition of reward components into one scalar, with every component logged by name.

Two rubrics, as in the papers (PAPER.md section 3):

* :class:`LtrReward` (VisionCreator): ``R = R_plan x R_fine`` where R_fine is the weighted mean of
  R_format, R_tool, R_result, R_traj and R_cons. A well-executed bad plan scores low.
* :class:`AdditiveReward` (VisionCreator-R1): the weighted mean of R_reflect, R_plan, R_format,
  R_tool and R_result (weights 1.0).

``None`` policy. A component answers ``None`` when it does not apply (R_cons on a task without a
consistency requirement) or when it failed (a judge that timed out). A ``None`` from an optional
entry is dropped and the remaining weights are renormalised. A ``None`` from a *required* entry
follows ``none_policy``: "renormalize" (drop it too) or "invalid" (the whole sample's total is
``None``; trainers must mask it). A missing score is never turned into 0.0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from visenv.episode import EpisodeRecord
from visenv.error import ConfigError
from visenv.rewards.rules import (ConsistencyReward, FormatReward, ResultReward, RulePlanReward,
                                  RuleReflectionReward, RuleTrajectoryReward, ToolReward)

Component = Callable[[Sequence[EpisodeRecord]], list]
NONE_POLICIES = ("renormalize", "invalid")


@dataclass(frozen=True)
class RewardBreakdown:
    """One episode's reward: the total and every component by name.

    Attributes:
        total: the scalar reward, or None when the sample is invalid (see the None policy).
        components: component name -> score or None (includes composite parts such as R_fine).
        dropped: names of the components that answered None and were left out.
    """

    total: float | None
    components: dict[str, float | None]
    dropped: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return self.total is not None


@dataclass(frozen=True)
class Entry:
    """A component in a rubric: its weight and whether a None from it follows the None policy."""

    component: Any
    weight: float = 1.0
    required: bool = False

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"Rubric weight ({self.weight}) of {self.component!r} must be >= 0.")


def _check_policy(none_policy: str) -> None:
    if none_policy not in NONE_POLICIES:
        raise ConfigError(f"none_policy ({none_policy!r}) must be one of {NONE_POLICIES}.")


def _weighted_mean(scores: Mapping[str, float | None], entries: Mapping[str, Entry], policy: str
                   ) -> tuple[float | None, tuple[str, ...]]:
    dropped = tuple(name for name, value in scores.items() if value is None)
    if policy == "invalid" and any(entries[name].required for name in dropped):
        return None, dropped
    kept = [(entries[name].weight, value) for name, value in scores.items() if value is not None]
    total_weight = sum(w for w, _ in kept)
    if total_weight == 0:
        return None, dropped
    return sum(w * v for w, v in kept) / total_weight, dropped


def _score_all(entries: Mapping[str, Entry], episodes: Sequence[EpisodeRecord]) -> list[dict[str, float | None]]:
    columns = {}
    for name, entry in entries.items():
        values = entry.component(episodes)
        if len(values) != len(episodes):
            raise RuntimeError(f"Reward component {name} returned {len(values)} scores for {len(episodes)} episodes.")
        columns[name] = values
    return [{name: columns[name][i] for name in entries} for i in range(len(episodes))]


@dataclass
class AdditiveReward:
    """The weighted mean of named components (VisionCreator-R1's reward by default)."""

    entries: dict[str, Entry] = field(default_factory=lambda: {
        "R_reflect": Entry(RuleReflectionReward()), "R_plan": Entry(RulePlanReward()),
        "R_format": Entry(FormatReward()), "R_tool": Entry(ToolReward()), "R_result": Entry(ResultReward())})
    none_policy: str = "renormalize"

    def __post_init__(self) -> None:
        _check_policy(self.none_policy)
        if not self.entries:
            raise ConfigError("AdditiveReward needs at least one entry.")

    def __call__(self, episodes: Sequence[EpisodeRecord]) -> list[RewardBreakdown]:
        out = []
        for scores in _score_all(self.entries, episodes):
            total, dropped = _weighted_mean(scores, self.entries, self.none_policy)
            out.append(RewardBreakdown(total, {**scores, "total": total}, dropped))
        return out


@dataclass
class LtrReward:
    """LtrReward: R_plan x R_fine, R_fine the weighted mean of the fine-grained components."""

    plan: Entry = field(default_factory=lambda: Entry(RulePlanReward(), required=True))
    fine: dict[str, Entry] = field(default_factory=lambda: {
        "R_format": Entry(FormatReward()), "R_tool": Entry(ToolReward()), "R_result": Entry(ResultReward()),
        "R_traj": Entry(RuleTrajectoryReward()), "R_cons": Entry(ConsistencyReward())})
    none_policy: str = "renormalize"

    def __post_init__(self) -> None:
        _check_policy(self.none_policy)
        if not self.fine:
            raise ConfigError("LtrReward needs at least one fine-grained entry.")

    def __call__(self, episodes: Sequence[EpisodeRecord]) -> list[RewardBreakdown]:
        plans = self.plan.component(episodes)
        out = []
        for plan, scores in zip(plans, _score_all(self.fine, episodes)):
            fine, dropped = _weighted_mean(scores, self.fine, self.none_policy)
            components = {"R_plan": plan, **scores, "R_fine": fine}
            if plan is None:
                dropped = ("R_plan", *dropped)
                if self.plan.required and self.none_policy == "invalid":
                    total = None
                else:
                    total = fine
            else:
                total = None if fine is None else plan * fine
            components["total"] = total
            out.append(RewardBreakdown(total, components, dropped))
        return out


def make_rubric(name_or_rubric: Any) -> Any:
    """"ltr" -> LtrReward(), "r1" -> AdditiveReward(), a rubric object -> itself."""
    if name_or_rubric == "ltr":
        return LtrReward()
    if name_or_rubric == "r1":
        return AdditiveReward()
    if callable(name_or_rubric):
        return name_or_rubric
    raise ConfigError(f"rubric ({name_or_rubric!r}) must be 'ltr', 'r1' or a callable rubric.")
