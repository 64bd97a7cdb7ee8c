"""VisGen: the virtual visual-creation environment of VisionCreator, as a gymnasium environment."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from visenv.envs.base import TextEnv, action_space, coerce_action, fit_text, observation_space, vector_info
from visenv.envs.config import VisGenConfig, build_chains
from visenv.episode import EpisodeRecord, TurnRecord
from visenv.error import ConfigError, ResetNeeded
from visenv.media import ArtifactRegistry
from visenv.mediadb import MediaDatabase, thumbnail
from visenv.protocol import Turn, parse_turn, render_error, render_tool_response
from visenv.rewards import deliverables, make_rubric, run_checks
from visenv.tasks import WORKFLOWS, Task, load_tasks, make_suite
from visenv.tools.attribute import AttributeBackend
from visenv.tools.calls import execute_call
from visenv.tools.fidelity import REAL_TIER
from visenv.tools.semantic import SemanticBackend
from visenv.tools.specs import ToolSet

PROTOCOL_HELP = (
    "Work in turns. First turn: <think>what is needed</think><plan>numbered steps, one tool each</plan> "
    "and one <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>. Then one <tool_call> per turn, "
    "refer to artifacts by their ids. Finish with <answer> citing the ids you deliver.")


def load_suite(config: VisGenConfig) -> list[Task]:
    """The tasks an environment draws from, as configured."""
    tasks = config.tasks
    if tasks in ("all", "image", "video"):
        modality = None if tasks == "all" else tasks
        suite = make_suite(config.num_tasks, config.task_seed, modality=modality)
    elif isinstance(tasks, str):
        suite = load_tasks(tasks)
    else:
        suite = list(tasks)
        bad = [t for t in suite if not isinstance(t, Task)]
        if bad:
            raise ConfigError(f"tasks must hold Task objects; got {type(bad[0]).__name__}.")
    if not suite:
        raise ConfigError(f"The task suite {tasks!r} is empty; give at least one task.")
    return suite


def _warn_unplayable_workflows(tasks: list[Task], tools: ToolSet) -> None:
    """Warn when a task's reference workflow needs a tool that ``tools`` lacks."""
    lacking = []
    for workflow_id in sorted({task.workflow for task in tasks if task.workflow in WORKFLOWS}):
        steps = WORKFLOWS[workflow_id].unavailable_steps(tools)
        lacking += [f"{workflow_id} (step {step.id!r} needs one of {list(step.tools)})" for step in steps]
    if lacking:
        warnings.warn(f"The tool set lacks tools that the reference workflows of some tasks use: "
                      f"{'; '.join(lacking)}. The expert plan of those tasks cannot be executed (R_plan "
                      "still compares plans with it); add the tools, or choose tasks whose workflows "
                      "need only the tools you keep.", stacklevel=3)


def arguments_text(arguments: Any) -> str:
    """A call's arguments as the JSON text that info dicts hold (sorted keys)."""
    return json.dumps(arguments, sort_keys=True, ensure_ascii=False, allow_nan=False)


def turn_summary(turn: Turn) -> dict[str, Any]:
    """The parsed turn as plain data (for info dicts and trajectory files); a call's arguments as JSON text."""
    return {"think": turn.think, "plan": turn.plan, "plan_steps": list(turn.plan_steps),
            "reflection": turn.reflection, "answer": turn.answer,
            "tool_call": None if turn.tool_call is None else
            {"name": turn.tool_call.name, "arguments": arguments_text(turn.tool_call.arguments)},
            "tool_call_error": turn.tool_call_error,
            "problems": [{"code": p.code, "message": p.message} for p in turn.problems]}


