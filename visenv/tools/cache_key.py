"""The exact-cache key: which tool calls count as "the same call".

Two calls share a key when they name the same tool at the same ``ToolSpec.version``, with the same
seed, and arguments that are equal after normalisation:

- **Defaults**: a top-level argument left out is filled with its JSON Schema ``default``, so
  ``{"prompt": "a fox"}`` and ``{"prompt": "a fox", "n": 1}`` are one call.
- **Key order**: objects are serialised with sorted keys.
- **Whitespace and Unicode**: strings are NFC-normalised, stripped, and every run of whitespace
  becomes one space (``"a  red\\nfox "`` equals ``"a red fox"``).
- **Numbers**: a float with an integral value becomes an integer (``5.0`` equals ``5``); other
  floats are rounded to 12 significant digits (``0.1 + 0.2`` equals ``0.3``). Booleans stay booleans.
  NaN and infinities are refused.
- **Artifacts**: artifact ids are episode-scoped names, so each is replaced by its content hash,
  ``"sha256:<hex>"`` (order kept: the order of clips matters). A value that already has this form
  (an imported call) is kept as it is.

The key is the SHA-256 of the canonical JSON of ``{format, tool, version, seed, arguments}``.
``seed`` None marks an entry that answers any seed (imported or seedless builds).

For nearest-neighbour retrieval, :func:`query_text` joins a call's free-text arguments (the text
that is embedded) and :func:`shape_of` hashes the rest (the arguments that fix the output's
physical attributes: count, aspect ratio, duration...), so that a neighbour is only taken from
calls of the same shape.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Mapping

from visenv.media import Artifact
from visenv.tools.spec import ToolSpec

KEY_FORMAT = 1
"""Bump when the normalisation below changes: every earlier key then misses (and so bump the env id)."""
HASH_PREFIX = "sha256:"

_WHITESPACE = re.compile(r"\s+")


def normalise_value(value: Any) -> Any:
    """A JSON value normalised for keying (see the module docstring); raises ValueError on NaN."""
    if isinstance(value, str):
        return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", value)).strip()
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"A cache key cannot hold the number {value!r}.")
        rounded = float(f"{value:.12g}")  # round first: 1e11 + 0.5 rounds to an integral value
        return int(rounded) if rounded.is_integer() else rounded
    if isinstance(value, Mapping):
        return {str(k): normalise_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise_value(v) for v in value]
    raise ValueError(f"A cache key can only hold JSON values, not {type(value).__name__}.")


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: the byte-exact form that keys are hashed from."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _content_ref(artifact_or_ref: Artifact | str, argument: str) -> str:
    if isinstance(artifact_or_ref, Artifact):
        return HASH_PREFIX + artifact_or_ref.sha256
    if isinstance(artifact_or_ref, str) and artifact_or_ref.startswith(HASH_PREFIX):
        return artifact_or_ref
    raise ValueError(f"Argument {argument!r} names {artifact_or_ref!r}, which was not resolved to an "
                     f"artifact; pass the resolved inputs (ToolRequest.inputs) or '{HASH_PREFIX}<hex>'.")


def normalise_arguments(spec: ToolSpec, arguments: Mapping[str, Any],
                        inputs: Mapping[str, tuple[Artifact, ...]] | None = None) -> dict[str, Any]:
    """The call's arguments with defaults filled, artifacts hashed and values normalised.

    Args:
        spec: the tool.
        arguments: the arguments as the agent (or an import file) wrote them.
        inputs: artifact argument -> the resolved artifacts (``ToolRequest.inputs``); arguments
            not in it must already hold ``"sha256:<hex>"`` references.
    """
    values = dict(arguments)
    for name, schema in spec.parameters.get("properties", {}).items():
        if name not in values and "default" in schema:
            values[name] = schema["default"]
    inputs = inputs or {}
    for inp in spec.inputs:
        if inp.argument not in values:
            continue
        given = inputs.get(inp.argument)
        if given is None:
            refs = values[inp.argument] if inp.many else [values[inp.argument]]
            resolved = [_content_ref(ref, inp.argument) for ref in refs]
        else:
            resolved = [_content_ref(artifact, inp.argument) for artifact in given]
        values[inp.argument] = resolved if inp.many else resolved[0]
    return normalise_value(values)


@dataclass(frozen=True)
class CallKey:
    """The identity of a tool call in the exact cache.

    Attributes:
        tool: the tool name.
        version: the tool's ``ToolSpec.version``.
        arguments: the normalised arguments (:func:`normalise_arguments`).
        seed: the per-call seed, or None for an entry that answers any seed.
    """

    tool: str
    version: int
    arguments: Mapping[str, Any]
    seed: int | None

    @classmethod
    def of(cls, spec: ToolSpec, arguments: Mapping[str, Any],
           inputs: Mapping[str, tuple[Artifact, ...]] | None = None, seed: int | None = None) -> CallKey:
        """The key of a call to ``spec`` (arguments are normalised here)."""
        return cls(spec.name, spec.version, normalise_arguments(spec, arguments, inputs), seed)

    def with_seed(self, seed: int | None) -> CallKey:
        """The same call with another seed (None: the seedless entry)."""
        return CallKey(self.tool, self.version, self.arguments, seed)

    @functools.cached_property
    def digest(self) -> bytes:
        """The 32-byte SHA-256 that indexes the entry."""
        record = {"format": KEY_FORMAT, "tool": self.tool, "version": self.version,
                  "seed": self.seed, "arguments": self.arguments}
        return hashlib.sha256(canonical_json(record).encode()).digest()


def _text_arguments(spec: ToolSpec) -> list[str]:
    """The free-text arguments of a tool, in schema order (strings without an enum, not artifact ids)."""
    artifact_args = {inp.argument for inp in spec.inputs}
    return [name for name, schema in spec.parameters.get("properties", {}).items()
            if schema.get("type") == "string" and "enum" not in schema and name not in artifact_args]


def query_text(spec: ToolSpec, arguments: Mapping[str, Any]) -> str:
    """The text that stands for a call in semantic search: its free-text arguments joined.

    ``prompt`` comes first and bare; other text arguments follow as ``name: value`` lines, e.g.
    ``"a red fox in snow\\nstyle: flat illustration"``.
    """
    parts = []
    for name in _text_arguments(spec):
        value = arguments.get(name)
        if isinstance(value, str) and value:
            parts.append(value if name == "prompt" else f"{name}: {value}")
    return "\n".join(parts)


def nearest_eligible(spec: ToolSpec, arguments: Mapping[str, Any]) -> bool:
    """Whether a neighbour may stand in for this call: a stateless tool called without artifacts.

    A call that edits, animates or composes a given artifact depends on that artifact, so another
    prompt's output would have the wrong content and attributes.
    """
    if spec.stateful:
        return False
    return not any(inp.argument in arguments for inp in spec.inputs)


def shape_of(spec: ToolSpec, arguments: Mapping[str, Any]) -> str:
    """A short hash of the normalised non-text arguments: calls of one shape have interchangeable outputs."""
    text = set(_text_arguments(spec))
    rest = {name: value for name, value in arguments.items() if name not in text}
    return hashlib.sha256(canonical_json(rest).encode()).hexdigest()[:16]
