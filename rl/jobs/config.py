"""The main job's configuration: rl's config sections plus the job's own seeds, counts and budgets.

Every section is the rl dataclass the job hands it to (:class:`~rl.config.TinyModelConfig`,
:class:`~rl.sft.SFTStage`, :class:`~rl.config.PolicyConfig`, :class:`~rl.grpo.GRPOConfig`,
:class:`~rl.config.RolloutConfig`, :class:`~rl.config.EnvConfig`); loading, overrides and their checks go
through :mod:`rl.config` (``apply_overrides(MainJobConfig(), {"grpo.kl_coef": 0.1})``, or ``--set
grpo.kl_coef=0.1`` on ``python -m rl.cli main``). Only what no section holds is a top-level field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl.config import EnvConfig, PolicyConfig, RolloutConfig, TinyModelConfig
from rl.grpo import GRPOConfig
from rl.sft import SFTStage
from visenv.rewards.rubric import RUBRICS
from visenv.error import ConfigError

#: The image scenarios whose teacher workflows are shortest (3 turns; ~350 BPE tokens a trajectory, docs/main-job.md).
SHORT_SCENARIOS = ["official_account_cover", "social_media_cover", "realistic_photography"]

#: Where the main job's GRPO departs from :class:`rl.grpo.GRPOConfig`'s defaults (8 x 8 groups, lr 3e-4,
#: clip 0.2, k3, token loss): a warm-up over the first 10 updates and KL 0.05 to the SFT-only policy.
#: Without them the first 10-30 updates pushed some PST policies off their optimum (entropy, length,
#: truncation and KL rose, the training reward fell) and GRPO did not recover within the job's budget
#: (docs/main-job.md, experiments E5-E12). And advantages are not divided by the group's std (Dr. GRPO):
#: most groups' rewards differ only by VisGen's 0.05 turn-error penalty (a mistyped artifact id in the
#: answer), which the std scaled up to full-size advantages (docs/main-job.md, "Why the training reward
#: was flat"). And an entropy penalty (``entropy_coef`` -0.1): on seeds 0 and 2 the SFT-only policy sampled at
#: temperature 0.5 already scores its teacher's reward and loses 0.11-0.13 of it to sampling at 1; the
#: penalty lets GRPO sharpen the policy while the rewards decide where (seed 2: +0.051 without it, +0.097
#: at -0.05, +0.106 at -0.1; docs/main-job.md, "The entropy penalty").
MAIN_JOB_GRPO = {"warmup_steps": 10, "kl_coef": 0.05, "scale_rewards": False, "entropy_coef": -0.1}


#: PST's budgets in optimizer steps (stage 1, stage 2): what 162 s + 108 s gave on a quiet 2-core machine
#: (run 17 of docs/main-job.md), so that a seed does the same PST work on any machine (the same SFT-only policy, bit
#: for bit, on one machine; other CPUs round differently).
PST_STEPS = (291, 197)

#: GRPO's budget in iterations: what fits the 13-minute job on the slowest of seeds 0-2 on a quiet 2-core machine
#: (60 until generate dropped finished rows and kept each turn's keys and values, about 1.2x faster an iteration).
GRPO_ITERATIONS = 75


def _stages() -> list[SFTStage]:
    """PST's two stages, budgeted in steps (:data:`PST_STEPS`, about 270 s on a quiet 2-core machine): stage 1
    (lambda 1, lr 2e-3), stage 2 (lambda 2, lr 1e-3); ``epochs`` is an upper bound the budgets always reach first."""
    return [SFTStage(visual="", visual_weight=1.0, epochs=1000, batch_size=32, learning_rate=2e-3,
                     max_steps=PST_STEPS[0]),
            SFTStage(visual="", visual_weight=2.0, epochs=1000, batch_size=32, learning_rate=1e-3,
                     max_steps=PST_STEPS[1])]


def _rollout(num_envs: int) -> RolloutConfig:
    return RolloutConfig(backend="ray", num_envs=num_envs, num_workers=2, worker_num_cpus=1.0, torch_threads=1)


@dataclass
class MainJobConfig:
    """Settings of :func:`rl.jobs.main_job.run_main_job`; the defaults are the main job (15 minutes on 2 CPU cores).

    Attributes:
        out: folder for everything the job writes (data, tokenizer, policies, metrics, results).
        seed: seeds the data, model initialisation, PST, GRPO (its ``grpo.seed`` is replaced by this) and
            evaluation sampling.
        scenarios: VisGen scenario ids the tasks are drawn from (null: all 42).
        train_tasks: tasks in the training suite (the teacher plays each once; GRPO samples from it).
        train_task_seed: seed of the training suite.
        rl_task_seed: GRPO samples its tasks from a third ``train_tasks``-task suite drawn with this seed
            (checked to share no task with the training or the held-out suite), so RL practises on tasks
            PST has not memorised, as the held-out evaluation does (docs/main-job.md, E14 and runs 10-12).
            Null: GRPO samples from the training suite, the tasks the teacher played for PST.
        eval_tasks: tasks in the held-out suite.
        eval_task_seed: seed of the held-out suite (must differ from ``train_task_seed``).
        eval_episodes: held-out episodes per policy and decoding mode (one per held-out task when
            equal to ``eval_tasks``; otherwise tasks are drawn by the episode seeds).
        eval_greedy: also evaluate both policies greedily (temperature 0).
        mistake_rate: probability that the teacher makes a mistake in an episode.
        reflect: whether the teacher writes reflections (longer trajectories).
        min_reward: teacher trajectories whose LtrReward is below this are dropped.
        env: the environment (its ``id`` VisGen; its ``options`` get each suite's ``tasks`` from the job).
        tiny: the tiny Llama built from scratch and its BPE vocabulary (at least 300 tokens).
        stages: PST's stages, in order; each trains on the job's teacher data (leave ``visual`` empty)
            until its ``max_steps`` or ``max_seconds`` budget is spent (at least one of them set). By
            default the budgets are steps (:data:`PST_STEPS`): the same work on any machine, so two runs
            of a seed with the same ``torch_threads`` on one machine train the same SFT-only policy, bit for bit
            (``--set stages.0.max_seconds=162 --set stages.0.max_steps=null`` budgets a stage in seconds).
        policy: how the policy samples (``max_new_tokens``, ``device``; its ``model`` is set by the job).
        grpo: GRPO's hyperparameters: GRPOConfig's defaults with :data:`MAIN_JOB_GRPO` on top.
        rl_rubric: the rubric GRPO trains on ("ltr", "r1" or "result_format", see
            :func:`visenv.rewards.rubric.make_rubric`), or null for the environment's own (``env.options``;
            LtrReward by default). The teacher data and both evaluations keep the environment's rubric, so
            policies trained on other rewards are measured by the same one.
        rollout: where GRPO's rollouts run: "ray" (``num_workers`` actors of ``num_envs`` environments)
            or "serial" (``num_envs`` environments in this process; no Ray needed). Its ``overlap`` and
            ``max_staleness`` (sampling with weights one or more updates behind) need ``grpo.off_policy``.
        eval_rollout: where the held-out evaluation runs ("ray": in Ray workers, both cores busy; "serial":
            in this process); ``num_envs`` is the generate batch size (per worker on Ray).
        grpo_seconds: wall-clock budget of GRPO (the iteration running when it runs out finishes; 0 skips
            GRPO; null: no wall-clock budget, ``grpo_max_iterations`` is the budget). GRPO also stops
            early when the job would otherwise overrun ``time_limit_seconds`` (unless
            ``stop_at_time_limit`` is false): it keeps back the time the SFT-only evaluation took (the
            RL evaluation repeats it) plus ``safety_seconds`` (which also covers the HTML report).
        grpo_max_iterations: upper bound on GRPO iterations (the budget itself, by default: ``grpo_seconds``
            null and ``stop_at_time_limit`` false, the same work on any machine).
        stop_at_time_limit: stop GRPO early when the job would overrun ``time_limit_seconds``; false (the
            default) lets the budgets alone decide, so a slower or loaded machine takes longer but does
            the same work.
        keep_best_window: the RL policy is the one that sampled the best ``keep_best_window`` consecutive
            iterations of training reward (:class:`rl.train.KeepBest`: model selection on the training
            rollouts, no extra episodes), not necessarily the last; 0 keeps the last weights. Both are
            saved (``<out>/rl/policy`` and ``<out>/rl/last_policy``).
        ray_num_cpus: CPUs of the local Ray (workers x worker_num_cpus of each rollout must fit).
        torch_threads: torch threads of the learner process (SFT, updates, evaluation).
        sft_policy: folder of an SFT-only policy written by an earlier run (``<out>/sft/policy``): teacher
            data, tokenizer and PST are skipped and GRPO starts from it (e.g. to rerun RL with another
            seed). It must come from a run with the same scenarios and training tasks. Null runs PST.
        report_episodes: held-out episodes per policy in the HTML report (``<out>/report/report.html``:
            the SFT-only and the RL policy side by side, with the pictures they made); 0 skips it.
        clip_model: the CLIP model whose text-image alignment (:class:`visenv.rewards.clip.ClipAlignment`)
            the report logs per policy: "tiny" (a tiny open_clip model with random weights, built
            offline: the pipeline runs, the scores mean nothing), an open_clip architecture name or
            "local-dir:PATH" with ``clip_pretrained``, or null for no CLIP. Logged, never optimised:
            the attribute tier's procedural pictures do not depict the request.
        clip_pretrained: the weights of a non-tiny ``clip_model`` (a checkpoint file, a pretrained tag,
            or "local" for a local-dir folder's weights).
        time_limit_seconds: the job's target wall time; the results say whether it was met.
        safety_seconds: slack kept back from ``time_limit_seconds`` when GRPO's budget is cut.
    """

    out: str = "runs/main"
    seed: int = 0
    scenarios: list[str] | None = field(default_factory=lambda: list(SHORT_SCENARIOS))
    train_tasks: int = 400
    train_task_seed: int = 0
    rl_task_seed: int | None = 20_000
    eval_tasks: int = 256
    eval_task_seed: int = 10_000
    eval_episodes: int = 256
    eval_greedy: bool = False
    mistake_rate: float = 0.3
    reflect: bool = False
    min_reward: float = 0.5
    env: EnvConfig = field(default_factory=lambda: EnvConfig(id="visenv/VisGen-v0", options={"max_turns": 5}))
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    stages: list[SFTStage] = field(default_factory=_stages)
    policy: PolicyConfig = field(default_factory=lambda: PolicyConfig(max_new_tokens=200, device="cpu"))
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(**MAIN_JOB_GRPO))
    rl_rubric: str | None = None
    rollout: RolloutConfig = field(default_factory=lambda: _rollout(32))
    eval_rollout: RolloutConfig = field(default_factory=lambda: _rollout(64))
    grpo_seconds: float | None = None
    grpo_max_iterations: int = GRPO_ITERATIONS
    stop_at_time_limit: bool = False
    keep_best_window: int = 5
    ray_num_cpus: int = 2
    torch_threads: int = 2
    sft_policy: str | None = None
    report_episodes: int = 32
    clip_model: str | None = "tiny"
    clip_pretrained: str | None = None
    time_limit_seconds: float = 900.0
    safety_seconds: float = 45.0

    def __post_init__(self) -> None:
        from visenv.tasks.scenarios import get_scenario

        if self.scenarios is not None:
            if not self.scenarios:
                raise ConfigError("scenarios is empty: give scenario ids or null for all 42.")
            for name in self.scenarios:
                get_scenario(name)  # raises ConfigError naming the unknown id
        for name in ("train_tasks", "eval_tasks", "eval_episodes", "grpo_max_iterations", "ray_num_cpus",
                     "torch_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)!r}) must be a positive integer.")
        for name, zero in (("report_episodes", "skips the report"), ("keep_best_window", "keeps the last weights"),
                           ("grpo_seconds", "skips GRPO; null: no wall-clock budget")):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name} ({getattr(self, name)!r}) must be >= 0 (0 {zero}).")
        if self.rl_rubric is not None and self.rl_rubric not in RUBRICS:
            raise ConfigError(f"rl_rubric ({self.rl_rubric!r}) must be null or one of {RUBRICS}.")
        if self.train_task_seed == self.eval_task_seed:
            raise ConfigError(f"eval_task_seed ({self.eval_task_seed}) must differ from train_task_seed: the "
                              "evaluation is on held-out tasks.")
        if self.rl_task_seed in (self.train_task_seed, self.eval_task_seed):
            raise ConfigError(f"rl_task_seed ({self.rl_task_seed!r}) must be null or differ from train_task_seed "
                              f"({self.train_task_seed}) and eval_task_seed ({self.eval_task_seed}).")
        if not 0.0 <= self.mistake_rate <= 1.0:
            raise ConfigError(f"mistake_rate ({self.mistake_rate}) must be in [0, 1], e.g. 0.3.")
        if self.env.id != "visenv/VisGen-v0" or "tasks" in self.env.options:
            raise ConfigError(f"env.id ({self.env.id!r}) must be 'visenv/VisGen-v0' and env.options must not set "
                              "'tasks' (the job draws the suites).")
        if self.tiny.vocab_size < 300:
            raise ConfigError(f"tiny.vocab_size ({self.tiny.vocab_size}) must be at least 300 (256 bytes + special "
                              "tokens).")
        if not self.stages:
            raise ConfigError("stages is empty: PST needs at least one stage.")
        for number, stage in enumerate(self.stages):
            if stage.visual or (stage.max_steps is None and stage.max_seconds is None):
                raise ConfigError(f"stages.{number}: visual ({stage.visual!r}) must be empty (the job trains on its "
                                  "teacher data) and max_steps or max_seconds set (the stage's budget).")
        for name in ("rollout", "eval_rollout"):
            rollout = getattr(self, name)
            if rollout.backend == "ray" and rollout.num_workers * rollout.worker_num_cpus > self.ray_num_cpus:
                raise ConfigError(f"{name}.num_workers x {name}.worker_num_cpus ({rollout.num_workers} x "
                                  f"{rollout.worker_num_cpus}) must be at most ray_num_cpus ({self.ray_num_cpus}).")
        if (self.rollout.overlap or self.rollout.max_staleness) and not self.grpo.off_policy:
            raise ConfigError("rollout.overlap: true and rollout.max_staleness > 0 sample with weights older than the "
                              "learner's, so GRPO must take the old log-probs from the sampler: set "
                              "grpo.off_policy: true too.")
        if self.eval_rollout.overlap or self.eval_rollout.max_staleness:
            raise ConfigError("eval_rollout.overlap and eval_rollout.max_staleness must be off: the evaluation "
                              "does not train (they are GRPO's settings, under rollout).")
        if self.sft_policy is not None and not (Path(self.sft_policy) / "config.json").is_file():
            raise ConfigError(f"sft_policy ({self.sft_policy!r}) is not a policy folder (no config.json); give the "
                              "sft/policy folder of an earlier main job, or null to run PST.")

    @property
    def uses_ray(self) -> bool:
        """Whether GRPO's rollouts or the evaluation run on Ray."""
        return "ray" in (self.rollout.backend, self.eval_rollout.backend)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
