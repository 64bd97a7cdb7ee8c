"""The benchmark report page: VisGenBench-style tables, reward plots and a trajectory viewer.

``report.html`` is one self-contained file (inline CSS, inline SVG charts and one small inline
script) plus the ``media/`` folder of PNGs it links by relative path, so it works offline and can be
moved with its folder. Sections:

* **VisGenBench scores**: the nine dimensions, S-Rate and O-Score* per group (overall, each
  modality, each scenario). An episode of a benchmark task counts toward its own dimension only
  (VisGenBench's rule); an episode without a dimension counts toward every objective dimension its
  task has a check for (visual amount, video duration, video storyboard). Subjective dimensions
  need grades from a VLM grader, else they show "n/a". **O-Score*** is the mean of S-Rate and the
  dimension scores available in the row: the paper's O-Score when all nine are graded, an
  objective-only stand-in otherwise (the page says which).
* **Objective metrics**: S-Rate, amount, duration, storyboard and audio pass rates, reward, turns
  and failed-call rate, straight from the evaluator's summary.
* **Reward components**: mean of each rubric component, overall and per modality; the episode
  reward distribution; mean reward per scenario.
* **Trajectories**: per episode, each turn's think, reflection, plan and tool call (or answer)
  with the call's result beside the pictures it produced (video: frames across the clip).

Cells, bars and the page carry ``data-*`` attributes (``data-group``, ``data-metric``,
``data-value``; ``data-images-loaded`` / ``data-images-broken`` on ``<body>`` once the pictures
have loaded) so that the numbers and the pictures can be checked by a headless browser.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any, Mapping, Sequence

from visenv.report.media import EpisodeCapture
from visenv.report.svg import grouped_bars, histogram
from visenv.report.template import PAGE
from visenv.tasks import DIMENSIONS

OBJECTIVE_DIMENSIONS = {"visual_amount": "amount", "video_duration": "duration", "video_storyboard": "storyboard"}
"""Objective dimension -> the result check that measures it."""
SHOWN_ATTRIBUTES = ("width", "height", "duration", "shots")
"""Artifact attributes written under each picture."""
METRICS = (("s_rate", "S-Rate"), ("amount", "amount"), ("duration", "duration"), ("storyboard", "storyboard"),
           ("audio", "audio"), ("reward", "reward"), ("turns", "turns"), ("failed_call_rate", "failed calls"))


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _cell(value: float | None, group: str, metric: str) -> str:
    if value is None:
        return f'<td class="na" data-group="{escape(group)}" data-metric="{metric}" data-value="n/a">n/a</td>'
    return f'<td data-group="{escape(group)}" data-metric="{metric}" data-value="{value:.3f}">{value:.3f}</td>'


def episode_dimensions(episode: Mapping[str, Any], grade: float | None) -> dict[str, float]:
    """The dimension scores one episode contributes (see the module docstring)."""
    dimension, checks = episode["dimension"], episode["checks"]
    if dimension is None:
        return {d: float(checks[c]) for d, c in OBJECTIVE_DIMENSIONS.items() if checks.get(c) is not None}
    if dimension in OBJECTIVE_DIMENSIONS:
        passed = checks.get(OBJECTIVE_DIMENSIONS[dimension])
        return {} if passed is None else {dimension: float(passed)}
    return {} if grade is None else {dimension: float(grade)}


def dimension_block(episodes: Sequence[Mapping[str, Any]], grades: Sequence[float | None], s_rate: float | None
                    ) -> dict[str, Any]:
    """A group's dimension means (None where no episode scored) and its O-Score*."""
    scored = [episode_dimensions(e, g) for e, g in zip(episodes, grades)]
    dimensions = {d: _mean([s[d] for s in scored if d in s]) for d in DIMENSIONS}
    available = [v for v in dimensions.values() if v is not None]
    return {"dimensions": dimensions, "available": len(available),
            "o_score": None if s_rate is None else _mean([s_rate, *available])}


Group = tuple[str, str, Mapping[str, Any], list[int]]
"""(group key such as "modality:image", row label, the summary's block, indices of its episodes)."""


def _groups(summary: Mapping[str, Any], episodes: Sequence[Mapping[str, Any]]) -> list[Group]:
    """The table rows: overall, each modality, each scenario."""
    rows = [("overall", "overall", summary["overall"], list(range(len(episodes))))]
    for field, name in (("modality", "by_modality"), ("scenario", "by_scenario")):
        for value, block in summary[name].items():
            rows.append((f"{field}:{value}", value, block, [i for i, e in enumerate(episodes) if e[field] == value]))
    return rows


