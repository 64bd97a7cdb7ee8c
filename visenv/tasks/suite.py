"""Task suites: training suites cycling through the scenarios, and the VisGenBench composition.

VisGenBench (PAPER.md section 6) has 1,200 tasks, 400 image and 800 video, over nine dimensions.
:func:`visgenbench` rebuilds that composition from a seed: each dimension's tasks are spread evenly
over the scenarios that can probe it (consistency needs a workflow that generates images, so the
text-to-video scenarios sit those out), and each task is its scenario's template biased toward the
dimension (see :meth:`visenv.tasks.scenario.Scenario.make`).
"""

from __future__ import annotations

import itertools
import random
from typing import Mapping, Sequence

from visenv.error import ConfigError
from visenv.tasks.scenarios import SCENARIOS, get_scenario
from visenv.tasks.task import MODALITIES, Task

BENCH_DIMENSIONS: Mapping[str, tuple[int, int]] = {
    "content_creative": (50, 50),
    "content_match": (50, 50),
    "object_consistency": (50, 50),
    "scene_consistency": (50, 50),
    "style_consistency": (50, 50),
    "variety": (50, 50),
    "visual_amount": (100, 100),
    "video_duration": (0, 200),
    "video_storyboard": (0, 200),
}
"""VisGenBench tasks per dimension, as (image, video) counts: 400 image + 800 video = 1,200."""
SEED_SPACE = 2**31
"""Task seeds are drawn from range(SEED_SPACE)."""


def make_suite(n: int, seed: int, modality: str | None = None,
               scenarios: Sequence[str] | None = None) -> list[Task]:
    """``n`` tasks with distinct seeds, cycling through the scenarios so that each appears.

    Without an explicit ``scenarios`` list the cycle alternates image and video scenarios (in the
    paper's order within each), so any ``n`` covers both modalities and ``n >= 42`` every scenario.

    Args:
        n: how many tasks.
        seed: the suite's seed; the same arguments always give the same tasks.
        modality: keep only "image" or "video" scenarios; None keeps both.
        scenarios: scenario ids to cycle through, in this order; None means all of them, image and
            video alternating.

    Raises:
        ConfigError: ``n`` is negative, a scenario id is unknown, or no scenario is left.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n ({n!r}) must be a non-negative integer")
    if modality is not None and modality not in MODALITIES:
        raise ConfigError(f"modality ({modality!r}) must be None or one of {MODALITIES}")
    chosen = [get_scenario(name) for name in (_alternating_modalities() if scenarios is None else scenarios)]
    chosen = [s for s in chosen if modality is None or s.modality == modality]
    if not chosen:
        raise ConfigError(f"no scenario is left to draw from (scenarios={scenarios!r}, "
                          f"modality={modality!r}); pass scenarios of that modality")
    seeds = random.Random(f"suite/{seed}").sample(range(SEED_SPACE), n)
    return [chosen[i % len(chosen)].make(task_seed) for i, task_seed in enumerate(seeds)]


def _alternating_modalities() -> list[str]:
    """Every scenario id, image and video alternating (each modality in the paper's order)."""
    by_modality = [[name for name, s in SCENARIOS.items() if s.modality == m] for m in MODALITIES]
    return [name for pair in itertools.zip_longest(*by_modality) for name in pair if name is not None]


def visgenbench(seed: int = 0) -> list[Task]:
    """The 1,200 VisGenBench tasks with the paper's per-dimension counts (:data:`BENCH_DIMENSIONS`).

    Tasks come grouped by dimension, image before video; every task has a distinct seed and its
    ``dimension`` set. Within a dimension, scenario counts differ by at most one.
    """
    rng = random.Random(f"visgenbench/{seed}")
    seeds = iter(rng.sample(range(SEED_SPACE), sum(sum(c) for c in BENCH_DIMENSIONS.values())))
    tasks = []
    for dimension, counts in BENCH_DIMENSIONS.items():
        for modality, count in zip(MODALITIES, counts):
            eligible = [s for s in SCENARIOS.values() if s.modality == modality and s.supports(dimension)]
            rng.shuffle(eligible)
            tasks += [eligible[i % len(eligible)].make(next(seeds), dimension) for i in range(count)]
    return tasks


def split_suite(tasks: Sequence[Task], held_out_fraction: float, seed: int) -> tuple[list[Task], list[Task]]:
    """Split tasks into (train, held_out) by task seed, keeping each side in the input order.

    Tasks that share a seed land on the same side, so no held-out request has a training twin
    drawn from the same seed.

    Args:
        tasks: the tasks to split.
        held_out_fraction: share of the distinct task seeds to hold out, in [0, 1].
        seed: the split's seed; the same arguments always give the same split.

    Raises:
        ConfigError: ``held_out_fraction`` is outside [0, 1].
    """
    if isinstance(held_out_fraction, bool) or not isinstance(held_out_fraction, (int, float)) or not (
            0 <= held_out_fraction <= 1):
        raise ConfigError(f"held_out_fraction ({held_out_fraction!r}) must be a number in [0, 1]")
    task_seeds = sorted({task.seed for task in tasks})
    random.Random(f"split/{seed}").shuffle(task_seeds)
    held = set(task_seeds[:round(held_out_fraction * len(task_seeds))])
    return [t for t in tasks if t.seed not in held], [t for t in tasks if t.seed in held]
