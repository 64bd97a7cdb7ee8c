"""ToolEcho: a one-turn learning check where the prompt states the exact tool call to make."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from visenv.envs.base import TextEnv, action_space, coerce_action, fit_text, observation_space
from visenv.error import ConfigError
from visenv.protocol import parse_turn, render_tool_response
from visenv.tools.specs import TOOLS

SUBJECTS = ("cat", "robot", "castle", "teapot", "forest", "violin", "lighthouse", "bicycle")


@dataclass
class ToolEchoConfig:
    """Settings of :class:`ToolEchoEnv`.

    Attributes:
        tools: the tools a target call may name.
        subjects: the prompts a target call may carry.
        max_n: targets ask for n in 1..max_n images.
        max_turn_chars: characters kept from the turn.
    """

    tools: tuple[str, ...] = ("tool_text2image_qwen", "tool_text2image_gemini")
    subjects: tuple[str, ...] = SUBJECTS
    max_n: int = 2
    max_turn_chars: int = 512

    def __post_init__(self) -> None:
        self.tools, self.subjects = tuple(self.tools), tuple(self.subjects)
        unknown = [t for t in self.tools if t not in TOOLS or TOOLS[t].group != "text2image"]
        if not self.tools or unknown:
            raise ConfigError(f"tools {list(unknown) or '[]'} must be non-empty text-to-image tool names.")
        if not self.subjects or not all(isinstance(s, str) and s for s in self.subjects):
            raise ConfigError("subjects must be a non-empty list of non-empty strings.")
        if not 1 <= self.max_n <= 4:
            raise ConfigError(f"max_n ({self.max_n}) must be between 1 and 4.")
        if self.max_turn_chars < 64:
            raise ConfigError(f"max_turn_chars ({self.max_turn_chars}) must be at least 64.")


class ToolEchoEnv(TextEnv):
    """Make the tool call that the prompt spells out.

    ## Description
    The observation says, e.g., "Call tool_text2image_qwen with prompt 'cat' and n=2." The agent
    answers with one turn holding a ``<tool_call>``; the episode ends after that turn. It checks that
    a trainer can learn the UTPC call format in seconds.

    ## Rewards
    ``R_format`` 0.2 for a parseable tool call, ``R_name`` 0.3 for the right tool, ``R_args`` 0.5
    times the share of the two arguments (prompt, n) that are right; the reward is their sum.

    ## Spaces
    As in VisGen: ``Dict(text, artifacts)`` observations (artifacts always empty) and ``Text`` actions.

    ## Version history
    * v0: initial release.
    """

    def __init__(self, config: Any = None, **options: Any):
        values = dict(config or {}) | options
        try:
            self.config = ToolEchoConfig(**values)
        except TypeError as exc:
            raise ConfigError(f"Unknown ToolEcho option in {sorted(values)}: {exc}") from None
        self.observation_space = observation_space(256)
        self.action_space = action_space(self.config.max_turn_chars)
        self.target: dict[str, Any] = {}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        cfg = self.config
        tool = cfg.tools[int(self.np_random.integers(len(cfg.tools)))]
        subject = cfg.subjects[int(self.np_random.integers(len(cfg.subjects)))]
        n = int(self.np_random.integers(1, cfg.max_n + 1))
        self.target = {"name": tool, "arguments": {"prompt": subject, "n": n}}
        self._begin_episode()
        text = f"Call {tool} with prompt '{subject}' and n={n}."
        return {"text": text, "artifacts": ()}, {"target": self.target}

    def step(self, action: Any):
        self._check_can_step()
        turn = parse_turn(coerce_action(action), max_chars=self.config.max_turn_chars)
        call = turn.tool_call
        components = {"R_format": 0.0, "R_name": 0.0, "R_args": 0.0}
        if call is not None:
            components["R_format"] = 0.2
            components["R_name"] = 0.3 * (call.name == self.target["name"])
            expected = self.target["arguments"]
            right = sum(call.arguments.get(k) == v for k, v in expected.items())
            components["R_args"] = 0.5 * right / len(expected)
        reward = sum(components.values())
        self._ended = True
        if call is None:
            body = render_tool_response({"status": "error", "error": turn.feedback() or "No <tool_call> found."})
        else:
            body = render_tool_response({"status": "done", "reward": round(reward, 4)})
        info = {"reward_components": components, "target": self.target,
                "turn_problems": [p.code for p in turn.problems]}
        return {"text": fit_text(body, 256), "artifacts": ()}, reward, True, False, info
