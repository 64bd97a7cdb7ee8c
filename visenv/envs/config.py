"""The configuration of the VisGen environments: one self-validating dataclass."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from visenv.error import ConfigError
from visenv.rewards.rubric import RUBRICS
from visenv.tools.backends import Backend, BackendChain
from visenv.tools.semantic import check_fidelity
from visenv.tools.spec import GROUPS
from visenv.tools.specs import ToolSet, make_tool_set

TASK_SUITES = ("all", "image", "video")
CONTENT_TIERS = ("attribute", "semantic")


@dataclass
class VisGenConfig:
    """Settings of a :class:`~visenv.envs.visgen.VisGenEnv`.

    Attributes:
        tasks: "all", "image" or "video" (the built-in scenarios), a path to a JSONL task file, or
            a sequence of :class:`~visenv.tasks.Task`.
        num_tasks: how many tasks the built-in suite holds (it cycles through the scenarios).
        task_seed: the seed of the built-in suite.
        max_turns: turns after which the episode is truncated.
        max_turn_chars: characters kept from one turn; longer turns are cut (a format problem).
        max_episode_chars: characters of all turns together after which the episode is truncated.
        max_observation_chars: most characters in one observation's text.
        tools: the tools the agent can call: None (the default tools), a
            :class:`~visenv.tools.specs.ToolSet`, or a list of default tool names (a subset) and your
            own :class:`~visenv.tools.spec.ToolSpec` s (``[*DEFAULT_TOOLS, my_spec]`` adds one); see
            :func:`~visenv.tools.specs.make_tool_set`. After construction it is always a ToolSet.
        backends: None (the attribute tier alone), a :class:`BackendChain`, a list of backends, or a
            mapping from a tool name, a tool group or "*" to a list of backends or a chain.
        media: a folder of your own media for the attribute tier (None: the procedural database).
        rubric: "ltr" (LtrReward, R_plan x R_fine), "r1" (additive), either with "+percept" (adds
            R_percept, scored on the semantic tier), "result_format" (the mean of R_result and R_format)
            or a rubric object.
        error_penalty: reward subtracted on a step whose turn or call failed.
        observe_pixels: add a "pixels" array of the latest images and video frames to observations,
            and a "pixels_mask" that marks its real rows (the rest is zero padding).
        pixel_size: side of each pixel thumbnail.
        max_pixel_images: how many thumbnails the "pixels" array holds.
        tool_latency_scale: when > 0, a call answered by a virtual tier (any but the real backend)
            waits the tool's cost-model latency (``ToolCall.latency_seconds``) times this scale, with
            ``time.sleep`` (the GIL released, other episodes running); 0.01 plays a real latency
            mix at 1/100 of real time. 0 (the default) answers at once.
        content: "attribute" (the default: the paper's attribute tier, media files drawn from a
            database) or "semantic" (:mod:`visenv.tools.semantic`: media rendered from what each
            call asked for, with the truth on the artifact). Chooses the default backend; an
            explicit ``backends`` setting takes precedence.
        tool_fidelity: with ``content="semantic"``, the probability that a generation comes out as
            asked (else wrong in one realistic way, listed in ``info["tool_result"]["defects"]``):
            a number in [0, 1] or a mapping from a tool name (or "*", every other tool) to one.
            1.0 (the default): always as asked.
        perception_noise: with ``content="semantic"``, the probability that the analysis tools
            misread a subject's count or colour.
    """

    tasks: Any = "all"
    num_tasks: int = 420
    task_seed: int = 0
    max_turns: int = 30
    max_turn_chars: int = 8192
    max_episode_chars: int = 262144
    max_observation_chars: int = 8192
    tools: Any = None
    backends: Any = None
    media: str | None = None
    rubric: Any = "ltr"
    error_penalty: float = 0.05
    observe_pixels: bool = False
    pixel_size: int = 64
    max_pixel_images: int = 4
    tool_latency_scale: float = 0.0
    content: str = "attribute"
    tool_fidelity: Any = 1.0
    perception_noise: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_tasks", "max_turns", "max_turn_chars", "max_episode_chars",
                     "max_observation_chars", "pixel_size", "max_pixel_images"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} ({value!r}) must be a positive integer.")
        if self.max_observation_chars < 256:
            raise ConfigError(f"max_observation_chars ({self.max_observation_chars}) must be at least 256 "
                              "so that tool responses fit.")
        if isinstance(self.tasks, str) and self.tasks not in TASK_SUITES and not os.path.exists(self.tasks):
            raise ConfigError(f"tasks ({self.tasks!r}) must be one of {TASK_SUITES}, a path to an existing "
                              "JSONL task file, or a list of Task objects.")
        if not isinstance(self.error_penalty, (int, float)) or self.error_penalty < 0:
            raise ConfigError(f"error_penalty ({self.error_penalty!r}) must be a number >= 0.")
        scale = self.tool_latency_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise ConfigError(f"tool_latency_scale ({scale!r}) must be a finite number >= 0 (0: no simulated "
                              "latency; 0.01: the cost model's latencies at 1/100 of real time).")
        if isinstance(self.rubric, str) and self.rubric not in RUBRICS:
            raise ConfigError(f"rubric ({self.rubric!r}) must be one of {RUBRICS} or a rubric object.")
        if self.media is not None and not os.path.isdir(self.media):
            raise ConfigError(f"media ({self.media!r}) must be a folder of images, videos and audio.")
        self.tools = make_tool_set(self.tools)
        if self.content not in CONTENT_TIERS:
            raise ConfigError(f"content ({self.content!r}) must be one of {CONTENT_TIERS}: 'attribute' draws media "
                              "files from a database, 'semantic' renders them from what each call asked for.")
        check_fidelity(self.tool_fidelity, self.tools)
        noise = self.perception_noise
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise <= 1.0:
            raise ConfigError(f"perception_noise ({noise!r}) must be a number in [0, 1].")
        semantic_only = [name for name, off in (("tool_fidelity", self.tool_fidelity == 1.0),
                                                ("perception_noise", noise == 0.0)) if not off]
        if semantic_only and self.content != "semantic":
            raise ConfigError(f"{', '.join(semantic_only)} need(s) content='semantic' (the attribute tier renders "
                              "no content to get wrong or to perceive); set content='semantic'.")
        if isinstance(self.backends, Mapping):
            for key in self.backends:
                if key != "*" and key not in self.tools and key not in GROUPS:
                    raise ConfigError(f"backends key {key!r} must be '*', a tool of the tool set or a group "
                                      f"{GROUPS}.")

    @classmethod
    def from_any(cls, config: Any = None, **overrides: Any) -> "VisGenConfig":
        """Build from None, a VisGenConfig, or a mapping (RLlib passes an EnvContext dict)."""
        if config is None:
            values: dict[str, Any] = {}
        elif isinstance(config, cls):
            values = dataclasses.asdict(config) | {"backends": config.backends, "rubric": config.rubric,
                                                   "tasks": config.tasks, "tools": config.tools}
        elif isinstance(config, Mapping):
            values = dict(config)
        else:
            raise ConfigError(f"config must be a VisGenConfig or a dict, not {type(config).__name__}.")
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"Unknown VisGen option(s) {unknown}; the options are {sorted(known)}.")
        return cls(**values)


def build_chains(backends: Any, default: Sequence[Backend], tools: ToolSet) -> dict[str, BackendChain]:
    """One chain per tool of ``tools``, from the ``backends`` setting (see :class:`VisGenConfig`)."""

    def as_chain(value: Any) -> BackendChain:
        if isinstance(value, BackendChain):
            return value
        if isinstance(value, (list, tuple)):
            return BackendChain(list(value))
        raise ConfigError(f"backends entry {value!r} must be a BackendChain or a list of backends.")

    if backends is None:
        chain = BackendChain(list(default))
        return {name: chain for name in tools}
    if not isinstance(backends, Mapping):
        chain = as_chain(backends)
        return {name: chain for name in tools}
    fallback = as_chain(backends["*"]) if "*" in backends else BackendChain(list(default))
    chains = {}
    for name, spec in tools.items():
        if name in backends:
            chains[name] = as_chain(backends[name])
        elif spec.group in backends:
            chains[name] = as_chain(backends[spec.group])
        else:
            chains[name] = fallback
    return chains
