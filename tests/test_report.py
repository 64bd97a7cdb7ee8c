"""The benchmark report: numbers, pictures, replay, the command, and the page in headless Chromium."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from baselines.random_agent import RandomAgent
from baselines.workflow_agent import WorkflowAgent
from rl.evaluate import evaluate, evaluate_run, evaluate_with_report
from visenv.error import ConfigError
from visenv.evaluation import write_results
from visenv.report import Run, render_comparison, render_page, replay_captures, write_comparison
from visenv.report.cli import add_report_commands
from visenv.report.page import dimension_block, episode_dimensions
from visenv.tasks import DIMENSIONS, make_suite, visgenbench

SEED = 3
OBJECTIVE_COLUMNS = ("s_rate", "amount", "duration", "storyboard", "audio", "reward", "turns", "failed_call_rate")


def mixed_suite():
    """Two image and two video tasks (the built-in suites list image scenarios first)."""
    return make_suite(2, 7, modality="image") + make_suite(2, 7, modality="video")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report of the teacher (with mistakes) on the mixed suite: (folder, results, summary)."""
    folder = tmp_path_factory.mktemp("report")
    results, summary = evaluate_with_report(lambda: WorkflowAgent(seed=1, mistake_rate=0.5), mixed_suite(), folder,
                                            seed=SEED, progress=False)
    write_results(folder / "results.json", results, summary)
    return folder, results, summary


class _Cells(HTMLParser):
    """Collects the page's table cells (data-group, data-metric -> text; a comparison page's in
    ``run_cells`` by data-run, data-group, data-metric), images, bars, episodes and <body> attributes."""

    def __init__(self):
        super().__init__()
        self.cells, self.run_cells, self.images, self.body, self.bars, self.episodes = {}, {}, [], {}, [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "td" and "data-metric" in attrs:
            if "data-run" in attrs:
                self._cell = (self.run_cells, (attrs["data-run"], attrs["data-group"], attrs["data-metric"]))
            else:
                self._cell = (self.cells, (attrs["data-group"], attrs["data-metric"]))
            self._cell[0][self._cell[1]] = ""
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "body":
            self.body = attrs
        elif tag == "rect" and "data-series" in attrs:
            self.bars.append(attrs)
        elif tag == "details":
            self.episodes.append(attrs)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0][self._cell[1]] += data

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None


def parse(html: str) -> _Cells:
    cells = _Cells()
    cells.feed(html)
    return cells


def expected_cells(summary) -> dict:
    """(group, metric) -> the text the metrics table must show for the evaluator's summary."""
    blocks = {"overall": summary["overall"], **{f"modality:{k}": v for k, v in summary["by_modality"].items()},
              **{f"scenario:{k}": v for k, v in summary["by_scenario"].items()}}
    return {(group, metric): "n/a" if block[metric] is None else f"{block[metric]:.3f}"
            for group, block in blocks.items()
            for metric in OBJECTIVE_COLUMNS}


def test_evaluate_with_report_matches_evaluate(report):
    folder, results, summary = report
    _, plain = evaluate(lambda: WorkflowAgent(seed=1, mistake_rate=0.5), mixed_suite(), seed=SEED, progress=False)
    assert summary == plain
    _, lockstep = evaluate(lambda: WorkflowAgent(seed=1, mistake_rate=0.5), mixed_suite(), seed=SEED, progress=False,
                           num_envs=3)  # episodes 0-2 in lock-step, then episode 3
    assert lockstep == plain
    with pytest.raises(ValueError, match=r"num_envs \(0\) must be at least 1"):
        evaluate(WorkflowAgent, mixed_suite(), num_envs=0)
    assert all(r.trajectory for r in results) and (folder / "report.html").is_file()


def test_page_shows_the_summary_numbers(report):
    folder, results, summary = report
    cells = parse((folder / "report.html").read_text()).cells
    expected = expected_cells(summary)
    assert {k: cells[k] for k in expected} == expected
    assert cells[("overall", "s_rate")] == f"{summary['overall']['s_rate']:.3f}"
    assert not parse((folder / "report.html").read_text()).run_cells  # one run: no policy column
    shown = {metric for _, metric in cells}  # without logged metrics: no extra column, no note
    assert shown == {*OBJECTIVE_COLUMNS, *DIMENSIONS, "o_score"}
    assert "logged-metrics" not in (folder / "report.html").read_text()


