"""Every user-facing exception of rl, in one place (visenv's classes reused where they fit).

Each message says what was expected, what came, and the fix. All of them are
:class:`visenv.error.VisenvError`, so one ``except VisenvError`` (as in ``rl``'s command line) turns
any of them into a one-line message. A library bug still raises a plain exception (or an assert).

Reused from :mod:`visenv.error`:
    ConfigError: a configuration value (file, option, argument) is invalid.
    DependencyNotInstalled: an optional package is missing; the message gives the ``pip install`` extra.
    ResetNeeded: a method was called in the wrong order.
"""

from __future__ import annotations

from visenv.error import ConfigError, DependencyNotInstalled, ResetNeeded, VisenvError

__all__ = ["ChatDataError", "CheckpointError", "CheckpointNotFound", "ConfigError", "DependencyNotInstalled",
           "EndpointError", "ModelLoadError", "ResetNeeded", "RolloutError", "VisenvError"]


class ModelLoadError(VisenvError, OSError):
    """A policy's model (``policy.model``) is missing, incomplete or unreadable."""


class CheckpointError(VisenvError, RuntimeError):
    """A checkpoint cannot be restored: truncated, corrupt, or written for another model."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A path given as a checkpoint folder holds no checkpoint."""


class ChatDataError(VisenvError, ValueError):
    """A line of an SFT data file (chat JSONL) is not a trajectory; the message names the file and line."""


class RolloutError(VisenvError, RuntimeError):
    """Rollouts cannot go on: Ray is not running, or workers died more often than allowed."""


class EndpointError(VisenvError, RuntimeError):
    """An OpenAI-compatible endpoint refused the connection, timed out or answered in another format."""
