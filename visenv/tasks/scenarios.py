"""The registry of the 42 scenarios (PAPER.md section 5): 21 image and 21 video task types.

Each scenario is a seeded request template (:class:`visenv.tasks.scenario.Scenario`); its
:meth:`~visenv.tasks.scenario.Scenario.make` turns a seed into a :class:`~visenv.tasks.task.Task`.
Ids are the paper's names in snake_case, in the paper's order; the video "picture book" type is
``picture_book_video`` so that every id is unique.
"""

from __future__ import annotations

from typing import Mapping

from visenv.error import ConfigError
from visenv.tasks.image_scenarios import IMAGE_SCENARIO_LIST
from visenv.tasks.scenario import Scenario
from visenv.tasks.video_scenarios import VIDEO_SCENARIO_LIST

IMAGE_SCENARIOS: Mapping[str, Scenario] = {s.name: s for s in IMAGE_SCENARIO_LIST}
"""The 21 image scenarios by id, in the paper's order."""
VIDEO_SCENARIOS: Mapping[str, Scenario] = {s.name: s for s in VIDEO_SCENARIO_LIST}
"""The 21 video scenarios by id, in the paper's order."""
SCENARIOS: Mapping[str, Scenario] = {**IMAGE_SCENARIOS, **VIDEO_SCENARIOS}
"""All 42 scenarios by id: the image ones, then the video ones."""


def get_scenario(name: str) -> Scenario:
    """The scenario named ``name``; raises :class:`ConfigError` naming close matches."""
    try:
        return SCENARIOS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, SCENARIOS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else f" Choose one of {list(SCENARIOS)}."
        raise ConfigError(f"No scenario named {name!r}.{hint}") from None
