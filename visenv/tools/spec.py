"""Typed tool specifications: the contract between a policy's tool call and a backend.

A :class:`ToolSpec` says what a tool accepts (a JSON Schema for its arguments, validated by the
``jsonschema`` library, plus the rules below that JSON Schema cannot state), which artifacts it
consumes (an edit needs an image, a composite needs clips), what it produces (modality, count,
resolution and duration rules), what one real call would cost (GPU-seconds and latency), and how the
attribute tier simulates its output. The default tools of the VisGen environment, and the
:class:`~visenv.tools.specs.ToolSet` an environment plays with, live in :mod:`visenv.tools.specs`.

Rules every tool shares (:meth:`ToolSpec.validate` and :meth:`ToolSpec.accept`):

- **Numbers are finite doubles**: NaN, infinities and integers beyond +-1.8e308 are refused in
  every argument (JSON Schema's bounds cannot refuse NaN).
- **Integral floats are integers**: as in JSON Schema, ``1.0`` satisfies ``"type": "integer"``, and
  the accepted arguments hold it as the integer ``1`` (the exact cache keys it the same way).
- **Text is not blank**: free text has :data:`TEXT_PATTERN` (at least one non-space character), so
  ``"   "`` is refused like ``""``.
- **Messages are bounded**: each problem quotes at most :data:`MAX_PROBLEM_CHARS` characters and at
  most :data:`MAX_PROBLEMS` problems are listed, however large the offending value.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import fastjsonschema
import jsonschema

MEDIA_KINDS = ("image", "video", "audio")
OUTPUT_KINDS = MEDIA_KINDS + ("text",)
GROUPS = ("text", "text2image", "image_edit", "video_generation", "audio", "video_editing",
          "understanding", "search")
COST_UNITS = ("call", "image", "video_second", "audio_second")
TEXT_PATTERN = r"\S"
"""The JSON Schema ``pattern`` of free-text arguments: at least one character that is not whitespace."""
MAX_PROBLEMS = 5
MAX_PROBLEM_CHARS = 300


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_PROBLEM_CHARS else text[: MAX_PROBLEM_CHARS - 3] + "..."


def _number_problems(arguments: Any) -> list[str]:
    """Where ``arguments`` holds a number that is not a finite double (iterative: any nesting)."""
    problems, stack = [], [("", arguments)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{where}/{key}" if where else str(key), item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((f"{where}/{i}" if where else str(i), item) for i, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{where or 'arguments'}: {value!r} is not a finite number")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
            problems.append(f"{where or 'arguments'}: an integer of {int(math.log10(abs(value))) + 1} digits "
                            "is too large; numbers must lie within +-1.8e308")
    return sorted(problems)


def _as_schema_integers(schema: Mapping[str, Any], value: Any) -> Any:
    """``value`` with the integral floats that ``schema`` types as integers made ints (1.0 -> 1)."""
    if isinstance(value, float) and schema.get("type") == "integer":
        return int(value)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        return {key: _as_schema_integers(properties.get(key, {}), item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_schema_integers(schema.get("items", {}), item) for item in value]
    return value


@dataclass(frozen=True)
class ArtifactInput:
    """One argument of a tool that names artifacts by id.

    Attributes:
        argument: the argument's name in the call.
        kinds: the artifact kinds it accepts.
        many: True when the argument is a list of ids.
        required: whether the argument must be present (the JSON Schema says the same).
    """

    argument: str
    kinds: tuple[str, ...]
    many: bool = False
    required: bool = True

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in MEDIA_KINDS]
        if bad:
            raise ValueError(f"ArtifactInput.kinds {bad} must be among {MEDIA_KINDS}")


@dataclass(frozen=True)
class OutputSpec:
    """What a tool produces and how the simulation derives the output's attributes.

    Attributes:
        kind: "image", "video", "audio" or "text".
        derive: how the attribute tier simulates the output (see :mod:`visenv.tools.attribute`).
            Media: a rule family, "generate", "edit", "animate", "concat", "slideshow", "trim",
            "speed", "same", "voiceover", "subtitle", "soundtrack", "music", "tts" or "cut", or your
            own rule ``rule(request) -> (attributes of each output, note) | ToolFailure``. Text: the
            tool's text simulator ``simulate(request, rng) -> str | ToolFailure``. Give a
            module-level function, so that the spec pickles to Ray workers.
        resolutions: aspect ratio -> (width, height) for generated images or videos.
        fps: frames per second of produced video.
        max_count: most outputs one call may return (images).
    """

    kind: str
    derive: str | Callable[..., Any]
    resolutions: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    fps: int | None = None
    max_count: int = 1

    def __post_init__(self) -> None:
        if self.kind not in OUTPUT_KINDS:
            raise ValueError(f"OutputSpec.kind {self.kind!r} must be one of {OUTPUT_KINDS}")


@dataclass(frozen=True)
class CostModel:
    """What one real call would cost, per unit of output.

    Attributes:
        unit: "call", "image", "video_second" or "audio_second".
        gpu_seconds: GPU-seconds per unit on the real tool's serving hardware.
        latency_seconds: wall-clock seconds per unit seen by the caller.
    """

    unit: str
    gpu_seconds: float
    latency_seconds: float

    def __post_init__(self) -> None:
        if self.unit not in COST_UNITS:
            raise ValueError(f"CostModel.unit {self.unit!r} must be one of {COST_UNITS}")

    def estimate(self, units: float) -> tuple[float, float]:
        """(GPU-seconds, latency seconds) for ``units`` of output (a call counts 1)."""
        units = 1.0 if self.unit == "call" else float(units)
        return self.gpu_seconds * units, self.latency_seconds * units


@dataclass(frozen=True)
class ToolSpec:
    """A virtual tool: its name, documentation, argument schema, inputs, output and cost.

    Attributes:
        name: the name a policy calls, e.g. "tool_text2image_qwen".
        group: one of :data:`GROUPS`.
        description: one paragraph shown to the agent.
        parameters: JSON Schema (draft 2020-12) of the arguments object.
        inputs: the arguments that name artifacts.
        output: the output rule.
        cost: the real-world cost model.
        version: bump when the tool's dynamics change (it is part of the cache key).
        stateful: the result depends on episode state (never cached or served by a neighbour).
    """

    name: str
    group: str
    description: str
    parameters: Mapping[str, Any]
    inputs: tuple[ArtifactInput, ...]
    output: OutputSpec
    cost: CostModel
    version: int = 1
    stateful: bool = False

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"ToolSpec {self.name}: group {self.group!r} must be one of {GROUPS}")
        jsonschema.Draft202012Validator.check_schema(self.parameters)
        props = self.parameters.get("properties", {})
        for inp in self.inputs:
            if inp.argument not in props:
                raise ValueError(f"ToolSpec {self.name}: input {inp.argument!r} is not a parameter")

    @functools.cached_property
    def _validator(self) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator(self.parameters)

    @functools.cached_property
    def _fast_check(self) -> Any:
        return fastjsonschema.compile(dict(self.parameters), use_default=False)

    def validate(self, arguments: Any) -> list[str]:
        """Agent-readable problems with ``arguments``; empty when they are valid.

        Valid arguments are accepted by a compiled validator (fastjsonschema, a few microseconds);
        invalid ones are explained by ``jsonschema``, which lists every problem with its path. The
        shared rules of the module docstring apply first (a schema message would quote a huge number).
        """
        problems = _number_problems(arguments) or self._schema_problems(arguments)
        shown = [_shorten(problem) for problem in problems[:MAX_PROBLEMS]]
        if len(problems) > MAX_PROBLEMS:
            shown.append(f"and {len(problems) - MAX_PROBLEMS} more problems")
        return shown

    def _schema_problems(self, arguments: Any) -> list[str]:
        try:
            self._fast_check(arguments)
            return []
        except fastjsonschema.JsonSchemaException:
            pass
        problems = []
        for err in sorted(self._validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.path]):
            where = "/".join(str(p) for p in err.path) or "arguments"
            blank = err.validator == "pattern" and err.validator_value == TEXT_PATTERN
            problems.append(f"{where}: must hold some text, not only whitespace" if blank else f"{where}: {err.message}")
        return problems

    def accept(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Valid ``arguments`` as backends receive them: integral floats of integer fields made ints."""
        return _as_schema_integers(self.parameters, dict(arguments))

    def to_prompt(self) -> dict[str, Any]:
        """The OpenAI/Hermes function description of this tool, for system prompts."""
        return {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}

    def __getstate__(self) -> dict[str, Any]:  # the cached validators are rebuilt after unpickling
        state = dict(self.__dict__)
        state.pop("_validator", None)
        state.pop("_fast_check", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "__dict__", state)
