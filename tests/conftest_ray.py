"""The one Ray instance of the test session (a pytest plugin, loaded by tests/conftest.py).

Ray starts once, on loopback, with 2 CPUs and no dashboard; tests that need it ask for ``ray_session``.
Actors in tests reserve fractions of a CPU so that the CPUs they ask for sum to at most 2.
"""

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def ray_session():
    """Ray, started for the session (or the instance already running), shut down at the end."""
    import ray

    started = not ray.is_initialized()
    if started:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([root, os.path.join(root, "tests")])}})
    yield ray
    if started:
        ray.shutdown()
