"""Every example runs (as a user would run it, in a subprocess) with small settings."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_step_by_hand():
    out = run_example("step_by_hand.py", "--seed", "0")
    assert out.startswith("Request: ")
    assert re.search(r"--- answer: terminated=True reward=1\.000", out)
    assert "'s_rate': True, 'amount': True" in out


def test_custom_policy():
    out = run_example("custom_policy.py", "--n", "6")
    rewards = dict(re.findall(r"(one-tool policy|random|workflow teacher) (-?\d\.\d+)", out.splitlines()[-1]))
    assert float(rewards["workflow teacher"]) > float(rewards["one-tool policy"]) > float(rewards["random"])


def test_build_cache(tmp_path):
    out = run_example("build_cache.py", "--cache", str(tmp_path / "cache"), "--n", "3")
    assert re.search(r"record: \d+ text-to-image outputs, by backend \{'real': \d+\}", out)
    assert "all from the exact cache: True, identical to the recording: True" in out
    again = run_example("build_cache.py", "--cache", str(tmp_path / "cache"), "--n", "3")
    assert re.search(r"by backend \{'exact_cache': \d+\}", again)  # a second build finds everything cached


@pytest.mark.slow
def test_rllib_ppo(tmp_path):
    out = run_example("rllib_ppo.py", "--iterations", "1", "--batch", "200", "--eval-episodes", "5",
                      "--json", str(tmp_path / "rllib.json"))
    figures = json.loads((tmp_path / "rllib.json").read_text())
    assert figures["iterations"] == 1 and len(figures["sampled_returns"]) == 1
    assert f"PPO (greedy) {figures['ppo_greedy']:.3f}, random {figures['random']:.3f}" in out


@pytest.mark.slow
def test_grpo_ray(tmp_path):
    # The example starts its own local Ray (2 CPUs, 2 workers x 1 CPU) in the subprocess, apart from
    # any Ray of this test session. Margins after 20 iterations were +0.10 to +0.22 over seeds 0-4.
    out = run_example("grpo_ray.py", "--iterations", "20", "--eval-episodes", "128", "--seed", "1",
                      "--out", str(tmp_path / "run"), "--json", str(tmp_path / "grpo.json"))
    figures = json.loads((tmp_path / "grpo.json").read_text())
    assert len(set(figures["worker_pids"])) == 2 and figures["driver_pid"] not in figures["worker_pids"]
    assert figures["iterations"] == 20 and len(re.findall(r"^iteration +\d+ +reward", out, re.M)) == 20
    assert figures["after"] >= figures["before"] + 0.05, figures
    assert f"before {figures['before']:.3f}, after {figures['after']:.3f}" in out
    assert (tmp_path / "run" / "checkpoints" / "iter_000020" / "policy" / "config.json").exists()
