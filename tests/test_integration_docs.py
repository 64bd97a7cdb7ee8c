"""docs/integrations.md: the snippets that need no download or GPU run as written."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


def blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_trl_snippet_plays_an_episode_by_hand(capsys):
    namespace: dict = {}
    exec(compile(blocks()[0], "integrations.md (TRL)", "exec"), namespace)
    out = capsys.readouterr().out
    assert out.startswith("Request: ") and '"status": "ok"' in out
    assert namespace["env"].session.ended


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_skyrl_snippet_steps_through_skyrl_gym(capsys):
    namespace: dict = {}
    exec(compile(blocks()[2], "integrations.md (SkyRL)", "exec"), namespace)
    assert namespace["out"]["done"] is False and '"status": "ok"' in capsys.readouterr().out
