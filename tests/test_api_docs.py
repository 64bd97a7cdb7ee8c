"""The API reference builds from the docstrings (pdoc) and documents the public entry points."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_api_reference_builds_from_docstrings(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "scripts" / "api_docs.sh"), str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    env_page = (tmp_path / "visenv" / "envs" / "visgen.html").read_text()
    assert "VisGenEnv" in env_page and "Version history" in env_page
    assert "LtrReward" in (tmp_path / "visenv" / "rewards.html").read_text()
    assert (tmp_path / "rl.html").exists() and (tmp_path / "baselines.html").exists()
