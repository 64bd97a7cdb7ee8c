"""Rule-based reward components, with the papers' names (PAPER.md section 3).

Every component is a plain batched callable: ``component(episodes) -> list[float | None]``, one
score in [0, 1] per episode, ``None`` when the component does not apply (e.g. R_cons on a task
that needs no consistency). Components are classes so that they pickle to Ray workers. The LLM
judge versions of R_plan, R_traj and R_reflect implement the same call and replace these.
"""

from __future__ import annotations

import re
from typing import Sequence

from visenv.episode import EpisodeRecord
from visenv.rewards.checks import AUDIO_PRODUCERS, RESULT_CHECKS
from visenv.tasks import WORKFLOWS

TOOL_NAME = re.compile(r"\btool_[a-z0-9_]+")
GENERATION_GROUPS = ("text2image", "image_edit", "video_generation")
REFERENCE_ARGUMENTS = ("reference_images", "image")


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two sequences."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def plan_tools(record: EpisodeRecord) -> list[list[str]]:
    """For each step of the episode's plan, the names of the episode's tools it mentions."""
    turn = record.plan_turn
    if turn is None:
        return []
    return [[t for t in TOOL_NAME.findall(step) if t in record.tools] for step in turn.plan_steps]


class EpisodeRule:
    """Base of the rule components: batches by scoring each episode in turn."""

    name = ""

    def __call__(self, episodes: Sequence[EpisodeRecord]) -> list[float | None]:
        return [self.score(e) for e in episodes]

    def score(self, episode: EpisodeRecord) -> float | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FormatReward(EpisodeRule):
    """R_format: mean per-turn UTPC structure score (tags, order, content, JSON validity).

    A well-formed turn scores 1; each distinct kind of format problem costs a third.
    """

    name = "R_format"

    def score(self, episode: EpisodeRecord) -> float | None:
        if not episode.turns:
            return 0.0
        scores = [max(0.0, 1.0 - len({p.code for p in t.turn.problems}) / 3) for t in episode.turns]
        return sum(scores) / len(scores)


class ToolReward(EpisodeRule):
    """R_tool: graded execution success, levels {0, 0.1, 0.8, 1.0} as in VisionCreator-R1.

    1.0: every call succeeded and the episode delivered; 0.8: some intermediate call failed but the
    episode delivered; 0.1: calls succeeded but nothing was delivered; 0.0: no call succeeded.
    """

    name = "R_tool"

    def score(self, episode: EpisodeRecord) -> float | None:
        calls = episode.calls
        if not any(c.ok for c in calls):
            return 0.0
        if not (episode.answered and episode.deliverables):
            return 0.1
        return 1.0 if all(c.ok for c in calls) else 0.8


class ResultReward(EpisodeRule):
    """R_result: 1 when every applicable result check passes (modality, amount, duration, shots, audio)."""

    name = "R_result"

    def score(self, episode: EpisodeRecord) -> float | None:
        results = [check(episode) for check in RESULT_CHECKS]
        return float(all(r is not False for r in results))


class ConsistencyReward(EpisodeRule):
    """R_cons: where consistency is required, the share of later generations that use a reference.

    A generation call (text-to-image, image edit, video generation) is reference-based when it
    passes ``reference_images`` or animates/edits an ``image`` of the episode. The first
    generation needs no reference. ``None`` when the task requires no consistency.
    """

    name = "R_cons"

    def score(self, episode: EpisodeRecord) -> float | None:
        if not episode.task.requirements.consistency:
            return None
        generations = [c for c in episode.calls if c.ok and episode.tools[c.tool].group in GENERATION_GROUPS]
        if not generations:
            return 0.0
        later = generations[1:]
        if not later:
            return 1.0 if len(generations[0].outputs) <= 1 and episode.task.requirements.amount <= 1 else 0.0
        referenced = sum(bool(c.inputs) for c in later)
        return referenced / len(later)


