"""The backend interface: who answers a validated tool call, and the chain that asks them in order.

The environment validates a call (schema, artifact ids and kinds) and then hands a
:class:`ToolRequest` to a :class:`BackendChain`. Each :class:`Backend` either answers
(:class:`BackendAnswer`), refuses for a reason the agent should read (:class:`ToolFailure`, e.g. a
trim past the end of the clip), or passes (``None``) to the next backend. The attribute tier
(:mod:`visenv.tools.attribute`) is the paper's simulation; cache, nearest-neighbour and real
backends implement the same protocol and slot into the chain without touching the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from visenv.error import BackendMiss
from visenv.media import Artifact
from visenv.tools.spec import ToolSpec


@dataclass(frozen=True)
class ToolRequest:
    """A validated tool call, ready for a backend.

    Attributes:
        spec: the tool's specification.
        arguments: the call's arguments (already valid against ``spec.parameters``).
        inputs: artifact argument name -> the resolved artifacts (a tuple even for single ids).
        seed: the per-call seed, derived from the episode seed and the call's index.
        state: the episode's mutable scratch state (e.g. the to-do list of tool_task_manager).
    """

    spec: ToolSpec
    arguments: Mapping[str, Any]
    inputs: Mapping[str, tuple[Artifact, ...]]
    seed: int
    state: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class MediaOutput:
    """One media file a backend produced, before the environment registers it as an artifact.

    Attributes:
        kind: "image", "video" or "audio".
        sha256: the content hash of the file.
        path: where the file lies (never shown to the agent).
        attributes: the simulated or measured attributes (width, height, duration, fps, shots...).
        prompt: the prompt that made it (for alignment rewards and nearest-neighbour lookup).
        content: the ground truth of what the file shows (semantic tier), else None.
        defects: what this call got wrong in this output (semantic tier with ``tool_fidelity`` < 1):
            :func:`visenv.scene.defect` records; empty when it came out as asked.
    """

    kind: str
    sha256: str
    path: str
    attributes: Mapping[str, Any]
    prompt: str = ""
    content: Mapping[str, Any] | None = None
    defects: tuple[Mapping[str, str], ...] = ()


@dataclass(frozen=True)
class BackendAnswer:
    """A successful answer to a tool call.

    Attributes:
        outputs: the media produced (empty for text tools).
        text: text for the agent (the result of text, understanding and search tools; may be empty).
        backend: the tier that answered ("attribute", "exact_cache", "nearest", "real", ...).
        similarity: for a nearest-neighbour answer, how close the cached prompt was (cosine).
    """

    outputs: tuple[MediaOutput, ...]
    text: str
    backend: str
    similarity: float | None = None


@dataclass(frozen=True)
class ToolFailure:
    """A tool call that the tool itself rejects (agent-readable), e.g. a trim past the clip's end."""

    message: str
    backend: str = ""


@runtime_checkable
class Backend(Protocol):
    """Answers tool calls. ``answer`` returns an answer, a failure, or ``None`` to pass."""

    name: str

    def answer(self, request: ToolRequest) -> BackendAnswer | ToolFailure | None: ...


class BackendChain:
    """Asks backends in order; the first that does not pass answers.

    Args:
        backends: the ordered backends.
        strict: when every backend passes, raise :class:`~visenv.error.BackendMiss` instead of
            answering with an agent-readable :class:`ToolFailure`.
    """

    def __init__(self, backends: Sequence[Backend], strict: bool = False):
        if not backends:
            raise ValueError("BackendChain needs at least one backend, e.g. [AttributeBackend()]")
        self.backends = tuple(backends)
        self.strict = strict

    def answer(self, request: ToolRequest) -> BackendAnswer | ToolFailure:
        for backend in self.backends:
            result = backend.answer(request)
            if result is not None:
                return result
        names = [b.name for b in self.backends]
        if self.strict:
            raise BackendMiss(f"No backend in the strict chain {names} could answer "
                              f"{request.spec.name} with arguments {dict(request.arguments)}.")
        return ToolFailure(f"{request.spec.name} is unavailable for these arguments "
                           f"(no backend among {names} could serve it); try other arguments or another tool.",
                           backend="chain")