class ImageIndexMetric:
    """A logged metric: 0.1 x the episode's index in its batch for image tasks, None for the others."""

    judge_id = "index|<test>"

    def __call__(self, records):
        return [0.1 * i if r.task.requirements.modality == "image" else None for i, r in enumerate(records)]


def test_logged_metrics_get_a_column_per_group_and_their_id(tmp_path):
    results, summary = evaluate_with_report(lambda: WorkflowAgent(seed=1), mixed_suite(), tmp_path, seed=SEED,
                                            metrics={"index": ImageIndexMetric()}, progress=False)
    html = (tmp_path / "report.html").read_text()
    cells = parse(html).cells
    assert summary["visgenbench"]["overall"]["index"] == pytest.approx(0.05)  # episodes 0 and 1 are images
    expected = {"overall": "0.050", "modality:image": "0.050", "modality:video": "n/a"}
    expected |= {f"scenario:{r.scenario}": "n/a" if r.modality == "video" else f"{0.1 * i:.3f}"
                 for i, r in enumerate(results)}  # mixed_suite has one task per scenario
    assert {group: cells[(group, "index")] for group in expected} == expected
    assert 'title="index|&lt;test&gt;">index</th>' in html
    assert "<code>index</code> = <code>index|&lt;test&gt;</code>" in html
    short = dict(summary, visgenbench=dict(summary["visgenbench"], episodes=summary["visgenbench"]["episodes"][1:]))
    with pytest.raises(ValueError, match=r"scores 3 episodes but there are 4"):
        render_page(results, short)


def test_pictures_are_written_for_every_artifact(report):
    folder, results, _ = report
    page = parse((folder / "report.html").read_text())
    assert page.images and all((folder / src).is_file() for src in page.images)
    assert all(not Path(src).is_absolute() and src.startswith("media/") for src in page.images)
    videos = [f for f in os.listdir(folder / "media") if "_f" in f]
    assert len(videos) >= 4  # the video tasks' clips, four frames each
    picture = Image.open(folder / page.images[0])
    assert picture.size == (160, 160) and np.asarray(picture).std() > 1
    made = {a for r in results for step in r.trajectory if step["tool_result"] for a in step["tool_result"]["outputs"]}
    shown = set(re.findall(r'data-artifact="([^"]+)"', (folder / "report.html").read_text()))
    assert made <= shown


def test_dimension_scores_follow_the_benchmark_rule():
    plain = {"dimension": None, "checks": {"s_rate": True, "amount": False, "duration": True, "storyboard": None}}
    assert episode_dimensions(plain, None) == {"visual_amount": 0.0, "video_duration": 1.0}
    bench = {"dimension": "video_duration", "checks": {"s_rate": True, "amount": False, "duration": True}}
    assert episode_dimensions(bench, 0.2) == {"video_duration": 1.0}
    graded = {"dimension": "variety", "checks": {"s_rate": True, "amount": True}}
    assert episode_dimensions(graded, 0.4) == {"variety": 0.4}
    assert episode_dimensions(graded, None) == {}
    block = dimension_block([plain, bench, graded], [None, None, 0.4], s_rate=0.5)
    assert block["dimensions"]["video_duration"] == 1.0 and block["dimensions"]["visual_amount"] == 0.0
    assert block["dimensions"]["content_match"] is None
    assert block["o_score"] == pytest.approx((0.5 + 0.0 + 1.0 + 0.4) / 4)


class FixedGrader:
    """Grades the episodes 0.25, 0.75, ... and remembers which tasks it saw."""

    judge_id = "fixed|test-grader"

    def __init__(self):
        self.seen = []

    def __call__(self, records):
        self.seen += [r.task.task_id for r in records]
        return [(0.25, 0.75)[i % 2] for i in range(len(records))]


def test_grades_fill_the_subjective_columns(tmp_path):
    tasks = [t for t in visgenbench(0) if t.dimension == "variety" and t.requirements.modality == "image"][:2]
    grader = FixedGrader()
    results, summary = evaluate_with_report(lambda: WorkflowAgent(seed=0), tasks, tmp_path, grader=grader,
                                            progress=False)
    assert grader.seen == [t.task_id for t in tasks]
    cells = parse((tmp_path / "report.html").read_text()).cells
    assert cells[("overall", "variety")] == "0.500"
    assert cells[("overall", "content_match")] == "n/a"
    s_rate = summary["overall"]["s_rate"]
    assert cells[("overall", "o_score")] == f"{(s_rate + 0.5) / 2:.3f}"
    with pytest.raises(ValueError, match="one score per episode"):
        render_page(results, summary, grades=[0.5])


