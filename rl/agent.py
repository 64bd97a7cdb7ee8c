"""rl policies as visenv agents, and the HTML report that compares named policies on the same tasks.

:class:`PolicyAgent` is the reverse of :class:`rl.policy.AgentPolicy`: it plays any
:class:`~rl.policy.Policy` (``encode`` + ``generate``: :class:`~rl.hf.CausalLMPolicy`, the API
policy, a wrapped baseline) through the ``reset`` / ``act`` protocol of the baselines, so
:func:`visenv.evaluation.evaluate` and the benchmark report run it like any scripted agent. Each
episode is one :class:`~rl.policy.Conversation` seeded by the episode's seed, which fixes every turn's
sampling seed: the same seed gives the same text, whichever other episodes share a batch.

:func:`write_policy_report` plays the same held-out episodes with each named policy (episode ``i``:
task ``i``, environment and sampling seed ``seed + i``), a batch of episodes at a time with one
batched ``generate`` per step (:func:`act_together`), and writes one ``report.html`` in which the
policies appear side by side (:func:`visenv.report.write_comparison`), with ``results.json`` beside it::

    write_policy_report({"SFT-only": sft_policy, "RL (GRPO)": rl_policy}, heldout_tasks, "runs/main/report",
                        episodes=32, seed=777, env_options={"max_turns": 5})

``metrics`` adds logged (not optimised) scores, e.g. ``{"clip_alignment":
ClipAlignment(ClipScorer.tiny(folder))}``: a column per metric in the report, one value per group and
policy, and the scores in results.json (see docs/rewards.md, "Logged metrics in the report").
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from rl.policy import Conversation, Policy
from visenv.error import ResetNeeded
from visenv.report import evaluate_run, write_comparison
from visenv.tasks import Task


class PolicyAgent:
    """Plays an rl :class:`~rl.policy.Policy` as a visenv agent (``reset(observation, seed)`` / ``act(observation)``).

    ``reset`` starts a :class:`~rl.policy.Conversation` seeded with the episode's seed; ``act``
    encodes the observation with ``policy.encode`` (``first`` on the episode's first turn), samples
    one turn with ``policy.generate`` and returns its text, which may be malformed (the environment
    turns that into an error observation).

    Args:
        policy: the policy.
        seed: seeds the conversation seeds of episodes reset without a seed.

    Attributes:
        conversation: the current episode's conversation (None before the first ``reset``).
    """

    def __init__(self, policy: Policy, seed: int = 0):
        self.policy = policy
        self.conversation: Conversation | None = None
        self._seeds = random.Random(seed)

    def reset(self, observation: dict[str, Any], seed: int | None = None) -> None:
        """Start an episode whose turns are sampled with ``seed`` (drawn from the agent's seed when None)."""
        self.conversation = Conversation(seed=self._seeds.getrandbits(63) if seed is None else seed)

    def act(self, observation: dict[str, Any]) -> str:
        """The policy's next turn for ``observation``, the latest observation of the episode.

        Raises:
            ResetNeeded: called before :meth:`reset`.
        """
        return act_together([self], [observation])[0]


def act_together(agents: Sequence[PolicyAgent], observations: Sequence[dict[str, Any]]) -> list[str]:
    """One turn for each agent's episode with a single batched ``generate`` of their shared policy.

    Agent ``k`` gets ``observations[k]``; the result is the same as each agent's :meth:`PolicyAgent.act`
    (a policy's samples do not depend on batching). This is the ``act_batch`` of
    :func:`visenv.evaluation.evaluate`.

    Raises:
        ValueError: the agents do not all play the same policy object.
        ResetNeeded: an agent was not reset.
    """
    if not agents:
        return []
    policy = agents[0].policy
    if any(agent.policy is not policy for agent in agents):
        raise ValueError("act_together batches agents of one policy: the agents play different policy objects.")
    conversations = []
    for agent, observation in zip(agents, observations, strict=True):
        conversation = agent.conversation
        if conversation is None:
            raise ResetNeeded("PolicyAgent.act() was called before reset(): call reset(observation, seed) at the "
                              "start of each episode.")
        conversation.segments.append(policy.encode(observation, first=not conversation.segments))
        conversations.append(conversation)
    turns = policy.generate(conversations)
    for conversation, turn in zip(conversations, turns, strict=True):
        conversation.segments.append(turn)
    return [turn.text for turn in turns]


def write_policy_report(policies: Mapping[str, Policy], tasks: Sequence[Task], report_dir: str | Path, *,
                        episodes: int, seed: int, env_options: Mapping[str, Any] | None = None,
                        batch_size: int = 32, torch_threads: int | None = 1,
                        metrics: Mapping[str, Callable] | None = None, title: str = "policy comparison"
                        ) -> dict[str, Any]:
    """Play the same held-out episodes with each named policy; write one report.html comparing them.

    Episode ``i`` plays ``tasks[i % len(tasks)]`` (the first ``episodes`` tasks when there are enough)
    in a :class:`~visenv.envs.visgen.VisGenEnv` reset with seed ``seed + i``, and samples its turns
    with conversation seed ``seed + i``: every policy meets the same tasks with the same seeds. Writes
    ``report_dir/report.html`` (the VisGenBench and objective tables with one row per policy, reward
    charts with one series per policy, each episode's trajectories labelled by policy), the pictures
    under ``report_dir/media`` and ``report_dir/results.json``.

    Args:
        policies: name -> policy, in the order shown (e.g. ``{"SFT-only": sft, "RL (GRPO)": rl}``).
        tasks: the held-out suite.
        report_dir: the report folder.
        episodes: episodes per policy.
        seed: the base seed of the environments and of the sampling.
        env_options: options of the environment (e.g. ``{"max_turns": 5}``).
        batch_size: episodes played at once, with one batched ``generate`` per step.
        torch_threads: torch's CPU threads while playing (restored afterwards); None keeps the current
            setting. One thread is the fast choice for small models: on a 2-core machine that other
            processes also used (load average 8), decoding a 0.5M-parameter Llama with 2 threads
            measured about 25 times slower than with 1.
        metrics: logged (not optimised) batched components by name, computed on each policy's
            episodes, e.g. ``{"clip_alignment": ClipAlignment(ClipScorer.tiny(folder))}``; the
            metrics table shows one column per metric (a row per group and policy).
        title: the page title.

    Returns:
        What results.json holds: ``seed``, ``episodes``, ``env_options``, the played ``tasks`` (ids)
        and, per policy name, its ``summary`` and ``episodes`` (as in the results.json of ``visenv eval``).
        A metric's per-episode scores, group means and id are in the summary's ``visgenbench``
        (``episodes``, ``overall``, ``by_modality``, ``metric_ids``).

    Raises:
        ValueError: no policies, no tasks, or ``episodes``, ``batch_size`` or ``torch_threads`` below 1.
    """
    if not policies:
        raise ValueError("write_policy_report needs at least one policy, e.g. {'SFT-only': policy}.")
    if not tasks:
        raise ValueError("write_policy_report needs at least one task: pass the held-out suite.")
    if episodes < 1 or batch_size < 1 or (torch_threads is not None and torch_threads < 1):
        raise ValueError(f"episodes ({episodes}), batch_size ({batch_size}) and torch_threads ({torch_threads}) "
                         "must be at least 1.")
    played = [tasks[i % len(tasks)] for i in range(episodes)]
    options = dict(env_options or {})
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads or threads)
    try:
        runs = [evaluate_run(functools.partial(PolicyAgent, policy), played, report_dir, name=name, seed=seed,
                             env_config=options, metrics=metrics, progress=False, num_envs=batch_size,
                             act_batch=act_together)
                for name, policy in policies.items()]
    finally:
        torch.set_num_threads(threads)
    write_comparison(report_dir, runs, title)
    payload = {"seed": seed, "episodes": episodes, "env_options": options, "tasks": [t.task_id for t in played],
               "policies": {run.name: {"summary": run.summary, "episodes": [vars(r) for r in run.results]}
                            for run in runs}}
    (Path(report_dir) / "results.json").write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    return payload
