"""Plug in your own policy: anything with ``reset(observation, seed)`` and ``act(observation)``.

    python examples/custom_policy.py --n 42

``OneToolPolicy`` below reads the request with the teacher's request parser, then makes everything
with a single generation tool (images in batches of four, or one text-to-video clip) and answers.
It satisfies :class:`baselines.agent.Agent`, so :func:`rl.evaluate.evaluate` runs it like any
baseline; it is compared with the random agent and the scripted workflow teacher on held-out tasks.
"""

from __future__ import annotations

import argparse
from typing import Any

from baselines.agent import Agent
from baselines.random_agent import RandomAgent
from baselines.task_agent import TaskAgent
from baselines.workflow_agent import WorkflowAgent, request_of
from rl.evaluate import evaluate
from visenv.evaluation import format_table
from visenv.protocol import format_turn, parse_tool_response
from visenv.tasks import make_suite


class OneToolPolicy:
    """Makes the deliverable with one generation tool, skipping the expert workflow."""

    def __init__(self) -> None:
        self.parser = TaskAgent()
        self.requirements = None
        self.made: list[str] = []
        self.turns = 0

    def reset(self, observation: dict[str, Any], seed: int | None = None) -> None:
        self.requirements = self.parser.route(request_of(observation)).requirements
        self.made, self.turns = [], 0

    def act(self, observation: dict[str, Any]) -> str:
        response = parse_tool_response(observation["text"]) or {}
        self.made += [a["id"] for a in response.get("artifacts", []) if a.get("kind") == self.requirements.modality]
        req, self.turns = self.requirements, self.turns + 1
        plan = None
        if self.turns == 1:
            tool = "tool_text2image_qwen" if req.modality == "image" else "tool_text2video_veo"
            plan = f"1. {tool}: make the {req.modality} directly"
        if req.modality == "image" and len(self.made) < req.amount:
            call = {"name": "tool_text2image_qwen",
                    "arguments": {"prompt": ", ".join(req.keywords) or "the request", "aspect_ratio": req.aspect_ratio,
                                  "n": min(4, req.amount - len(self.made))}}
            return format_turn(think=f"{len(self.made)} of {req.amount} images made.", plan=plan, tool_call=call)
        if req.modality == "video" and not self.made:
            call = {"name": "tool_text2video_veo",
                    "arguments": {"prompt": ", ".join(req.keywords) or "the request", "aspect_ratio": req.aspect_ratio}}
            return format_turn(think="One clip is the whole video.", plan=plan, tool_call=call)
        return format_turn(think="Done.", answer="Delivered: " + " ".join(self.made))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=42, help="held-out tasks (default 42: one per scenario)")
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed (default 0)")
    args = parser.parse_args()

    assert isinstance(OneToolPolicy(), Agent)  # the protocol the evaluator relies on
    tasks = make_suite(args.n, 10_000)
    agents = {"one-tool policy": OneToolPolicy, "random": lambda: RandomAgent(seed=args.seed),
              "workflow teacher": lambda: WorkflowAgent(seed=args.seed)}
    rewards = {}
    for name, factory in agents.items():
        _, summary = evaluate(factory, tasks, seed=args.seed, progress=False)
        rewards[name] = summary["overall"]["reward"]
        table = format_table(summary, title=f"== {name} on {len(tasks)} held-out tasks ==").splitlines()
        rules = [i for i, line in enumerate(table) if line.startswith("---")]
        print("\n".join(table[:rules[1]]))  # overall and per-modality rows; format_table also lists scenarios
    print("mean reward: " + ", ".join(f"{name} {value:.3f}" for name, value in rewards.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
