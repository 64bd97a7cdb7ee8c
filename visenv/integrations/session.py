"""One VisGen episode driven by function calls, for the trainers whose models call tools natively.

TRL and verl hand the environment a parsed function call (a name and its arguments), not a UTPC
turn. :class:`ToolSession` turns each call into the UTPC turn the environment reads
(``<plan>`` once, then ``<tool_call>{...}</tool_call>``, or ``<answer>``) and steps a
:class:`~visenv.envs.visgen.VisGenEnv` with it, so validation, budgets, artifacts and the rubric
are the environment's own. Two calls exist besides the tools: ``plan`` (the numbered steps, sent
with the next turn so the rubric's R_plan sees them) and ``answer`` (the artifact ids delivered; it
ends the episode). An episode that ends without ``answer`` is closed with an empty answer when its
reward is asked for (it delivered nothing).
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable

import numpy as np

from visenv.envs.visgen import VisGenEnv
from visenv.error import ConfigError, ResetNeeded
from visenv.mediadb import thumbnail

SESSION_CALLS = ("plan", "answer")
"""The calls a session adds to the environment's tools."""

INSTRUCTIONS = ("Make what is asked with the tools. First call `plan` with your numbered steps (one tool each), "
                "then call one tool at a time, referring to artifacts by their ids; finish by calling `answer` "
                "with the ids of the artifacts you deliver.")


def lazy_class(module: str, name: str, body: type, base: Callable[[], type]) -> Callable[[str], type]:
    """A module ``__getattr__`` that makes class ``name`` (``body`` mixed into the framework class
    ``base()`` returns) on first access, so that importing the module needs no framework.
    ``__getattr__.made`` holds the class once made."""

    def __getattr__(attr: str) -> type:
        if attr != name:
            raise AttributeError(f"module {module!r} has no attribute {attr!r}")
        if name not in __getattr__.made:
            __getattr__.made[name] = type(name, (body, base()), {"__module__": module, "__doc__": body.__doc__})
        return __getattr__.made[name]

    __getattr__.made = {}  # type: ignore[attr-defined]
    return __getattr__


def task_seeds(n: int, seed: int = 0) -> list[int]:
    """``n`` distinct-looking task seeds drawn from ``seed`` (one per dataset row; the rows of a GRPO
    group share their row's seed, so its rollouts play the same task)."""
    rng = random.Random(f"visenv-integrations/{seed}")
    return [rng.randrange(2**31) for _ in range(n)]


