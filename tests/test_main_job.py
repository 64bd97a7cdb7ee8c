"""The main job (rl.jobs) end to end on a small configuration, its configuration checks, and the library
pieces it is composed of (rl.train.Budget, rl.sft.train_sft's budgets, rl.config.apply_overrides).

The small run only proves that every stage runs and that the outputs agree with each other; whether
RL beats SFT-only within 15 minutes is measured by the full job (docs/main-job.md), not here.
"""

import json
import math

import pytest
import torch

from rl.config import apply_overrides
from rl.grpo import GRPOConfig
from rl.jobs.compare import format_comparison
from rl.jobs.config import MAIN_JOB_GRPO, MainJobConfig
from rl.jobs.main_job import run_main_job


def small_config(out, **extra):
    values = {"out": str(out), "train_tasks": 24, "eval_tasks": 8, "eval_episodes": 8, "eval_greedy": False,
              "env.options.max_turns": 3, "tiny": {"vocab_size": 400, "hidden_size": 32, "num_layers": 1,
                                                   "num_heads": 2, "intermediate_size": 64},
              "stages.0.max_seconds": 3.6, "stages.1.max_seconds": 2.4, "stages.0.batch_size": 8,
              "stages.1.batch_size": 8, "grpo_seconds": 1.0, "grpo_max_iterations": 2,
              "grpo.tasks_per_iteration": 2, "grpo.group_size": 2, "grpo.warmup_steps": 2, "keep_best_window": 1,
              "policy.max_new_tokens": 24, "rollout.worker_num_cpus": 0.5, "rollout.num_envs": 2,
              "eval_rollout.worker_num_cpus": 0.5, "eval_rollout.num_envs": 8, "report_episodes": 3}
    return apply_overrides(MainJobConfig(), values | extra)


SERIAL = {"rollout.backend": "serial", "eval_rollout.backend": "serial"}