def test_replay_reproduces_the_pictures(report, tmp_path):
    folder, results, _ = report
    episodes = json.loads((folder / "results.json").read_text())["episodes"]
    captures, records = replay_captures(episodes, mixed_suite(), tmp_path, seed=SEED)
    made = [[a for s in r.trajectory if s["tool_result"] for a in s["tool_result"]["outputs"]] for r in results]
    assert [list(c.artifacts) for c in captures] == made
    assert [r.task.task_id for r in records] == [r.task_id for r in results]
    assert sorted(os.listdir(tmp_path / "media")) == sorted(os.listdir(folder / "media"))


def test_replay_refuses_a_mismatch(report, tmp_path):
    folder, _, _ = report
    episodes = json.loads((folder / "results.json").read_text())["episodes"]
    with pytest.raises(ConfigError, match="replays to reward"):
        replay_captures(episodes, mixed_suite(), tmp_path, seed=SEED + 1)
    with pytest.raises(ConfigError, match="but task 0 of the suite"):
        replay_captures(episodes, list(reversed(mixed_suite())), tmp_path, seed=SEED)
    with pytest.raises(ConfigError, match="4 episodes but the suite has 3"):
        replay_captures(episodes, mixed_suite()[:3], tmp_path, seed=SEED)
    bare = [dict(e, trajectory=[]) for e in episodes]
    with pytest.raises(ConfigError, match="--trajectories"):
        replay_captures(bare, mixed_suite(), tmp_path, seed=SEED)


def _parser():
    parser = argparse.ArgumentParser(prog="visenv")
    add_report_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_report_command_replays_a_results_file(tmp_path):
    tasks = make_suite(3, 11, modality="image")
    results, summary = evaluate(lambda: RandomAgent(seed=2), tasks, seed=5, keep_trajectories=True, progress=False)
    write_results(tmp_path / "results.json", results, summary, {"suite": "image", "n": 3, "task_seed": 11, "seed": 5})
    args = _parser().parse_args(["report", str(tmp_path / "results.json")])  # the suite and seed as recorded
    assert args.func(args) == 0
    page = parse((tmp_path / "report.html").read_text())
    assert page.cells[("overall", "reward")] == f"{summary['overall']['reward']:.3f}"
    assert all((tmp_path / src).is_file() for src in page.images)
    args = _parser().parse_args(["report", str(tmp_path / "results.json"), "--no-media", "--out", str(tmp_path / "b")])
    assert args.func(args) == 0
    assert parse((tmp_path / "b" / "report.html").read_text()).images == []
    (tmp_path / "bad.json").write_text("{}")
    args = _parser().parse_args(["report", str(tmp_path / "bad.json")])
    with pytest.raises(ConfigError, match="not a results.json"):
        args.func(args)
    args = _parser().parse_args(["report", str(tmp_path / "results.json"), "--task-seed", "12", "--out", str(tmp_path / "c")])
    with pytest.raises(ConfigError, match="but task 0 of the suite"):  # a given argument overrides the record
        args.func(args)


# ---- several named runs on one page ---------------------------------------------------------------

@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """The teacher (with mistakes) and the random agent on the mixed suite, on one page: (folder, runs)."""
    folder = tmp_path_factory.mktemp("comparison")
    agents = {"teacher": lambda: WorkflowAgent(seed=1, mistake_rate=0.5), "random <agent>": lambda: RandomAgent(seed=2)}
    runs = [evaluate_run(factory, mixed_suite(), folder, name=name, seed=SEED, progress=False)
            for name, factory in agents.items()]
    write_comparison(folder, runs)
    return folder, runs


BIN = re.compile(r"^-?\d\.\d\d--?\d\.\d\d$")


def test_comparison_shows_the_runs_side_by_side(report, comparison):
    folder, runs = comparison
    assert runs[0].summary == report[2]  # the same evaluation as the single-run report
    html = (folder / "report.html").read_text()
    page = parse(html)
    assert not page.cells  # every cell names its run
    for run in runs:
        expected = {(run.name, group, metric): text for (group, metric), text in expected_cells(run.summary).items()}
        assert {k: page.run_cells[k] for k in expected} == expected
        bars = [b for b in page.bars if b["data-series"] == run.name]
        total = next(b for b in bars if b["data-label"] == "total")  # the overall components chart comes first
        assert total["data-value"] == f"{run.summary['overall']['components']['total']:.3f}"
        assert sum(float(b["data-value"]) for b in bars if BIN.match(b["data-label"])) == len(run.results)
    assert "random &lt;agent&gt;: mean reward" in html and "random <agent>" not in html
    assert [(e["data-run"], e["data-task"]) for e in page.episodes] == [
        (run.name, task.task_id) for task in mixed_suite() for run in runs]
    assert page.images and all((folder / src).is_file() for src in page.images)


