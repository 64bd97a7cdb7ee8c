"""Composition of reward components into one scalar, with every component logged by name.

Two rubrics, as in the papers (PAPER.md section 3):

* :class:`LtrReward` (VisionCreator): ``R = R_plan x R_fine`` where R_fine is the weighted mean of
  R_format, R_tool, R_result, R_traj and R_cons. A well-executed bad plan scores low.
* :class:`AdditiveReward` (VisionCreator-R1): the weighted mean of R_reflect, R_plan, R_format,
  R_tool and R_result (weights 1.0).

``None`` policy. A component answers ``None`` when it does not apply (R_cons on a task without a
consistency requirement) or when it failed (a judge that timed out). A ``None`` from an optional
entry means "not applicable": it is dropped and the remaining weights are renormalised. A ``None``
from a *required* entry is a missing measurement and follows ``none_policy``:

* "invalid" (the default): the sample's total is ``None`` (the env returns NaN with
  ``info["reward_valid"] = False``; trainers mask it, the evaluator leaves it out of its means).
* "lowest": the missing score counts as 0.0, the lowest score any component gives (scores lie in
  [0, 1]); the total is the lowest the episode could have got from the judgement it lost.

Why: a failed judgement must never score above the one it replaces. Dropping a required entry
does not meet that: in LtrReward, dropping the R_plan factor means multiplying by 1.0, its best
score (a failed judge gave 1.0 where a working one gave 0.75), and in a mean it stands in the mean
of the others, which may beat the real score. "invalid" neither rewards nor punishes the episode
for the judge's failure, so it is the default; "lowest" never rewards it but may punish it (use it
where a number is needed for every episode). A missing score is never turned into 0.0 silently:
the components keep the ``None``, ``dropped`` names it and every breakdown names its policy
(``info["reward_none_policy"]``, the evaluator's ``summary["reward_none_policy"]``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from visenv.episode import EpisodeRecord
from visenv.error import ConfigError
from visenv.rewards.rules import (ConsistencyReward, FormatReward, PerceptionReward, ResultReward,
                                  RulePlanReward, RuleReflectionReward, RuleTrajectoryReward, ToolReward)

Component = Callable[[Sequence[EpisodeRecord]], list]
NONE_POLICIES = ("invalid", "lowest")
RUBRICS = ("ltr", "r1", "ltr+percept", "r1+percept", "result_format")
"""The rubrics by name; "+percept" adds R_percept (:class:`PerceptionReward`, weight 1, optional);
"result_format" is the plain Result + Format reward (the mean of R_result and R_format: the ablation
baseline of LtrReward)."""


@dataclass(frozen=True)
class RewardBreakdown:
    """One episode's reward: the total and every component by name.

    Attributes:
        total: the scalar reward, or None when the sample is invalid (see the None policy).
        components: component name -> score or None (includes composite parts such as R_fine).
        none_policy: the rubric's policy for a required component's None ("invalid" or "lowest").
        dropped: names of the components that answered None (left out, or counted as 0.0 when
            required under "lowest").
    """

    total: float | None
    components: dict[str, float | None]
    none_policy: str
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
        raise ConfigError(f"none_policy ({none_policy!r}) must be one of {NONE_POLICIES}: 'invalid' makes the "
                          "total None when a required component fails (trainers mask it), 'lowest' counts "
                          "the missing score as 0.0.")


def _weighted_mean(scores: Mapping[str, float | None], entries: Mapping[str, Entry], policy: str
                   ) -> tuple[float | None, tuple[str, ...]]:
    dropped = tuple(name for name, value in scores.items() if value is None)
    if policy == "invalid" and any(entries[name].required for name in dropped):
        return None, dropped
    kept = [(entries[name].weight, 0.0 if value is None else value) for name, value in scores.items()
            if value is not None or entries[name].required]
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
    none_policy: str = "invalid"

    def __post_init__(self) -> None:
        _check_policy(self.none_policy)
        if not self.entries:
            raise ConfigError("AdditiveReward needs at least one entry.")

    def __call__(self, episodes: Sequence[EpisodeRecord]) -> list[RewardBreakdown]:
        out = []
        for scores in _score_all(self.entries, episodes):
            total, dropped = _weighted_mean(scores, self.entries, self.none_policy)
            out.append(RewardBreakdown(total, {**scores, "total": total}, self.none_policy, dropped))
        return out


@dataclass
class LtrReward:
    """LtrReward: R_plan x R_fine, R_fine the weighted mean of the fine-grained components.

    R_plan is required by default: when it is None (a failed plan judge) the total is None under
    "invalid" and 0.0 (R_fine x 0.0, the lowest R_plan) under "lowest", never R_fine (see the
    module docstring). An optional R_plan's None leaves the factor out.
    """

    plan: Entry = field(default_factory=lambda: Entry(RulePlanReward(), required=True))
    fine: dict[str, Entry] = field(default_factory=lambda: {
        "R_format": Entry(FormatReward()), "R_tool": Entry(ToolReward()), "R_result": Entry(ResultReward()),
        "R_traj": Entry(RuleTrajectoryReward()), "R_cons": Entry(ConsistencyReward())})
    none_policy: str = "invalid"

    def __post_init__(self) -> None:
        _check_policy(self.none_policy)
        if not self.fine:
            raise ConfigError("LtrReward needs at least one fine-grained entry.")

    def __call__(self, episodes: Sequence[EpisodeRecord]) -> list[RewardBreakdown]:
        plans = self.plan.component(episodes)
        out = []
        for plan, scores in zip(plans, _score_all(self.fine, episodes)):
            fine, dropped = _weighted_mean(scores, self.fine, self.none_policy)
            if plan is not None:
                factor: float | None = plan
            elif not self.plan.required:
                factor = 1.0  # "not applicable": the factor is left out
            else:
                factor = None if self.none_policy == "invalid" else 0.0
            if plan is None:
                dropped = ("R_plan", *dropped)
            total = None if fine is None or factor is None else factor * fine
            out.append(RewardBreakdown(total, {"R_plan": plan, **scores, "R_fine": fine, "total": total},
                                       self.none_policy, dropped))
        return out


@dataclass
class DelayedRubric:
    """A rubric that first waits ``seconds`` per episode it scores: a simulated judge's latency, for
    tests and benchmarks of rollout loops (the scores are the wrapped rubric's, unchanged).

    Attributes:
        rubric: "ltr", "r1", "result_format" or a rubric object (as :class:`~visenv.envs.config.VisGenConfig` takes).
        seconds: the wait per episode (``time.sleep``: the GIL released, other episodes running).
    """

    rubric: Any = "ltr"
    seconds: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) or not math.isfinite(self.seconds) \
                or self.seconds < 0:
            raise ConfigError(f"DelayedRubric.seconds ({self.seconds!r}) must be a finite number >= 0.")
        self.rubric = make_rubric(self.rubric)

    def __call__(self, episodes: Sequence[EpisodeRecord]) -> list[RewardBreakdown]:
        time.sleep(self.seconds * len(episodes))
        return self.rubric(episodes)


def make_rubric(name_or_rubric: Any) -> Any:
    """A rubric by name (:data:`RUBRICS`) or a rubric object as it is.

    "ltr" -> LtrReward(), "r1" -> AdditiveReward(); "ltr+percept" and "r1+percept" add the entry
    "R_percept" (:class:`PerceptionReward`, weight 1, optional: None on the attribute tier, where it
    is dropped and the rubric scores as without it); "result_format" -> the mean of R_result and R_format.
    """
    if name_or_rubric in ("ltr", "ltr+percept"):
        rubric = LtrReward()
        if name_or_rubric == "ltr+percept":
            rubric.fine["R_percept"] = Entry(PerceptionReward())
        return rubric
    if name_or_rubric in ("r1", "r1+percept"):
        rubric = AdditiveReward()
        if name_or_rubric == "r1+percept":
            rubric.entries["R_percept"] = Entry(PerceptionReward())
        return rubric
    if name_or_rubric == "result_format":
        return AdditiveReward({"R_result": Entry(ResultReward()), "R_format": Entry(FormatReward())})
    if callable(name_or_rubric):
        return name_or_rubric
    raise ConfigError(f"rubric ({name_or_rubric!r}) must be one of {RUBRICS} or a callable rubric.")
