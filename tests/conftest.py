"""Shared fixtures of the test suite.

The whole session uses a private visenv home (media database, caches) in a temporary folder, so
that tests never read or write the user's ~/.cache/visenv and a fresh machine behaves like CI.
"""

import os
import tempfile

import pytest
from hypothesis import settings

from visenv.mediadb import MediaDatabase

pytest_plugins = ["conftest_ray"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["VISENV_HOME"] = tempfile.mkdtemp(prefix="visenv-test-home-")

# CI replays the same examples every run (no flaky finds, no timing deadlines on a loaded machine);
# a developer's run keeps exploring new ones.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def media_db() -> MediaDatabase:
    """The procedural default media database, built once per test session in the private home."""
    return MediaDatabase.default()
