"""LLM/VLM judges: prompt templates and strict parsers, chat backends, a persistent cache, the
judge components (R_plan, R_traj, R_reflect) and the VisGenBench grader.

Importing this package needs neither httpx nor transformers: each backend imports its client
library when it first sends a request.
"""

from visenv.rewards.judges.backends import ChatPrompt, OpenAIChatBackend, TransformersChatBackend
from visenv.rewards.judges.cache import JudgeCache
from visenv.rewards.judges.grader import format_benchmark, grade_benchmark
from visenv.rewards.judges.judges import BenchmarkGrader, PlanJudge, ReflectionJudge, TrajectoryJudge

__all__ = ["ChatPrompt", "OpenAIChatBackend", "TransformersChatBackend", "JudgeCache", "format_benchmark",
           "grade_benchmark", "BenchmarkGrader", "PlanJudge", "ReflectionJudge", "TrajectoryJudge"]
