"""The JSON forms that `visenv serve` and :class:`~visenv.remote.RemoteEnv` exchange: spaces and observations.

An observation travels as a JSON object shaped by its gymnasium space:

* ``Text`` -> a string; ``Discrete`` -> an integer; ``Sequence`` -> a list; ``Dict`` -> an object;
* ``Box``, ``MultiBinary``, ``MultiDiscrete`` (the opt-in ``pixels`` and ``pixels_mask``) -> an object
  ``{"dtype": "uint8", "shape": [4, 64, 64, 3], "data": "<base64>"}`` whose ``data`` is the array's
  bytes in C order and little-endian byte order (a 4 x 64 x 64 RGB stack is 66 KB of base64, where a
  nested list of numbers would be about three times larger and slower to parse).

A space travels as ``{"type": "Text", ...its parameters}`` (the ``x-gym-space`` entry of the
``/schema`` answer), so a client rebuilds exactly the space the served environment declares.
Info dicts of visenv environments are strict JSON already; :func:`dumps` also turns numpy scalars and
arrays into numbers and lists.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np
from gymnasium import spaces

from visenv.error import ConfigError

_ARRAY_SPACES = (spaces.Box, spaces.MultiBinary, spaces.MultiDiscrete)


def space_to_json(space: spaces.Space) -> dict[str, Any]:
    """``space`` as plain JSON data (inverted by :func:`space_from_json`)."""
    if isinstance(space, spaces.Text):
        return {"type": "Text", "min_length": space.min_length, "max_length": space.max_length,
                "charset": "".join(sorted(space.character_set))}
    if isinstance(space, spaces.Sequence):
        return {"type": "Sequence", "feature": space_to_json(space.feature_space), "stack": space.stack}
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": {key: space_to_json(sub) for key, sub in space.spaces.items()}}
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.Box):
        return {"type": "Box", "low": _bound(space.low), "high": _bound(space.high), "shape": list(space.shape),
                "dtype": space.dtype.name}
    if isinstance(space, spaces.MultiBinary):
        return {"type": "MultiBinary", "n": list(space.shape)}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist(), "dtype": space.dtype.name}
    raise ConfigError(f"A {type(space).__name__} space cannot be served: the wire format knows Text, Sequence, "
                      "Dict, Discrete, Box, MultiBinary and MultiDiscrete; wrap the environment to use those.")


def _bound(values: np.ndarray) -> Any:
    """A Box bound: one number when all are equal (the usual case), else the nested list."""
    flat = np.unique(values)
    if flat.size == 1:
        value = flat[0].item()
        return None if isinstance(value, float) and math.isinf(value) else value
    return values.tolist()


def space_from_json(data: dict[str, Any]) -> spaces.Space:
    """The space :func:`space_to_json` described."""
    kind = data["type"]
    if kind == "Text":
        return spaces.Text(data["max_length"], min_length=data["min_length"], charset=data["charset"])
    if kind == "Sequence":
        return spaces.Sequence(space_from_json(data["feature"]), stack=data["stack"])
    if kind == "Dict":
        return spaces.Dict({key: space_from_json(sub) for key, sub in data["spaces"].items()})
    if kind == "Discrete":
        return spaces.Discrete(data["n"], start=data["start"])
    if kind == "Box":
        low = -np.inf if data["low"] is None else data["low"]
        high = np.inf if data["high"] is None else data["high"]
        low, high = (np.asarray(b) if isinstance(b, list) else b for b in (low, high))
        return spaces.Box(low, high, tuple(data["shape"]), dtype=np.dtype(data["dtype"]))
    if kind == "MultiBinary":
        return spaces.MultiBinary(data["n"])
    if kind == "MultiDiscrete":
        return spaces.MultiDiscrete(data["nvec"], dtype=np.dtype(data["dtype"]))
    raise ConfigError(f"The server described a space of type {kind!r}, which this client does not know; "
                      "use the same visenv version on both sides.")


def encode(value: Any, space: spaces.Space) -> Any:
    """An observation (or part of one) of ``space`` as JSON data."""
    if isinstance(space, spaces.Dict):
        return {key: encode(value[key], sub) for key, sub in space.spaces.items()}
    if isinstance(space, spaces.Sequence):
        return [encode(item, space.feature_space) for item in value]
    if isinstance(space, _ARRAY_SPACES):
        array = np.ascontiguousarray(value, dtype=space.dtype)
        return {"dtype": array.dtype.name, "shape": list(array.shape),
                "data": base64.b64encode(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()).decode()}
    if isinstance(space, spaces.Discrete):
        return int(value)
    return value


def decode(data: Any, space: spaces.Space) -> Any:
    """The observation that :func:`encode` wrote (Sequences come back as tuples, as gymnasium samples them)."""
    if isinstance(space, spaces.Dict):
        return {key: decode(data[key], sub) for key, sub in space.spaces.items()}
    if isinstance(space, spaces.Sequence):
        return tuple(decode(item, space.feature_space) for item in data)
    if isinstance(space, _ARRAY_SPACES):
        little = np.dtype(data["dtype"]).newbyteorder("<")
        raw = np.frombuffer(base64.b64decode(data["data"]), dtype=little)
        return raw.astype(space.dtype).reshape(data["shape"])
    if isinstance(space, spaces.Discrete):
        return np.int64(data)
    return data


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON data")


def dumps(data: Any) -> str:
    """``data`` as strict JSON text (numpy values as numbers and lists; NaN and infinity refused)."""
    return json.dumps(data, default=_default, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def json_schema(space: spaces.Space) -> dict[str, Any]:
    """A JSON Schema of the encoded form of ``space``, with the space itself under ``x-gym-space``."""
    return {**_schema(space), "x-gym-space": space_to_json(space)}


def _schema(space: spaces.Space) -> dict[str, Any]:
    if isinstance(space, spaces.Dict):
        return {"type": "object", "properties": {key: _schema(sub) for key, sub in space.spaces.items()},
                "required": list(space.spaces), "additionalProperties": False}
    if isinstance(space, spaces.Sequence):
        return {"type": "array", "items": _schema(space.feature_space)}
    if isinstance(space, spaces.Text):
        return {"type": "string", "minLength": space.min_length, "maxLength": space.max_length}
    if isinstance(space, spaces.Discrete):
        return {"type": "integer", "minimum": int(space.start), "maximum": int(space.start + space.n - 1)}
    return {"type": "object", "description": "an array: dtype, shape and its C-order little-endian bytes in base64",
            "properties": {"dtype": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                           "data": {"type": "string", "contentEncoding": "base64"}},
            "required": ["dtype", "shape", "data"]}
