"""What happened in an episode, as plain records: the input of rewards, metrics and reports.

The environment appends one :class:`TurnRecord` per step and fills in the deliverables when the
agent answers. Rewards read an :class:`EpisodeRecord`; they never call back into the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from visenv.media import Artifact
from visenv.protocol import Turn
from visenv.tasks import Task

CALL_OK = "ok"
CALL_ERROR = "error"


@dataclass(frozen=True)
class CallRecord:
    """One executed (or refused) tool call.

    Attributes:
        index: 0-based index among the episode's calls.
        tool: the tool name as the agent wrote it.
        arguments: the arguments as the agent wrote them.
        status: "ok" or "error".
        error: the agent-readable reason when status is "error".
        error_kind: "unknown_tool", "bad_arguments", "bad_artifact", "tool_failure" or "".
        outputs: ids of the artifacts produced.
        inputs: ids of the artifacts consumed.
        text: the text result (text, understanding and search tools).
        backend: the tier that answered ("" when refused before any backend ran).
        similarity: the neighbour similarity when the nearest tier answered.
        gpu_seconds: what the call would have cost on the real tool.
        latency_seconds: how long the real tool would have taken.
    """

    index: int
    tool: str
    arguments: Any
    status: str
    error: str = ""
    error_kind: str = ""
    outputs: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    text: str = ""
    backend: str = ""
    similarity: float | None = None
    gpu_seconds: float = 0.0
    latency_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == CALL_OK

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "tool": self.tool, "arguments": self.arguments,
                "status": self.status, "error": self.error, "error_kind": self.error_kind,
                "outputs": list(self.outputs), "inputs": list(self.inputs), "text": self.text,
                "backend": self.backend, "similarity": self.similarity,
                "gpu_seconds": self.gpu_seconds, "latency_seconds": self.latency_seconds}


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
    """

    task: Task
    turns: list[TurnRecord] = field(default_factory=list)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    answered: bool = False
    truncated: bool = False
    deliverables: tuple[str, ...] = ()
    answer_problems: tuple[str, ...] = ()

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
