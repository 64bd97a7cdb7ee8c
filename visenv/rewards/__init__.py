"""Rewards: rule components, result checks and the rubrics that compose them."""

from visenv.rewards.checks import RESULT_CHECKS, deliverables, run_checks
from visenv.rewards.rubric import AdditiveReward, Entry, LtrReward, RewardBreakdown, make_rubric
from visenv.rewards.rules import (ConsistencyReward, FormatReward, PerceptionReward, ResultReward,
                                  RulePlanReward, RuleReflectionReward, RuleTrajectoryReward, ToolReward)

__all__ = ["RESULT_CHECKS", "deliverables", "run_checks", "AdditiveReward", "Entry", "LtrReward",
           "RewardBreakdown", "make_rubric", "ConsistencyReward", "FormatReward", "PerceptionReward", "ResultReward",
           "RulePlanReward", "RuleReflectionReward", "RuleTrajectoryReward", "ToolReward"]
