"""Metrics out: a JSONL file (always), TensorBoard, W&B (optional), and a progress bar with live reward."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from rl.errors import ConfigError, DependencyNotInstalled
from rl.checkpoint import write_file


class MetricsLogger:
    """Writes one record per step to every configured sink.

    Args:
        directory: folder of ``metrics.jsonl`` and of the TensorBoard event files. A resumed run
            continues the file: records of steps at or after ``initial`` (steps the run is about to
            redo, logged by a run killed before its next checkpoint) are dropped first, so each step
            appears once; TensorBoard purges them too (``purge_step``).
        tensorboard: also write TensorBoard scalars (needs ``tensorboardX``).
        wandb_project: also log to this Weights & Biases project (needs ``wandb``), or None.
        total: steps of the run, for the progress bar; None for no progress bar.
        initial: the step this run starts from (0: a fresh run, which replaces an older log).
        config: the run's configuration, stored with W&B runs.
    """

    def __init__(self, directory: str, tensorboard: bool = True, wandb_project: str | None = None,
                 total: int | None = None, initial: int = 0, config: dict[str, Any] | None = None):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.jsonl")
        _drop_steps_from(self.path, initial)
        self._file = open(self.path, "a", encoding="utf-8")
        self._start = time.time()
        self._tb = self._wandb = self._bar = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise DependencyNotInstalled("tensorboardX", "rl", "TensorBoard logging (tensorboard: true)") from None
            self._tb = SummaryWriter(directory, purge_step=initial)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError(f"wandb_project ({wandb_project!r}) needs the package 'wandb', which is not "
                                  "installed and in no visenv extra: pip install wandb, or set wandb_project: null.") from None
            self._wandb = wandb.init(project=wandb_project, config=config, dir=directory)
        if total is not None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
        record = {"step": step, "elapsed": round(time.time() - self._start, 3), **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._bar is not None:
            shown = {k: f"{clean[k]:.3f}" for k in ("reward", "kl", "sft_loss", "loss") if k in clean}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._bar is not None:
            self._bar.close()


def _drop_steps_from(path: str, step: int) -> None:
    """Rewrite ``path`` (atomically) without its records of ``step`` and later, and without a line that
    a killed writer left cut short; nothing happens when there is nothing to drop."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] < step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    if len(kept) < len(lines):
        def write(temporary: str) -> None:
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.writelines(kept)

        write_file(path, write)


def read_metrics(path: str) -> list[dict[str, float]]:
    """The records of a ``metrics.jsonl`` file."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