def test_comparison_refuses_runs_it_cannot_compare(comparison):
    _, runs = comparison
    with pytest.raises(ValueError, match="at least one run"):
        render_comparison([])
    with pytest.raises(ValueError, match="non-empty and distinct"):
        render_comparison([runs[0], runs[0]])
    with pytest.raises(ValueError, match="'later' played other tasks"):
        render_comparison([runs[0], Run("later", runs[1].results[1:], runs[1].summary)])


# ---- the page in a real browser ------------------------------------------------------------------

def chromium() -> str:
    """The Chromium executable; skipped when absent outside CI, a failure in CI."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("CI must test the report page in Chromium: apt-get install -y chromium")
    pytest.skip("Chromium is not installed (apt-get install -y chromium); the browser test of the page needs it.")


def run_chromium(tmp_path: Path, *args: str) -> str:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_page_in_chromium(report, tmp_path):
    folder, _, summary = report
    url = (folder / "report.html").resolve().as_uri()
    page = parse(run_chromium(tmp_path, "--dump-dom", url))
    expected = expected_cells(summary)
    assert {k: page.cells[k] for k in expected} == expected
    assert page.body.get("data-images-broken") == "0"
    assert int(page.body["data-images-loaded"]) == len(page.images) > 0
    totals = {b["data-label"]: b["data-value"] for b in page.bars if b["data-series"] == "overall"}
    assert totals["total"] == f"{summary['overall']['components']['total']:.3f}"

    shot = tmp_path / "page.png"
    run_chromium(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", url)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1200)
    colourful = (pixels.max(axis=2).astype(int) - pixels.min(axis=2)) > 60
    assert colourful.mean() > 0.005  # the charts and the pictures, not a blank or text-only page


def test_broken_pictures_are_reported_in_chromium(report, tmp_path):
    folder, _, _ = report
    copy = tmp_path / "moved"
    copy.mkdir()
    shutil.copy(folder / "report.html", copy / "report.html")  # the media/ folder is left behind
    page = parse(run_chromium(tmp_path, "--dump-dom", (copy / "report.html").resolve().as_uri()))
    assert int(page.body["data-images-broken"]) == len(page.images) > 0
    assert page.body["data-images-loaded"] == "0"


def test_line_chart_draws_every_value_and_the_band():
    from visenv.report.svg import line_chart

    svg = line_chart("curves", {"reward": [0.5, None, 0.75, 1.0], "kl": [0.0, 0.01, 0.02, 0.03]}, band=(1, 2))
    # a missing value breaks the line in two; each piece carries all the series' values
    assert svg.count('data-series="reward" data-values="0.500,nan,0.750,1.000"') == 2
    assert svg.count('data-series="kl" data-values="0.000,0.010,0.020,0.030"') == 1
    assert 'data-band="1-2"' in svg and "<title>selected: 1-2</title>" in svg
    assert 'data-band' not in line_chart("flat", {"x": [1.0, 1.0]})  # no band asked; a flat line still draws
def test_the_viewer_shows_rendered_content_defects_and_reflections(tmp_path):
    """On the semantic tier the pictures say what was rendered, defects are marked and reflections stand out."""
    evaluate_with_report(lambda: WorkflowAgent(seed=0, inspect=True), make_suite(3, 7, modality="image"), tmp_path,
                         seed=0, progress=False, env_config={"content": "semantic", "tool_fidelity": 0.3,
                                                             "max_turns": 90})
    html = (tmp_path / "report.html").read_text()
    assert re.search(r'<div class="content">\d+ x [a-z-]+ \([a-z]+, identity [a-z-]+-[0-9a-f]{4}\)', html)
    assert 'class="status defect">came out wrong: img_' in html
    assert re.search(r'<figure class="image defective"[^>]*>.*?<div class="defects">defects: [a-z_]+ \(', html)
    assert '<div class="reflection"><b>reflection</b><pre>Step ' in html
