"""The benchmark report: ``report.html`` beside results.json, with tables, reward plots and a trajectory viewer.

Typical use::

    from visenv.evaluation import write_results
    from visenv.report import evaluate_with_report

    results, summary = evaluate_with_report(lambda: WorkflowAgent(), tasks, "runs/report")
    write_results("runs/report/results.json", results, summary)  # beside report.html and media/*.png

or, for a results.json written by ``rl eval --trajectories``: ``visenv report results.json``.

Several named runs of the same tasks on one page::

    runs = [evaluate_run(factory, tasks, "runs/compare", name=name) for name, factory in agents.items()]
    write_comparison("runs/compare", runs)

(:func:`rl.agent.write_policy_report` does this for rl policies.)
"""

from visenv.report.collect import evaluate_run, evaluate_with_report, replay_captures
from visenv.report.media import EpisodeCapture, MediaItem, capture_episode
from visenv.report.page import Run, render_comparison, render_page, write_comparison, write_report

__all__ = ["EpisodeCapture", "MediaItem", "Run", "capture_episode", "evaluate_run", "evaluate_with_report",
           "render_comparison", "render_page", "replay_captures", "write_comparison", "write_report"]
