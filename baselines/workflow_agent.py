"""The scripted workflow teacher: VisionAgent = TaskAgent routing + MetaAgent execution (PAPER.md section 5).

The TaskAgent reads the request, picks the scenario and one of the 15 reference workflows, and
instantiates the workflow into concrete tool calls. The MetaAgent (:class:`WorkflowAgent`) plays
them as UTPC turns: a first turn with ``<think>`` and a numbered ``<plan>``, then one
``<tool_call>`` per turn with the artifact ids read from the previous tool responses, optional
``<reflection>`` on each result, and an ``<answer>`` citing the delivered ids.

``mistake_rate`` makes the teacher realistic for data building: with that probability an episode
contains one mistake (a skipped step, a wrong image count, a wrong clip duration, or an early answer).
"""

from __future__ import annotations

import random
from typing import Any

from baselines.task_agent import TaskAgent
from visenv.protocol import format_turn, parse_tool_response
from visenv.tasks import PlannedCall
from visenv.tools.specs import TOOLS

MISTAKES = ("skip_step", "wrong_count", "wrong_duration", "early_answer")


def request_of(observation: dict[str, Any]) -> str:
    """The request text of a VisGen reset observation ("Request: ..." up to the first blank line)."""
    text = observation.get("text", "")
    body = text[len("Request: "):] if text.startswith("Request: ") else text
    return body.split("\n\n", 1)[0]


class WorkflowAgent:
    """The scripted teacher; plays any VisGen task from observations alone.

    Args:
        seed: seeds the mistakes.
        mistake_rate: probability that an episode contains one deliberate mistake.
        reflect: add a ``<reflection>`` on each media result (scored by R1's R_reflect).
        mistakes: the kinds of mistake to draw from (a subset of :data:`MISTAKES`).
    """

    def __init__(self, seed: int = 0, mistake_rate: float = 0.0, reflect: bool = True,
                 mistakes: tuple[str, ...] = MISTAKES):
        if not 0.0 <= mistake_rate <= 1.0:
            raise ValueError(f"mistake_rate ({mistake_rate}) must be in [0, 1].")
        unknown = sorted(set(mistakes) - set(MISTAKES))
        if not mistakes or unknown:
            raise ValueError(f"mistakes {unknown or '()'} must be a non-empty subset of {MISTAKES}.")
        self.mistakes = tuple(mistakes)
        self.rng = random.Random(seed)
        self.mistake_rate = mistake_rate
        self.reflect = reflect
        self.router = TaskAgent()
        self.calls: list[PlannedCall] = []
        self.outputs: dict[int, list[str]] = {}
        self.position = 0
        self.order: list[int] = []
        self.mistake: str | None = None
        self.route = None

    def reset(self, observation: dict[str, Any], seed: int | None = None) -> None:
        if seed is not None:
            self.rng.seed(seed)
        request = request_of(observation)
        self.route = self.router.route(request)
        self.calls = self.router.plan(request)
        self.outputs, self.position, self.mistake = {}, 0, None
        self.order = list(range(len(self.calls)))
        if self.calls and self.rng.random() < self.mistake_rate:
            self.mistake = self.rng.choice(self.mistakes)
            self._inject(self.mistake)

    def _inject(self, mistake: str) -> None:
        """Make the execution deviate from the (unchanged) plan by one realistic mistake."""
        calls = self.calls
        if mistake == "skip_step" and len(calls) > 1:
            self.order.remove(self.rng.randrange(len(calls) - 1))
        elif mistake == "wrong_count":
            delivering = [c for c in calls if c.deliver and "n" in c.arguments]
            if delivering:
                call = self.rng.choice(delivering)
                call.arguments["n"] = max(1, call.arguments["n"] - 1) if call.arguments["n"] > 1 else 2
            elif len(calls) > 1:
                self.order.remove(self.rng.randrange(len(calls) - 1))
        elif mistake == "wrong_duration":
            timed = [c for c in calls if "duration" in c.arguments and "enum" in
                     TOOLS[c.tool].parameters["properties"].get("duration", {})]
            if timed:
                options = [d for d in TOOLS[timed[0].tool].parameters["properties"]["duration"]["enum"]
                           if d != timed[0].arguments["duration"]]
                wrong = self.rng.choice(options)
                for call in timed:
                    if wrong in TOOLS[call.tool].parameters["properties"]["duration"]["enum"]:
                        call.arguments["duration"] = wrong
        elif mistake == "early_answer" and len(calls) > 1:
            del self.order[self.rng.randrange(1, len(calls)):]

    def _arguments(self, call: PlannedCall) -> dict[str, Any]:
        arguments = dict(call.arguments)
        spec = TOOLS[call.tool]
        many = {inp.argument: inp.many for inp in spec.inputs}
        for argument, refs in call.refs.items():
            ids: list[str] = []
            for index, output in refs:
                produced = self.outputs.get(index, [])
                ids.extend(produced if output is None else produced[output:output + 1])
            if ids:
                arguments[argument] = ids if many.get(argument, False) else ids[0]
        return arguments

    def _plan_text(self) -> str:
        lines = []
        for i, call in enumerate(self.calls):
            uses = sorted({index + 1 for refs in call.refs.values() for index, _ in refs})
            verb = "reference" if "reference_images" in call.refs else "uses"
            after = f" ({verb} {', '.join(map(str, uses))})" if uses else ""
            lines.append(f"{i + 1}. {call.tool}: {call.purpose}{after}")
        return "\n".join(lines)

    def _think(self) -> str:
        req = self.route.requirements
        needs = [f"{req.amount} {req.modality}(s)", f"aspect {req.aspect_ratio}"]
        if req.duration:
            needs.append(f"{req.duration:g} s")
        if req.shots:
            needs.append(f"{req.shots} shots")
        if req.consistency:
            needs.append(f"{'/'.join(req.consistency)} consistency by reference")
        if req.audio:
            needs.append("audio: " + ", ".join(req.audio))
        return (f"This is a {self.route.scenario.replace('_', ' ')} request; I follow the "
                f"{self.route.workflow.replace('_', ' ')} workflow. Needs: {'; '.join(needs)}.")

    def act(self, observation: dict[str, Any]) -> str:
        reflection = None
        if self.position > 0:
            response = parse_tool_response(observation.get("text", "")) or {}
            produced = [a["id"] for a in response.get("artifacts", []) if isinstance(a, dict) and "id" in a]
            self.outputs[self.order[self.position - 1]] = produced
            if self.reflect and produced:
                first = response["artifacts"][0]
                shown = ", ".join(f"{k}={v}" for k, v in first.items() if k not in ("id", "kind"))
                reflection = f"{produced[0]} came back as expected ({shown})."
            elif self.reflect and response.get("status") == "error":
                reflection = "The call failed: " + str(response.get("error", ""))[:200].replace("<", "(")
        if self.position >= len(self.order):
            delivered = [i for index, call in enumerate(self.calls) if call.deliver
                         for i in self.outputs.get(index, [])]
            summary = " ".join(delivered) if delivered else "nothing could be made"
            return format_turn(think="Every planned step is done; I deliver the results.",
                               reflection=reflection, answer=f"Delivered: {summary}")
        call = self.calls[self.order[self.position]]
        self.position += 1
        tool_call = {"name": call.tool, "arguments": self._arguments(call)}
        if self.position == 1:
            return format_turn(think=self._think(), plan=self._plan_text(), tool_call=tool_call)
        return format_turn(think=f"Step {self.position}: {call.purpose}", reflection=reflection,
                           tool_call=tool_call)