@dataclass
class PendingScore:
    """The end-of-episode scoring of a finished episode, detached from its environment.

    What :meth:`VisGenEnv.step` does at an episode's last step, deferred: the rubric (rule
    components, CLIP, LLM/VLM judges) scores the finished record, and the end-of-episode info is
    filled in. It holds only the finished :class:`~visenv.episode.EpisodeRecord` and the rubric, so it
    runs on any thread or process (it pickles, as the rubric does) while the environment plays the
    next episode; the judges' caches and None policy are the rubric's, as in the env.

    Attributes:
        record: the finished episode.
        rubric: the env's rubric.
        step_reward: the last step's own reward (minus ``error_penalty`` when its turn failed, else 0).
        info: the last step's info before scoring (its ``reward_components`` are the step's).
    """

    record: EpisodeRecord
    rubric: Any
    step_reward: float
    info: dict[str, Any]

    def run(self) -> tuple[float, dict[str, Any]]:
        """Score the episode: the last step's reward and info exactly as the env would have returned them.

        The reward is ``step_reward`` plus the rubric's total, or NaN when the total is invalid (a
        required judge failed under the "invalid" policy; ``info["reward_valid"]`` is then False). A
        judge that raises propagates, as it would out of ``env.step``.
        """
        breakdown = self.rubric([self.record])[0]
        reward = self.step_reward + breakdown.total if breakdown.valid else float("nan")
        info = {**self.info, "reward_components": breakdown.components, "checks": run_checks(self.record),
                "deliverables": list(self.record.deliverables), "reward_valid": breakdown.valid,
                "reward_dropped": list(breakdown.dropped), "reward_none_policy": breakdown.none_policy}
        return reward, vector_info(info)


