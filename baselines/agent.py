"""The minimal agent interface the baselines share with any policy the evaluator runs."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Agent(Protocol):
    """Plays one episode at a time from observations alone.

    ``reset`` receives the first observation of an episode (it holds the request); ``act`` receives
    the latest observation and returns the next turn's text.
    """

    def reset(self, observation: dict[str, Any], seed: int | None = None) -> None: ...

    def act(self, observation: dict[str, Any]) -> str: ...
