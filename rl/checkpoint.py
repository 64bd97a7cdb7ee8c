"""Checkpoints and atomic saves: what rl writes is either complete on disk or absent.

Layout of one checkpoint folder::

    iter_000012/
      policy/            the model and tokenizer (``save_pretrained``): ``rl eval`` and ``from_pretrained`` read it
      trainer.pt         trainable weights, algorithm state (optimizer, value head) and the iteration
      sampler.pt         (overlapping runs only) the weights the next iteration is sampled with, and their version
      rl_complete.json   the completion marker (every file's size); policy/ has its own

Every iteration's tasks and sampling noise derive from ``(seed, iteration)`` (see
:func:`rl.rollout.make_specs`), so restoring the weights, the optimizer and the iteration is all an
exact resume needs.

A folder is written by :func:`write_folder`: under a temporary name next to it, every file fsynced,
the marker written last, then renamed into place. A process killed at any moment leaves either the
previous folder, the new one complete, or (killed between the two renames that replace an older
folder) none; never a folder with truncated files under the final name. :func:`latest` returns the
newest *complete* checkpoint, so a rerun resumes from it or, when there is none, starts over.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from typing import Callable

import torch

from rl.errors import CheckpointError, CheckpointNotFound, ConfigError
from rl.policy import TrainablePolicy

MARKER = "rl_complete.json"
"""The completion marker of a folder written by :func:`write_folder`: ``{"files": {relative path: size}}``."""

_CHECKPOINT_NAME = re.compile(r"iter_\d{6}")
_log = logging.getLogger(__name__)


def _fsync(path: str) -> None:
    """Flush a file's or a folder's content (a folder: its entries) to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_file(path: str, write: Callable[[str], None]) -> None:
    """Write the file ``path`` atomically: ``write(temporary_path)`` fills a sibling, which is fsynced and
    renamed onto ``path``; readers see the old file or the new one, never a part."""
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    _fsync(folder)


def write_folder(path: str, write: Callable[[str], None]) -> None:
    """Write the folder ``path`` atomically, replacing an older save; ``write(folder)`` fills the new content.

    The content goes to a temporary sibling (``.NAME.partial-*``); every file and folder in it is
    fsynced, the marker :data:`MARKER` is written last, and the folder is renamed to ``path``. Leftovers
    of a killed earlier write to ``path`` are removed first (one writer per folder at a time). An
    existing ``path`` must be empty or an earlier save (it has the marker): it is replaced whole.
    """
    parent, name = os.path.split(os.path.abspath(path))
    if os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, MARKER)):
        raise ConfigError(f"{path} holds files that rl did not save (no {MARKER}), and a save replaces the whole "
                          "folder: save into a new or empty folder, or delete this one first.")
    os.makedirs(parent, exist_ok=True)
    for leftover in os.listdir(parent):
        if leftover.startswith((f".{name}.partial-", f".{name}.old-")):
            shutil.rmtree(os.path.join(parent, leftover), ignore_errors=True)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    temporary = os.path.join(parent, f".{name}.partial-{token}")
    os.mkdir(temporary)
    try:
        write(temporary)
        sizes = {}
        for root, _, files in os.walk(temporary, topdown=False):
            for file in files:
                full = os.path.join(root, file)
                _fsync(full)
                sizes[os.path.relpath(full, temporary)] = os.path.getsize(full)
            _fsync(root)
        with open(os.path.join(temporary, MARKER), "w", encoding="utf-8") as handle:
            json.dump({"files": sizes}, handle, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync(temporary)
        old = os.path.join(parent, f".{name}.old-{token}")
        if os.path.lexists(path):
            os.rename(path, old)
        os.rename(temporary, path)
        _fsync(parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def incomplete(path: str) -> str | None:
    """Why the folder ``path`` is not a complete :func:`write_folder` folder, or None when it is."""
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as handle:
            sizes = json.load(handle)["files"]
    except FileNotFoundError:
        return f"it has no completion marker {MARKER} (its save was interrupted, or rl did not write it)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its completion marker {MARKER} is unreadable ({exc})"
    for file, size in sorted(sizes.items()):
        full = os.path.join(path, file)
        if not os.path.isfile(full) or os.path.getsize(full) != size:
            found = os.path.getsize(full) if os.path.isfile(full) else "missing"
            return f"{file} should have {size} bytes, found {found}"
    return None


def save(path: str, policy: TrainablePolicy, algorithm_state: dict, iteration: int,
         sampler: tuple[dict[str, torch.Tensor], int] | None = None) -> None:
    """Write the checkpoint folder ``path`` atomically (see :func:`write_folder`); ``sampler``: the weights
    and version the rollout samples the next iteration with, when they are not the learner's (overlap)."""

    def write(folder: str) -> None:
        policy.save(os.path.join(folder, "policy"))
        torch.save({"weights": policy.get_weights(), "algorithm": algorithm_state, "iteration": iteration},
                   os.path.join(folder, "trainer.pt"))
        if sampler is not None:
            torch.save({"weights": sampler[0], "version": sampler[1]}, os.path.join(folder, "sampler.pt"))

    write_folder(path, write)


def load_sampler(path: str) -> tuple[dict[str, torch.Tensor], int] | None:
    """The sampler's weights and version saved in checkpoint ``path``, or None when it holds none (a run
    without overlap wrote it). Call after :func:`load`, which checks that the folder is complete."""
    file = os.path.join(path, "sampler.pt")
    if not os.path.isfile(file):
        return None
    state = torch.load(file, weights_only=False)
    return state["weights"], state["version"]


def load(path: str, policy: TrainablePolicy) -> tuple[dict, int]:
    """Load the weights of checkpoint ``path`` into ``policy``; returns ``(algorithm_state, iteration)``."""
    if not os.path.isfile(os.path.join(path, "trainer.pt")):
        raise CheckpointNotFound(f"{path} is not a checkpoint folder (no trainer.pt); pass a folder such as "
                                 f"{os.path.join(path, 'iter_000010')} or use latest(...).")
    problem = incomplete(path)
    if problem is None:
        try:
            state = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)
        except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
            problem = f"trainer.pt cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    if problem is not None:
        raise CheckpointError(f"Checkpoint {path} is incomplete or damaged: {problem}. Resume from an earlier one "
                              f"(latest(...) skips damaged checkpoints) or delete this folder.")
    try:
        policy.set_weights(state["weights"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}/trainer.pt cannot be restored ({' '.join(str(exc).split())[:200]}); expected "
                              "a checkpoint written for this policy's model. Use the checkpoints of this run's "
                              "output_dir, or a new output_dir.") from None
    return state["algorithm"], state["iteration"]


def latest(directory: str) -> str | None:
    """The newest complete checkpoint folder under ``directory``, or None when there is none.

    Incomplete ones (no marker, a file of the wrong size) are skipped with a warning in the log.
    """
    if not os.path.isdir(directory):
        return None
    for name in sorted((n for n in os.listdir(directory) if _CHECKPOINT_NAME.fullmatch(n)), reverse=True):
        path = os.path.join(directory, name)
        problem = incomplete(path)
        if problem is None:
            return path
        _log.warning("skipping checkpoint %s: %s", path, problem)
    return None