class VisGenEnv(TextEnv):
    """A visual-creation request, virtual tools (the default tools or your own set), and a plan-aware reward.

    ## Description
    Each episode draws a task (one of 42 scenarios: 21 image, 21 video) whose request states its
    requirements: modality, amount, duration, storyboard shots, consistency, style, audio. The agent
    answers in UTPC turns (``<think>``, ``<plan>``, ``<tool_call>``, ``<answer>``, optional
    ``<reflection>``); each tool call is validated against the tool's JSON Schema and artifact
    references, served by the tool's backend chain (by default the attribute tier: media of the
    right resolution, duration and count drawn from a media database; with ``content="semantic"``
    the semantic tier: media rendered from what the call asked for, the truth on the artifact,
    generations that come out wrong with probability ``1 - tool_fidelity`` and analysis tools that
    describe what was rendered; see :mod:`visenv.tools.semantic`), and answered with a
    ``<tool_response>`` observation. The observation names the serving tier only for a
    nearest-neighbour answer (with its similarity), so that a replay from the exact cache shows the
    agent exactly what the recorded run showed; ``info["tool_result"]["backend"]`` always names it.

    ## Tools
    ``env.tools``, a :class:`~visenv.tools.specs.ToolSet`: the default tools
    (:data:`~visenv.tools.specs.DEFAULT_TOOLS`) unless ``tools`` picks a subset of them and adds your
    own :class:`~visenv.tools.spec.ToolSpec` s, each carrying its simulation (``output.derive``).
    ``env.system_prompt`` documents them; a call to a tool outside the set gets an "unknown tool"
    error observation. Construction warns when a task's reference workflow needs a missing tool.

    ## Spaces
    Action: ``Text`` (one model turn; any string is accepted, longer than ``max_turn_chars`` is cut).
    Observation: ``Dict(text=Text, artifacts=Sequence(Text))``; with ``observe_pixels=True`` also
    ``pixels`` (uint8 ``(max_pixel_images, pixel_size, pixel_size, 3)``: the latest images and video
    middle frames, newest first, then zero padding) and ``pixels_mask`` (``MultiBinary(max_pixel_images)``,
    int8: 1 on the rows that hold an image, 0 on padding; an all-black image is a 1, so read the
    mask, never the pixel values, to tell them apart). Text spaces have dynamic shapes: use
    ``AsyncVectorEnv(..., shared_memory=False)``.

    ## Rewards
    0 on intermediate steps, minus ``error_penalty`` on a step whose turn or call failed; on the last
    step, plus the rubric's total (``ltr``: R_plan x R_fine; ``r1``: additive). An invalid total
    (a required judge failed under the "invalid" policy) is returned as NaN with
    ``info["reward_valid"] = False``. ``info["reward_components"]`` names every component.

    ## Episode end
    Terminated on ``<answer>``; truncated after ``max_turns`` turns or ``max_episode_chars``
    characters.

    ## Deferred scoring
    By default the last step scores the episode itself (the rubric and its judges run inside
    ``step``), as the gymnasium contract has it. A rollout loop that wants the environment back at
    once sets ``env.defer_scoring = True`` (an attribute, off by default): the last step then returns
    only that step's own reward (0, or minus ``error_penalty``), ``info["reward_pending"] = True`` and
    the step's ``reward_components``; :meth:`detach_pending_score` hands over a picklable
    :class:`PendingScore` whose ``run()`` returns the reward and the info the step would have
    returned, and the env can be reset at once while the score runs elsewhere (``rl.rollout`` runs
    them on a bounded judge pool). The episode record the score holds is the env's ``record`` of
    that episode; ``reset`` starts a new one and leaves it alone.

    ## Info
    ``turn`` (the parsed turn), ``tool_result`` (the call record, on steps whose turn held a call;
    its ``defects`` list what the semantic tier got wrong, empty otherwise),
    ``artifacts`` (all so far), ``reward_components``, ``cost`` (GPU-seconds and latency the real
    tool would have taken, for the step and the episode, and ``gpu_seconds_avoided``: the part that a
    virtual tier answered, not the real tool), ``task_id``; on the last step also ``checks`` and
    ``deliverables``. Info is strict JSON (no NaN or infinity) and keeps one kind per key, so that
    gymnasium's vector envs merge it on any mix of steps: a value that does not apply (a component or
    check that is None, a turn's missing answer) is left out rather than None, and a call's
    ``arguments`` (whose keys and kinds the model chooses) are JSON text.

    ## Arguments
    ``VisGenEnv(config=None, **options)`` where ``config`` is a :class:`VisGenConfig` or a dict
    (RLlib passes its env_config) and ``options`` override it; see :class:`VisGenConfig`.

    ## Version history
    * v0: initial release; ``tool_latency_scale`` (simulated latency, default 0: none) added; ``pixels_mask`` added to the opt-in pixel observations, and the ``tools``
      option (default observations, dynamics and rewards unchanged). Hardening: blank text arguments and
      non-finite numbers are refused, integral floats in integer arguments are accepted, and info
      leaves out None values and holds call arguments as JSON text (a candidate for v1). Opt-in deferred
      scoring (``defer_scoring``, :meth:`detach_pending_score`; default steps and rewards unchanged). The
      ``content`` (default "attribute": dynamics and rewards unchanged), ``tool_fidelity`` and
      ``perception_noise`` options, the rubrics "ltr+percept", "r1+percept" and "result_format", and the call
      record's ``defects`` (always empty on the attribute tier) added.
    """

    def __init__(self, config: Any = None, **options: Any):
        self.config = VisGenConfig.from_any(config, **options)
        cfg = self.config
        self.tasks = load_suite(cfg)
        self.rubric = make_rubric(cfg.rubric)
        media = MediaDatabase.from_folder(cfg.media) if cfg.media else None
        self.tools = cfg.tools
        default = (SemanticBackend(media, cfg.tool_fidelity, cfg.perception_noise) if cfg.content == "semantic"
                   else AttributeBackend(media))
        self.chains = build_chains(cfg.backends, [default], self.tools)
        _warn_unplayable_workflows(self.tasks, self.tools)
        pixels = (cfg.max_pixel_images, cfg.pixel_size) if cfg.observe_pixels else None
        self.observation_space = observation_space(cfg.max_observation_chars, pixels)
        self.action_space = action_space(cfg.max_turn_chars)
        self.registry = ArtifactRegistry()
        self.record: EpisodeRecord | None = None
        self._episode_seed = 0
        self._state: dict[str, Any] = {}
        self._chars = 0
        self._gpu_seconds = self._gpu_seconds_avoided = 0.0
        self._latency_seconds = 0.0
        self.defer_scoring = False
        self._pending: PendingScore | None = None

    @property
    def system_prompt(self) -> str:
        """The tool documentation and protocol, for a policy's system message."""
        return f"You are a visual-creation agent with these tools:\n{self.tools.prompt()}\n\n{PROTOCOL_HELP}"

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        task = self._choose_task(options or {})
        self._episode_seed = int(self.np_random.integers(2**62))
        self.registry.new_episode(f"ep{self._episode_seed:016x}")
        self.record = EpisodeRecord(task=task, tools=self.tools)
        self._state, self._chars = {}, 0
        self._gpu_seconds = self._gpu_seconds_avoided = self._latency_seconds = 0.0
        self._pending = None
        self._begin_episode()
        text = f"Request: {task.request}\n\n{PROTOCOL_HELP}"
        info = {"task_id": task.task_id, "task": task.to_dict(), "episode_id": self.registry.episode_id}
        return self._observation(text), vector_info(info)

    def _choose_task(self, options: dict[str, Any]) -> Task:
        choice = options.get("task")
        if choice is None:
            return self.tasks[int(self.np_random.integers(len(self.tasks)))]
        if isinstance(choice, Task):
            return choice
        if isinstance(choice, (int, np.integer)) and not isinstance(choice, bool):
            if not 0 <= choice < len(self.tasks):
                raise ConfigError(f"options['task'] index {choice} is outside the suite of {len(self.tasks)} tasks.")
            return self.tasks[int(choice)]
        for task in self.tasks:
            if task.task_id == choice:
                return task
        raise ConfigError(f"options['task'] ({choice!r}) must be a Task, an index, or a task_id of the suite.")

    def step(self, action: Any):
        self._check_can_step()
        record = self.record
        text = coerce_action(action)
        self._chars += len(text)
        turn = parse_turn(text, max_chars=self.config.max_turn_chars)
        call, failed, terminated = None, False, False
        if turn.tool_call is not None:
            seed = (self._episode_seed * 6364136223846793005 + len(record.calls)) % 2**63
            call = execute_call(turn.tool_call, len(record.calls), self.registry, self.chains, seed, self._state,
                                self.tools)
            if self.config.tool_latency_scale and call.backend != REAL_TIER:
                time.sleep(call.latency_seconds * self.config.tool_latency_scale)
            for artifact_id in call.outputs:
                record.artifacts[artifact_id] = self.registry.get(artifact_id)
            self._gpu_seconds += call.gpu_seconds
            self._gpu_seconds_avoided += gpu_seconds_avoided(call)
            self._latency_seconds += call.latency_seconds
            payload = self._call_payload(call)
            failed = not call.ok
        elif turn.tool_call_error is not None:
            payload, failed = {"status": "error", "error": turn.tool_call_error}, True
        elif turn.answer is not None:
            terminated = True
            record.answered = True
            record.deliverables, record.answer_problems = deliverables(record, turn.answer)
            payload = {"status": "done", "delivered": list(record.deliverables)}
            if record.answer_problems:
                payload["problems"] = list(record.answer_problems)
                failed = True
        else:
            payload, failed = {"status": "error", "error": turn.feedback() or "The turn has no action."}, True
        if turn.problems and "error" not in payload:
            payload["format"] = turn.feedback()
        record.turns.append(TurnRecord(turn, call))
        truncated = not terminated and (len(record.turns) >= self.config.max_turns
                                        or self._chars > self.config.max_episode_chars)
        reward = -float(self.config.error_penalty) if failed else 0.0
        if terminated or truncated:
            self._ended = True
            record.truncated = truncated
            if truncated:
                payload["truncated"] = (f"The episode ran out of budget ({len(record.turns)} turns, "
                                        f"{self._chars} characters).")
        info = {"task_id": record.task.task_id, "turn": turn_summary(turn),
                "tool_result": None if call is None else {**call.to_dict(), "arguments": arguments_text(call.arguments)},
                "artifacts": [a.describe() for a in record.artifacts.values()],
                "reward_components": {"step_format": float(turn.well_formed),
                                      "step_call": None if call is None else float(call.ok)},
                "cost": {"gpu_seconds": 0.0 if call is None else call.gpu_seconds,
                         "latency_seconds": 0.0 if call is None else call.latency_seconds,
                         "gpu_seconds_avoided": 0.0 if call is None else gpu_seconds_avoided(call),
                         "episode_gpu_seconds": round(self._gpu_seconds, 3),
                         "episode_gpu_seconds_avoided": round(self._gpu_seconds_avoided, 3),
                         "episode_latency_seconds": round(self._latency_seconds, 3)}}
        body = render_error(payload.pop("error"), **payload) if "error" in payload else render_tool_response(payload)
        if not (terminated or truncated):
            return self._observation(body), reward, terminated, truncated, vector_info(info)
        pending = PendingScore(record, self.rubric, reward, info)
        if self.defer_scoring:
            self._pending = pending
            return self._observation(body), reward, terminated, truncated, vector_info({**info, "reward_pending": True})
        reward, info = pending.run()
        return self._observation(body), reward, terminated, truncated, info

    def detach_pending_score(self) -> PendingScore:
        """Hand over the deferred scoring of the episode that just ended (with ``defer_scoring`` on).

        Returns:
            The :class:`PendingScore` of the last step; the env no longer holds it, and may be reset
            and stepped at once while the score runs elsewhere.

        Raises:
            ResetNeeded: no scoring is pending (``defer_scoring`` is off, the episode has not ended, or
                its score was already detached).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            raise ResetNeeded("VisGenEnv.detach_pending_score() was called with no episode score pending: "
                              "set env.defer_scoring = True before the episode's last step, and detach once, "
                              "after the step whose info holds reward_pending=True.")
        return pending

    def _call_payload(self, call) -> dict[str, Any]:
        if not call.ok:
            return {"status": "error", "tool": call.tool, "error": call.error}
        payload: dict[str, Any] = {"status": "ok", "tool": call.tool,
                                   "artifacts": [self.registry.get(i).describe() for i in call.outputs]}
        if call.text:
            payload["text"] = call.text
        if call.similarity is not None:
            payload["backend"] = call.backend
            payload["similarity"] = round(call.similarity, 4)
            payload["note"] = "Served from the cached output of the most similar earlier prompt."
        return payload

    def _observation(self, text: str) -> dict[str, Any]:
        obs: dict[str, Any] = {"text": fit_text(text, self.config.max_observation_chars),
                               "artifacts": tuple(self.registry.all_ids())}
        if self.config.observe_pixels:
            size, count = self.config.pixel_size, self.config.max_pixel_images
            pixels = np.zeros((count, size, size, 3), dtype=np.uint8)
            visual = [a for a in reversed(self.registry.all()) if a.kind in ("image", "video")][:count]
            for row, artifact in enumerate(visual):
                pixels[row] = thumbnail(artifact.path, artifact.kind, size)
            mask = np.zeros(count, dtype=np.int8)
            mask[: len(visual)] = 1
            obs["pixels"], obs["pixels_mask"] = pixels, mask
        return obs

    def render(self) -> str:
        """The episode so far as text (render_mode "ansi")."""
        if self.record is None:
            return ""
        lines = [f"Task {self.record.task.task_id}: {self.record.task.request}"]
        for i, step in enumerate(self.record.turns):
            lines.append(f"--- turn {i} ---\n{step.turn.raw}")
            if step.call is not None:
                lines.append(f"=> {step.call.status} {step.call.tool} {step.call.outputs or step.call.error}")
        return "\n".join(lines)


def gpu_seconds_avoided(call) -> float:
    """The real GPU-seconds a call saved: its cost when a virtual tier answered, 0 when the real tool did."""
    return 0.0 if call.backend == REAL_TIER else call.gpu_seconds
