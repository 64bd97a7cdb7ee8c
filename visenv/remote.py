"""RemoteEnv: a gymnasium environment played on a `visenv serve` server (OpenEnv's WebSocket protocol).

    env = RemoteEnv("http://gpu-node-3:8000")          # or gymnasium.make("visenv/Remote-v0", url=...)
    observation, info = env.reset(seed=0)
    observation, reward, terminated, truncated, info = env.step(turn_text)

The spaces are the served environment's (read from ``GET /schema``), and ``reset`` / ``step``
return what the served environment returned, ``info`` included, so the rollout backends play a
remote environment unchanged: ``SerialRollout(policy, functools.partial(RemoteEnv, url), ...)``
(a partial of the class pickles, so ``RayRollout`` ships it to its workers; so does a RemoteEnv
itself, as a fresh client of the same server).

One RemoteEnv holds one WebSocket session, opened by the first ``reset`` and closed by ``close``.
When the connection is lost (server stopped, idle timeout), a ``step`` raises
:class:`~visenv.error.RemoteEnvError` saying so (the episode is gone), and ``reset`` opens a new
session. A reset without a seed in a new session starts the server's generator afresh.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import gymnasium as gym

from visenv import wire
from visenv.envs.base import coerce_action
from visenv.error import ConfigError, DependencyNotInstalled, RemoteEnvError, ResetNeeded
from visenv.tasks import Task

try:
    from websockets.exceptions import ConnectionClosed, InvalidHandshake
    from websockets.sync.client import connect
except ImportError:
    raise DependencyNotInstalled("websockets", "serve", "visenv.remote.RemoteEnv") from None


class RemoteEnv(gym.Env):
    """A client of one session on a `visenv serve` server.

    Args:
        url: the server, ``http://host:port`` (``ws://`` works too).
        timeout: seconds to wait for the server's answer to one call (a step runs the tools).
        max_message_bytes: largest answer accepted (observations with pixels are the large ones).

    Raises:
        RemoteEnvError: the server cannot be reached or does not answer ``/schema``.
    """

    metadata = {"render_modes": []}

    def __init__(self, url: str, timeout: float = 300.0, max_message_bytes: int = 64 << 20):
        if not isinstance(url, str) or not url.startswith(("http://", "https://", "ws://", "wss://")):
            raise ConfigError(f"url ({url!r}) must be the server's address, e.g. 'http://127.0.0.1:8000'.")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._http = self.url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        schema = self._get("/schema")
        self.observation_space = wire.space_from_json(schema["observation"]["x-gym-space"])
        self.action_space = wire.space_from_json(schema["action"]["x-gym-space"])
        self.server_metadata = self._get("/metadata")
        self._ws = None

    @property
    def system_prompt(self) -> str | None:
        """The served environment's tool documentation (None when it has none)."""
        return self.server_metadata.get("system_prompt")

    def _get(self, path: str) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(self._http + path, timeout=self.timeout) as answer:
                return json.loads(answer.read())
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise RemoteEnvError(f"Cannot read {self._http}{path} ({error}); is `visenv serve` running there?") from None

    def _call(self, message: dict[str, Any], what: str) -> dict[str, Any]:
        """Send one message on the session and return the answer's data."""
        if self._ws is None:
            ws_url = self._http.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/ws"
            try:
                # entered as its context (websockets' supported use); _drop() leaves it
                self._ws = connect(ws_url, open_timeout=self.timeout, max_size=self.max_message_bytes).__enter__()
            except (OSError, InvalidHandshake, TimeoutError) as error:
                raise RemoteEnvError(f"Cannot open a session on {ws_url} ({error}); is `visenv serve` running "
                                     "there?") from None
        try:
            self._ws.send(wire.dumps(message))
            answer = json.loads(self._ws.recv(timeout=self.timeout))
        except (ConnectionClosed, OSError, TimeoutError) as error:
            self._drop()
            raise RemoteEnvError(f"{what} failed: the connection to {self.url} was lost ({error}). The session and "
                                 "its episode are gone; call reset() to open a new session.") from None
        if answer.get("type") == "error":
            data = answer.get("data", {})
            text = f"{what}: the server refused it ({data.get('code')}): {data.get('message')}"
            if data.get("status") == 409:
                raise ResetNeeded(text)
            if data.get("code") in ("SESSION_ERROR", "CAPACITY_REACHED"):
                self._drop()
            raise RemoteEnvError(text)
        return answer["data"]

    def _drop(self) -> None:
        if self._ws is not None:
            self._ws.__exit__(None, None, None)
            self._ws = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if options and isinstance(options.get("task"), Task):
            options = {**options, "task": options["task"].to_dict()}
        message = {"type": "reset", "data": {"seed": seed, "options": options}}
        had_session = self._ws is not None
        try:
            data = self._call(message, "reset()")
        except RemoteEnvError:
            if not had_session or self._ws is not None:  # no server, or a refusal on a live session
                raise
            data = self._call(message, "reset()")  # the old session was gone (idle timeout, restart): a new one
        return wire.decode(data["observation"], self.observation_space), data["info"]

    def step(self, action: Any):
        data = self._call({"type": "step", "data": {"text": coerce_action(action)}}, "step()")
        reward = float("nan") if data["reward"] is None else data["reward"]
        return (wire.decode(data["observation"], self.observation_space), reward, data["terminated"],
                data["truncated"], data["info"])

    def state(self) -> dict[str, Any]:
        """The session's state on the server: ``episode_id``, ``step_count``, ``done``, ``session_id``."""
        return self._call({"type": "state"}, "state()")

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._ws.send(json.dumps({"type": "close"}))
            except (ConnectionClosed, OSError):
                pass
            self._drop()
        super().close()

    def __reduce__(self):  # a copy is a fresh client of the same server (a live connection does not pickle)
        return type(self), (self.url, self.timeout, self.max_message_bytes)
