"""visenv: gymnasium environments for training visual-creation agents with virtual tools.

Importing the package registers the environments with gymnasium::

    import gymnasium, visenv
    env = gymnasium.make("visenv/VisGen-v0")

``visenv/Remote-v0`` (``gymnasium.make("visenv/Remote-v0", url=...)``) plays an environment served by
`visenv serve` (:class:`visenv.remote.RemoteEnv`); it needs a server, so it is not in :data:`ENV_IDS`.
"""

from gymnasium.envs.registration import register, registry

__version__ = "0.1.0"

ENV_IDS = ("visenv/VisGen-v0", "visenv/VisGenImage-v0", "visenv/VisGenVideo-v0", "visenv/ToolEcho-v0",
           "visenv/VisGenStructured-v0")


def _register() -> None:
    specs = {
        "visenv/VisGen-v0": ("visenv.envs.visgen:VisGenEnv", {}),
        "visenv/VisGenImage-v0": ("visenv.envs.visgen:VisGenEnv", {"tasks": "image"}),
        "visenv/VisGenVideo-v0": ("visenv.envs.visgen:VisGenEnv", {"tasks": "video"}),
        "visenv/ToolEcho-v0": ("visenv.envs.toy:ToolEchoEnv", {}),
        "visenv/VisGenStructured-v0": ("visenv.wrappers.structured:make_structured", {}),
        "visenv/Remote-v0": ("visenv.remote:RemoteEnv", {}),
    }
    for env_id, (entry_point, kwargs) in specs.items():
        if env_id not in registry:
            register(id=env_id, entry_point=entry_point, kwargs=kwargs)


_register()
