"""scripts/temperature_table.py: the per-policy summary it tabulates (reward, rubric, penalty, ids)."""

import importlib.util
import os
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


@pytest.fixture(scope="module")
def table():
    sys.path.insert(0, SCRIPTS)
    try:
        spec = importlib.util.spec_from_file_location("temperature_table", os.path.join(SCRIPTS, "temperature_table.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(SCRIPTS)


def episode(total, reward, observation="ok", checks=None):
    action = '<think>Needs: 1 image(s)</think><tool_call>{"name": "t", "arguments": {"n": 1}}</tool_call>'
    return {"reward": reward, "components": {"total": total}, "checks": checks or {},
            "trajectory": [{"action": action, "observation": "ok"},
                           {"action": "<answer>Delivered: img_000000000001</answer>", "observation": observation}]}


def test_summary_counts_penalty_success_and_invented_ids(table):
    invented = "The answer cites img_000000000001, which is not an artifact of this episode."
    rows = [episode(1.0, 1.0), episode(1.0, 0.95, invented), episode(0.5, 0.4, invented), episode(None, 0.0)]
    summary = table.summarise(rows)
    assert summary["episodes"] == 4 and summary["episodes_citing_invented_id"] == 2
    assert summary["reward"] == pytest.approx((1.0 + 0.95 + 0.4 + 0.0) / 4)
    assert summary["rubric_total"] == pytest.approx(2.5 / 4)  # a missing total counts as 0
    assert summary["turn_error_penalty"] == pytest.approx((0.05 + 0.1) / 4)
    assert summary["success_rate"] == pytest.approx(0.5)


def test_missing_run_folder_says_what_to_run(table, tmp_path):
    with pytest.raises(SystemExit, match=r"no readable results.json.*rl.cli main --seed 3"):
        table.main(["--runs", str(tmp_path), "--seeds", "3"])
