"""The main job: teacher data -> tokenizer -> PST (two stages) -> GRPO on Ray -> held-out evaluation.

``python -m visenv.cli main`` (``bash scripts/main.sh``) runs :func:`run_main_job` on the embedded
defaults of :class:`MainJobConfig`, sized to finish within 15 minutes on a 2-core CPU machine:

1. **Tasks.** A training suite and a held-out suite of the real VisGen environment (real tools'
   attribute tier, real LtrReward rubric), drawn with different task seeds from the same scenarios;
   the two are checked to share no task.
2. **Data.** The scripted teacher (:class:`baselines.workflow_agent.WorkflowAgent`) plays the
   training suite with a mistake rate, the funnel of :mod:`visenv.data` filters it (LtrReward below
   ``min_reward`` dropped), and the rest is written as chat JSONL.
3. **Tokenizer.** A byte-level BPE trained on the data's texts (:func:`rl.tokenizer.train_tokenizer`).
4. **PST.** A tiny Llama from scratch, two SFT stages (:func:`rl.sft.train_sft`), each with a
   wall-clock budget. This is the *SFT-only* policy.
5. **GRPO** (:class:`rl.grpo.GRPO`) inside the environment, rollouts in Ray actors on a local Ray
   (``ray.init(num_cpus=2)``), for a wall-clock budget.
6. **Evaluation.** The SFT-only and the RL policy play the same held-out episodes (episode ``i``:
   held-out task ``i``, seed ``seed + 777 + i``), once each, through the one episode runner
   (:func:`rl.evaluate.play`), sampled at temperature 1 and greedily; ``results.json`` holds both, and
   a comparison table is printed. The report shows the first ``report_episodes`` of the sampled ones.

Why the default VisGen configuration is smaller than the full benchmark (docs/main-job.md): with a BPE
tokenizer a full VisGen teacher trajectory averages ~1,700 tokens over ~9 turns (video scenarios
2,000-3,300 tokens over 12-18 turns), which a 0.5M-parameter policy cannot learn and explore within 15
minutes on two cores. The defaults keep the three image scenarios with the shortest workflows (3
turns, ~350 tokens with the teacher's ``reflect=False``), which is the real environment and rubric on
a subset of its scenarios.

``visenv`` does not import ``rl`` at module import time; this module imports it lazily inside
:func:`run_main_job`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from visenv.error import ConfigError

if TYPE_CHECKING:  # rl is imported lazily (it needs torch)
    from rl.grpo import GRPOConfig

#: The image scenarios whose teacher workflows are shortest (3 turns; ~350 BPE tokens a trajectory, docs/main-job.md).
SHORT_SCENARIOS = ("official_account_cover", "social_media_cover", "realistic_photography")

#: Where the main job's GRPO departs from :class:`rl.grpo.GRPOConfig`'s defaults (8 x 8 groups, lr 3e-4,
#: clip 0.2, k3, token loss): a warm-up over the first 10 updates and KL 0.05 to the SFT-only policy.
#: Without them the first 10-30 updates pushed some PST policies off their optimum (entropy, length,
#: truncation and KL rose, the training reward fell) and GRPO did not recover within the job's budget
#: (docs/main-job.md, experiments E5-E12).
MAIN_JOB_GRPO = {"warmup_steps": 10, "kl_coef": 0.05}


@dataclass
class MainJobConfig:
    """Settings of :func:`run_main_job`; the defaults are the main job (15 minutes on 2 CPU cores).

    Attributes:
        out: folder for everything the job writes (data, tokenizer, policies, metrics, results).
        scenarios: VisGen scenario ids the tasks are drawn from (None: all 42).
        train_tasks: tasks in the training suite (the teacher plays each once; GRPO samples from it).
        train_task_seed: seed of the training suite.
        rl_task_seed: GRPO samples its tasks from a third ``train_tasks``-task suite drawn with this seed
            (checked to share no task with the training or the held-out suite), so RL practises on tasks
            PST has not memorised, as the held-out evaluation does (docs/main-job.md, E14 and runs 10-12).
            None: GRPO samples from the training suite, the tasks the teacher played for PST.
        eval_tasks: tasks in the held-out suite.
        eval_task_seed: seed of the held-out suite (must differ from ``train_task_seed``).
        eval_episodes: held-out episodes per policy and decoding mode (one per held-out task when
            equal to ``eval_tasks``; otherwise tasks are drawn by the episode seeds).
        eval_greedy: also evaluate both policies greedily (temperature 0).
        max_turns: the environment's turn budget.
        mistake_rate: probability that the teacher makes a mistake in an episode.
        reflect: whether the teacher writes reflections (longer trajectories).
        min_reward: teacher trajectories whose LtrReward is below this are dropped.
        vocab_size: BPE vocabulary size.
        hidden_size, num_layers, num_heads, intermediate_size: the tiny Llama.
        sft_seconds: wall-clock budget of the two PST stages together.
        sft_stage1_share: share of ``sft_seconds`` given to stage 1.
        sft_steps: None (default): PST runs for ``sft_seconds``, so a faster machine trains longer. Two
            step counts (stage 1, stage 2): each stage runs exactly that many optimizer steps and
            ``sft_seconds`` is ignored, so PST does the same work on any machine (its wall time
            differs) and two runs of a seed on one machine with the same ``torch_threads`` train the
            same SFT-only policy, bit for bit (e.g. ``--set sft_steps=[285,196]``, what 270 s gave in
            run 13 of docs/main-job.md).
        sft_batch_size: trajectories per SFT step.
        sft_learning_rates: AdamW learning rates of stage 1 and stage 2.
        sft_stage2_weight: lambda of stage 2 (copies of the visual set in its mixture).
        grpo_seconds: wall-clock budget of GRPO (the iteration running when it runs out finishes). GRPO
            also stops early when the job would otherwise overrun ``time_limit_seconds``: it keeps
            back the time the SFT-only evaluation took (the RL evaluation repeats it) plus
            ``safety_seconds`` (which also covers the HTML report).
        grpo_max_iterations: upper bound on GRPO iterations.
        grpo: GRPO's hyperparameters (:class:`rl.grpo.GRPOConfig`: groups per iteration, group size,
            learning rate and warm-up, clip, KL, loss aggregation, ...): GRPOConfig's defaults with
            :data:`MAIN_JOB_GRPO` on top. A dict is read as overrides of those (``--set
            grpo.kl_coef=0.1``). Its ``seed`` is replaced by this config's ``seed``.
        keep_best_window: the RL policy is the one that sampled the best ``keep_best_window`` consecutive
            iterations of training reward (:class:`rl.train.KeepBest`: model selection on the training
            rollouts, no extra episodes), not necessarily the last; 0 keeps the last weights. Both are
            saved (``<out>/rl/policy`` and ``<out>/rl/last_policy``).
        rollout_backend: where GRPO's rollouts run: "ray" (``num_workers`` Ray actors) or "serial" (in
            this process; no Ray needed).
        max_new_tokens: most tokens in one policy turn.
        num_workers: Ray rollout workers.
        worker_num_cpus: CPUs each worker reserves (num_workers x worker_num_cpus <= ray_num_cpus).
        envs_per_worker: environments (episodes per chunk) per worker.
        ray_num_cpus: CPUs of the local Ray (ray.init(num_cpus=...)).
        torch_threads: torch threads of the learner process (SFT, updates, evaluation).
        eval_envs: environments in the evaluation pool (generate batch size; per worker on Ray).
        eval_backend: "ray" (the evaluation episodes run in the Ray workers, both cores busy) or
            "serial" (in this process).
        seed: seeds the data, model initialisation, GRPO tasks and evaluation sampling.
        sft_policy: folder of an SFT-only policy written by an earlier run (``<out>/sft/policy``): teacher
            data, tokenizer and PST are skipped and GRPO starts from it (e.g. to rerun RL with another
            seed). It must come from a run with the same scenarios and training tasks. None runs PST.
        clip_model: the CLIP model whose text-image alignment (:class:`visenv.rewards.clip.ClipAlignment`)
            the report logs per policy: "tiny" (a tiny open_clip model with random weights, built
            offline: the pipeline runs, the scores mean nothing), an open_clip architecture name or
            "local-dir:PATH" with ``clip_pretrained``, or None for no CLIP. Logged, never optimised:
            the attribute tier's procedural pictures do not depict the request.
        clip_pretrained: the weights of a non-tiny ``clip_model`` (a checkpoint file, a pretrained tag,
            or "local" for a local-dir folder's weights).
        report_episodes: held-out episodes per policy in the HTML report (``<out>/report/report.html``:
            the first sampled evaluation episodes of the SFT-only and the RL policy side by side, with
            the pictures they made); 0 skips it.
        time_limit_seconds: the job's target wall time; the report says whether it was met.
        safety_seconds: slack kept back from ``time_limit_seconds`` when GRPO's budget is cut.
    """

    out: str = "runs/main"
    scenarios: tuple[str, ...] | None = SHORT_SCENARIOS
    train_tasks: int = 400
    train_task_seed: int = 0
    rl_task_seed: int | None = 20_000
    eval_tasks: int = 256
    eval_task_seed: int = 10_000
    eval_episodes: int = 256
    eval_greedy: bool = False
    max_turns: int = 5
    mistake_rate: float = 0.3
    reflect: bool = False
    min_reward: float = 0.5
    vocab_size: int = 1000
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 352
    sft_seconds: float = 270.0
    sft_stage1_share: float = 0.6
    sft_steps: tuple[int, int] | None = None
    sft_batch_size: int = 32
    sft_learning_rates: tuple[float, float] = (2e-3, 1e-3)
    sft_stage2_weight: float = 2.0
    grpo_seconds: float = 450.0
    grpo_max_iterations: int = 1000
    grpo: GRPOConfig | dict[str, Any] = dataclasses.field(default_factory=dict)
    keep_best_window: int = 5
    rollout_backend: str = "ray"
    max_new_tokens: int = 200
    num_workers: int = 2
    worker_num_cpus: float = 1.0
    envs_per_worker: int = 32
    ray_num_cpus: int = 2
    torch_threads: int = 2
    eval_envs: int = 64
    eval_backend: str = "ray"
    seed: int = 0
    sft_policy: str | None = None
    report_episodes: int = 32
    clip_model: str | None = "tiny"
    clip_pretrained: str | None = None
    time_limit_seconds: float = 900.0
    safety_seconds: float = 45.0

    def __post_init__(self) -> None:
        from visenv.tasks.scenarios import get_scenario

        _check_numbers(type(self), vars(self), kinds=("float", "int"))  # the kinds first, the ranges below

        if self.scenarios is not None:
            self.scenarios = tuple(self.scenarios)
            if not self.scenarios:
                raise ConfigError("scenarios is empty: give scenario ids or None for all 42.")
            for name in self.scenarios:
                get_scenario(name)  # raises ConfigError naming the unknown id
        self.sft_learning_rates = tuple(self.sft_learning_rates)
        if self.sft_steps is not None:
            steps = tuple(self.sft_steps) if isinstance(self.sft_steps, (list, tuple)) else ()
            if len(steps) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in steps):
                raise ConfigError(f"sft_steps ({self.sft_steps!r}) must be None or two positive integers (steps of PST "
                                  "stage 1 and stage 2), e.g. [285, 196].")
            self.sft_steps = steps
        from rl.grpo import GRPOConfig

        if isinstance(self.grpo, dict):
            self.grpo = _grpo_config(MAIN_JOB_GRPO | self.grpo)
        elif not isinstance(self.grpo, GRPOConfig):
            raise ConfigError(f"grpo ({self.grpo!r}) must be an rl.grpo.GRPOConfig or a dict of its fields.")
        positive_ints = ("train_tasks", "eval_tasks", "eval_episodes", "max_turns", "vocab_size", "hidden_size",
                         "num_layers", "num_heads", "intermediate_size", "sft_batch_size", "grpo_max_iterations",
                         "max_new_tokens", "num_workers", "envs_per_worker",
                         "ray_num_cpus", "torch_threads", "eval_envs")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)!r}) must be a positive integer.")
        if self.report_episodes < 0:
            raise ConfigError(f"report_episodes ({self.report_episodes!r}) must be an integer >= 0 (0 skips the report).")
        if self.keep_best_window < 0:
            raise ConfigError(f"keep_best_window ({self.keep_best_window!r}) must be an integer >= 0 (0 keeps the "
                              "last weights).")
        if self.sft_policy is not None and not (Path(self.sft_policy) / "config.json").is_file():
            raise ConfigError(f"sft_policy ({self.sft_policy!r}) is not a policy folder (no config.json); give the "
                              "sft/policy folder of an earlier main job, or None to run PST.")
        for name in ("eval_backend", "rollout_backend"):
            if getattr(self, name) not in ("ray", "serial"):
                raise ConfigError(f"{name} ({getattr(self, name)!r}) must be 'ray' or 'serial'.")
        if self.train_task_seed == self.eval_task_seed:
            raise ConfigError(f"eval_task_seed ({self.eval_task_seed}) must differ from train_task_seed: the "
                              "evaluation is on held-out tasks.")
        if self.rl_task_seed is not None and (isinstance(self.rl_task_seed, bool) or not isinstance(self.rl_task_seed, int)
                                              or self.rl_task_seed in (self.train_task_seed, self.eval_task_seed)):
            raise ConfigError(f"rl_task_seed ({self.rl_task_seed!r}) must be None or an integer that differs from "
                              f"train_task_seed ({self.train_task_seed}) and eval_task_seed ({self.eval_task_seed}).")
        if not 0.0 <= self.mistake_rate <= 1.0:
            raise ConfigError(f"mistake_rate ({self.mistake_rate}) must be in [0, 1], e.g. 0.3.")
        if self.vocab_size < 300:
            raise ConfigError(f"vocab_size ({self.vocab_size}) must be at least 300 (256 bytes + special tokens).")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}).")
        if self.sft_seconds <= 0 or self.grpo_seconds < 0:
            raise ConfigError(f"sft_seconds ({self.sft_seconds}) must be > 0 and grpo_seconds "
                              f"({self.grpo_seconds}) >= 0.")
        if not 0.0 < self.sft_stage1_share < 1.0:
            raise ConfigError(f"sft_stage1_share ({self.sft_stage1_share}) must be in (0, 1), e.g. 0.6.")
        if len(self.sft_learning_rates) != 2 or any(lr <= 0 for lr in self.sft_learning_rates):
            raise ConfigError(f"sft_learning_rates ({self.sft_learning_rates}) must be two positive numbers.")
        if self.sft_stage2_weight <= 0:
            raise ConfigError(f"sft_stage2_weight ({self.sft_stage2_weight}) must be > 0.")
        if self.worker_num_cpus <= 0 or self.num_workers * self.worker_num_cpus > self.ray_num_cpus:
            raise ConfigError(f"num_workers x worker_num_cpus ({self.num_workers} x {self.worker_num_cpus}) must "
                              f"be positive and at most ray_num_cpus ({self.ray_num_cpus}).")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_numbers(config_class: type, values: dict[str, Any], kinds: tuple[str, ...], prefix: str = "") -> None:
    """Raise ConfigError for a value in ``values`` that is not a number of its field's annotated kind.

    Values come from YAML or the command line, where ``fast`` or ``true`` can land in a number field;
    ``kinds`` are the annotations checked ("float" accepts ints, "int" only ints; bools are neither).
    """
    for spec in dataclasses.fields(config_class):
        if spec.name not in values or spec.type not in kinds:
            continue
        value = values[spec.name]
        if isinstance(value, bool) or not isinstance(value, int if spec.type == "int" else (int, float)):
            kind = "an integer" if spec.type == "int" else "a number"
            raise ConfigError(f"{prefix}{spec.name} ({value!r}) must be {kind}, e.g. {spec.default!r}.")


def _grpo_config(overrides: dict[str, Any]):
    """:class:`rl.grpo.GRPOConfig` with ``overrides``; bad names and values raise ConfigError."""
    from rl.grpo import GRPOConfig

    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"grpo has no field {', '.join(unknown)}; the fields are {sorted(names)}.")
    _check_numbers(GRPOConfig, overrides, kinds=("float", "int"), prefix="grpo.")
    try:
        return GRPOConfig(**overrides)
    except ValueError as error:
        raise ConfigError(f"grpo: {error}") from None


class _OutOfTime(Exception):
    """Raised from an SFT step callback when the stage's wall-clock budget is spent."""


def _suite(config: MainJobConfig, n: int, task_seed: int):
    from visenv.tasks import make_suite

    return make_suite(n, task_seed, scenarios=config.scenarios)


def _sft_stage(policy, examples, seconds: float, steps: int | None, batch_size: int, learning_rate: float,
               seed: int, log: Callable[[int, dict[str, float]], None]) -> dict[str, float]:
    """:func:`rl.sft.train_sft` for ``steps`` optimizer steps, or (``steps`` None) for ``seconds`` of wall
    time (whole epochs are repeated until then)."""
    from rl.sft import train_sft

    start = time.perf_counter()
    losses: list[float] = []

    def on_step(step: int, metrics: dict[str, float]) -> None:
        losses.append(metrics["sft_loss"])
        log(step, metrics)
        if steps is not None:
            done = len(losses) >= steps
        else:
            done = time.perf_counter() - start >= seconds
        if done:
            raise _OutOfTime

    try:
        train_sft(policy, examples, epochs=10_000, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                  on_step=on_step)
    except _OutOfTime:
        pass
    tail = losses[-20:]
    return {"steps": len(losses), "seconds": time.perf_counter() - start,
            "loss_last20": sum(tail) / max(1, len(tail)), "loss_first": losses[0] if losses else float("nan")}


def _evaluate(policy, make_rollout: Callable[[float], Any], tasks: Sequence[Any], seed: int, temperature: float,
              env_config: dict[str, Any], report_dir: Path | None = None, report_episodes: int = 0
              ) -> tuple[dict[str, Any], list[dict[str, Any]], list[Any]]:
    """Play the held-out episodes (episode ``i``: ``tasks[i]``, seed ``seed + i``) once with ``policy``'s
    weights through the one episode runner; summary metrics, one row per episode, and the episodes.

    ``make_rollout(temperature)`` gives the backend factory (serial, or Ray workers that get the weights).
    The first ``report_episodes`` episodes keep their trajectories and pictures (under ``report_dir``).
    """
    from rl.evaluate import Recorder, play
    from rl.train import episode_metrics

    saved = policy.temperature
    policy.temperature = temperature
    recorder = Recorder(keep_trajectories=report_episodes > 0,
                        report_dir=None if report_dir is None else str(report_dir), captured=report_episodes)
    try:
        found, stats = play(policy, tasks, seed=seed, env_config=env_config, recorder=recorder,
                            make_rollout=make_rollout(temperature), progress=False)
    finally:
        policy.temperature = saved
    rows = []
    for episode in found:
        total = episode.components.get("total")
        rows.append({"task_id": episode.spec.task.task_id, "task_seed": episode.spec.task_seed,
                     "reward": episode.reward, "rubric_total": None if total is None else float(total),
                     "success": total is not None and not math.isnan(total) and total >= 0.999,
                     "turns": len(episode.rewards), "terminated": episode.terminated, "truncated": episode.truncated,
                     "components": {k: (None if v is None else float(v)) for k, v in episode.components.items()},
                     "policy_tokens": episode.policy_tokens, "error": episode.error})
    metrics = episode_metrics(found, stats)
    valid = [r["reward"] for r in rows if not math.isnan(r["reward"])]
    summary = {"episodes": len(rows), "temperature": temperature,
               "reward": sum(valid) / len(valid) if valid else float("nan"),
               "reward_stderr": _stderr(valid),
               "success_rate": sum(r["success"] for r in rows) / len(rows),
               "answered_rate": sum(r["terminated"] for r in rows) / len(rows),
               "truncated_rate": sum(r["truncated"] for r in rows) / len(rows),
               "invalid_rate": 1 - len(valid) / len(rows),
               "episodes_failed": stats.episodes_failed,
               "turns": metrics["turns"], "policy_tokens": metrics["policy_tokens"],
               "components": {k[len("reward/"):]: v for k, v in metrics.items() if k.startswith("reward/")},
               "seconds": stats.wall_seconds}
    return summary, rows, found


def _stderr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


def format_comparison(results: dict[str, Any]) -> str:
    """The SFT-only vs RL table of a results dict (``results.json``)."""
    evaluations = results["evaluations"]
    modes = [m for m in ("sampled", "greedy") if m in evaluations["sft"]]
    lines = [f"== held-out: {results['eval']['episodes']} episodes on {results['eval']['tasks']} tasks "
             f"(task seed {results['eval']['task_seed']}) ==",
             f"{'policy':<10}{'mode':<9}{'reward':>14}{'success':>9}{'answered':>10}{'turns':>7}"]
    for mode in modes:
        for name in ("sft", "rl"):
            s = evaluations[name][mode]
            lines.append(f"{name:<10}{mode:<9}{s['reward']:>8.3f} ±{s['reward_stderr']:.3f}"
                         f"{s['success_rate']:>9.1%}{s['answered_rate']:>10.1%}{s['turns']:>7.2f}")
    for mode in modes:
        m = results["margin"][mode]
        lines.append(f"RL - SFT ({mode}): reward {m['reward']:+.3f} ({m['reward_relative']:+.1%}), "
                     f"success {m['success_rate']:+.1%} points")
    lines.append(f"wall time {results['timing']['total']:.0f} s (limit {results['time_limit_seconds']:.0f} s)")
    if results.get("report"):
        lines.append(f"report: {results['report']['path']}")
    return "\n".join(lines)



def _teacher_data_and_pst(config: MainJobConfig, out: Path, train_path: str, timing: dict[str, float],
                          log: Callable[[str], None]):
    """Steps 2-4: teacher data through the funnel, the BPE tokenizer, the two PST stages.

    Returns ``(policy, sft_dir, funnel, data_stats, stages)``. With ``config.sft_policy`` the three steps
    are skipped and that SFT-only policy is loaded instead (``funnel``, ``data_stats`` are None).
    """
    from rl.config import PolicyConfig
    from rl.hf import CausalLMPolicy, tiny_causal_lm
    from rl.logging import MetricsLogger
    from rl.sft import chat_segments, load_chat_jsonl, mix
    from rl.tokenizer import train_tokenizer
    from visenv.data import DataConfig, build_dataset

    if config.sft_policy:
        policy = PolicyConfig(model=config.sft_policy, max_new_tokens=config.max_new_tokens, temperature=1.0,
                              device="cpu").build()
        log(f"SFT-only policy loaded from {config.sft_policy} (teacher data and PST skipped)")
        timing["data"] = timing["sft"] = 0.0
        return policy, config.sft_policy, None, None, []
    mark = time.perf_counter()
    # 2. Teacher data through the funnel.
    data_path = str(out / "data" / "teacher.jsonl")
    funnel = build_dataset(DataConfig(out=data_path, num_tasks=config.train_tasks, tasks=train_path,
                                      seed=config.seed, mistake_rate=config.mistake_rate, reflect=config.reflect,
                                      min_reward=config.min_reward, env={"max_turns": config.max_turns}))
    log(funnel.format())

    # 3. Tokenizer from the data.
    examples = load_chat_jsonl(data_path)
    tokenizer = train_tokenizer([m["content"] for example in examples for m in example], config.vocab_size)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    model = tiny_causal_lm(len(tokenizer), config.hidden_size, config.num_layers, config.num_heads,
                           config.intermediate_size, seed=config.seed)
    policy = CausalLMPolicy(model, tokenizer, chat="plain", max_new_tokens=config.max_new_tokens, temperature=1.0)
    lengths = [sum(len(s.token_ids) for s in chat_segments(policy, example)) for example in examples]
    policy_lengths = [max(len(tokenizer.encode(m["content"], add_special_tokens=False)) + 1
                          for m in example if m["role"] == "assistant") for example in examples]
    data_stats = {"trajectories": len(examples), "tokens_per_trajectory": sum(lengths) / len(lengths),
                  "max_tokens_per_trajectory": max(lengths), "max_tokens_per_turn": max(policy_lengths),
                  "turns_per_trajectory": sum(sum(m["role"] == "assistant" for m in e) for e in examples) / len(examples),
                  "parameters": sum(p.numel() for p in model.parameters())}
    if data_stats["max_tokens_per_turn"] > config.max_new_tokens:
        log(f"warning: a teacher turn takes {data_stats['max_tokens_per_turn']} tokens, more than max_new_tokens "
            f"({config.max_new_tokens}); such turns are cut when sampled.")
    log(f"tokenizer: {len(tokenizer)} tokens; {data_stats['tokens_per_trajectory']:.0f} tokens per trajectory "
        f"(max {data_stats['max_tokens_per_trajectory']}), {data_stats['turns_per_trajectory']:.1f} turns; "
        f"policy {data_stats['parameters'] / 1e6:.2f}M parameters")
    timing["data"] = time.perf_counter() - mark

    # 4. PST: two stages, each for its share of the wall-clock budget (or its number of steps).
    mark = time.perf_counter()
    (out / "sft" / "metrics.jsonl").unlink(missing_ok=True)  # a rerun into the same folder starts a new log
    sft_logger = MetricsLogger(str(out / "sft"), tensorboard=False, total=None)
    stages = []
    rng = random.Random(config.seed)
    budgets = (config.sft_seconds * config.sft_stage1_share, config.sft_seconds * (1 - config.sft_stage1_share))
    weights = (1.0, config.sft_stage2_weight)
    offset = 0
    step_budgets = config.sft_steps or (None, None)
    for number, (seconds, steps, weight, lr) in enumerate(zip(budgets, step_budgets, weights,
                                                              config.sft_learning_rates)):
        stage_examples = mix([], examples, 0, weight, rng)
        result = _sft_stage(policy, stage_examples, seconds, steps, config.sft_batch_size, lr, config.seed + number,
                            lambda step, m, o=offset: sft_logger.log(o + step, m))
        offset += result["steps"]
        stages.append({"visual_weight": weight, "learning_rate": lr, **result})
        log(f"PST stage {number + 1}: {result['steps']} steps in {result['seconds']:.0f} s, "
            f"loss {result['loss_first']:.3f} -> {result['loss_last20']:.3f}")
    sft_logger.close()
    sft_dir = str(out / "sft" / "policy")
    policy.save(sft_dir)
    timing["sft"] = time.perf_counter() - mark
    return policy, sft_dir, funnel, data_stats, stages


def run_main_job(config: MainJobConfig | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the main job (see the module docstring); writes ``<out>/results.json`` and returns its content."""
    import torch

    from rl.config import EnvConfig, PolicyConfig, RolloutConfig
    from rl.grpo import GRPO
    from rl.hf import reference_policy
    from rl.logging import MetricsLogger
    from rl.rollout import RayRollout, SerialRollout
    from rl.train import Callback, KeepBest, Trainer
    from visenv.tasks import save_tasks

    config = config or MainJobConfig()
    start = time.perf_counter()
    timing: dict[str, float] = {}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)

    # 1. Tasks: a training suite and a disjoint held-out suite.
    train_suite = _suite(config, config.train_tasks, config.train_task_seed)
    eval_suite = _suite(config, config.eval_tasks, config.eval_task_seed)
    overlap = {t.task_id for t in train_suite} & {t.task_id for t in eval_suite}
    if overlap:
        raise ConfigError(f"the held-out suite shares {len(overlap)} tasks with the training suite; change eval_task_seed.")
    train_path, eval_path = str(out / "tasks_train.jsonl"), str(out / "tasks_heldout.jsonl")
    save_tasks(train_suite, train_path)
    save_tasks(eval_suite, eval_path)
    rl_path = train_path
    (out / "tasks_rl.jsonl").unlink(missing_ok=True)  # a rerun into this folder may leave one behind
    if config.rl_task_seed is not None:  # GRPO on tasks that neither PST nor the evaluation sees
        rl_suite = _suite(config, config.train_tasks, config.rl_task_seed)
        shared = {t.task_id for t in rl_suite} & ({t.task_id for t in train_suite} | {t.task_id for t in eval_suite})
        if shared:
            raise ConfigError(f"the RL suite (rl_task_seed {config.rl_task_seed}) shares {len(shared)} tasks with the "
                              "training or held-out suite; choose another rl_task_seed.")
        rl_path = str(out / "tasks_rl.jsonl")
        save_tasks(rl_suite, rl_path)

    policy, sft_dir, funnel, data_stats, stages = _teacher_data_and_pst(config, out, train_path, timing, log)

    # 5. Evaluate the SFT-only policy on held-out tasks (before GRPO changes the weights in place).
    started_ray = False
    use_ray = "ray" in (config.eval_backend, config.rollout_backend)
    if use_ray:
        import ray
    if use_ray and not ray.is_initialized():
        # workers import visenv, rl and baselines from the same checkout as this process
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        ray.init(num_cpus=config.ray_num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
        started_ray = True
    try:
        def make_eval_rollout(temperature: float):
            """The evaluation's backend factory (``make_rollout`` of :func:`rl.evaluate.play`)."""
            if config.eval_backend == "serial":
                return lambda policy, make_env, finish: SerialRollout(policy, make_env, config.eval_envs, finish)
            make_policy = PolicyConfig(model=sft_dir, max_new_tokens=config.max_new_tokens, temperature=temperature,
                                       device="cpu").build
            return lambda policy, make_env, finish: RayRollout(
                make_policy, make_env, config.num_workers, config.eval_envs, num_cpus=config.worker_num_cpus,
                torch_threads=1, finish=finish)

        # the held-out episodes, played once per policy and mode; the report shows the first ones (sampled)
        held_out = [eval_suite[i % len(eval_suite)] for i in range(config.eval_episodes)]
        report_dir = out / "report"
        shown = min(config.report_episodes, len(held_out))
        modes = {"sampled": 1.0, **({"greedy": 0.0} if config.eval_greedy else {})}
        eval_seed = config.seed + 777
        evaluations: dict[str, dict[str, Any]] = {"sft": {}, "rl": {}}
        episodes: dict[str, dict[str, Any]] = {"sft": {}, "rl": {}}
        played: dict[str, list[Any]] = {}

        def evaluate_policy(name: str) -> None:
            for mode, temperature in modes.items():
                pictures = shown if mode == "sampled" else 0
                evaluations[name][mode], episodes[name][mode], found = _evaluate(
                    policy, make_eval_rollout, held_out, eval_seed, temperature, {"max_turns": config.max_turns},
                    report_dir, pictures)
                if pictures:
                    played[name] = found[:pictures]

        mark = time.perf_counter()
        evaluate_policy("sft")
        for mode in modes:
            s = evaluations["sft"][mode]
            log(f"SFT-only held-out ({mode}): reward {s['reward']:.3f}, success {s['success_rate']:.1%} "
                f"({s['seconds']:.0f} s)")
        timing["eval_sft"] = time.perf_counter() - mark

        # 6. GRPO in the environment, rollouts in Ray actors.
        mark = time.perf_counter()
        train_env = EnvConfig(id="visenv/VisGen-v0", options={"tasks": rl_path, "max_turns": config.max_turns})
        if config.rollout_backend == "serial":
            rollout = SerialRollout(policy, train_env.make, config.envs_per_worker * config.num_workers)
        else:
            policy_config = PolicyConfig(model=sft_dir, max_new_tokens=config.max_new_tokens, temperature=1.0,
                                         device="cpu")
            rollout = RolloutConfig(backend="ray", num_workers=config.num_workers, num_envs=config.envs_per_worker,
                                    worker_num_cpus=config.worker_num_cpus, torch_threads=1).build(
                policy, policy_config.build, train_env.make)
        grpo_config = dataclasses.replace(config.grpo, seed=config.seed)
        reference = reference_policy(policy) if grpo_config.kl_coef > 0 else None
        algorithm = GRPO(policy, reference, grpo_config)

        class Budget(Callback):
            def __init__(self) -> None:
                self.start = time.perf_counter()

            def on_step(self, iteration: int, metrics: dict[str, float]) -> bool:
                now = time.perf_counter()
                self.last = now - self.previous if hasattr(self, "previous") else now - self.start
                self.previous = now
                # stop before the next iteration would eat into the time the RL evaluation needs
                deadline = start + config.time_limit_seconds - config.safety_seconds - timing["eval_sft"]
                return now - self.start >= config.grpo_seconds or now + self.last > deadline

        grpo_dir = out / "grpo"
        (grpo_dir / "metrics.jsonl").unlink(missing_ok=True)  # a rerun into the same folder starts a new log
        keeper = KeepBest(policy, config.keep_best_window) if config.keep_best_window else None
        trainer = Trainer(policy, algorithm, rollout, iterations=config.grpo_max_iterations,
                          num_groups=grpo_config.tasks_per_iteration, group_size=grpo_config.group_size, seed=config.seed,
                          logger=MetricsLogger(str(grpo_dir), tensorboard=False, total=None),
                          callbacks=([Budget()] if config.grpo_seconds > 0 else []) + ([keeper] if keeper else []))
        try:
            history = trainer.run() if config.grpo_seconds > 0 else []
        finally:
            trainer.logger.close()
            rollout.close()
        policy.save(str(out / "rl" / "last_policy"))
        selected = {"selected_iteration": None, "selected_window_reward": None}
        if keeper is not None and keeper.restore():
            selected = {"selected_iteration": keeper.best_iteration, "selected_window_reward": keeper.best_reward}
            log(f"GRPO: the RL policy is the one that sampled iterations {keeper.best_iteration - keeper.window + 1}-"
                f"{keeper.best_iteration} (mean training reward {keeper.best_reward:.3f}, the best {keeper.window}-"
                f"iteration stretch); the last weights are in {out / 'rl' / 'last_policy'}")
        rl_dir = str(out / "rl" / "policy")
        policy.save(rl_dir)
        timing["grpo"] = time.perf_counter() - mark
        train_rewards = [h["reward"] for h in history]
        grpo_summary = {"iterations": len(history), "seconds": timing["grpo"], "tasks": train_env.options["tasks"],
                        "train_reward_first5": _head_mean(train_rewards, 5),
                        "train_reward_last5": _head_mean(train_rewards[::-1], 5),
                        "groups_skipped_mean": _head_mean([h.get("groups_skipped", float("nan")) for h in history],
                                                          len(history)),
                        "seconds_per_iteration": timing["grpo"] / max(1, len(history)), **selected}
        log(f"GRPO: {len(history)} iterations in {timing['grpo']:.0f} s; training reward "
            f"{grpo_summary['train_reward_first5']:.3f} (first 5) -> {grpo_summary['train_reward_last5']:.3f} (last 5)")

        # 7. Evaluate the RL policy on the same held-out episodes.
        mark = time.perf_counter()
        evaluate_policy("rl")
        timing["eval_rl"] = time.perf_counter() - mark
    finally:  # a failure after Ray started must not leave it running
        if started_ray:
            ray.shutdown()

    # 8. The HTML report: both policies on the first held-out episodes of their evaluations, side by side.
    report = None
    if shown:
        from rl.evaluate import run_of, write_comparison_report

        mark = time.perf_counter()
        metrics = {}
        if config.clip_model:
            from visenv.rewards.clip import ClipAlignment, ClipScorer

            scorer = (ClipScorer.tiny(out / "clip", seed=config.seed) if config.clip_model == "tiny" else
                      ClipScorer(model=config.clip_model, pretrained=config.clip_pretrained))
            metrics["clip_alignment"] = ClipAlignment(scorer)
        runs = [run_of(name, played[key], metrics=metrics)
                for name, key in (("SFT-only", "sft"), ("RL (SFT + GRPO)", "rl"))]
        written = write_comparison_report(
            runs, report_dir, f"main job: SFT-only vs RL on {shown} held-out episodes", seed=eval_seed,
            episodes=shown, env_options={"max_turns": config.max_turns}, tasks=[t.task_id for t in held_out[:shown]])
        overall = {name: run["summary"]["visgenbench"]["overall"] for name, run in written["policies"].items()}
        report = {"path": str(report_dir / "report.html"), "episodes": shown,
                  "policies": {name: {"reward": written["policies"][name]["summary"]["overall"]["reward"],
                                      "s_rate": block["s_rate"], **{m: block[m] for m in metrics}}
                               for name, block in overall.items()}}
        timing["report"] = time.perf_counter() - mark
        log(f"report: {report['path']} ({timing['report']:.0f} s)")
    timing["total"] = time.perf_counter() - start

    margin = {}
    for mode in modes:
        sft, rl = evaluations["sft"][mode], evaluations["rl"][mode]
        margin[mode] = {"reward": rl["reward"] - sft["reward"],
                        "reward_relative": (rl["reward"] - sft["reward"]) / abs(sft["reward"]) if sft["reward"] else float("nan"),
                        "success_rate": rl["success_rate"] - sft["success_rate"]}
    results = {"config": config.to_dict(), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                       "load_average": _load()},
               "funnel": funnel.to_dict() if funnel else None, "data": data_stats, "sft": {"stages": stages},
               "grpo": grpo_summary,
               "eval": {"tasks": len(eval_suite), "task_seed": config.eval_task_seed,
                        "episodes": config.eval_episodes, "seed": eval_seed},
               "evaluations": evaluations, "margin": margin, "timing": timing, "report": report,
               "time_limit_seconds": config.time_limit_seconds,
               "within_time_limit": timing["total"] <= config.time_limit_seconds}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for name in ("sft", "rl"):
        with open(out / f"episodes_{name}.jsonl", "w", encoding="utf-8") as handle:
            for mode, rows in episodes[name].items():
                for row in rows:
                    handle.write(json.dumps({"mode": mode, **row}) + "\n")
    log(format_comparison(results))
    log(f"wrote {out / 'results.json'}")
    return results


def _head_mean(values: Sequence[float], n: int) -> float:
    kept = [v for v in values[:n] if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _load() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None
