"""RLlib PPO (new API stack) on :class:`~visenv.wrappers.structured.StructuredVisGen`, and policy returns.

Needs the ``rllib`` extra (``pip install "visenv[rllib]"``). Typical use::

    import ray
    ray.init(num_cpus=2, include_dashboard=False)
    algo = ppo_config({"task_seed": 0}).build_algo()
    for _ in range(10):
        algo.train()
    env = make_structured({"task_seed": 10_000})       # held-out tasks
    print(mean_return(env, greedy_policy(algo.get_module(), env.action_space), episodes=200))

Everything runs in the driver process (no env-runner or learner actors), so it fits any CPU budget.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
from gymnasium import spaces
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

from visenv.wrappers.structured import StructuredVisGen, register_rllib

Policy = Callable[[np.ndarray], np.ndarray]


def ppo_config(env_config: Mapping[str, Any] | None = None, *, seed: int = 0,
               train_batch_size: int = 1000) -> PPOConfig:
    """PPO on the structured environment, sized for a laptop.

    Sampling and learning run in the driver (``num_env_runners=0``, ``num_learners=0``); the
    policy and value networks are 64x64 MLPs; each iteration collects ``train_batch_size`` steps
    and makes 6 epochs of minibatches of a quarter of it (lr 1e-3, entropy 0.01).

    Args:
        env_config: options of :func:`~visenv.wrappers.structured.make_structured`.
        seed: seeds the networks, the sampling and the environments.
        train_batch_size: environment steps per training iteration.
    """
    return (PPOConfig()
            .environment(register_rllib(), env_config=dict(env_config or {}))
            .env_runners(num_env_runners=0, num_envs_per_env_runner=1)
            .learners(num_learners=0)
            .training(train_batch_size_per_learner=train_batch_size, minibatch_size=max(1, train_batch_size // 4),
                      num_epochs=6, lr=1e-3, entropy_coeff=0.01)
            .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=[64, 64]))
            .debugging(seed=seed))


def greedy_policy(module: Any, action_space: spaces.MultiDiscrete) -> Policy:
    """The most likely action of each component under an RLlib RLModule's ``forward_inference``."""
    sizes = [int(n) for n in action_space.nvec]

    def act(observation: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = module.forward_inference({"obs": torch.as_tensor(observation)[None]})["action_dist_inputs"][0]
        return np.array([int(part.argmax()) for part in torch.split(logits, sizes)])

    return act


def random_policy(action_space: spaces.MultiDiscrete, seed: int) -> Policy:
    """Uniformly random actions (the baseline PPO must beat)."""
    space = spaces.MultiDiscrete(action_space.nvec, seed=seed)
    return lambda observation: space.sample()


def mean_return(env: StructuredVisGen, policy: Policy, episodes: int, seed: int = 0) -> float:
    """The mean undiscounted return of ``policy`` over ``episodes`` episodes reset with seeds ``seed + i``."""
    total = 0.0
    for i in range(episodes):
        observation, _ = env.reset(seed=seed + i)
        done = False
        while not done:
            observation, reward, terminated, truncated, _ = env.step(policy(observation))
            total += reward
            done = terminated or truncated
    return total / episodes