def _scores_table(groups: list[Group], episodes: Sequence[Mapping[str, Any]], grades: Sequence[float | None]
                  ) -> tuple[str, bool]:
    """The VisGenBench table, and whether all nine dimensions have an overall score."""
    head = "".join(f'<th title="{d}">{escape(d.replace("_", " "))}</th>' for d in DIMENSIONS)
    lines = [f"<table class='scores'><thead><tr><th>group</th><th>n</th>{head}<th>S-Rate</th>"
             "<th>O-Score*</th></tr></thead><tbody>"]
    complete = False
    for key, label, block, members in groups:
        dims = dimension_block([episodes[i] for i in members], [grades[i] for i in members], block["s_rate"])
        if key == "overall":
            complete = dims["available"] == len(DIMENSIONS)
        cells = "".join(_cell(dims["dimensions"][d], key, d) for d in DIMENSIONS)
        lines.append(f"<tr class='{key.split(':')[0]}'><th>{escape(label)}</th><td>{block['episodes']}</td>{cells}"
                     f"{_cell(block['s_rate'], key, 's_rate')}{_cell(dims['o_score'], key, 'o_score')}</tr>")
    lines.append("</tbody></table>")
    return "".join(lines), complete


def _metrics_table(groups: list[Group]) -> str:
    head = "".join(f"<th>{escape(label)}</th>" for _, label in METRICS)
    lines = [f"<table class='metrics'><thead><tr><th>group</th><th>n</th>{head}</tr></thead><tbody>"]
    for key, label, block, _ in groups:
        cells = "".join(_cell(block[metric], key, metric) for metric, _ in METRICS)
        lines.append(f"<tr class='{key.split(':')[0]}'><th>{escape(label)}</th><td>{block['episodes']}</td>"
                     f"{cells}</tr>")
    lines.append("</tbody></table>")
    return "".join(lines)


def _charts(summary: Mapping[str, Any], episodes: Sequence[Mapping[str, Any]]) -> str:
    blocks = {"overall": summary["overall"], **summary["by_modality"]}
    names = sorted({name for block in blocks.values() for name in block["components"]},
                   key=lambda n: (n == "total", n == "R_fine", n))
    components = grouped_bars("Mean reward components", names,
                              {group: [block["components"].get(n) for n in names] for group, block in blocks.items()})
    rewards = [e["reward"] for e in episodes if e["reward"] is not None and not math.isnan(e["reward"])]
    low = min([0.0] + [math.floor(r * 10) / 10 for r in rewards])
    distribution = histogram("Episode reward", rewards, bins=10, low=low, high=max([1.0] + rewards))
    scenarios = sorted(summary["by_scenario"])
    means = [summary["by_scenario"][s]["reward"] for s in scenarios]
    scenario_low = min([0.0] + [math.floor(m * 10) / 10 for m in means if m is not None])
    by_scenario = grouped_bars("Mean reward by scenario", scenarios, {"reward": means}, low=scenario_low)
    return f'<div class="charts">{components}{distribution}</div><div class="charts">{by_scenario}</div>'


def _pictures(capture: EpisodeCapture | None, ids: Sequence[str]) -> str:
    if capture is None:
        return ""
    figures = []
    for artifact_id in ids:
        item = capture.artifacts.get(artifact_id)
        if item is None:
            continue
        shown = ", ".join(f"{k}={v}" for k, v in item.attributes.items() if k in SHOWN_ATTRIBUTES)
        images = "".join(f'<img src="{escape(p)}" alt="{escape(item.id)} {item.kind}" width="120" height="120">'
                         for p in item.pictures)
        figures.append(f'<figure class="{item.kind}" data-artifact="{escape(item.id)}">{images}'
                       f"<figcaption>{escape(item.id)} · {item.kind}<br>{escape(shown)}</figcaption></figure>")
    return "".join(figures)


def _turn(number: int, step: Mapping[str, Any], capture: EpisodeCapture | None) -> str:
    turn, result = step["turn"], step["tool_result"]
    parts = []
    for tag in ("think", "reflection", "plan"):
        if turn.get(tag):
            parts.append(f'<div class="{tag}"><b>{tag}</b><pre>{escape(turn[tag])}</pre></div>')
    if turn.get("tool_call"):
        call = turn["tool_call"]
        arguments = json.dumps(call["arguments"], indent=1, ensure_ascii=False)
        parts.append(f'<div class="call"><b>tool_call</b> <code>{escape(str(call["name"]))}</code>'
                     f"<pre>{escape(arguments)}</pre></div>")
    elif turn.get("answer"):
        parts.append(f'<div class="answer"><b>answer</b><pre>{escape(turn["answer"])}</pre></div>')
    if result is not None:
        status = "ok" if result["status"] == "ok" else "error"
        if status == "ok":
            detail = f"{result['backend']} → {', '.join(result['outputs']) or 'text'}"
        else:
            detail = result["error"]
        parts.append(f'<div class="status {status}">{status}: {escape(detail)}</div>')
    elif turn.get("tool_call_error"):
        parts.append(f'<div class="status error">error: {escape(turn["tool_call_error"])}</div>')
    problems = "; ".join(p["message"] for p in turn.get("problems", []))
    if problems:
        parts.append(f'<div class="problems">format: {escape(problems)}</div>')
    media = _pictures(capture, result["outputs"] if result else [])
    return (f'<li class="turn"><div class="text"><span class="n">turn {number} · reward {step["reward"]:+.3f}</span>'
            f'{"".join(parts)}</div><div class="media">{media}</div></li>')


