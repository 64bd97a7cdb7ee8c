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
  and failed-call rate, straight from the evaluator's summary; then one column per logged metric
  (``evaluate(..., metrics=...)``, e.g. CLIP alignment): the group's mean of the per-episode scores
  in ``summary["visgenbench"]["episodes"]`` (n/a where no episode has one), its id
  (``metric_ids``) in the column's title and in a note under the table.
* **Reward components**: mean of each rubric component, overall and per modality; the episode
  reward distribution; mean reward per scenario.
* **Trajectories**: per episode, each turn's think, reflection, plan and tool call (or answer)
  with the call's result beside the pictures it produced (video: frames across the clip); a turn
  that could not be parsed is shown as the text the agent wrote. On the semantic tier each picture
  also says what was rendered, a defective output is outlined with its defects listed (and the
  call's ``defects`` under its status), and reflections are marked with a bar.

:func:`render_page` shows one evaluation. :func:`render_comparison` shows several named
:class:`Run` of the same episodes on one page: each table row becomes one row per run (a
``policy`` column, ``data-run`` on its cells), each chart one series per run, and the trajectory
viewer lists, episode by episode, each run's attempt labelled with its name.

Cells, bars and the page carry ``data-*`` attributes (``data-group``, ``data-metric``,
``data-value``; ``data-images-loaded`` / ``data-images-broken`` on ``<body>`` once the pictures
have loaded) so that the numbers and the pictures can be checked by a headless browser.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

from visenv.report.media import EpisodeCapture, defect_line
from visenv.report.svg import grouped_bars, grouped_histogram, histogram
from visenv.report.template import PAGE
from visenv.tasks import DIMENSIONS

OBJECTIVE_DIMENSIONS = {"visual_amount": "amount", "video_duration": "duration", "video_storyboard": "storyboard"}
"""Objective dimension -> the result check that measures it."""
SHOWN_ATTRIBUTES = ("width", "height", "duration", "shots")
"""Artifact attributes written under each picture."""
METRICS = (("s_rate", "S-Rate"), ("amount", "amount"), ("duration", "duration"), ("storyboard", "storyboard"),
           ("audio", "audio"), ("reward", "reward"), ("turns", "turns"), ("failed_call_rate", "failed calls"))


@dataclass(frozen=True)
class Run:
    """One named evaluation, as a comparison page (:func:`render_comparison`) shows it.

    Attributes:
        name: the name the page shows for it (e.g. a policy's).
        results: its episodes: :class:`~visenv.evaluation.EpisodeResult` objects or their dicts.
        summary: the evaluator's summary of the same episodes.
        captures: per episode, its request and pictures, or None (no pictures).
        grades: per episode, the VLM grader's score of its subjective dimension, or None (not graded).
    """

    name: str
    results: Sequence[Any]
    summary: Mapping[str, Any]
    captures: Sequence[EpisodeCapture] | None = None
    grades: Sequence[float | None] | None = None


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cell(value: float | None, group: str, metric: str, run: str | None = None) -> str:
    tag = f'data-group="{escape(group)}"' + ("" if run is None else f' data-run="{escape(run)}"')
    if value is None:
        return f'<td class="na" {tag} data-metric="{escape(metric)}" data-value="n/a">n/a</td>'
    return f'<td {tag} data-metric="{escape(metric)}" data-value="{value:.3f}">{value:.3f}</td>'


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


class _Shown(NamedTuple):
    """A run as the page draws it: episodes as dicts, one grade per episode, its table groups."""

    name: str | None  # None: the single-evaluation page (no policy column, no labels)
    episodes: list[Mapping[str, Any]]
    summary: Mapping[str, Any]
    captures: Sequence[EpisodeCapture] | None
    grades: list[float | None]
    groups: list[Group]
    metric_ids: Mapping[str, str]  # logged metric -> its id
    metric_scores: Mapping[str, list[float | None]]  # logged metric -> one score per episode


def _show(run: Run, name: str | None) -> _Shown:
    episodes = [r if isinstance(r, Mapping) else vars(r) for r in run.results]
    if run.captures is not None and len(run.captures) != len(episodes):
        raise ValueError(f"captures ({len(run.captures)}) must hold one entry per episode ({len(episodes)}).")
    if run.grades is not None and len(run.grades) != len(episodes):
        raise ValueError(f"grades ({len(run.grades)}) must hold one score per episode ({len(episodes)}).")
    grades = list(run.grades) if run.grades is not None else [None] * len(episodes)
    benchmark = run.summary["visgenbench"]
    if benchmark["metric_ids"] and len(benchmark["episodes"]) != len(episodes):
        raise ValueError(f"summary['visgenbench'] scores {len(benchmark['episodes'])} episodes but there are "
                         f"{len(episodes)}: pass the summary of the same evaluation.")
    scores = {name: [row[name] for row in benchmark["episodes"]] for name in benchmark["metric_ids"]}
    return _Shown(name, episodes, run.summary, run.captures, grades, _groups(run.summary, episodes),
                  benchmark["metric_ids"], scores)


def _rows(runs: Sequence[_Shown]) -> Iterator[tuple[str, _Shown, str, Mapping[str, Any], list[int]]]:
    """Per table row: its group, the run, the opening ``<tr>`` with its headers, the block and its members.

    Runs of one page play the same episodes, so their groups are the same; a comparison page gives
    each group one row per run, the group's label spanning them.
    """
    for g, (key, label, _, _) in enumerate(runs[0].groups):
        kind = key.split(":")[0]
        for position, run in enumerate(runs):
            _, _, block, members = run.groups[g]
            if run.name is None:
                head = f"<tr class='{kind}'><th>{escape(label)}</th>"
            else:
                group = f"<th rowspan='{len(runs)}'>{escape(label)}</th>" if position == 0 else ""
                head = (f"<tr class='{kind}' data-run='{escape(run.name)}'>{group}"
                        f"<th class='run'>{escape(run.name)}</th>")
            yield key, run, head, block, members


def _header(runs: Sequence[_Shown]) -> str:
    return "<th>group</th>" + ("" if runs[0].name is None else "<th>policy</th>") + "<th>n</th>"


def _scores_table(runs: Sequence[_Shown]) -> tuple[str, bool]:
    """The VisGenBench table, and whether all nine dimensions have an overall score in every run."""
    head = "".join(f'<th title="{d}">{escape(d.replace("_", " "))}</th>' for d in DIMENSIONS)
    lines = [f"<table class='scores'><thead><tr>{_header(runs)}{head}<th>S-Rate</th>"
             "<th>O-Score*</th></tr></thead><tbody>"]
    complete = True
    for key, run, row, block, members in _rows(runs):
        dims = dimension_block([run.episodes[i] for i in members], [run.grades[i] for i in members], block["s_rate"])
        if key == "overall":
            complete = complete and dims["available"] == len(DIMENSIONS)
        cells = "".join(_cell(dims["dimensions"][d], key, d, run.name) for d in DIMENSIONS)
        lines.append(f"{row}<td>{block['episodes']}</td>{cells}{_cell(block['s_rate'], key, 's_rate', run.name)}"
                     f"{_cell(dims['o_score'], key, 'o_score', run.name)}</tr>")
    lines.append("</tbody></table>")
    return "".join(lines), complete


def _logged_ids(runs: Sequence[_Shown]) -> dict[str, dict[str | None, str]]:
    """Logged metric -> run name -> the metric's id, in the order the runs name them."""
    ids: dict[str, dict[str | None, str]] = {}
    for run in runs:
        for metric, metric_id in run.metric_ids.items():
            ids.setdefault(metric, {})[run.name] = metric_id
    return ids


def _logged_note(ids: Mapping[str, Mapping[str | None, str]]) -> str:
    """The note under the metrics table that names each logged metric's id (per run where they differ)."""
    named = []
    for metric, by_run in ids.items():
        if len(set(by_run.values())) == 1:
            named.append(f"<code>{escape(metric)}</code> = <code>{escape(next(iter(by_run.values())))}</code>")
        else:
            named += [f"<code>{escape(metric)}</code> ({escape(str(run))}) = <code>{escape(metric_id)}</code>"
                      for run, metric_id in by_run.items()]
    return ("<p class='note' id='logged-metrics'>Logged metrics (computed, not optimised): the mean of the "
            "episodes' scores, n/a where no episode has one; " + "; ".join(named) + ".</p>")


def _metrics_table(runs: Sequence[_Shown]) -> str:
    """The objective metrics, then one column per logged metric (and a note naming their ids)."""
    ids = _logged_ids(runs)
    head = "".join(f"<th>{escape(label)}</th>" for _, label in METRICS)
    head += "".join(f'<th class="logged" title="{escape("; ".join(dict.fromkeys(by_run.values())))}">'
                    f"{escape(metric)}</th>" for metric, by_run in ids.items())
    lines = [f"<table class='metrics'><thead><tr>{_header(runs)}{head}</tr></thead><tbody>"]
    for key, run, row, block, members in _rows(runs):
        cells = "".join(_cell(block[metric], key, metric, run.name) for metric, _ in METRICS)
        for metric in ids:
            scores = run.metric_scores.get(metric)
            cells += _cell(None if scores is None else _mean([scores[i] for i in members]), key, metric, run.name)
        lines.append(f"{row}<td>{block['episodes']}</td>{cells}</tr>")
    lines.append("</tbody></table>")
    return "".join(lines) + (_logged_note(ids) if ids else "")


def _component_names(blocks: Sequence[Mapping[str, Any]]) -> list[str]:
    """The reward components of the blocks, the totals last."""
    return sorted({name for block in blocks for name in block["components"]},
                  key=lambda n: (n == "total", n == "R_fine", n))


def _valid_rewards(episodes: Sequence[Mapping[str, Any]]) -> list[float]:
    return [e["reward"] for e in episodes if e["reward"] is not None and not math.isnan(e["reward"])]


def _axis_low(values: Sequence[float | None]) -> float:
    """0, or the tenth below the lowest value when one is negative (error penalties)."""
    return min([0.0] + [math.floor(v * 10) / 10 for v in values if v is not None])


def _charts(run: _Shown) -> str:
    summary = run.summary
    blocks = {"overall": summary["overall"], **summary["by_modality"]}
    names = _component_names(list(blocks.values()))
    components = grouped_bars("Mean reward components", names,
                              {group: [block["components"].get(n) for n in names] for group, block in blocks.items()})
    rewards = _valid_rewards(run.episodes)
    distribution = histogram("Episode reward", rewards, bins=10, low=_axis_low(rewards), high=max([1.0] + rewards))
    scenarios = sorted(summary["by_scenario"])
    means = [summary["by_scenario"][s]["reward"] for s in scenarios]
    by_scenario = grouped_bars("Mean reward by scenario", scenarios, {"reward": means}, low=_axis_low(means))
    return f'<div class="charts">{components}{distribution}</div><div class="charts">{by_scenario}</div>'


def _comparison_charts(runs: Sequence[_Shown]) -> str:
    """The charts of a comparison page: one series per run (components per modality when there are several)."""
    modalities = list(runs[0].summary["by_modality"])
    charts = []
    for group in ["overall"] + (modalities if len(modalities) > 1 else []):
        blocks = {run.name: run.summary["overall"] if group == "overall" else run.summary["by_modality"][group]
                  for run in runs}
        names = _component_names(list(blocks.values()))
        values = {name: [block["components"].get(n) for n in names] for name, block in blocks.items()}
        charts.append(grouped_bars(f"Mean reward components ({group})", names, values))
    rewards = {run.name: _valid_rewards(run.episodes) for run in runs}
    pooled = [r for values in rewards.values() for r in values]
    charts.append(grouped_histogram("Episode reward", rewards, bins=10, low=_axis_low(pooled),
                                    high=max([1.0] + pooled)))
    scenarios = sorted(runs[0].summary["by_scenario"])
    means = {run.name: [run.summary["by_scenario"][s]["reward"] for s in scenarios] for run in runs}
    by_scenario = grouped_bars("Mean reward by scenario", scenarios, means,
                               low=_axis_low([m for values in means.values() for m in values]))
    return f'<div class="charts">{"".join(charts)}</div><div class="charts">{by_scenario}</div>'


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
        content = f'<div class="content">{escape(item.content)}</div>' if item.content else ""
        defects = (f'<div class="defects">defects: {escape("; ".join(item.defects))}</div>' if item.defects else "")
        marked = " defective" if item.defects else ""
        figures.append(f'<figure class="{item.kind}{marked}" data-artifact="{escape(item.id)}">{images}'
                       f"<figcaption>{escape(item.id)} · {item.kind}<br>{escape(shown)}{content}{defects}"
                       "</figcaption></figure>")
    return "".join(figures)


def _turn(number: int, step: Mapping[str, Any], capture: EpisodeCapture | None) -> str:
    turn, result = step["turn"], step["tool_result"]
    parts = []
    for tag in ("think", "reflection", "plan"):
        if turn.get(tag):
            parts.append(f'<div class="{tag}"><b>{tag}</b><pre>{escape(turn[tag])}</pre></div>')
    if not any(turn.get(tag) for tag in ("think", "reflection", "plan", "tool_call", "answer")):
        parts.append(f'<div class="raw"><b>text</b><pre>{escape(step["action"])}</pre></div>')
    if turn.get("tool_call"):
        call = turn["tool_call"]
        arguments = json.dumps(json.loads(call["arguments"]), indent=1, ensure_ascii=False)
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
        if result.get("defects"):
            found = "; ".join(f"{d['artifact']} {defect_line(d)}" for d in result["defects"])
            parts.append(f'<div class="status defect">came out wrong: {escape(found)}</div>')
    elif turn.get("tool_call_error"):
        parts.append(f'<div class="status error">error: {escape(turn["tool_call_error"])}</div>')
    problems = "; ".join(p["message"] for p in turn.get("problems", []))
    if problems:
        parts.append(f'<div class="problems">format: {escape(problems)}</div>')
    media = _pictures(capture, result["outputs"] if result else [])
    return (f'<li class="turn"><div class="text"><span class="n">turn {number} · reward {step["reward"]:+.3f}</span>'
            f'{"".join(parts)}</div><div class="media">{media}</div></li>')


def _episode(element_id: str, episode: Mapping[str, Any], capture: EpisodeCapture | None, run: str | None = None,
             opened: bool = False) -> str:
    checks = "".join(f'<span class="check {"pass" if v else "fail"}">{escape(k)}</span>'
                     for k, v in episode["checks"].items() if v is not None)
    request = f'<p class="request">{escape(capture.request)}</p>' if capture else ""
    delivered = _pictures(capture, capture.delivered) if capture else ""
    if delivered:
        delivered = f'<div class="delivered"><b>delivered</b><div class="media">{delivered}</div></div>'
    turns = "".join(_turn(n + 1, step, capture) for n, step in enumerate(episode["trajectory"]))
    label = "" if run is None else f' data-run="{escape(run)}"'
    badge = "" if run is None else f'<span class="run">{escape(run)}</span> '
    return (f'<details class="episode" id="{element_id}" data-task="{escape(episode["task_id"])}"{label}'
            f'{" open" if opened else ""}><summary>{badge}<b>{escape(episode["task_id"])}</b> · '
            f'{escape(episode["modality"])} · reward {episode["reward"]:.3f} · {episode["turns"]} turns '
            f'{checks}</summary>'
            f'{request}{delivered}<ol class="turns">{turns}</ol></details>')


def _capture(run: _Shown, index: int) -> EpisodeCapture | None:
    return run.captures[index] if run.captures else None


def _viewer(runs: Sequence[_Shown]) -> str:
    """The trajectory viewer; on a comparison page, episode by episode, each run's attempt."""
    if runs[0].name is None:
        viewer = "".join(_episode(f"episode-{i}", e, _capture(runs[0], i), opened=i == 0)
                         for i, e in enumerate(runs[0].episodes) if e["trajectory"])
    else:
        sections = []
        for i, first in enumerate(runs[0].episodes):
            attempts = "".join(_episode(f"episode-{r}-{i}", run.episodes[i], _capture(run, i), run.name, i == 0)
                               for r, run in enumerate(runs) if run.episodes[i]["trajectory"])
            if attempts:
                sections.append(f'<section class="task" id="task-{i}"><h3>episode {i + 1}: '
                                f'{escape(first["task_id"])}</h3>{attempts}</section>')
        viewer = "".join(sections)
    if not viewer:
        viewer = "<p>No trajectories were kept: evaluate with <code>keep_trajectories=True</code> " \
                 "(<code>rl eval --trajectories</code>).</p>"
    return viewer


def _render(runs: Sequence[_Shown], title: str, preface: str = "", given: str | None = None) -> str:
    scores, complete = _scores_table(runs)
    graded = any(g is not None for run in runs for g in run.grades)
    o_note = ("O-Score* is the paper's O-Score: the mean of S-Rate and all nine dimension scores." if complete else
              "O-Score* is NOT the paper's O-Score: it is the mean of S-Rate and only the dimension scores "
              "available in its row" + ("." if graded else "; no VLM grader was configured, so the six subjective "
                                        "dimensions are n/a and O-Score* covers S-Rate and the objective dimensions "
                                        "(visual amount, video duration, video storyboard)."))
    if runs[0].name is None:
        overall = runs[0].summary["overall"]
        headline = (f"{overall['episodes']} episodes · mean reward {_number(overall['reward'])} · S-Rate "
                    f"{_number(overall['s_rate'])}")
        charts = _charts(runs[0])
    else:
        headline = " · ".join([f"{len(runs)} policies on the same {len(runs[0].episodes)} episodes"] + [
            f"{run.name}: mean reward {_number(run.summary['overall']['reward'])}, S-Rate "
            f"{_number(run.summary['overall']['s_rate'])}" for run in runs])
        charts = _comparison_charts(runs)
    headline = headline if given is None else given
    return PAGE.substitute(title=escape(title), headline=escape(headline), preface=preface, scores=scores,
                           o_note=escape(o_note),
                           metrics=_metrics_table(runs), charts=charts, viewer=_viewer(runs))


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
    return _render([_show(Run("", results, summary, captures, grades), None)], title)


def render_comparison(runs: Sequence[Run], title: str = "visenv policy comparison", preface: str = "",
                      headline: str | None = None) -> str:
    """The HTML of one page comparing several named runs of the same episodes (see the module docstring).

    Args:
        runs: the runs, in the order shown; each played the same tasks in the same order (e.g. the
            same suite and seed).
        title: the page title.
        preface: HTML placed above the scores (an application's own sections, e.g. training curves);
            the caller builds and escapes it.
        headline: the line under the title (plain text); None: the runs' episode count and rewards.

    Raises:
        ValueError: no runs, names empty or repeated, or runs that played other tasks.
    """
    if not runs:
        raise ValueError("render_comparison needs at least one run.")
    names = [run.name for run in runs]
    if not all(names) or len(set(names)) != len(names):
        raise ValueError(f"run names {names} must be non-empty and distinct.")
    shown = [_show(run, run.name) for run in runs]
    tasks = [e["task_id"] for e in shown[0].episodes]
    for run in shown[1:]:
        if [e["task_id"] for e in run.episodes] != tasks:
            raise ValueError(f"run {run.name!r} played other tasks than run {shown[0].name!r}: a comparison shows "
                             "runs of the same tasks in the same order (same suite and seed).")
    return _render(shown, title, preface, headline)


def _write(report_dir: str | Path, html: str) -> Path:
    path = Path(report_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


def write_report(report_dir: str | Path, results: Sequence[Any], summary: Mapping[str, Any],
                 captures: Sequence[EpisodeCapture] | None = None, grades: Sequence[float | None] | None = None,
                 title: str = "visenv benchmark report") -> Path:
    """Write ``report_dir/report.html`` (see :func:`render_page` for the arguments); returns its path.

    The pictures the captures name must already be in ``report_dir/media`` (as
    :func:`~visenv.report.media.capture_episode` writes them).
    """
    return _write(report_dir, render_page(results, summary, captures, grades, title))


def write_comparison(report_dir: str | Path, runs: Sequence[Run], title: str = "visenv policy comparison",
                     preface: str = "", headline: str | None = None) -> Path:
    """Write ``report_dir/report.html`` comparing ``runs`` (see :func:`render_comparison`); returns its path.

    The pictures the runs' captures name must already be in ``report_dir/media``.
    """
    return _write(report_dir, render_comparison(runs, title, preface, headline))
