"""A structured view of VisGen for RL libraries that need fixed-size spaces (RLlib, SB3, CleanRL).

:class:`StructuredVisGen` wraps a :class:`~visenv.envs.visgen.VisGenEnv`: discrete actions choose a
tool and templated arguments, which the wrapper writes as a UTPC turn
(:func:`visenv.protocol.format_turn`); observations are a feature vector encoding the task's
requirements and the episode's progress. The text environment underneath runs unchanged: its
tool validation, backends and rubric give the transitions and the reward.

Register it for RLlib with :func:`register_rllib` (id ``visenv/VisGenStructured-v0``, built by
:func:`make_structured` from the RLlib ``env_config``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from visenv.envs.visgen import VisGenEnv
from visenv.error import ConfigError, ResetNeeded
from visenv.protocol import format_turn
from visenv.tasks.task import AUDIO, CONSISTENCY, MAX_DURATION, MAX_IMAGES, MAX_SHOTS
from visenv.tools.spec import ToolSpec

RLLIB_ENV_ID = "visenv/VisGenStructured-v0"
DEFAULT_TOOLS = ("tool_prompt_refine", "tool_text2image_qwen", "tool_image_edit_qwen", "tool_image_analysis")
"""The default tool set: refine a prompt, generate images, edit an image, analyse an image."""
STRUCTURED_DEFAULTS = {"tasks": "image", "max_turns": 10}
"""Environment options :func:`make_structured` uses unless the env_config sets them."""
KINDS = ("call", "answer")
COUNTS = ("one", "owed")
"""Argument ``n``: 1, or the outputs still owed (the requested amount minus those made), capped by the tool."""
REFERENCES = ("none", "first", "latest")
"""Artifact arguments: left out, the first or the latest artifact of an accepted kind."""
FILLED_ARGUMENTS = ("prompt", "query", "question")
"""Required free-text arguments the wrapper can write from the request; a tool needing others is refused."""


def _check_tools(tools: Sequence[str], available: Mapping[str, ToolSpec]) -> tuple[str, ...]:
    tools = tuple(tools)
    if not tools or len(set(tools)) != len(tools):
        raise ConfigError(f"tools ({list(tools)}) must be a non-empty list of distinct tool names.")
    for name in tools:
        if name not in available:
            raise ConfigError(f"tools: {name!r} is not a VisGen tool of the environment; see env.unwrapped.tools.")
        spec = available[name]
        artifacts = {i.argument for i in spec.inputs}
        missing = [a for a in spec.parameters.get("required", ()) if a not in artifacts | set(FILLED_ARGUMENTS)]
        if missing:
            raise ConfigError(f"tools: {name} requires {missing}, which the structured wrapper cannot fill; use tools "
                              f"whose required arguments are artifacts or among {FILLED_ARGUMENTS}.")
    return tools


class StructuredVisGen(gym.Wrapper):
    """VisGen with discrete tool-and-template actions and a feature-vector observation.

    ## Action space
    ``MultiDiscrete([2, len(tools), 2, 3])``: ``[kind, tool, count, reference]``.

    * kind 0 calls ``tools[tool]``; kind 1 answers, citing every artifact of the requested
      modality made so far (the other components are then ignored).
    * Arguments are filled from the request: ``prompt``/``query`` from its content keywords,
      ``style`` and ``aspect_ratio`` from its requirements, ``question`` with a fixed question;
      ``n`` from ``count`` (:data:`COUNTS`); artifact arguments from ``reference``
      (:data:`REFERENCES`): a required one left out makes the call fail, as it would for a model.
    * The first turn also carries a ``<plan>`` with one step per tool of the set, so R_plan is a
      per-task constant and the policy learns the execution.

    ## Observation space
    ``Box(0, 1, (len(feature_names),), float32)``; see :attr:`feature_names`: the requirements
    (modality, amount, consistency, style, audio, duration, shots), artifacts made by kind,
    outputs still owed, whether more were made than asked, which tools have succeeded, the last
    call's status (none, ok, error) and the turn index over the budget.

    ## Rewards and episode end
    Those of the wrapped environment (the rubric's total on the last step, minus the error penalty
    on failed steps; truncated after ``max_turns``).

    Args:
        env: the text environment.
        tools: the tool set the ``tool`` action indexes (see :data:`DEFAULT_TOOLS`).
    """

    def __init__(self, env: VisGenEnv, tools: Sequence[str] = DEFAULT_TOOLS):
        super().__init__(env)
        self.tools = _check_tools(tools, env.unwrapped.tools)
        self.action_space = spaces.MultiDiscrete([len(KINDS), len(self.tools), len(COUNTS), len(REFERENCES)])
        self.observation_space = spaces.Box(0.0, 1.0, (len(self.feature_names),), np.float32)
        self._last_status = 0

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The name of each observation entry, in order."""
        return ("video", "amount", *(f"consistency_{c}" for c in CONSISTENCY), "style",
                *(f"audio_{a}" for a in AUDIO), "duration", "shots", "images", "videos", "audio_tracks",
                "owed", "nothing_owed", "surplus", *(f"used_{t}" for t in self.tools),
                "last_none", "last_ok", "last_error", "turn")

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        _, info = self.env.reset(seed=seed, options=options)
        self._last_status = 0
        return self._features(), info

    def step(self, action: Any):
        text = self.turn_text(action)
        _, reward, terminated, truncated, info = self.env.step(text)
        result = info.get("tool_result")
        failed = (result is not None and result["status"] != "ok") or "tool_call_error" in info["turn"]
        self._last_status = 2 if failed else (1 if result is not None else 0)
        return self._features(), reward, terminated, truncated, info

    def turn_text(self, action: Any) -> str:
        """The UTPC turn that ``action`` stands for, in the current state."""
        values = np.asarray(action).reshape(-1)
        if values.shape != self.action_space.shape or not self.action_space.contains(
                values.astype(self.action_space.dtype)):
            raise ConfigError(f"action {values.tolist()} is outside {self.action_space}: give [kind, tool, count, "
                              "reference] with each entry below its bound.")
        kind, tool, count, reference = (int(v) for v in values)
        record = self.env.unwrapped.record
        if record is None:
            raise ResetNeeded("StructuredVisGen.step() was called before reset(): call env.reset(seed=...) first.")
        modality = record.task.requirements.modality
        if KINDS[kind] == "answer":
            made = [a for a in record.artifacts.values() if a.kind == modality]
            cited = " ".join(a.id for a in made) if made else f"no {modality} was made"
            return format_turn(think=f"I deliver what I made ({len(made)} {modality}).", answer=f"Delivered: {cited}")
        name = self.tools[tool]
        plan = None if record.turns else "\n".join(
            f"{i}. {t}: {self.env.unwrapped.tools[t].description.split('.')[0]}" for i, t in enumerate(self.tools, 1))
        think = f"Call {name} (n: {COUNTS[count]}, reference: {REFERENCES[reference]})."
        call = {"name": name, "arguments": self._arguments(name, count, reference)}
        return format_turn(think=think, plan=plan, tool_call=call)

    def _arguments(self, name: str, count: int, reference: int) -> dict[str, Any]:
        record = self.env.unwrapped.record
        req = record.task.requirements
        spec = self.env.unwrapped.tools[name]
        properties = spec.parameters["properties"]
        subject = ", ".join(req.keywords) or "the requested subject"
        arguments: dict[str, Any] = {}
        if "prompt" in properties:
            arguments["prompt"] = f"a variant of the image: {subject}" if spec.group == "image_edit" else subject
        if "query" in properties:
            arguments["query"] = subject
        if "question" in properties:
            arguments["question"] = "Which traits must stay the same in the next images?"
        if "style" in properties and req.style:
            arguments["style"] = req.style
        if req.aspect_ratio in properties.get("aspect_ratio", {}).get("enum", ()):
            arguments["aspect_ratio"] = req.aspect_ratio
        if "n" in properties:
            owed = max(1, req.amount - sum(a.kind == req.modality for a in record.artifacts.values()))
            arguments["n"] = 1 if COUNTS[count] == "one" else min(owed, properties["n"].get("maximum", owed))
        for argument in spec.inputs:
            candidates = [a.id for a in record.artifacts.values() if a.kind in argument.kinds]
            if REFERENCES[reference] == "none" or not candidates:
                continue
            chosen = candidates[0] if REFERENCES[reference] == "first" else candidates[-1]
            arguments[argument.argument] = [chosen] if argument.many else chosen
        return arguments

    def _features(self) -> np.ndarray:
        record = self.env.unwrapped.record
        req = record.task.requirements
        made = {kind: sum(a.kind == kind for a in record.artifacts.values()) for kind in ("image", "video", "audio")}
        wanted = made[req.modality]
        used = {c.tool for c in record.calls if c.ok}
        values = [float(req.modality == "video"), req.amount / MAX_IMAGES,
                  *(float(c in req.consistency) for c in CONSISTENCY), float(req.style is not None),
                  *(float(a in req.audio) for a in AUDIO), (req.duration or 0.0) / MAX_DURATION,
                  (req.shots or 0) / MAX_SHOTS,
                  *(min(made[k], MAX_IMAGES) / MAX_IMAGES for k in ("image", "video", "audio")),
                  max(0, req.amount - wanted) / MAX_IMAGES, float(wanted >= req.amount), float(wanted > req.amount),
                  *(float(t in used) for t in self.tools),
                  *(float(self._last_status == s) for s in range(3)),
                  min(1.0, len(record.turns) / self.env.unwrapped.config.max_turns)]
        return np.asarray(values, dtype=np.float32)


def make_structured(config: Mapping[str, Any] | None = None, **overrides: Any) -> StructuredVisGen:
    """The structured environment from an RLlib ``env_config`` dict and/or keyword options.

    ``tools`` (optional) is the tool set; every other key is a
    :class:`~visenv.envs.config.VisGenConfig` option, over :data:`STRUCTURED_DEFAULTS`.
    """
    options = {**dict(config or {}), **overrides}
    tools = options.pop("tools", DEFAULT_TOOLS)
    return StructuredVisGen(VisGenEnv({**STRUCTURED_DEFAULTS, **options}), tools)


def register_rllib(name: str = RLLIB_ENV_ID) -> str:
    """Register :func:`make_structured` with RLlib (``ray.tune.registry.register_env``); returns the id."""
    from ray.tune.registry import register_env

    register_env(name, make_structured)
    return name
