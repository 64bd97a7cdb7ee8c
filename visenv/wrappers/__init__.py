"""Wrappers of the VisGen environments: :class:`StructuredVisGen` (discrete actions, feature observations, RLlib)."""

from visenv.wrappers.structured import RLLIB_ENV_ID, StructuredVisGen, make_structured, register_rllib

__all__ = ["RLLIB_ENV_ID", "StructuredVisGen", "make_structured", "register_rllib"]
