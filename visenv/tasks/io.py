"""Task files: one task per line as JSON (JSONL), written by :func:`save_tasks`.

A malformed line raises :class:`~visenv.error.TaskFormatError` naming the file, the line number
and the problem; blank lines are skipped. ``load_tasks(save_tasks(...))`` gives back equal tasks.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from visenv.error import TaskFormatError
from visenv.tasks.task import Task


def save_tasks(tasks: Iterable[Task], path: str | os.PathLike) -> None:
    """Write ``tasks`` to ``path``, one JSON object per line (overwrites the file)."""
    with open(path, "w", encoding="utf-8") as fh:
        for task in tasks:
            fh.write(json.dumps(task.to_dict(), ensure_ascii=False) + "\n")


def load_tasks(path: str | os.PathLike) -> list[Task]:
    """Read the tasks of a JSONL file, validating every line.

    Raises:
        TaskFormatError: a line is not JSON, not a valid task, or repeats an earlier task_id; the
            message names the file and the line.
    """
    tasks: list[Task] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)}, line {number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskFormatError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); "
                                      "each line must hold one task object") from None
            try:
                task = Task.from_dict(data)
            except TaskFormatError as err:
                raise TaskFormatError(f"{where}: {err}") from None
            if task.task_id in first_line:
                raise TaskFormatError(f"{where}: task_id {task.task_id!r} already appears on line "
                                      f"{first_line[task.task_id]}; task ids must be unique")
            first_line[task.task_id] = number
            tasks.append(task)
    return tasks
