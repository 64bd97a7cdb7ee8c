"""The benchmark report: ``report.html`` beside results.json, with tables, reward plots and a trajectory viewer.

This package draws records; it plays nothing. The episodes come from the trainer's one episode runner
(:mod:`rl.evaluate`)::

    from rl.evaluate import evaluate_with_report
    from visenv.evaluation import write_results

    results, summary = evaluate_with_report(WorkflowAgent, tasks, "runs/report")
    write_results("runs/report/results.json", results, summary)  # beside report.html and media/*.png

or, for a results.json written by ``rl eval --trajectories``: ``visenv report results.json``.

Several named runs of the same tasks on one page::

    runs = [evaluate_run(player, tasks, "runs/compare", name=name) for name, player in players.items()]
    write_comparison("runs/compare", runs)

(:func:`rl.evaluate.write_policy_report` does this and writes results.json.)
"""

from visenv.report.collect import replay_captures, suite_of
from visenv.report.media import EpisodeCapture, MediaItem, capture_episode
from visenv.report.page import Run, render_comparison, render_page, write_comparison, write_report

__all__ = ["EpisodeCapture", "MediaItem", "Run", "capture_episode", "render_comparison", "render_page",
           "replay_captures", "suite_of", "write_comparison", "write_report"]
