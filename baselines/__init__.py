"""Baseline agents: random, the scripted workflow teacher (TaskAgent + MetaAgent)."""