class ToolSession:
    """A :class:`~visenv.envs.visgen.VisGenEnv` played through function calls.

    Args:
        config: a :class:`~visenv.envs.config.VisGenConfig` or a dict of its options.
        image_size: side of the square pictures :meth:`new_images` returns.
        options: more options of the environment (override ``config``).

    Attributes:
        env: the environment.
        rewards: the environment's reward of each step so far.
        calls: ``(name, arguments)`` of every call so far (``plan`` and ``answer`` included).
        ended: the episode has ended (answered, or cut by the turn budget).
    """

    def __init__(self, config: Any = None, image_size: int = 256, **options: Any):
        self.env = VisGenEnv(config, **options)
        clash = [name for name in self.env.tools if name in SESSION_CALLS or name.startswith("_")]
        if clash:
            raise ConfigError(f"Tools named {clash} clash with the session's own calls {SESSION_CALLS} (or are "
                              "private): rename them.")
        self.image_size = image_size
        self.started = False
        self.rewards: list[float] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.ended = False
        self._plan: list[str] | None = None
        self._new: list[str] = []

    def reset(self, task_seed: int | None = None, task: Any = None) -> str:
        """Start an episode: the request and how to work (the text a model is prompted with).

        Args:
            task_seed: ``env.reset(seed=task_seed)``: the same seed gives the same task (GRPO groups
                share it); None draws one.
            task: a task of the suite by id or index, or a :class:`~visenv.tasks.Task` (None: by seed).
        """
        observation, _ = self.env.reset(seed=task_seed, options=None if task is None else {"task": task})
        self.started, self.ended = True, False
        self.rewards, self.calls, self._plan, self._new = [], [], None, []
        return f"Request: {self.env.record.task.request}\n\n{INSTRUCTIONS}"

    def plan(self, steps: list[str]) -> str:
        """Record the plan; it travels with the next call (the rubric reads the episode's first plan)."""
        self._check()
        self.calls.append(("plan", {"steps": list(steps)}))
        if self.ended:
            return self._ended_text()
        self._plan = [str(step) for step in steps]
        return f"Plan noted ({len(self._plan)} steps)."

    def call(self, name: str, arguments: dict[str, Any]) -> str:
        """Call tool ``name``: the environment's tool response (an error the agent can read when invalid)."""
        self._check()
        self.calls.append((name, dict(arguments)))
        if self.ended:
            return self._ended_text()
        payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, default=str)
        return self._step(f"<tool_call>{payload}</tool_call>")

    def answer(self, artifacts: list[str]) -> str:
        """Deliver ``artifacts`` (ids) and end the episode: the environment's final response."""
        self._check()
        self.calls.append(("answer", {"artifacts": list(artifacts)}))
        if self.ended:
            return self._ended_text()
        return self._step(f"<answer>{' '.join(map(str, artifacts))}</answer>")

    def dispatch(self, name: str, arguments: Any) -> str:
        """A parsed function call by name: ``plan``, ``answer`` or a tool. Arguments that are not a JSON
        object (or lack ``steps`` / ``artifacts``) get an error the agent can read, as a bad tool call does."""
        if not isinstance(arguments, dict):
            return f"Error: the arguments of {name} must be a JSON object, got {type(arguments).__name__}."
        if name in SESSION_CALLS:
            key = "steps" if name == "plan" else "artifacts"
            value = arguments.get(key)
            if not isinstance(value, list):
                return f'Error: {name} takes {{"{key}": [...]}}, a list of strings; got {json.dumps(arguments)[:200]}.'
            return self.plan(value) if name == "plan" else self.answer(value)
        return self.call(name, arguments)

    def tool_schemas(self) -> list[dict[str, Any]]:
        """OpenAI function schemas of the environment's tools plus ``plan`` and ``answer`` (for chat templates)."""
        def strings(description: str) -> dict[str, Any]:
            return {"type": "array", "items": {"type": "string"}, "description": description}

        own = [{"name": "plan", "description": "Write down the plan before the first tool call: one tool per step.",
                "parameters": {"type": "object", "properties": {"steps": strings("the steps, in order")},
                               "required": ["steps"]}},
               {"name": "answer", "description": "Deliver the finished artifacts and end the episode. Call it last.",
                "parameters": {"type": "object", "properties": {"artifacts": strings("ids of the delivered artifacts")},
                               "required": ["artifacts"]}}]
        tools = [self.env.tools[name].to_prompt() for name in self.env.tools]
        return [{"type": "function", "function": f} for f in own + tools]

    def finish(self) -> float:
        """The episode return (sum of the step rewards; NaN when the rubric could not score), ending the
        episode with an empty answer first if it is still going."""
        self._check()
        if not self.ended:
            self._step("<answer></answer>")
        return float(sum(self.rewards))

    def new_images(self) -> list[np.ndarray]:
        """``(image_size, image_size, 3)`` pictures of the images and videos (middle frame) made by the last call."""
        registry = self.env.registry
        visual = [registry.get(i) for i in self._new]
        return [thumbnail(a.path, a.kind, self.image_size) for a in visual if a.kind in ("image", "video")]

    def _step(self, text: str) -> str:
        if self._plan is not None:
            text = "<plan>" + "\n".join(f"{i}. {s}" for i, s in enumerate(self._plan, 1)) + "</plan>" + text
            self._plan = None
        before = set(self.env.registry.all_ids())
        observation, reward, terminated, truncated, _ = self.env.step(text)
        self.rewards.append(float(reward))
        self.ended = bool(terminated or truncated)
        self._new = [i for i in self.env.registry.all_ids() if i not in before]
        return observation["text"]

    def _check(self) -> None:
        self._new = []
        if not self.started:
            raise ResetNeeded("The episode has not started: call reset() first.")

    def _ended_text(self) -> str:
        return "The episode has ended; nothing more is done. Stop calling tools."
