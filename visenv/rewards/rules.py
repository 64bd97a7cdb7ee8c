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
from visenv.scene import FALLBACK_SUBJECT, parse_prompt, shot_scenes
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


DEFECT_PHRASES: dict[str, tuple[str, ...]] = {
    "wrong_count": ("wrong_count", "wrong count", "count is wrong", "wrong number", "too many", "too few"),
    "wrong_colour": ("wrong_colour", "wrong colour", "wrong color", "colour is wrong", "color is wrong"),
    "missing_text": ("missing_text", "missing text", "text is missing", "lacks the text"),
    "misspelled_text": ("misspelled_text", "misspell", "typo"),
    "identity_drift": ("identity_drift", "identity drift", "identity changed", "drifted"),
    "missing_shot": ("missing_shot", "missing shot", "shot is missing", "repeated shot"),
    "missing_subject": ("missing_subject", "missing subject", "subject is missing"),
}
"""The words by which a reflection names each defect kind of the semantic tier (lower case)."""


def claimed_defects(reflection: str) -> set[str]:
    """The defect kinds a reflection names (see :data:`DEFECT_PHRASES`); empty: it claims none."""
    text = reflection.lower()
    return {kind for kind, phrases in DEFECT_PHRASES.items() if any(p in text for p in phrases)}


def reflection_credit(claimed: set[str], present: set[str]) -> float:
    """How right a reflection is, in [-1, 1]: +1 names exactly the defects present (or none when
    there are none), -1 names only wrong ones or misses every one (an "ok" after a defect).

    ``(right - wrong - missed) / |claimed | present|``, and +1 when both sets are empty.
    """
    if not claimed and not present:
        return 1.0
    return (len(claimed & present) - len(claimed - present) - len(present - claimed)) / len(claimed | present)


class RuleReflectionReward(EpisodeRule):
    """R_reflect (rule version): did the agent reflect after each media result, and rightly?

    Attribute tier (no truth on the artifacts): the share of media-producing calls followed by a
    ``<reflection>`` turn, a proxy for VisionCreator-R1's VLM-judged checkpoints.

    Semantic tier (the outputs carry their truth, :mod:`visenv.tools.semantic`): each
    media-producing call is a checkpoint whose reflection is the first ``<reflection>`` written
    after it, up to and including the turn of the next media-producing call (so the agent may look
    with an analysis tool first). A checkpoint scores :func:`reflection_credit` of the defect kinds
    the reflection names (:func:`claimed_defects`) against those its outputs show: +1 right, 0 no
    reflection, down to -1 for false claims and missed defects; R_reflect = (1 + mean) / 2. So no
    reflection at all scores 0.5, an "ok" after a defective image scores below it, and a reflection
    that names the defects present scores above it. ``None`` when no media was produced.
    """

    name = "R_reflect"

    def score(self, episode: EpisodeRecord) -> float | None:
        makes = [i for i, step in enumerate(episode.turns)
                 if step.call is not None and step.call.ok and step.call.outputs]
        if not makes:
            return None
        if not any(episode.artifacts[a].content is not None for i in makes for a in episode.turns[i].call.outputs
                   if a in episode.artifacts):
            following = [episode.turns[i + 1] if i + 1 < len(episode.turns) else None for i in makes]
            return sum(bool(turn and turn.turn.reflection) for turn in following) / len(makes)
        credits = []
        for k, i in enumerate(makes):
            until = makes[k + 1] if k + 1 < len(makes) else len(episode.turns) - 1
            reflection = next((step.turn.reflection for step in episode.turns[i + 1:until + 1]
                               if step.turn.reflection), None)
            if reflection is None:
                credits.append(0.0)
                continue
            present = {d["kind"] for a in episode.turns[i].call.outputs if a in episode.artifacts
                       for d in (episode.artifacts[a].content or {}).get("defects", ())}
            credits.append(reflection_credit(claimed_defects(reflection), present))
        return (1.0 + sum(credits) / len(credits)) / 2.0


class PerceptionReward(EpisodeRule):
    """R_percept: the delivered media show what the request asked, read from the semantic tier's truth.

    One item per delivered image or video that carries its truth: 1 when it shows no defect
    (counts, colours, text, identities and shots as its calls asked), shows the task's subject (the
    first content keyword, parsed with :func:`visenv.scene.parse_prompt`; not checked when it names no
    noun of the vocabulary) and, when the task names a
    style, is rendered in it; else 0. When the task requires consistency, one more item: 1 when the
    subject keeps one identity across the delivered images (and every shot of a video). R_percept
    is the mean of the items; ``None`` when nothing delivered carries truth (the attribute tier):
    opt in with the rubrics "ltr+percept" and "r1+percept".
    """

    name = "R_percept"

    def score(self, episode: EpisodeRecord) -> float | None:
        delivered = [a for a in episode.delivered() if a.kind in ("image", "video") and a.content is not None]
        if not delivered:
            return None
        req = episode.task.requirements
        subject = parse_prompt(req.keywords[0])["subjects"][0]["name"] if req.keywords else None
        subject = None if subject == FALLBACK_SUBJECT else subject  # a keyword outside the vocabulary
        items, identities = [], set()
        for artifact in delivered:
            scenes = [scene for scene in shot_scenes(artifact.content) if scene is not None]
            names = [{s["name"]: s for s in scene["subjects"]} for scene in scenes]
            shows = subject is None or any(subject in found for found in names)
            styled = req.style is None or (bool(scenes) and all(req.style.lower() in (scene.get("style") or "")
                                                               for scene in scenes))
            items.append(float(bool(scenes) and not artifact.content["defects"] and shows and styled))
            key = subject if subject is not None else (scenes[0]["subjects"][0]["name"] if scenes else None)
            identities |= {found[key]["identity"] for found in names if key in found}
        if req.consistency:
            items.append(float(len(identities) == 1))
        return sum(items) / len(items)
