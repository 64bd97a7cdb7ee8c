"""The main job: teacher data -> tokenizer -> PST (two stages) -> GRPO on Ray -> held-out evaluation.

``python -m rl.cli main`` (``bash scripts/main.sh``) runs :func:`run_main_job` on the embedded
defaults of :class:`~rl.jobs.config.MainJobConfig`, sized to finish within 15 minutes on a 2-core CPU
machine. Each step is a library piece:

1. **Tasks.** A training suite and a held-out suite of the real VisGen environment (real tools'
   attribute tier, real LtrReward rubric), drawn with different task seeds from the same scenarios
   (:func:`visenv.tasks.make_suite`); the suites are checked to share no task.
2. **Data.** The scripted teacher plays the training suite with a mistake rate and the funnel of
   :func:`baselines.data.build_dataset` filters it (LtrReward below ``min_reward`` dropped) into chat JSONL.
3. **Tokenizer.** A byte-level BPE trained on the data's texts (:func:`rl.tokenizer.train_tokenizer`).
4. **PST.** A tiny Llama from scratch, trained by :func:`rl.sft.run_pst` in two stages, each with a
   budget (:class:`rl.sft.SFTStage` ``max_seconds`` / ``max_steps``). This is the *SFT-only* policy.
5. **GRPO** (:class:`rl.grpo.GRPO`) inside the environment by :class:`rl.train.Trainer`, rollouts in Ray
   actors on a local Ray (:func:`rl.config.start_ray`), stopped by :class:`rl.train.Budget`, the best
   stretch kept by :class:`rl.train.KeepBest`.
6. **Evaluation.** The SFT-only and the RL policy play the same held-out episodes (same task and
   sampling seeds: episode ``i`` is held-out task ``i``, seed ``seed + 777 + i``), once each, through the
   one episode runner (:func:`rl.jobs.compare.evaluate_policy` -> :func:`rl.evaluate.play`), sampled at
   temperature 1 and greedily; the scripted teacher that wrote the data plays the same episodes
   (:func:`evaluate_teacher`: the reward SFT imitates); ``results.json`` holds all of them, and a
   comparison table is printed. The HTML
   report shows the first ``report_episodes`` of the sampled ones side by side
   (:func:`rl.evaluate.write_comparison_report`).

Why the default VisGen configuration is smaller than the full benchmark (docs/main-job.md): with a BPE
tokenizer a full VisGen teacher trajectory averages ~1,700 tokens over ~9 turns (video scenarios
2,000-3,300 tokens over 12-18 turns), which a 0.5M-parameter policy cannot learn and explore within 15
minutes on two cores. The defaults keep the three image scenarios with the shortest workflows (3
turns, ~350 tokens with the teacher's ``reflect=False``), which is the real environment and rubric on
a subset of its scenarios.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from baselines.data import DataConfig, build_dataset
from baselines.workflow_agent import WorkflowAgent
from rl.config import EnvConfig, RolloutConfig, start_ray
from rl.evaluate import MakeRollout, run_of, write_comparison_report
from rl.grpo import GRPO
from rl.hf import CausalLMPolicy, reference_policy, tiny_causal_lm
from rl.jobs.compare import evaluate_policy, format_comparison, margin
from rl.jobs import report as job_report
from rl.jobs.config import MainJobConfig
from rl.logging import MetricsLogger, read_metrics
from rl.sft import chat_segments, load_chat_jsonl, run_pst
from rl.tokenizer import train_tokenizer
from rl.train import Budget, KeepBest, Trainer
from visenv.error import ConfigError
from visenv.tasks import make_suite, save_tasks

Log = Callable[[str], None]


def run_main_job(config: MainJobConfig | None = None, log: Log = print) -> dict[str, Any]:
    """Run the main job (see the module docstring); writes ``<out>/results.json`` and returns its content."""
    config = config or MainJobConfig()
    start = time.perf_counter()
    timing: dict[str, float] = {}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)
    with _quiet_loading():
        suites = draw_suites(config, out)
        policy, sft_dir, funnel, data_stats, stages = sft_only(config, out, suites["train"], timing, log)
        modes = {"sampled": 1.0, **({"greedy": 0.0} if config.eval_greedy else {})}
        eval_seed = config.seed + 777
        # the held-out episodes (episode i: held-out task i mod n, seed eval_seed + i), played once per
        # policy and mode through the one runner; the report shows the first ones of the sampled mode
        heldout = suites["heldout_tasks"]
        held_out = [heldout[i % len(heldout)] for i in range(config.eval_episodes)]
        report_dir = out / "report"
        shown = min(config.report_episodes, len(held_out))
        evaluations: dict[str, dict[str, Any]] = {"sft": {}, "rl": {}}
        episodes: dict[str, dict[str, Any]] = {"sft": {}, "rl": {}}
        played: dict[str, list[Any]] = {}

        def evaluate(name: str) -> None:
            for mode, temperature in modes.items():
                pictures = shown if mode == "sampled" else 0
                evaluations[name][mode], episodes[name][mode], found = evaluate_policy(
                    policy, _eval_rollout(config, sft_dir, temperature), held_out, eval_seed, temperature,
                    dict(config.env.options), report_dir, pictures)
                if pictures:
                    played[name] = found[:pictures]

        started_ray = start_ray(num_cpus=config.ray_num_cpus, log_to_driver=False) if config.uses_ray else False
        try:
            mark = time.perf_counter()
            teacher = evaluate_teacher(config, held_out, eval_seed)
            timing["eval_teacher"] = time.perf_counter() - mark
            log(f"teacher held-out (mistake rate {config.mistake_rate}): reward {teacher['reward']:.3f}, "
                f"success {teacher['success_rate']:.1%} ({timing['eval_teacher']:.0f} s)")
            mark = time.perf_counter()
            evaluate("sft")  # before GRPO changes the weights in place
            timing["eval_sft"] = time.perf_counter() - mark
            for mode, s in evaluations["sft"].items():
                log(f"SFT-only held-out ({mode}): reward {s['reward']:.3f}, success {s['success_rate']:.1%} "
                    f"({s['seconds']:.0f} s)")
            mark = time.perf_counter()
            # stop before the next iteration would eat into the time the RL evaluation needs
            deadline = start + config.time_limit_seconds - config.safety_seconds - timing["eval_sft"]
            practice = _env(config, suites["rl"])
            if config.rl_rubric is not None:  # GRPO's reward only: the evaluations keep the env's rubric
                practice = dataclasses.replace(practice, options={**practice.options, "rubric": config.rl_rubric})
            grpo_summary = grpo(config, policy, sft_dir, practice, out, deadline, log)
            timing["grpo"] = grpo_summary["seconds"] = time.perf_counter() - mark
            grpo_summary["seconds_per_iteration"] = timing["grpo"] / max(1, grpo_summary["iterations"])
            mark = time.perf_counter()
            evaluate("rl")
            timing["eval_rl"] = time.perf_counter() - mark
        finally:  # a failure after Ray started must not leave it running
            if started_ray:
                import ray

                ray.shutdown()

        margins = {mode: margin(evaluations["sft"][mode], evaluations["rl"][mode], episodes["sft"][mode],
                                episodes["rl"][mode], teacher) for mode in modes}
        results = {"config": config.to_dict(), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                           "load_average": _load()},
                   "funnel": funnel.to_dict() if funnel else None, "data": data_stats, "sft": {"stages": stages},
                   "grpo": grpo_summary,
                   "eval": {"tasks": len(suites["heldout_tasks"]), "task_seed": config.eval_task_seed,
                            "episodes": config.eval_episodes, "seed": eval_seed},
                   "evaluations": evaluations, "teacher": teacher, "margin": margins, "timing": timing, "report": None,
                   "time_limit_seconds": config.time_limit_seconds}
        if shown:
            mark = time.perf_counter()
            metrics_path = out / "grpo" / "metrics.jsonl"
            history = read_metrics(str(metrics_path)) if grpo_summary["iterations"] else []
            results["report"] = policy_report(config, played, held_out[:shown], report_dir, out, eval_seed,
                                              job_report.preface(results, history, config.keep_best_window),
                                              job_report.headline(results, shown))
            timing["report"] = time.perf_counter() - mark
            log(f"report: {results['report']['path']} ({timing['report']:.0f} s)")
    timing["total"] = time.perf_counter() - start
    results["within_time_limit"] = timing["total"] <= config.time_limit_seconds
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for name, by_mode in episodes.items():
        with open(out / f"episodes_{name}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"mode": mode, **row}) + "\n"
                              for mode, rows in by_mode.items() for row in rows)
    log(format_comparison(results))
    log(f"wrote {out / 'results.json'}")
    return results


def evaluate_teacher(config: MainJobConfig, held_out: Sequence, eval_seed: int) -> dict[str, Any]:
    """The scripted teacher that wrote the SFT data (its ``mistake_rate`` and ``reflect``) on the held-out
    episodes the policies play (same tasks and seeds), serially in the driver: the reward that SFT imitates
    and the reference of ``margin.<mode>.teacher_gap_closed``. Returns its summary."""
    make_teacher = functools.partial(WorkflowAgent, seed=config.seed, mistake_rate=config.mistake_rate,
                                     reflect=config.reflect)
    summary, _, _ = evaluate_policy(make_teacher, None, held_out, eval_seed, None, dict(config.env.options))
    return summary


def draw_suites(config: MainJobConfig, out: Path) -> dict[str, Any]:
    """Step 1: the training, held-out and (with ``rl_task_seed``) RL suites, written as JSONL under ``out``.

    Returns the paths (``train``, ``heldout``, ``rl``: the training suite's when there is no RL suite)
    and the held-out tasks (``heldout_tasks``). Raises ConfigError when two suites share a task.
    """
    train = make_suite(config.train_tasks, config.train_task_seed, scenarios=config.scenarios)
    heldout = make_suite(config.eval_tasks, config.eval_task_seed, scenarios=config.scenarios)
    _check_disjoint(heldout, train, "the held-out suite", "eval_task_seed")
    paths = {"train": str(out / "tasks_train.jsonl"), "heldout": str(out / "tasks_heldout.jsonl")}
    save_tasks(train, paths["train"])
    save_tasks(heldout, paths["heldout"])
    paths["rl"] = paths["train"]
    (out / "tasks_rl.jsonl").unlink(missing_ok=True)  # a rerun into this folder may leave one behind
    if config.rl_task_seed is not None:  # GRPO on tasks that neither PST nor the evaluation sees
        practice = make_suite(config.train_tasks, config.rl_task_seed, scenarios=config.scenarios)
        _check_disjoint(practice, train + heldout, f"the RL suite (rl_task_seed {config.rl_task_seed})",
                        "rl_task_seed")
        paths["rl"] = str(out / "tasks_rl.jsonl")
        save_tasks(practice, paths["rl"])
    return {**paths, "heldout_tasks": heldout}


def _check_disjoint(suite: Sequence, others: Sequence, name: str, seed_field: str) -> None:
    shared = {t.task_id for t in suite} & {t.task_id for t in others}
    if shared:
        raise ConfigError(f"{name} shares {len(shared)} tasks with the other suites; choose another {seed_field}.")


def sft_only(config: MainJobConfig, out: Path, train_path: str, timing: dict[str, float], log: Log):
    """Steps 2-4, or the ``sft_policy`` of an earlier run: ``(policy, sft_dir, funnel, data_stats, stages)``.

    ``timing`` gets ``data`` and ``sft`` (0 when loaded); ``funnel``, ``data_stats`` are None and
    ``stages`` empty when the policy is loaded.
    """
    if config.sft_policy:
        policy = dataclasses.replace(config.policy, model=config.sft_policy, temperature=1.0).build()
        log(f"SFT-only policy loaded from {config.sft_policy} (teacher data and PST skipped)")
        timing["data"] = timing["sft"] = 0.0
        return policy, config.sft_policy, None, None, []
    mark = time.perf_counter()
    funnel, data_path = teacher_data(config, out, train_path)
    log(funnel.format())
    policy, data_stats = tiny_policy(config, out, data_path, log)
    timing["data"] = time.perf_counter() - mark
    mark = time.perf_counter()
    stages = pst(config, policy, data_path, out, log)
    sft_dir = str(out / "sft" / "policy")
    policy.save(sft_dir)
    timing["sft"] = time.perf_counter() - mark
    return policy, sft_dir, funnel, data_stats, stages


def teacher_data(config: MainJobConfig, out: Path, train_path: str):
    """Step 2: the teacher plays the training suite; the funnel keeps the good trajectories. (funnel, path)"""
    path = str(out / "data" / "teacher.jsonl")
    funnel = build_dataset(DataConfig(out=path, num_tasks=config.train_tasks, tasks=train_path, seed=config.seed,
                                      mistake_rate=config.mistake_rate, reflect=config.reflect,
                                      min_reward=config.min_reward, env=dict(config.env.options)))
    return funnel, path


def tiny_policy(config: MainJobConfig, out: Path, data_path: str, log: Log) -> tuple[CausalLMPolicy, dict[str, Any]]:
    """Step 3: a BPE tokenizer trained on the data (saved under ``out/tokenizer``) and a tiny Llama from scratch.

    Returns the policy and the data's token statistics.
    """
    examples = load_chat_jsonl(data_path)
    tiny = config.tiny
    tokenizer = train_tokenizer([m["content"] for example in examples for m in example], tiny.vocab_size,
                                id_pairs=tiny.id_pairs)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    model = tiny_causal_lm(len(tokenizer), tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.intermediate_size,
                           seed=config.seed)
    policy = CausalLMPolicy(model, tokenizer, chat=config.policy.chat, max_new_tokens=config.policy.max_new_tokens,
                            temperature=1.0)
    lengths = [sum(len(s.token_ids) for s in chat_segments(policy, example)) for example in examples]
    policy_lengths = [max(len(tokenizer.encode(m["content"], add_special_tokens=False)) + 1
                          for m in example if m["role"] == "assistant") for example in examples]
    stats = {"trajectories": len(examples), "tokens_per_trajectory": sum(lengths) / len(lengths),
             "max_tokens_per_trajectory": max(lengths), "max_tokens_per_turn": max(policy_lengths),
             "turns_per_trajectory": sum(sum(m["role"] == "assistant" for m in e) for e in examples) / len(examples),
             "parameters": sum(p.numel() for p in model.parameters())}
    if stats["max_tokens_per_turn"] > config.policy.max_new_tokens:
        log(f"warning: a teacher turn takes {stats['max_tokens_per_turn']} tokens, more than policy.max_new_tokens "
            f"({config.policy.max_new_tokens}); such turns are cut when sampled.")
    log(f"tokenizer: {len(tokenizer)} tokens; {stats['tokens_per_trajectory']:.0f} tokens per trajectory "
        f"(max {stats['max_tokens_per_trajectory']}), {stats['turns_per_trajectory']:.1f} turns; "
        f"policy {stats['parameters'] / 1e6:.2f}M parameters")
    return policy, stats


def pst(config: MainJobConfig, policy: CausalLMPolicy, data_path: str, out: Path, log: Log) -> list[dict[str, Any]]:
    """Step 4: the PST stages on the teacher data, each to its budget; metrics to ``out/sft/metrics.jsonl``.

    Returns one summary per stage (its settings, steps, seconds, first loss and mean of the last 20).
    """
    (out / "sft" / "metrics.jsonl").unlink(missing_ok=True)  # a rerun into the same folder starts a new log
    logger = MetricsLogger(str(out / "sft"), tensorboard=False, total=None)
    losses: list[float] = []

    def on_step(step: int, metrics: dict[str, float]) -> None:
        losses.append(metrics["sft_loss"])
        logger.log(len(losses), metrics)  # one step count across the stages

    stages = [dataclasses.replace(stage, visual=data_path) for stage in config.stages]
    try:
        results = run_pst(policy, stages, config.seed, on_step=on_step)
    finally:
        logger.close()
    summaries, done = [], 0
    for number, (stage, result) in enumerate(zip(stages, results)):
        steps = int(result["steps"])
        mine, done = losses[done:done + steps], done + steps
        summaries.append({"visual_weight": stage.visual_weight, "learning_rate": stage.learning_rate, "steps": steps,
                          "seconds": result["seconds"], "loss_first": mine[0],
                          "loss_last20": sum(mine[-20:]) / len(mine[-20:])})
        log(f"PST stage {number + 1}: {steps} steps in {result['seconds']:.0f} s, "
            f"loss {mine[0]:.3f} -> {summaries[-1]['loss_last20']:.3f}")
    return summaries


def grpo(config: MainJobConfig, policy: CausalLMPolicy, sft_dir: str, env: EnvConfig, out: Path, deadline: float,
         log: Log) -> dict[str, Any]:
    """Step 5: GRPO from the SFT-only policy until ``grpo_seconds`` or ``grpo_max_iterations`` (or ``deadline``,
    when ``stop_at_time_limit``) is spent.

    Saves ``out/rl/last_policy`` (the last weights) and ``out/rl/policy`` (the :class:`~rl.train.KeepBest`
    selection, or the last weights); returns the run's summary.
    """
    settings = dataclasses.replace(config.grpo, seed=config.seed)
    history: list[dict[str, float]] = []
    keeper = KeepBest(policy, config.keep_best_window) if config.keep_best_window else None
    if config.grpo_seconds is None or config.grpo_seconds > 0:
        rollout = _rollout(config, config.rollout, policy, sft_dir, env, 1.0)
        (out / "grpo" / "metrics.jsonl").unlink(missing_ok=True)  # a rerun into the same folder starts a new log
        algorithm = GRPO(policy, reference_policy(policy) if settings.kl_coef > 0 else None, settings)
        budget = Budget(seconds=config.grpo_seconds, deadline=deadline if config.stop_at_time_limit else None)
        callbacks = [budget, *([keeper] if keeper else [])]
        trainer = Trainer(policy, algorithm, rollout, iterations=config.grpo_max_iterations,
                          num_groups=settings.tasks_per_iteration, group_size=settings.group_size, seed=config.seed,
                          max_staleness=config.rollout.max_staleness, overlap=config.rollout.overlap,
                          logger=MetricsLogger(str(out / "grpo"), tensorboard=False, total=None), callbacks=callbacks)
        try:
            history = trainer.run()
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
    policy.save(str(out / "rl" / "policy"))
    rewards = [h["reward"] for h in history]
    summary = {"iterations": len(history), "tasks": env.options["tasks"],
               "train_reward_first5": _head_mean(rewards, 5), "train_reward_last5": _head_mean(rewards[::-1], 5),
               "groups_skipped_mean": _head_mean([h.get("groups_skipped", float("nan")) for h in history],
                                                 len(history)), **selected}
    log(f"GRPO: {len(history)} iterations; training reward {summary['train_reward_first5']:.3f} (first 5) -> "
        f"{summary['train_reward_last5']:.3f} (last 5)")
    return summary


def policy_report(config: MainJobConfig, played: dict[str, list[Any]], tasks: Sequence, report_dir: Path,
                  out: Path, seed: int, preface: str = "", headline: str | None = None) -> dict[str, Any]:
    """Step 6b: the HTML report of both policies on the first held-out episodes of their sampled evaluations,
    under ``preface`` (the job's held-out table and training curves, :mod:`rl.jobs.report`) and ``headline``."""
    metrics = {}
    if config.clip_model:
        from visenv.rewards.clip import ClipAlignment, ClipScorer

        scorer = (ClipScorer.tiny(out / "clip", seed=config.seed) if config.clip_model == "tiny" else
                  ClipScorer(model=config.clip_model, pretrained=config.clip_pretrained))
        metrics["clip_alignment"] = ClipAlignment(scorer)
    runs = [run_of(name, played[key], metrics=metrics) for name, key in (("SFT-only", "sft"), ("RL (SFT + GRPO)", "rl"))]
    written = write_comparison_report(runs, report_dir, "main job: SFT-only vs RL on held-out episodes",
                                      preface=preface, headline=headline, seed=seed, episodes=len(tasks), env_options=dict(config.env.options),
                                      tasks=[t.task_id for t in tasks])
    overall = {name: run["summary"]["visgenbench"]["overall"] for name, run in written["policies"].items()}
    return {"path": str(report_dir / "report.html"), "episodes": len(tasks),
            "policies": {name: {"reward": written["policies"][name]["summary"]["overall"]["reward"],
                                "s_rate": block["s_rate"], **{m: block[m] for m in metrics}}
                         for name, block in overall.items()}}


def _env(config: MainJobConfig, tasks_path: str) -> EnvConfig:
    return dataclasses.replace(config.env, options={**config.env.options, "tasks": tasks_path})


def _rollout(config: MainJobConfig, settings: RolloutConfig, policy: CausalLMPolicy, sft_dir: str, env: EnvConfig,
             temperature: float):
    """The rollout of ``settings``; Ray workers load ``sft_dir`` and receive the learner's weights."""
    return settings.build(policy, _make_policy(config, sft_dir, temperature), env.make)


def _eval_rollout(config: MainJobConfig, sft_dir: str, temperature: float) -> MakeRollout:
    """The evaluation's backend (``make_rollout`` of :func:`rl.evaluate.play`): ``config.eval_rollout``."""
    make_policy = _make_policy(config, sft_dir, temperature)
    return lambda policy, make_env, finish: config.eval_rollout.build(policy, make_policy, make_env, finish)


def _make_policy(config: MainJobConfig, sft_dir: str, temperature: float) -> Callable[[], CausalLMPolicy]:
    """What a Ray worker calls to load its copy of the policy (the learner's weights follow)."""
    return dataclasses.replace(config.policy, model=sft_dir, temperature=temperature).build


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Keep transformers' loading bars and open_clip's (expected) random-weight warnings out of the job's output."""
    import transformers

    class RandomClipWeights(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            return not ("no CLIP weights found" in message or "Model initialized randomly" in message)

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    quiet = RandomClipWeights()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)
        transformers.logging.enable_progress_bar()
        transformers.logging.set_verbosity(verbosity)


def _head_mean(values: Sequence[float], n: int) -> float:
    kept = [v for v in values[:n] if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _load() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None
