"""The README's Python snippet does what it says: an image task, one tool call, a positive reward."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_snippet_runs_and_earns_a_positive_reward(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python snippet"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["terminated"] and namespace["reward"] > 0
    assert namespace["info"]["checks"]["s_rate"] is True
    assert "Request:" in capsys.readouterr().out
