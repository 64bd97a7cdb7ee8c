"""Objects named on a command line or in a config as ``package.module:name`` (a judge, a generator, an agent)."""

from __future__ import annotations

import importlib
from typing import Any

from visenv.error import ConfigError


def import_object(spec: str, option: str, example: str) -> Any:
    """The object ``spec`` (``package.module:name``) names.

    Args:
        spec: ``package.module:name``.
        option: how the user gave it, for the message (e.g. ``"--callable"``, ``"agent"``).
        example: a valid spec, shown in the message.

    Raises:
        ConfigError: ``spec`` is not of that form, or the module or the name cannot be imported.
    """
    module, colon, name = spec.partition(":")
    if not colon or not module or not name:
        raise ConfigError(f"{option} ({spec!r}) must be 'package.module:name', e.g. {example}.")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{option} ({spec!r}): cannot import it ({error}); give an importable "
                          f"'package.module:name', e.g. {example}.") from None
