"""Every user-facing exception of visenv, in one place.

Each message says what was expected, what was received, and how to fix it. A policy's mistake
(unknown tool, bad argument, missing artifact) is never an exception: the environment turns it into
an observation. These exceptions are for the library's users: bad configuration, misuse of call
order, missing optional dependencies, corrupt data files.
"""

from __future__ import annotations


class VisenvError(Exception):
    """Base class of every exception raised on purpose by visenv."""


class ConfigError(VisenvError, ValueError):
    """A configuration value is invalid; the message names the value and the fix."""


class ResetNeeded(VisenvError, RuntimeError):
    """An environment method was called in the wrong order (step() before reset(), or after the end;
    detach_pending_score() with no score pending)."""


class DependencyNotInstalled(VisenvError, ImportError):
    """An optional dependency is missing; the message gives the exact `pip install` extra."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the package {package!r}, which is not installed. "
            f"Install it with: pip install 'visenv[{extra}]'"
        )
        self.package = package
        self.extra = extra


class UnknownToolError(VisenvError, KeyError):
    """A tool name that is not in the registry was looked up by library code."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class MediaDatabaseError(VisenvError):
    """The media database folder is missing, empty, or holds a file that cannot be read."""


class ArtifactError(VisenvError, KeyError):
    """Library code asked the artifact store for an id or blob that it does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TaskFormatError(VisenvError, ValueError):
    """A task file (JSONL) holds a line that is not a valid task; the message names the line."""


class BackendMiss(VisenvError, LookupError):
    """No backend in a strict chain could answer a tool call."""


class BackendError(VisenvError, RuntimeError):
    """A backend failed in a way that is not the policy's fault (e.g. a real tool's server is down)."""


class CacheFormatError(VisenvError, ValueError):
    """A line of a calls file (JSONL of tool, arguments, file) is invalid; the message names the line."""


class CacheSchemaError(VisenvError):
    """A tool cache was written by another schema version of visenv."""


class NearestIndexError(VisenvError):
    """A saved nearest-tier index file is missing, truncated or corrupt; the backend rebuilds the index."""


class CacheCorruptError(VisenvError):
    """A tool cache's index (``index.sqlite``, ``embeddings.sqlite``) or one of its rows is damaged.

    Args:
        root: the cache directory.
        detail: what is damaged.
    """

    def __init__(self, root: object, detail: str):
        super().__init__(f"The tool cache {root} is damaged: {detail}. Run `visenv cache verify {root}`: it "
                         "quarantines damaged entries and says how to recover a damaged index.")
        self.root = str(root)
        self.detail = detail

    def __reduce__(self):  # crosses to Ray workers and back
        return type(self), (self.root, self.detail)


class RemoteEnvError(VisenvError, ConnectionError):
    """A :class:`~visenv.remote.RemoteEnv` lost its server, or the server refused a request; the message says which."""
