"""The benchmark report: ``report.html`` beside results.json, with tables, reward plots and a trajectory viewer.

Typical use::

    from visenv.evaluation import write_results
    from visenv.report import evaluate_with_report

    results, summary = evaluate_with_report(lambda: WorkflowAgent(), tasks, "runs/report")
    write_results("runs/report/results.json", results, summary)  # beside report.html and media/*.png

or, for a results.json written by ``visenv eval --trajectories``: ``visenv report results.json``.
"""

from visenv.report.collect import evaluate_with_report, replay_captures
from visenv.report.media import EpisodeCapture, MediaItem, capture_episode
from visenv.report.page import render_page, write_report

__all__ = ["EpisodeCapture", "MediaItem", "capture_episode", "evaluate_with_report", "render_page",
           "replay_captures", "write_report"]
