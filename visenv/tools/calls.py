"""Validation and execution of one tool call: the single place where a call meets its spec.

:func:`execute_call` checks the tool name, the arguments (JSON Schema) and every artifact reference
(exists in this episode, right kind), asks the tool's backend chain, registers the produced media
as artifacts and prices the call with the tool's cost model. Every policy mistake becomes a
:class:`CallRecord` with status "error" and an agent-readable message.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Mapping

from visenv.media import Artifact, ArtifactRegistry
from visenv.protocol import ToolCall
from visenv.tools.backends import BackendChain, ToolFailure, ToolRequest
from visenv.tools.spec import ToolSpec

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
        defects: what went wrong in the outputs (semantic tier with ``tool_fidelity`` < 1), each a
            dict of text: ``artifact``, ``kind`` (e.g. "wrong_count"), ``subject``, ``expected``,
            ``actual``; empty when every output is as asked (and always for the other tiers).
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
    defects: tuple[Mapping[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == CALL_OK

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "tool": self.tool, "arguments": self.arguments,
                "status": self.status, "error": self.error, "error_kind": self.error_kind,
                "outputs": list(self.outputs), "inputs": list(self.inputs), "text": self.text,
                "backend": self.backend, "similarity": self.similarity,
                "gpu_seconds": self.gpu_seconds, "latency_seconds": self.latency_seconds,
                "defects": [dict(d) for d in self.defects]}


def _refuse(index: int, call: ToolCall, kind: str, message: str, inputs: tuple[str, ...] = ()) -> CallRecord:
    return CallRecord(index=index, tool=call.name, arguments=call.arguments, status=CALL_ERROR,
                      error=message, error_kind=kind, inputs=inputs)


def _resolve_inputs(spec: ToolSpec, arguments: Mapping[str, Any], registry: ArtifactRegistry
                    ) -> tuple[dict[str, tuple[Artifact, ...]], list[str]]:
    """Artifact argument -> artifacts, and the problems found (unknown ids, wrong kinds)."""
    resolved: dict[str, tuple[Artifact, ...]] = {}
    problems: list[str] = []
    for inp in spec.inputs:
        if inp.argument not in arguments:
            continue
        value = arguments[inp.argument]
        refs = value if inp.many else [value]
        found = []
        for ref in refs:
            if ref not in registry:
                problems.append(f"{inp.argument}: {registry.explain_missing(ref)}")
                continue
            artifact = registry.get(ref)
            if artifact.kind not in inp.kinds:
                problems.append(f"{inp.argument}: {ref} is a {artifact.kind}, but {spec.name} needs "
                                f"{' or '.join(inp.kinds)} here.")
                continue
            found.append(artifact)
        resolved[inp.argument] = tuple(found)
    return resolved, problems


def _units(spec: ToolSpec, outputs: list[Artifact]) -> float:
    unit = spec.cost.unit
    if unit == "image":
        return float(len(outputs))
    if unit in ("video_second", "audio_second"):
        return float(sum(a.attributes.get("duration", 0.0) for a in outputs))
    return 1.0


def execute_call(call: ToolCall, index: int, registry: ArtifactRegistry, chains: Mapping[str, BackendChain],
                 seed: int, state: dict[str, Any], tools: Mapping[str, ToolSpec]) -> CallRecord:
    """Validate and run ``call``; returns its record (the new artifacts are in ``registry``).

    Args:
        call: the parsed tool call.
        index: the call's index in the episode (also names the call's outputs' lineage).
        registry: the episode's artifacts; produced media are added to it.
        chains: tool name -> backend chain.
        seed: the per-call seed handed to the backend.
        state: the episode's scratch state (for stateful tools such as the to-do list).
        tools: the environment's tool set; a name outside it is an unknown tool.
    """
    spec = tools.get(call.name)
    if spec is None:
        close = difflib.get_close_matches(call.name, tools, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else " Tool names start with 'tool_'."
        return _refuse(index, call, "unknown_tool", f"There is no tool named {call.name!r}.{hint}")
    problems = spec.validate(call.arguments)
    if problems:
        return _refuse(index, call, "bad_arguments",
                       f"Invalid arguments for {spec.name}: " + "; ".join(problems))
    call = dataclasses.replace(call, arguments=spec.accept(call.arguments))
    inputs, problems = _resolve_inputs(spec, call.arguments, registry)
    input_ids = tuple(a.id for arts in inputs.values() for a in arts)
    if problems:
        return _refuse(index, call, "bad_artifact", "; ".join(problems), input_ids)
    request = ToolRequest(spec=spec, arguments=call.arguments, inputs=inputs, seed=seed, state=state)
    answer = chains[spec.name].answer(request)
    if isinstance(answer, ToolFailure):
        return dataclasses.replace(_refuse(index, call, "tool_failure", answer.message, input_ids),
                                   backend=answer.backend)
    outputs = [registry.add(out.kind, out.sha256, out.attributes, spec.name, prompt=out.prompt,
                            sources=input_ids, backend=answer.backend, call_index=index, path=out.path,
                            content=out.content)
               for out in answer.outputs]
    defects = tuple({"artifact": artifact.id, **found} for artifact, out in zip(outputs, answer.outputs)
                    for found in out.defects)
    gpu_seconds, latency_seconds = spec.cost.estimate(_units(spec, outputs))
    return CallRecord(index=index, tool=spec.name, arguments=call.arguments, status=CALL_OK,
                      outputs=tuple(a.id for a in outputs), inputs=input_ids, text=answer.text,
                      backend=answer.backend, similarity=answer.similarity,
                      gpu_seconds=round(gpu_seconds, 3), latency_seconds=round(latency_seconds, 3),
                      defects=defects)
