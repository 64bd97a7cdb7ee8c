"""A random agent: random tools with random, often invalid, arguments; answers at random."""

from __future__ import annotations

import json
import random
from typing import Any

from visenv.tools.specs import TOOLS

_WORDS = ("cat", "poster", "sunset", "robot", "logo", "city", "ocean", "product", "forest", "hero")


class RandomAgent:
    """Emits UTPC turns with uniformly random tools and arguments built from their schemas.

    Args:
        answer_probability: chance that a turn answers (ending the episode) instead of calling.
        seed: base seed; each episode reseeds from ``reset(seed=...)`` when given.
    """

    def __init__(self, answer_probability: float = 0.15, seed: int = 0):
        if not 0.0 <= answer_probability <= 1.0:
            raise ValueError(f"answer_probability ({answer_probability}) must be in [0, 1].")
        self.answer_probability = answer_probability
        self.rng = random.Random(seed)
        self.seen: list[str] = []

    def reset(self, observation: dict[str, Any], seed: int | None = None) -> None:
        if seed is not None:
            self.rng.seed(seed)
        self.seen = []

    def _value(self, name: str, schema: dict[str, Any]) -> Any:
        if "enum" in schema:
            return self.rng.choice(schema["enum"])
        kind = schema.get("type")
        if kind == "integer":
            return self.rng.randint(int(schema.get("minimum", 0)), int(schema.get("maximum", 10)))
        if kind == "number":
            return round(self.rng.uniform(float(schema.get("minimum", 0)), float(schema.get("maximum", 30))), 1)
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "array":
            return [self._value(name, schema["items"]) for _ in range(self.rng.randint(1, 3))]
        if "artifact" in schema.get("description", "") and self.seen:
            return self.rng.choice(self.seen)
        return " ".join(self.rng.choices(_WORDS, k=3))

    def act(self, observation: dict[str, Any]) -> str:
        self.seen = list(observation.get("artifacts", ()))
        if self.rng.random() < self.answer_probability:
            cited = " ".join(self.seen[-2:])
            return f"<think>Done.</think><answer>Here it is: {cited}</answer>"
        name = self.rng.choice(list(TOOLS))
        props = TOOLS[name].parameters["properties"]
        arguments = {k: self._value(k, v) for k, v in props.items() if self.rng.random() < 0.7}
        call = json.dumps({"name": name, "arguments": arguments})
        return f"<think>Try {name}.</think><plan>1. {name}: try it</plan><tool_call>{call}</tool_call>"