def _episode(index: int, episode: Mapping[str, Any], capture: EpisodeCapture | None) -> str:
    checks = "".join(f'<span class="check {"pass" if v else "fail"}">{escape(k)}</span>'
                     for k, v in episode["checks"].items() if v is not None)
    request = f'<p class="request">{escape(capture.request)}</p>' if capture else ""
    delivered = _pictures(capture, capture.delivered) if capture else ""
    if delivered:
        delivered = f'<div class="delivered"><b>delivered</b><div class="media">{delivered}</div></div>'
    turns = "".join(_turn(n + 1, step, capture) for n, step in enumerate(episode["trajectory"]))
    return (f'<details class="episode" id="episode-{index}" data-task="{escape(episode["task_id"])}"'
            f'{" open" if index == 0 else ""}><summary><b>{escape(episode["task_id"])}</b> · '
            f'{escape(episode["modality"])} · reward {episode["reward"]:.3f} · {episode["turns"]} turns '
            f'{checks}</summary>'
            f'{request}{delivered}<ol class="turns">{turns}</ol></details>')


def render_page(results: Sequence[Any], summary: Mapping[str, Any], captures: Sequence[EpisodeCapture] | None = None,
                grades: Sequence[float | None] | None = None, title: str = "visenv benchmark report") -> str:
    """The report's HTML.

    Args:
        results: the evaluated episodes: :class:`~visenv.evaluation.EpisodeResult` objects or their
            dicts (the ``episodes`` of results.json); trajectories are shown when kept.
        summary: the evaluator's summary of the same episodes.
        captures: per episode, its request and pictures (:func:`~visenv.report.media.capture_episode`);
            None shows the trajectories without pictures.
        grades: per episode, the VLM grader's score of its subjective dimension (None: not graded).
        title: the page title.
    """
    episodes = [r if isinstance(r, Mapping) else vars(r) for r in results]
    if captures is not None and len(captures) != len(episodes):
        raise ValueError(f"captures ({len(captures)}) must hold one entry per episode ({len(episodes)}).")
    if grades is not None and len(grades) != len(episodes):
        raise ValueError(f"grades ({len(grades)}) must hold one score per episode ({len(episodes)}).")
    grades = list(grades) if grades is not None else [None] * len(episodes)
    groups = _groups(summary, episodes)
    scores, complete = _scores_table(groups, episodes, grades)
    graded = any(g is not None for g in grades)
    o_note = ("O-Score* is the paper's O-Score: the mean of S-Rate and all nine dimension scores." if complete else
              "O-Score* is NOT the paper's O-Score: it is the mean of S-Rate and only the dimension scores "
              "available in its row" + ("." if graded else "; no VLM grader was configured, so the six subjective "
                                        "dimensions are n/a and O-Score* covers S-Rate and the objective dimensions "
                                        "(visual amount, video duration, video storyboard)."))
    viewer = "".join(_episode(i, e, captures[i] if captures else None) for i, e in enumerate(episodes)
                     if e["trajectory"])
    if not viewer:
        viewer = "<p>No trajectories were kept: evaluate with <code>keep_trajectories=True</code> " \
                 "(<code>visenv eval --trajectories</code>).</p>"
    overall = summary["overall"]
    headline = (f"{overall['episodes']} episodes · mean reward "
                f"{'n/a' if overall['reward'] is None else format(overall['reward'], '.3f')} · S-Rate "
                f"{'n/a' if overall['s_rate'] is None else format(overall['s_rate'], '.3f')}")
    return PAGE.substitute(title=escape(title), headline=escape(headline), scores=scores, o_note=escape(o_note),
                                metrics=_metrics_table(groups), charts=_charts(summary, episodes), viewer=viewer)


def write_report(report_dir: str | Path, results: Sequence[Any], summary: Mapping[str, Any],
                 captures: Sequence[EpisodeCapture] | None = None, grades: Sequence[float | None] | None = None,
                 title: str = "visenv benchmark report") -> Path:
    """Write ``report_dir/report.html`` (see :func:`render_page` for the arguments); returns its path.

    The pictures the captures name must already be in ``report_dir/media`` (as
    :func:`~visenv.report.media.capture_episode` writes them).
    """
    path = Path(report_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_page(results, summary, captures, grades, title), encoding="utf-8")
    return path
