"""YAML for configuration values, with the numbers people write: ``3e-4`` is a float.

PyYAML implements YAML 1.1, whose float pattern requires a dot, so ``yaml.safe_load("3e-4")`` is the
*string* ``"3e-4"`` and a learning rate given that way fails later with a confusing type error.
:func:`load_yaml` is ``yaml.safe_load`` with YAML 1.2's float pattern added (``1e3``, ``3e-4``,
``-2E+5``; everything else unchanged). Config files and ``--option VALUE`` overrides of both command
lines (``visenv``, ``rl``) read through it.
"""

from __future__ import annotations

import re
from typing import IO, Any

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader that also resolves exponent floats without a dot."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(source: str | IO[str]) -> Any:
    """``yaml.safe_load`` of a string or stream, reading ``3e-4`` as a float."""
    return yaml.load(source, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
