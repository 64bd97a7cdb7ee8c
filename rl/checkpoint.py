"""Checkpoints: a loadable policy folder plus the exact training state, so a resume continues exactly.

Layout of one checkpoint folder::

    iter_000012/
      policy/      the model and tokenizer (``save_pretrained``): ``rl eval`` and ``from_pretrained`` read it
      trainer.pt   trainable weights, algorithm state (optimizer, value head) and the iteration

Every iteration's tasks and sampling noise derive from ``(seed, iteration)`` (see
:func:`rl.rollout.make_specs`), so restoring the weights, the optimizer and the iteration is all an
exact resume needs.
"""

from __future__ import annotations

import os
import pickle

import torch

from rl.errors import CheckpointError, CheckpointNotFound
from rl.policy import TrainablePolicy


def save(path: str, policy: TrainablePolicy, algorithm_state: dict, iteration: int) -> None:
    """Write the checkpoint folder ``path`` (created if needed)."""
    os.makedirs(path, exist_ok=True)
    policy.save(os.path.join(path, "policy"))
    torch.save({"weights": policy.get_weights(), "algorithm": algorithm_state, "iteration": iteration},
               os.path.join(path, "trainer.pt"))


def load(path: str, policy: TrainablePolicy) -> tuple[dict, int]:
    """Load the weights of checkpoint ``path`` into ``policy``; returns ``(algorithm_state, iteration)``."""
    file = os.path.join(path, "trainer.pt")
    if not os.path.exists(file):
        raise CheckpointNotFound(f"{path} is not a checkpoint folder (no trainer.pt); pass a folder such as "
                                 f"{os.path.join(path, 'iter_000010')} or use latest(...).")
    try:
        state = torch.load(file, weights_only=False)
        policy.set_weights(state["weights"])
    except (RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file} cannot be restored ({' '.join(str(exc).split())[:200]}); expected a complete "
                              "trainer.pt written for this policy's model. Delete the folder "
                              f"{path} to resume from the checkpoint before it, or use a new output_dir.") from None
    return state["algorithm"], state["iteration"]


def latest(directory: str) -> str | None:
    """The newest checkpoint folder under ``directory``, or None when there is none."""
    if not os.path.isdir(directory):
        return None
    names = sorted(n for n in os.listdir(directory)
                   if n.startswith("iter_") and os.path.exists(os.path.join(directory, n, "trainer.pt")))
    return os.path.join(directory, names[-1]) if names else None