class RuleTrajectoryReward(EpisodeRule):
    """R_traj (rule version): agreement of the executed calls with the plan's tool order (LCS ratio)."""

    name = "R_traj"

    def score(self, episode: EpisodeRecord) -> float | None:
        planned = [t for step in plan_tools(episode) for t in step]
        executed = [c.tool for c in episode.calls if c.ok]
        if not planned or not executed:
            return 0.0
        return lcs_length(planned, executed) / max(len(planned), len(executed))


class RulePlanReward(EpisodeRule):
    """R_plan (rule version of vPlanJudger): the plan against the task's reference workflow.

    Facets: requirement fulfilment (binary: the plan has a step producing the requested modality,
    a reference-based step when consistency is required, and a step for each required audio);
    pragmatic executability (share of steps naming a real tool); decomposition atomicity (share of
    steps naming at most one tool); coverage (share of reference steps whose tool or an alternative
    is planned; steps that exist for an audio track the task does not ask for are left out);
    coherence (the planned order agrees with the reference order, LCS ratio).
    R_plan = fulfilment x mean(executability, atomicity, coverage, coherence).
    """

    name = "R_plan"

    def facets(self, episode: EpisodeRecord) -> dict[str, float]:
        """Each facet's score in [0, 1] (all 0 when there is no plan)."""
        steps = plan_tools(episode)
        if not steps:
            return dict.fromkeys(("fulfilment", "executability", "atomicity", "coverage", "coherence"), 0.0)
        planned = [t for step in steps for t in step]
        req = episode.task.requirements
        workflow = WORKFLOWS[episode.task.workflow]
        plan_text = (episode.plan_turn.plan or "").lower()
        tools = episode.tools
        needs = [any(tools[t].output.kind == req.modality for t in planned)]
        if req.consistency:
            needs.append("reference" in plan_text or any(
                tools[t].group in GENERATION_GROUPS and any(i.required for i in tools[t].inputs)
                for t in planned))
        needs.extend(bool(set(AUDIO_PRODUCERS[a]) & set(planned)) for a in req.audio)
        fulfilment = all(needs)
        applicable = [s for s in workflow.steps if s.when is None or s.when in req.audio]
        accepted = [set(s.tools) for s in applicable]
        covered = sum(bool(options & set(planned)) for options in accepted)

        def canonical(tool: str) -> str:
            return next((s.id for s, options in zip(applicable, accepted) if tool in options), tool)

        reference_order = list(dict.fromkeys(canonical(s.tool) for s in applicable))
        planned_order = list(dict.fromkeys(canonical(t) for t in planned))
        return {
            "fulfilment": float(fulfilment),
            "executability": sum(len(s) >= 1 for s in steps) / len(steps),
            "atomicity": sum(len(s) <= 1 for s in steps) / len(steps),
            "coverage": covered / len(accepted),
            "coherence": lcs_length(planned_order, reference_order) / len(reference_order),
        }

    def score(self, episode: EpisodeRecord) -> float | None:
        f = self.facets(episode)
        return f["fulfilment"] * (f["executability"] + f["atomicity"] + f["coverage"] + f["coherence"]) / 4


class RuleReflectionReward(EpisodeRule):
    """R_reflect (rule version): share of media-producing calls followed by a <reflection> turn.

    VisionCreator-R1 scores VLM-judged checkpoints; this proxy only checks that the agent reflected
    after seeing each generated result. ``None`` when no media was produced.
    """

    name = "R_reflect"

    def score(self, episode: EpisodeRecord) -> float | None:
        checkpoints = reflected = 0
        for i, step in enumerate(episode.turns):
            if step.call is not None and step.call.ok and step.call.outputs:
                checkpoints += 1
                following = episode.turns[i + 1] if i + 1 < len(episode.turns) else None
                reflected += bool(following and following.turn.reflection)
        return reflected / checkpoints if checkpoints else None
