"""What happened in an episode, as plain records: the input of rewards, metrics and reports.

The environment appends one :class:`TurnRecord` per step and fills in the deliverables when the
agent answers. Rewards read an :class:`EpisodeRecord`; they never call back into the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from visenv.media import Artifact
from visenv.protocol import Turn
from visenv.tasks import Task
from visenv.tools.calls import CALL_ERROR, CALL_OK, CallRecord
from visenv.tools.spec import ToolSpec
from visenv.tools.specs import DEFAULT_TOOLS

__all__ = ["CALL_ERROR", "CALL_OK", "CallRecord", "EpisodeRecord", "TurnRecord"]


@dataclass(frozen=True)
class TurnRecord:
    """One step: the parsed turn and the call it made (if any)."""

    turn: Turn
    call: CallRecord | None


@dataclass
class EpisodeRecord:
    """Everything the rubric needs about an episode.

    Attributes:
        task: the task played.
        turns: the steps taken, in order.
        artifacts: every artifact produced, by id, in the order made.
        answered: whether the agent ended with an <answer>.
        truncated: whether the turn or character budget ended the episode.
        deliverables: the artifact ids the agent delivered (see :func:`visenv.rewards.checks.deliverables`).
        answer_problems: agent-readable problems with the answer (unknown ids cited, ...).
        tools: the tool set the episode was played with (rewards read the called tools' specs).
    """

    task: Task
    turns: list[TurnRecord] = field(default_factory=list)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    answered: bool = False
    truncated: bool = False
    deliverables: tuple[str, ...] = ()
    answer_problems: tuple[str, ...] = ()
    tools: Mapping[str, ToolSpec] = field(default_factory=lambda: DEFAULT_TOOLS)

    @property
    def calls(self) -> list[CallRecord]:
        """The tool calls, in order."""
        return [t.call for t in self.turns if t.call is not None]

    @property
    def plan_turn(self) -> Turn | None:
        """The first turn that holds a <plan> (the episode's plan), if any."""
        return next((t.turn for t in self.turns if t.turn.plan), None)

    def delivered(self) -> list[Artifact]:
        """The delivered artifacts, in the order cited."""
        return [self.artifacts[i] for i in self.deliverables if i in self.artifacts]

    @property
    def gpu_seconds(self) -> float:
        """GPU-seconds the episode's calls would have cost on the real tools."""
        return sum(c.gpu_seconds for c in self.calls)
