"""rl: GRPO and PPO for multi-turn LLM/VLM policies in visenv environments, PST (SFT), serial and Ray rollouts.

The pieces, each in one module:

* :mod:`rl.policy` the Policy protocol and token-level trajectory types; :mod:`rl.hf` transformers
  causal LM and VLM policies; :mod:`rl.api` an OpenAI-compatible endpoint (evaluation).
* :mod:`rl.rollout` the one episode runner and rollout contract, serial and Ray backends;
  :mod:`rl.evaluate` evaluation and the report of any policy or agent through it.
* :mod:`rl.core` the pure math; :mod:`rl.grpo` and :mod:`rl.ppo` one file per algorithm;
  :mod:`rl.sft` SFT and PST; :mod:`rl.train` the loop they share.
* :mod:`rl.config`, :mod:`rl.cli` (``rl sft|train|record|main|eval|data``), :mod:`rl.checkpoint`,
  :mod:`rl.logging`, :mod:`rl.tokenizer`.
* :mod:`rl.jobs` the applications composed from these pieces: the main job and ``rl eval``.

See docs/trainer.md.
"""

from rl.grpo import GRPO, GRPOConfig
from rl.policy import AgentPolicy, Conversation, Policy, Scores, Segment, TokenBatch, TrainablePolicy
from rl.ppo import PPO, PPOConfig
from rl.rollout import Episode, EpisodeSpec, RayRollout, Rollout, SerialRollout, make_specs
from rl.train import Callback, Trainer

__all__ = ["GRPO", "GRPOConfig", "PPO", "PPOConfig", "AgentPolicy", "Conversation", "Policy", "Scores", "Segment",
           "TokenBatch", "TrainablePolicy", "Episode", "EpisodeSpec", "RayRollout", "Rollout", "SerialRollout", "make_specs",
           "Callback", "Trainer"]