@pytest.mark.slow
def test_main_job_small_end_to_end(ray_session, tmp_path, capfd):
    lines = []
    results = run_main_job(small_config(tmp_path / "job"), log=lines.append)
    # transformers' loading/saving bars and open_clip's expected random-weight warnings stay out of the output
    printed = "".join(capfd.readouterr())
    for noise in ("Loading weights", "Writing model shards", "Model initialized randomly", "no CLIP weights"):
        assert noise not in printed
    out = tmp_path / "job"
    for name in ("results.json", "tasks_train.jsonl", "tasks_heldout.jsonl", "data/teacher.jsonl",
                 "tokenizer/tokenizer.json", "sft/policy/config.json", "rl/policy/config.json",
                 "grpo/metrics.jsonl", "episodes_sft.jsonl", "episodes_rl.jsonl"):
        assert (out / name).exists(), name
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    # held-out tasks are disjoint from the training tasks
    train = {json.loads(line)["task_id"] for line in (out / "tasks_train.jsonl").read_text().splitlines()}
    held = {json.loads(line)["task_id"] for line in (out / "tasks_heldout.jsonl").read_text().splitlines()}
    assert len(train) == 24 and len(held) == 8 and not train & held
    # by default GRPO practised on a third suite, disjoint from the teacher's tasks and the held-out ones
    practised = {json.loads(line)["task_id"] for line in (out / "tasks_rl.jsonl").read_text().splitlines()}
    assert len(practised) == 24 and not practised & (train | held)
    assert results["grpo"]["tasks"] == str(out / "tasks_rl.jsonl")  # the suite GRPO's environments were given
    funnel = results["funnel"]
    assert funnel["generated"] == 24 and funnel["kept"] + sum(funnel["dropped"].values()) == 24
    assert results["data"]["trajectories"] == funnel["kept"]
    assert [s["steps"] > 0 for s in results["sft"]["stages"]] == [True, True]
    assert 1 <= results["grpo"]["iterations"] <= 2
    # each evaluation's summary agrees with its episode rows, and the margin with the summaries
    rows = {name: [json.loads(line) for line in (out / f"episodes_{name}.jsonl").read_text().splitlines()]
            for name in ("sft", "rl")}
    for name in ("sft", "rl"):
        for mode in ("sampled",):
            summary = results["evaluations"][name][mode]
            mine = [r for r in rows[name] if r["mode"] == mode]
            assert summary["episodes"] == len(mine) == 8
            assert math.isclose(summary["reward"], sum(r["reward"] for r in mine) / 8, abs_tol=1e-9)
            assert summary["success_rate"] == sum(r["success"] for r in mine) / 8
            assert all(r["success"] == (r["rubric_total"] is not None and r["rubric_total"] >= 0.999) for r in mine)
    # both policies played the same held-out tasks
    assert ([r["task_seed"] for r in rows["sft"]] == [r["task_seed"] for r in rows["rl"]])
    assert set(results["margin"]) == {"sampled"}
    for mode in ("sampled",):
        sft, rl = results["evaluations"]["sft"][mode], results["evaluations"]["rl"][mode]
        assert math.isclose(results["margin"][mode]["reward"], rl["reward"] - sft["reward"])
        assert math.isclose(results["margin"][mode]["success_rate"], rl["success_rate"] - sft["success_rate"])
    # the teacher that wrote the data played the same 8 held-out episodes; the margin says how much of the
    # SFT-only policy's gap to it RL closed
    teacher = results["teacher"]
    assert teacher["episodes"] == 8 and 0.0 < teacher["reward"] <= 1.0
    assert results["timing"]["eval_teacher"] > 0
    gap = teacher["reward"] - results["evaluations"]["sft"]["sampled"]["reward"]
    closed = results["margin"]["sampled"]["teacher_gap_closed"]
    assert (math.isnan(closed) if gap <= 0 else math.isclose(closed, results["margin"]["sampled"]["reward"] / gap))
    assert results["timing"]["total"] >= sum(v for k, v in results["timing"].items() if k != "total") - 1e-6
    table = format_comparison(results)
    assert "RL - SFT (sampled)" in table and table in lines
    # the HTML report shows both policies on the same held-out episodes
    assert results["report"]["path"] == str(out / "report" / "report.html")
    assert f"report: {results['report']['path']}" in table
    page = (out / "report" / "report.html").read_text()
    report = json.loads((out / "report" / "results.json").read_text())
    assert list(report["policies"]) == ["SFT-only", "RL (SFT + GRPO)"] and all(
        len(p["episodes"]) == 3 for p in report["policies"].values())
    assert "SFT-only" in page and "RL (SFT + GRPO)" in page
    # the page headlines the measurement (all 8 held-out episodes, the printed table's numbers), and says the
    # tables below show the first 3
    sampled = results["evaluations"]
    assert (f"Held-out, 8 episodes on 8 tasks (sampled): SFT-only reward {sampled['sft']['sampled']['reward']:.3f}"
            in page and "show the first 3 of these episodes" in page)
    assert 'data-reward="{:.6f}"'.format(sampled["rl"]["sampled"]["reward"]) in page
    assert "reward_paired_stderr" in results["margin"]["sampled"] and "paired s.e." in table
    # the training curves: one point per GRPO iteration, the KeepBest selection shaded
    iterations, selected = results["grpo"]["iterations"], results["grpo"]["selected_iteration"]
    assert page.count('data-series="reward" data-values="') == 1 and f'data-band="{selected}-{selected}"' in page
    logged = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    values = ",".join(f"{row['reward']:.3f}" for row in logged)
    assert f'data-values="{values}"' in page and len(logged) == iterations
    from rl.jobs.report import CURVES

    drawn = [name for names in CURVES.values() for name in names if any(name in row for row in logged)]
    assert {"policy_tokens", "turns", "group_reward_std", "groups_zero_variance"} <= set(drawn)  # always logged
    for curve in drawn:
        assert f'data-series="{curve}"' in page
    assert len(report["tasks"]) == 3 and set(report["tasks"]) <= held
    # the tiny CLIP model's alignment is logged per policy (a number, or None when nothing visual was delivered)
    assert "clip_alignment" in page
    for name, figures in results["report"]["policies"].items():
        overall = report["policies"][name]["summary"]["visgenbench"]["overall"]
        assert figures == {"reward": report["policies"][name]["summary"]["overall"]["reward"], "s_rate": overall["s_rate"],
                           "clip_alignment": overall["clip_alignment"]}

    # the RL policy is the best window's (here one iteration); the last weights are saved beside it
    assert results["grpo"]["selected_iteration"] in range(results["grpo"]["iterations"])
    assert (out / "rl" / "last_policy" / "config.json").exists()
    # the GRPO settings are the nested config's (the warm-up itself is tested in test_rl_learning)
    assert results["config"]["grpo"]["group_size"] == 2 and results["config"]["grpo"]["warmup_steps"] == 2

    # a second run starts GRPO from the first run's SFT-only policy: no data, no PST, same SFT-only evaluation;
    # everything in this process (no Ray actors)
    # (into a folder with a stale GRPO log: the new run's log replaces it)
    (tmp_path / "again" / "grpo").mkdir(parents=True)
    (tmp_path / "again" / "grpo" / "metrics.jsonl").write_text('{"step": 0, "stale": 1}\n')
    (tmp_path / "again" / "tasks_rl.jsonl").write_text('{"task_id": "stale"}\n')
    # GRPO by iterations alone (no wall-clock budget, no time-limit guard): exactly grpo_max_iterations
    again = run_main_job(small_config(tmp_path / "again", sft_policy=str(out / "sft" / "policy"), report_episodes=0,
                                      rl_task_seed=None, grpo_seconds=None, stop_at_time_limit=False,
                                      time_limit_seconds=1.0, **SERIAL), log=lines.append)
    assert again["grpo"]["iterations"] == 2
    assert again["funnel"] is None and again["data"] is None and again["sft"]["stages"] == []
    assert again["report"] is None and not (tmp_path / "again" / "report").exists()
    # rl_task_seed None: GRPO practised on the training suite (no third suite is drawn; the stale one is gone)
    assert not (tmp_path / "again" / "tasks_rl.jsonl").exists()
    assert again["grpo"]["tasks"] == str(tmp_path / "again" / "tasks_train.jsonl")
    logged = [json.loads(line) for line in (tmp_path / "again" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == again["grpo"]["iterations"] and not any("stale" in row for row in logged)
    assert again["evaluations"]["sft"] == {mode: {**summary, "seconds": again["evaluations"]["sft"][mode]["seconds"]}
                                           for mode, summary in results["evaluations"]["sft"].items()}
    # the job's GRPO honours rollout.overlap: iteration it + 1 samples while update it runs, one update behind
    overlapped = run_main_job(small_config(tmp_path / "overlap", sft_policy=str(out / "sft" / "policy"),
                                           report_episodes=0, grpo_seconds=None, grpo_max_iterations=3,
                                           **{"rollout.overlap": True, "grpo.off_policy": True}, **SERIAL),
                              log=lines.append)
    logged = [json.loads(line) for line in (tmp_path / "overlap" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert overlapped["grpo"]["iterations"] == 3
    assert [row["rollout/staleness_max"] for row in logged] == [0.0, 1.0, 1.0]


@pytest.mark.slow
def test_sft_steps_make_the_sft_only_policy_the_same_on_any_machine(tmp_path):
    """With a step budget PST runs exactly those steps, so two runs of a seed train the same SFT-only policy
    whatever the machine's speed (here: the same machine, a wall-clock budget the steps never reach)."""
    from safetensors.torch import load_file

    weights, stages = [], []
    for name in ("a", "b"):
        budgets = {"stages.0.max_steps": 3, "stages.1.max_steps": 2, "stages.0.max_seconds": 30.0,
                   "stages.1.max_seconds": 30.0}
        results = run_main_job(small_config(tmp_path / name, grpo_seconds=0.0, report_episodes=0, eval_episodes=2,
                                            **budgets, **SERIAL), log=lambda line: None)
        stages.append([s["steps"] for s in results["sft"]["stages"]])
        weights.append(load_file(str(tmp_path / name / "sft" / "policy" / "model.safetensors")))
        assert [s["max_steps"] for s in results["config"]["stages"]] == [3, 2]
    assert stages == [[3, 2], [3, 2]]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("bad, word", [
    ({"eval_task_seed": 0}, "eval_task_seed"),
    ({"scenarios": ["no_such_scenario"]}, "no_such_scenario"),
    ({"rollout.num_workers": 3},
     "rollout.num_workers x rollout.worker_num_cpus \\(3 x 1.0\\) must be at most ray_num_cpus"),
    ({"eval_rollout.worker_num_cpus": 1.5}, "eval_rollout.num_workers"),
    ({"grpo.group_size": 1}, "group_size \\(1\\) must be at least 2"),
    ({"grpo.kl_coeff": 0.1}, "kl_coeff"),
    ({"rollout.backend": "gpu"}, "rollout.backend"),
    ({"rollout.overlap": True}, "set grpo.off_policy: true"),
    ({"rollout.max_staleness": 1}, "set grpo.off_policy: true"),
    ({"eval_rollout.overlap": True}, "the evaluation does not train"),
    ({"mistake_rate": 1.5}, "mistake_rate"),
    ({"tiny.hidden_size": 130}, "num_heads"),
    ({"tiny.vocab_size": 200}, "tiny.vocab_size"),
    ({"report_episodes": -1}, "report_episodes"),
    ({"keep_best_window": -1}, "keep_best_window"),
    ({"rl_task_seed": 0}, "rl_task_seed"),
    ({"stages.0.max_steps": None}, "stages.0: .* max_steps or max_seconds set"),
    ({"stages.1.visual": "mine.jsonl"}, "stages.1: visual"),
    ({"stages.0.max_steps": 0}, "max_steps \\(0\\) must be null or >= 1"),
    ({"stages.2.max_steps": 5}, "'2' is not an index of the 2-item list stages"),
    ({"stages": []}, "stages is empty"),
    ({"env.options.tasks": "image"}, "must not set 'tasks'"),
    ({"sft_policy": "/no/such/policy"}, "sft_policy"),
])
def test_main_job_config_rejects_bad_values(bad, word):
    with pytest.raises(ValueError, match=word):
        apply_overrides(MainJobConfig(), bad)


def test_command_line_overrides_reach_the_sections_on_top_of_the_job_defaults(capsys):
    from rl.cli import main
    from rl.config import parse_sets

    overrides = parse_sets(["grpo.learning_rate=5e-4", "grpo.tasks_per_iteration=8", "scenarios=[avatar]",
                            "grpo_seconds=60", "stages.1.max_steps=7"])
    assert overrides == {"grpo.learning_rate": 5e-4, "grpo.tasks_per_iteration": 8, "scenarios": ["avatar"],
                         "grpo_seconds": 60, "stages.1.max_steps": 7}
    config = apply_overrides(MainJobConfig(), overrides)
    assert config.scenarios == ["avatar"] and config.grpo.learning_rate == 5e-4 and config.grpo.tasks_per_iteration == 8
    assert isinstance(config.stages[1], type(config.stages[0])) and config.stages[1].max_steps == 7
    assert (config.stages[1].max_seconds, config.stages[0].max_steps) == (None, 291)  # the rest kept
    # overrides go on top of the main job's GRPO settings, not GRPOConfig's bare defaults
    assert ((config.grpo.warmup_steps, config.grpo.kl_coef, config.grpo.scale_rewards, config.grpo.entropy_coef)
            == (10, 0.05, False, -0.1) == tuple(MAIN_JOB_GRPO.values()))
    assert MainJobConfig().grpo == GRPOConfig(**MAIN_JOB_GRPO)
    with pytest.raises(ValueError, match="expected FIELD=VALUE"):
        parse_sets(["grpo.kl_coef"])
    assert main(["main", "--set", "no_such_field=1"]) == 2
    assert "no_such_field: unknown option" in capsys.readouterr().err
    assert main(["main", "--from-sft", "/no/such/policy"]) == 2
    assert "is not a policy folder" in capsys.readouterr().err


def test_margin_paired_standard_error_by_hand():
    from rl.jobs.compare import margin

    sft = [{"task_seed": i, "reward": r} for i, r in enumerate([0.5, 0.2, 0.9, float("nan")])]
    rl = [{"task_seed": i, "reward": r} for i, r in enumerate([0.7, 0.2, 1.0, 0.4])]
    found = margin({"reward": 0.5, "success_rate": 0.25}, {"reward": 0.6, "success_rate": 0.5}, sft, rl)
    # differences 0.2, 0.0, 0.1 (the NaN episode left out): mean 0.1, unbiased var 0.01, s.e. sqrt(0.01 / 3)
    assert found["reward_paired_stderr"] == pytest.approx((0.01 / 3) ** 0.5)
    assert found["reward"] == pytest.approx(0.1) and found["success_rate"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same episodes"):
        margin({"reward": 0.5, "success_rate": 0.0}, {"reward": 0.6, "success_rate": 0.0}, sft, rl[::-1])
    # the share of the gap to the teacher (0.9) that RL closed: 0.1 of 0.4; none when SFT-only is not below it
    with_teacher = margin({"reward": 0.5, "success_rate": 0.25}, {"reward": 0.6, "success_rate": 0.5}, sft, rl,
                          teacher={"reward": 0.9})
    assert with_teacher["teacher_gap_closed"] == pytest.approx(0.25)
    assert math.isnan(margin({"reward": 0.9, "success_rate": 0.0}, {"reward": 0.95, "success_rate": 0.0},
                             teacher={"reward": 0.9})["teacher_gap_closed"])


def test_main_job_budgets_can_be_steps_and_iterations():
    config = apply_overrides(MainJobConfig(), {"stages.0.max_steps": 291, "stages.0.max_seconds": None,
                                               "stages.1.max_steps": 197, "stages.1.max_seconds": None,
                                               "grpo_seconds": None, "grpo_max_iterations": 60,
                                               "stop_at_time_limit": False})
    assert [(s.max_steps, s.max_seconds) for s in config.stages] == [(291, None), (197, None)]
    assert (config.grpo_seconds, config.grpo_max_iterations, config.stop_at_time_limit) == (None, 60, False)
    with pytest.raises(ValueError, match="grpo_seconds \\(-1.0\\) must be >= 0"):
        apply_overrides(MainJobConfig(), {"grpo_seconds": -1.0})


def test_main_job_defaults_fit_two_cpus():
    config = MainJobConfig()
    for rollout in (config.rollout, config.eval_rollout):
        assert rollout.backend == "ray" and rollout.num_workers * rollout.worker_num_cpus <= config.ray_num_cpus == 2
    # machine-independent budgets: PST in steps, GRPO in iterations, no wall-clock cut
    assert [(s.max_seconds, s.max_steps) for s in config.stages] == [(None, 291), (None, 197)]
    assert (config.grpo_seconds, config.grpo_max_iterations, config.stop_at_time_limit) == (None, 75, False)
    assert config.eval_task_seed != config.train_task_seed and config.mistake_rate > 0


def test_budget_stops_on_iterations_seconds_or_before_a_deadline(monkeypatch):
    import rl.train

    now = [100.0]
    monkeypatch.setattr(rl.train.time, "perf_counter", lambda: now[0])

    def steps(budget, times):
        now[0] = 100.0
        budget.on_start(None)
        stops = []
        for t in times:
            now[0] = t
            stops.append(budget.on_step(len(stops), {}))
        return stops

    assert steps(rl.train.Budget(iterations=2), [101, 102, 103]) == [False, True, True]
    assert steps(rl.train.Budget(seconds=10), [105, 109.9, 110]) == [False, False, True]
    # the next iteration is expected to take as long as the last: 108 + 8 <= 120, 115 + 7 > 120
    assert steps(rl.train.Budget(deadline=120), [108, 115]) == [False, True]
    assert steps(rl.train.Budget(), [1e9]) == [False]
    with pytest.raises(ValueError, match="iterations \\(0\\)"):
        rl.train.Budget(iterations=0)


def test_train_sft_stops_at_its_step_or_time_budget():
    from rl.sft import train_sft
    from rl_helpers import echo_examples, echo_tokenizer, tiny_policy

    torch.set_num_threads(1)
    policy = tiny_policy(echo_tokenizer())
    examples = echo_examples(32, correct_share=1.0)  # 4 batches of 8 an epoch
    seen = []
    result = train_sft(policy, examples, epochs=100, batch_size=8, learning_rate=1e-3, seed=0,
                       on_step=lambda step, m: seen.append(step), max_steps=6)
    assert result["steps"] == 6 and seen == [1, 2, 3, 4, 5, 6]  # into the second epoch, then stopped
    assert train_sft(policy, examples, epochs=2, batch_size=8, learning_rate=1e-3, seed=0, max_steps=50)["steps"] == 8
    timed = train_sft(policy, examples, epochs=10_000, batch_size=8, learning_rate=1e-3, seed=0, max_seconds=0.5)
    assert 1 <= timed["steps"] < 40_000 and 0.5 <= timed["seconds"] < 30
