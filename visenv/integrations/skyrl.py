"""VisGen as a skyrl-gym text environment (``pip install 'visenv[skyrl]'``, skyrl-gym >= 0.4).

SkyRL makes one environment per trajectory with ``skyrl_gym.make(env_class, env_config=...,
extras=row)``, calls ``init(prompt)`` for the first messages, then ``step(model_text)`` after each
model turn until ``done``. :class:`VisGenSkyRLEnv` plays a :class:`~visenv.envs.visgen.VisGenEnv`
episode that way: the model writes UTPC turns (``<plan>``, ``<tool_call>``, ``<answer>``) as text,
exactly as visenv's own trainer does; each step's reward is the environment's (0 or an error
penalty on intermediate turns, plus the rubric's total at the end), its observations the tool
response as a user message, and ``get_metrics()`` the episode's reward components and checks.

The task comes from the row: ``task_seed`` (rows of one GRPO group share it) or ``task`` (an id or
index of the suite), at the top level of ``extras`` or under ``extras["extra_info"]``. ``init``
replaces the row's prompt with the environment's own: the tool documentation as the system
message and the request as the user message. ``env_config`` holds the
:class:`~visenv.envs.config.VisGenConfig` options (a dict or an OmegaConf mapping). ::

    from visenv.integrations.skyrl import register, task_rows
    register()                    # skyrl_gym.make("visenv_visgen", ...) now builds VisGenSkyRLEnv
    rows = task_rows(256, seed=0)  # the dataset: prompt placeholder, env_class, task_seed

The class is built on first access (``from visenv.integrations.skyrl import VisGenSkyRLEnv``),
so importing this module needs no skyrl-gym.
"""

from __future__ import annotations

from typing import Any

from visenv.envs.visgen import VisGenEnv
from visenv.error import DependencyNotInstalled
from visenv.integrations.session import lazy_class, task_seeds

ENV_ID = "visenv_visgen"
"""The id :func:`register` gives the environment in skyrl-gym's registry (the rows' ``env_class``)."""


def _base_text_env() -> type:
    try:
        from skyrl_gym.envs.base_text_env import BaseTextEnv
    except ImportError:
        raise DependencyNotInstalled("skyrl-gym", "skyrl", "The SkyRL adapter (visenv.integrations.skyrl)") from None
    return BaseTextEnv


def _row_value(extras: dict[str, Any], key: str) -> Any:
    value = extras.get(key)
    if value is None and isinstance(extras.get("extra_info"), dict):
        value = extras["extra_info"].get(key)
    return value


def _plain(config: Any) -> Any:
    """An OmegaConf mapping as a dict (other values as they are)."""
    if config is None or isinstance(config, dict) or not hasattr(config, "items"):
        return config
    try:
        from omegaconf import OmegaConf
    except ImportError:
        return dict(config)
    return OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(config)


class _VisGenSkyRL:
    """The body of :class:`VisGenSkyRLEnv` (mixed into skyrl-gym's ``BaseTextEnv`` on first access).

    Args:
        env_config: the :class:`~visenv.envs.config.VisGenConfig` options.
        extras: the dataset row: ``task_seed`` or ``task`` (top level or under ``extra_info``).
    """

    def __init__(self, env_config: Any = None, extras: dict[str, Any] | None = None):
        super().__init__()
        self.env = VisGenEnv(_plain(env_config))
        self.max_turns = self.env.config.max_turns
        extras = dict(extras or {})
        self.task_seed = _row_value(extras, "task_seed")
        self.task = _row_value(extras, "task")
        self.components: dict[str, Any] = {}
        self.checks: dict[str, Any] = {}

    def init(self, prompt: Any = None) -> tuple[list[dict[str, str]], dict[str, Any]]:
        """Reset the environment on the row's task: the system message (tool documentation) and the request."""
        observation, info = self.env.reset(seed=self.task_seed,
                                           options=None if self.task is None else {"task": self.task})
        self.turns = 0
        messages = [{"role": "system", "content": self.env.system_prompt},
                    {"role": "user", "content": observation["text"]}]
        return messages, {"task_id": info["task_id"]}

    def step(self, action: str) -> dict[str, Any]:
        """Play one model turn: the tool response (none once done), the step's reward, done, metadata."""
        self.turns += 1
        observation, reward, terminated, truncated, info = self.env.step(action)
        done = bool(terminated or truncated)
        if done:
            self.components = dict(info.get("reward_components", {}))
            self.checks = dict(info.get("checks", {}))
        return {"observations": [] if done else [{"role": "user", "content": observation["text"]}],
                "reward": float(reward), "done": done,
                "metadata": {"task_id": info["task_id"], "tool_result": info.get("tool_result"),
                             "reward_components": info.get("reward_components", {})},
                "postprocessed_action": None}

    def get_metrics(self) -> dict[str, Any]:
        """The finished episode: turns, calls, failed calls, reward components and checks (numbers only)."""
        record = self.env.record
        metrics: dict[str, Any] = {"turns": self.turns, "calls": len(record.calls),
                                   "failed_calls": sum(not c.ok for c in record.calls)}
        metrics.update({f"reward/{k}": v for k, v in self.components.items() if v is not None})
        metrics.update({f"check/{k}": float(v) for k, v in self.checks.items() if v is not None})
        return metrics

    def close(self) -> None:
        self.env.close()


__getattr__ = lazy_class(__name__, "VisGenSkyRLEnv", _VisGenSkyRL, lambda: _base_text_env())


def register(env_id: str = ENV_ID) -> None:
    """Register :class:`VisGenSkyRLEnv` in skyrl-gym's registry as ``env_id`` (once per process)."""
    _base_text_env()
    from skyrl_gym.envs.registration import register as skyrl_register, registry

    if env_id not in registry:
        skyrl_register(id=env_id, entry_point=f"{__name__}:VisGenSkyRLEnv")


def task_rows(n: int, seed: int = 0, env_id: str = ENV_ID) -> list[dict[str, Any]]:
    """``n`` SkyRL dataset rows: a placeholder prompt (``init`` writes the real one), the env class and
    a distinct ``task_seed`` each, drawn from ``seed``."""
    return [{"prompt": [{"role": "user", "content": ""}], "env_class": env_id, "task_seed": s}
            for s in task_seeds(n, seed)]
