"""Helpers of the rl tests: ToolEcho data from a noisy teacher, tiny policies, and two small test envs.

Importable by Ray workers too (the Ray fixture puts this folder on their PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rl.config import EnvConfig
from rl.hf import CausalLMPolicy, tiny_causal_lm
from rl.tokenizer import train_tokenizer

ECHO = EnvConfig("visenv/ToolEcho-v0", {"subjects": ["cat", "robot", "castle", "teapot"]})
TOOLS = ("tool_text2image_qwen", "tool_text2image_gemini")


def echo_call(name: str, prompt: str, n: int) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": {"prompt": prompt, "n": n}}) + "</tool_call>"


def echo_examples(count: int, correct_share: float, seed: int = 0) -> list[list[dict[str, str]]]:
    """ToolEcho chat trajectories from a teacher that copies the requested call with probability
    ``correct_share`` and otherwise makes a well-formed call with random arguments."""
    env = ECHO.make()
    rng = random.Random(seed)
    examples = []
    for i in range(count):
        observation, info = env.reset(seed=seed * 100_000 + i)
        target = info["target"]
        if rng.random() < correct_share:
            text = echo_call(target["name"], **target["arguments"])
        else:
            text = echo_call(rng.choice(TOOLS), rng.choice(ECHO.options["subjects"]), rng.randint(1, 2))
        examples.append([{"role": "user", "content": observation["text"]}, {"role": "assistant", "content": text}])
    return examples


def echo_tokenizer():
    """A BPE trained on ToolEcho prompts and calls, and on the words of :class:`LetterEnv`."""
    texts = [m["content"] for e in echo_examples(200, 0.5) for m in e]
    texts += [LetterEnv.prompt(w, t) for w in LetterEnv.WORDS for t in range(3)]
    return train_tokenizer(texts, 1000)


def tiny_policy(tokenizer, hidden_size: int = 64, max_new_tokens: int = 16, seed: int = 0) -> CausalLMPolicy:
    return CausalLMPolicy(tiny_causal_lm(len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                         seed=seed), tokenizer, max_new_tokens=max_new_tokens)


def tiny_lora_policy(tokenizer, max_new_tokens: int = 16) -> CausalLMPolicy:
    """:func:`tiny_policy` with LoRA adapters (rank 4) on the attention's q and v projections."""
    from rl.hf import add_lora

    return add_lora(tiny_policy(tokenizer, max_new_tokens=max_new_tokens), rank=4, alpha=8,
                    target_modules=["q_proj", "v_proj"])


class LetterEnv(gym.Env):
    """A three-turn toy: each turn asks for a word; the reward is the share of its letters the turn
    contains (so random policies already get varied rewards). With ``pixels=True`` each observation
    also carries two random 16x16 images (the second one blank), as VisGen's ``pixels`` does."""

    WORDS = ("castle", "violin", "forest", "teapot")

    def __init__(self, turns: int = 3, pixels: bool = False):
        self.turns = turns
        self.pixels = pixels
        entries = {"text": spaces.Text(256), "artifacts": spaces.Sequence(spaces.Text(16))}
        if pixels:
            entries["pixels"] = spaces.Box(0, 255, (2, 16, 16, 3), dtype=np.uint8)
        self.observation_space = spaces.Dict(entries)
        self.action_space = spaces.Text(256)

    @staticmethod
    def prompt(word: str, turn: int) -> str:
        return f"Turn {turn}: say {word}."

    def _observation(self) -> dict[str, Any]:
        obs = {"text": self.prompt(self.word, self.turn), "artifacts": ()}
        if self.pixels:
            images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
            images[0] = self.np_random.integers(1, 256, (16, 16, 3), dtype=np.uint8)
            obs["pixels"] = images
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.turn = 0
        self.word = self.WORDS[int(self.np_random.integers(len(self.WORDS)))]
        return self._observation(), {}

    def step(self, action: str):
        reward = sum(letter in action for letter in set(self.word)) / len(set(self.word))
        self.turn += 1
        done = self.turn >= self.turns
        self.word = self.WORDS[int(self.np_random.integers(len(self.WORDS)))]
        return self._observation(), reward, done, False, {"reward_components": {"letters": reward}}


class CrashOnceEnv(gym.Wrapper):
    """ToolEcho that kills its whole process the first time it is reset with ``crash_seed``.

    ``marker`` is a file path: it is created just before the crash, so the re-run survives.
    """

    def __init__(self, marker: str, crash_seed: int):
        super().__init__(ECHO.make())
        self.marker = marker
        self.crash_seed = crash_seed

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed == self.crash_seed and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return self.env.reset(seed=seed, options=options)


class StallEnv(gym.Wrapper):
    """ToolEcho whose reset with ``stall_seed`` never returns (it sleeps an hour, or ``seconds``): a hung tool or judge.

    With a ``marker`` path only the first such reset stalls (it creates the file), so a re-run goes through.
    """

    def __init__(self, stall_seed: int, marker: str | None = None, seconds: float = 3600.0):
        super().__init__(ECHO.make())
        self.stall_seed = stall_seed
        self.marker = marker
        self.seconds = seconds

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed == self.stall_seed and not (self.marker and os.path.exists(self.marker)):
            if self.marker:
                open(self.marker, "w").close()
            time.sleep(self.seconds)
        return self.env.reset(seed=seed, options=options)


class SlowSyncPolicy(CausalLMPolicy):
    """A policy whose ``set_weights`` first sleeps ``sync_seconds``: a window to kill a worker mid-sync."""

    sync_seconds = 3.0

    def set_weights(self, weights):
        import time

        time.sleep(self.sync_seconds)
        super().set_weights(weights)


class RaisingEnv(gym.Wrapper):
    """An env (ToolEcho by default) whose ``step`` raises, as a buggy env would, in episodes reset with
    ``fail_seed``."""

    def __init__(self, fail_seed: int, make_env=ECHO.make):
        super().__init__(make_env())
        self.fail_seed = fail_seed

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.failing = seed == self.fail_seed
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        if self.failing:
            raise OverflowError("int too large to convert to float")
        return self.env.step(action)
