"""Baseline agents: random, the scripted workflow teacher (TaskAgent + MetaAgent); the teacher's data funnel
(:mod:`baselines.data`) and RLlib PPO on the structured wrapper (:mod:`baselines.rllib_ppo`)."""
