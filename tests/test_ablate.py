"""rl.jobs.ablate: the ablation command end to end on a tiny configuration (every variant, two seeds, in
this process), its table's arithmetic, and its argument checks. Whether the paper's directions hold at
the main job's scale is measured by the real ablation (docs/main-job.md), not here."""

import json
import math

import pytest

from rl.jobs.ablate import VARIANTS, mean_stderr, one_stage, run_ablation
from rl.jobs.config import MainJobConfig
from test_main_job import SERIAL, small_config


def tiny_base(out):
    return small_config(out, **SERIAL, **{"stages.0.max_steps": 3, "stages.1.max_steps": 2, "grpo_seconds": None,
                                          "grpo_max_iterations": 1, "stop_at_time_limit": False, "eval_tasks": 3,
                                          "eval_episodes": 3, "report_episodes": 0, "train_tasks": 12,
                                          "policy.max_new_tokens": 16})


@pytest.mark.slow
def test_ablation_runs_every_variant_on_every_seed_and_writes_the_table(tmp_path):
    lines = []
    payload = run_ablation(tiny_base(tmp_path / "unused"), [0, 1], list(VARIANTS), str(tmp_path / "ab"), lines.append)
    folder = tmp_path / "ab"
    for name in ("ablation.json", "ablation.md", "ablation.svg", "ablation_curves.svg"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "ablation.json").read_text()) == json.loads(json.dumps(payload))
    assert set(payload["runs"]) == set(VARIANTS) and all(len(runs) == 2 for runs in payload["runs"].values())
    configs = {name: json.loads((folder / name / "seed1" / "results.json").read_text())["config"] for name in VARIANTS}
    assert [(s["max_steps"]) for s in configs["one_stage_sft"]["stages"]] == [5]  # PST's 3 + 2 steps in one stage
    assert configs["turn_credit"]["grpo"]["credit"] == "turn" and configs["result_format"]["rl_rubric"] == "result_format"
    assert configs["turn_credit"]["sft_policy"] == str(folder / "main" / "seed1" / "sft" / "policy")
    assert configs["main"]["seed"] == 1 and configs["main"]["grpo"]["credit"] == "episode"
    runs = payload["runs"]
    for seed in (0, 1):
        # the variants that keep PST start from the main run's SFT-only policy: the same SFT-only evaluation
        assert runs["turn_credit"][seed]["sft"] == runs["result_format"][seed]["sft"] == runs["main"][seed]["sft"]
        assert len(runs["main"][seed]["training_reward"]) == runs["main"][seed]["iterations"] == 1
    vrl = next(row for row in payload["comparisons"] if row["comparison"] == "VRL vs SFT-only")
    differences = [runs["main"][s]["rl"] - runs["main"][s]["sft"] for s in (0, 1)]
    assert vrl["difference_per_seed"] == pytest.approx(differences)
    assert vrl["difference_stderr"] == pytest.approx(abs(differences[0] - differences[1]) / 2)
    assert len(payload["comparisons"]) == 5
    table = (folder / "ablation.md").read_text()
    assert "| VRL vs SFT-only | main/sft | main/rl |" in table and table.strip() in "\n".join(lines)
    assert (folder / "ablation.svg").read_text().count('data-series="RL"') == len(VARIANTS)
    # a second call reads every run back instead of running it again
    again = []
    assert run_ablation(tiny_base(tmp_path / "unused"), [0, 1], list(VARIANTS), str(folder), again.append) == payload
    assert sum("read back" in line for line in again) == 2 * len(VARIANTS)


def test_mean_stderr_and_one_stage_by_hand():
    # values 1, 2, 4: mean 7/3, unbiased var ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3, s.e. sqrt(7/9)
    mean, stderr = mean_stderr([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and stderr == pytest.approx(math.sqrt(7 / 9))
    assert math.isnan(mean_stderr([1.0])[1])
    merged = one_stage(MainJobConfig())
    assert len(merged.stages) == 1 and merged.stages[0].max_steps == 291 + 197 and merged.stages[0].max_seconds is None
    assert merged.stages[0].learning_rate == MainJobConfig().stages[0].learning_rate


def test_ablation_refuses_unknown_variants_and_a_missing_main(tmp_path, capsys):
    from rl.cli import main

    with pytest.raises(ValueError, match="non-empty subset"):
        run_ablation(MainJobConfig(), [0], ["no_such"], str(tmp_path))
    with pytest.raises(ValueError, match="add 'main'"):
        run_ablation(MainJobConfig(), [0], ["turn_credit"], str(tmp_path))
    assert main(["ablate", "--set", "no_such_field=1"]) == 2
    assert "no_such_field: unknown option" in capsys.readouterr().err
