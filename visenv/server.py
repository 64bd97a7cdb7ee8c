"""`visenv serve`: any visenv environment as an HTTP service speaking OpenEnv's protocol.

One server holds up to ``max_sessions`` sessions; each session owns its own environment (built by
``gymnasium.make(env_id, **env_options)``), so nothing is shared between sessions. Environment calls
run on a thread pool, never on the event loop, so sessions step concurrently.

Endpoints (OpenEnv's names and bodies; a session is identified as described below):

* ``WebSocket /ws``: one connection is one session, closed with the connection. Messages
  ``{"type": "reset", "data": {"seed": 0, "options": {...}}}``, ``{"type": "step", "data": {"text":
  "<one model turn>"}}``, ``{"type": "state"}``, ``{"type": "close"}``; answers ``{"type":
  "observation", "data": RESULT}``, ``{"type": "state", "data": STATE}`` or ``{"type": "error",
  "data": {"message", "code", "status"}}`` (``code`` one of OpenEnv's ``INVALID_JSON``,
  ``UNKNOWN_TYPE``, ``VALIDATION_ERROR``, ``EXECUTION_ERROR``, ``CAPACITY_REACHED``,
  ``SESSION_ERROR``; ``status`` the HTTP status the same mistake gets over HTTP). A connection
  idle for ``idle_timeout`` seconds gets a ``SESSION_ERROR`` and is closed.
* ``POST /reset`` ``{"seed": 0, "options": {...}, "session_id": ...}``: without ``session_id`` it
  opens a new session; the answer (RESULT) carries its ``session_id``. ``POST /step`` ``{"session_id":
  ..., "action": {"text": ...}}``; ``GET /state?session_id=...``; ``POST /close`` ``{"session_id":
  ...}`` (an extension: OpenEnv's HTTP endpoints are stateless). A session not used for
  ``idle_timeout`` seconds is closed.
* ``GET /schema``: JSON Schemas of the action, observation and state, each with its gymnasium space
  under ``x-gym-space`` (see :mod:`visenv.wire`); ``GET /health``; ``GET /metadata`` (with the
  environment's ``system_prompt``, when it has one).

RESULT is OpenEnv's ``{"observation", "reward", "done"}`` plus gymnasium's ``terminated``,
``truncated`` and ``info``; the observation is encoded as :mod:`visenv.wire` says (pixels as base64
arrays); a NaN reward (an invalid rubric total) travels as ``null``. ``options["task"]`` may be a
task's ``to_dict()``.

Bad input gets a 4xx answer with ``{"detail": message}``: malformed JSON 400, unknown session 404,
step before reset or after the end 409, oversized body or action 413, a body of the wrong shape or
bad reset options 422, all sessions taken 503. An environment that raises (a library bug) gets 500
with the exception's message and a logged traceback; its session stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import gymnasium

import visenv
from visenv import wire
from visenv.error import ConfigError, DependencyNotInstalled, ResetNeeded, TaskFormatError
from visenv.tasks import Task

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect
except ImportError as missing:
    raise DependencyNotInstalled(missing.name or "starlette", "serve", "visenv serve (the HTTP server)") from None

LOG = logging.getLogger("visenv.server")

RESET_KEYS = ("seed", "options", "episode_id")
"""What a reset may carry (``episode_id`` is OpenEnv's: it is reported by the session's state)."""


@dataclass
class ServerConfig:
    """What `visenv serve` serves, and its limits.

    Attributes:
        env_id: the gymnasium id each session builds, e.g. "visenv/VisGen-v0".
        env_options: keyword options of that environment (e.g. max_turns, observe_pixels).
        max_sessions: most sessions open at once (HTTP and WebSocket together); more get 503.
        idle_timeout: seconds without a request after which a session is closed.
        max_action_chars: most characters in one action's text; longer gets 413.
        max_body_bytes: most bytes in one request body or WebSocket message; larger gets 413.
    """

    env_id: str = "visenv/VisGen-v0"
    env_options: dict[str, Any] = field(default_factory=dict)
    max_sessions: int = 64
    idle_timeout: float = 300.0
    max_action_chars: int = 65_536
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.env_id not in gymnasium.envs.registry:
            raise ConfigError(f"env_id ({self.env_id!r}) is not a registered environment; use one of "
                              f"{list(visenv.ENV_IDS)} or register yours before serving it.")
        if not isinstance(self.env_options, dict):
            raise ConfigError(f"env_options must be a dict of keyword options, got {type(self.env_options).__name__}.")
        for name in ("max_sessions", "max_action_chars", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} ({value!r}) must be a positive integer.")
        if not self.idle_timeout > 0:
            raise ConfigError(f"idle_timeout ({self.idle_timeout!r}) must be a positive number of seconds.")
        if self.max_body_bytes < self.max_action_chars:
            raise ConfigError(f"max_body_bytes ({self.max_body_bytes}) must be at least max_action_chars "
                              f"({self.max_action_chars}), or no action of the allowed size fits in a request.")

    def make_env(self) -> gymnasium.Env:
        """A new environment for one session (its own copy of the options)."""
        try:
            return gymnasium.make(self.env_id, **copy.deepcopy(self.env_options))
        except TypeError as error:  # an option the environment does not take
            raise ConfigError(f"env_options ({self.env_options!r}) do not fit {self.env_id!r}: {error}.") from None


class Problem(Exception):
    """A request the server refuses: the HTTP status, OpenEnv's WebSocket error code, the message."""

    CODES = {400: "INVALID_JSON", 404: "SESSION_ERROR", 408: "SESSION_ERROR", 409: "EXECUTION_ERROR",
             413: "VALIDATION_ERROR", 422: "VALIDATION_ERROR", 503: "CAPACITY_REACHED"}

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.code = self.CODES.get(status, "EXECUTION_ERROR")


@dataclass(eq=False)
class Session:
    """One client's environment and its bookkeeping."""

    id: str
    env: gymnasium.Env
    over_websocket: bool
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_active: float = field(default_factory=time.monotonic)
    step_count: int = 0
    episode_id: str | None = None
    done: bool = False


class EnvServer:
    """The sessions and the ASGI application (``EnvServer(config).app``) that serves them.

    Args:
        config: what to serve and the limits.

    Raises:
        ConfigError: the environment cannot be built with ``config.env_options`` (checked by building one).
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        probe = config.make_env()
        try:
            self.observation_space = probe.observation_space
            self.action_space = probe.action_space
            self.schema = {"action": self._action_schema(), "observation": wire.json_schema(self.observation_space),
                           "state": STATE_SCHEMA}
            unwrapped = probe.unwrapped
            self.metadata = {"name": config.env_id, "version": visenv.__version__,
                             "description": (type(unwrapped).__doc__ or "").strip().split("\n")[0]}
            prompt = getattr(unwrapped, "system_prompt", None)
            if prompt:
                self.metadata["system_prompt"] = prompt
        finally:
            probe.close()
        self.sessions: dict[str, Session] = {}
        self._opening = 0
        self._executor = ThreadPoolExecutor(max_workers=config.max_sessions, thread_name_prefix="visenv-env")
        self._reaper: asyncio.Task | None = None
        self.app = Starlette(routes=[
            Route("/reset", self._http_reset, methods=["POST"]),
            Route("/step", self._http_step, methods=["POST"]),
            Route("/state", self._http_state, methods=["GET"]),
            Route("/close", self._http_close, methods=["POST"]),
            Route("/schema", lambda _: JSONResponse(self.schema), methods=["GET"]),
            Route("/metadata", lambda _: JSONResponse(self.metadata), methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
            WebSocketRoute("/ws", self._websocket),
        ], lifespan=self._lifespan)

    def _action_schema(self) -> dict[str, Any]:
        return {"type": "object", "required": ["text"], "additionalProperties": False,
                "properties": {"text": {"type": "string", "maxLength": self.config.max_action_chars,
                                        "description": "one model turn"},
                               "metadata": {"type": "object", "description": "ignored (OpenEnv's Action field)"}},
                "x-gym-space": wire.space_to_json(self.action_space)}

    # ---- sessions -------------------------------------------------------------------------------

    async def _run(self, function, *args, **kwargs):
        """``function(*args, **kwargs)`` on the thread pool (environment code never runs on the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: function(*args, **kwargs))

    async def open_session(self, over_websocket: bool) -> Session:
        if len(self.sessions) + self._opening >= self.config.max_sessions:
            raise Problem(503, f"All {self.config.max_sessions} sessions are taken; close one (WebSocket 'close' "
                               "or POST /close), wait for idle ones to time out, or start the server with a "
                               "larger --max-sessions.")
        self._opening += 1
        try:
            env = await self._run(self.config.make_env)
        finally:
            self._opening -= 1
        session = Session(secrets.token_hex(16), env, over_websocket)
        self.sessions[session.id] = session
        return session

    async def close_session(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        async with session.lock:  # a step in flight finishes first
            await self._run(session.env.close)

    def session(self, session_id: Any) -> Session:
        if not isinstance(session_id, str):
            raise Problem(422, f"session_id must be the string that POST /reset returned, got {session_id!r}.")
        session = self.sessions.get(session_id)
        if session is None or session.over_websocket:
            raise Problem(404, f"Unknown session {session_id!r}: it was closed, timed out after "
                               f"{self.config.idle_timeout:g} s idle, or never existed. POST /reset without a "
                               "session_id opens a new one.")
        return session

    async def _reap_idle(self) -> None:
        """Close HTTP sessions idle past the timeout (a WebSocket times out in its own loop)."""
        period = min(self.config.idle_timeout / 4, 5.0)
        while True:
            await asyncio.sleep(period)
            deadline = time.monotonic() - self.config.idle_timeout
            for session in list(self.sessions.values()):
                if not session.over_websocket and not session.lock.locked() and session.last_active < deadline:
                    await self.close_session(session)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self._reaper = asyncio.create_task(self._reap_idle())
        try:
            yield
        finally:
            self._reaper.cancel()
            for session in list(self.sessions.values()):
                await self.close_session(session)
            self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- the environment calls ------------------------------------------------------------------

    async def reset(self, session: Session, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise Problem(422, f"A reset's data must be an object like {{\"seed\": 0, \"options\": {{}}}}, got {data!r}.")
        unknown = sorted(set(data) - set(RESET_KEYS))
        if unknown:
            raise Problem(422, f"A reset takes {list(RESET_KEYS)}; remove {unknown}.")
        seed, options = data.get("seed"), data.get("options")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise Problem(422, f"seed ({seed!r}) must be a non-negative integer or null.")
        if options is not None and not isinstance(options, dict):
            raise Problem(422, f"options ({options!r}) must be an object or null.")
        episode_id = data.get("episode_id")
        if episode_id is not None and not (isinstance(episode_id, str) and 0 < len(episode_id) <= 255):
            raise Problem(422, f"episode_id ({_clip(episode_id)}) must be a string of 1 to 255 characters or null.")
        if options and isinstance(options.get("task"), dict):
            try:
                options = {**options, "task": Task.from_dict(options["task"])}
            except (TaskFormatError, ConfigError) as error:
                raise Problem(422, f"options['task'] is not a valid task: {error}") from None
        async with session.lock:
            try:
                observation, info = await self._run(session.env.reset, seed=seed, options=options)
            except ConfigError as error:
                raise Problem(422, f"reset options refused: {error}") from None
            except Exception as error:
                raise _crashed("reset", error) from None
            session.step_count, session.done = 0, False
            session.episode_id = episode_id or info.get("episode_id")
        session.last_active = time.monotonic()
        return {"observation": wire.encode(observation, self.observation_space), "reward": None, "done": False,
                "info": info}

    async def step(self, session: Session, action: Any) -> dict[str, Any]:
        if not isinstance(action, dict) or not isinstance(action.get("text"), str) \
                or set(action) - {"text", "metadata"}:
            raise Problem(422, f"An action must be an object {{\"text\": \"<one model turn>\"}}, got "
                               f"{_clip(action)}.")
        text = action["text"]
        if len(text) > self.config.max_action_chars:
            raise Problem(413, f"The action holds {len(text)} characters; this server takes at most "
                               f"{self.config.max_action_chars} (--max-action-chars).")
        async with session.lock:
            try:
                observation, reward, terminated, truncated, info = await self._run(session.env.step, text)
            except (ResetNeeded, gymnasium.error.ResetNeeded) as error:
                raise Problem(409, str(error)) from None
            except Exception as error:
                raise _crashed("step", error) from None
            session.step_count += 1
            session.done = bool(terminated or truncated)
        session.last_active = time.monotonic()
        reward = float(reward)
        return {"observation": wire.encode(observation, self.observation_space),
                "reward": None if reward != reward else reward, "done": session.done,
                "terminated": bool(terminated), "truncated": bool(truncated), "info": info}

    @staticmethod
    def state(session: Session) -> dict[str, Any]:
        session.last_active = time.monotonic()
        return {"episode_id": session.episode_id, "step_count": session.step_count, "done": session.done,
                "session_id": session.id}

    # ---- HTTP -----------------------------------------------------------------------------------

    async def _body(self, request: Request) -> dict[str, Any]:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise Problem(413, f"The request body has {declared} bytes; this server takes at most {limit} "
                               "(--max-body-bytes).")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise Problem(413, f"The request body exceeds {limit} bytes (--max-body-bytes).")
        if not body:
            return {}
        return _parse_object(bytes(body))

    async def _answer(self, handler, request: Request) -> Response:
        try:
            return Response(wire.dumps(await handler(request)), media_type="application/json")
        except Problem as problem:
            return JSONResponse({"detail": str(problem)}, status_code=problem.status)

    async def _http_reset(self, request: Request) -> Response:
        async def handle(request):
            body = await self._body(request)
            session_id = body.pop("session_id", None)
            session = self.session(session_id) if session_id is not None else await self.open_session(False)
            try:
                result = await self.reset(session, body)
            except Problem:
                if session_id is None:  # the session this request opened is of no use to anyone
                    await self.close_session(session)
                raise
            return {**result, "session_id": session.id}
        return await self._answer(handle, request)

    async def _http_step(self, request: Request) -> Response:
        async def handle(request):
            body = await self._body(request)
            unknown = sorted(set(body) - {"session_id", "action"})
            if unknown or "action" not in body:
                raise Problem(422, f"POST /step takes {{\"session_id\": ..., \"action\": {{\"text\": ...}}}}; "
                                   f"got the keys {sorted(body)}.")
            session = self.session(body.get("session_id"))
            return {**await self.step(session, body["action"]), "session_id": session.id}
        return await self._answer(handle, request)

    async def _http_state(self, request: Request) -> Response:
        async def handle(request):
            return self.state(self.session(request.query_params.get("session_id")))
        return await self._answer(handle, request)

    async def _http_close(self, request: Request) -> Response:
        async def handle(request):
            session = self.session((await self._body(request)).get("session_id"))
            await self.close_session(session)
            return {"session_id": session.id, "closed": True}
        return await self._answer(handle, request)

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "healthy", "sessions": len(self.sessions),
                             "max_sessions": self.config.max_sessions})

    # ---- WebSocket ------------------------------------------------------------------------------

    async def _websocket(self, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            session = await self.open_session(True)
        except Problem as problem:
            await _send_error(websocket, problem)
            await websocket.close(code=1013)  # try again later
            return
        close_code, close_reason = 1000, ""
        try:
            while True:
                try:
                    message = await asyncio.wait_for(websocket.receive(), timeout=self.config.idle_timeout)
                except asyncio.TimeoutError:
                    await _send_error(websocket, Problem(408, f"The session was idle for {self.config.idle_timeout:g} s "
                                                               "and is closed; connect again to open a new one."))
                    close_code, close_reason = 4408, f"session idle for {self.config.idle_timeout:g} s: closed"
                    break
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    reply = await self._ws_message(session, message)
                except Problem as problem:
                    await _send_error(websocket, problem)
                    continue
                if reply is None:
                    break
                await websocket.send_text(wire.dumps(reply))
        except WebSocketDisconnect:
            pass
        finally:
            await self.close_session(session)
            try:
                await websocket.close(code=close_code, reason=close_reason)
            except (RuntimeError, WebSocketDisconnect):  # already closed by the client
                pass

    async def _ws_message(self, session: Session, message: dict[str, Any]) -> dict[str, Any] | None:
        """The answer to one message, or None for "close"."""
        raw = message.get("text") if message.get("text") is not None else message.get("bytes") or b""
        size = len(raw.encode() if isinstance(raw, str) else raw)
        if size > self.config.max_body_bytes:
            raise Problem(413, f"The message has {size} bytes; this server takes at most {self.config.max_body_bytes}.")
        request = _parse_object(raw)
        kind = request.get("type")
        if kind == "reset":
            return {"type": "observation", "data": await self.reset(session, request.get("data") or {})}
        if kind == "step":
            return {"type": "observation", "data": await self.step(session, request.get("data"))}
        if kind == "state":
            return {"type": "state", "data": self.state(session)}
        if kind == "close":
            return None
        problem = Problem(422, f"Unknown message type {kind!r}; send one of 'reset', 'step', 'state', 'close'.")
        problem.code = "UNKNOWN_TYPE"
        raise problem


STATE_SCHEMA = {"type": "object", "properties": {
    "episode_id": {"type": ["string", "null"]}, "step_count": {"type": "integer", "minimum": 0},
    "done": {"type": "boolean"}, "session_id": {"type": "string"}}}


def _parse_object(raw: str | bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise Problem(400, f"The body is not valid JSON ({error}); send a JSON object.") from None
    if not isinstance(data, dict):
        raise Problem(422, f"The body must be a JSON object, got {type(data).__name__}.")
    return data


def _crashed(call: str, error: Exception) -> Problem:
    """A library bug in the environment: logged with its traceback, answered with 500; the session stays open."""
    LOG.error("env.%s raised", call, exc_info=error)
    return Problem(500, f"The environment raised {type(error).__name__} in {call}(): {error}. This is a bug of the "
                        "environment, not of the request (the server log has the traceback); reset to go on.")


def _clip(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


async def _send_error(websocket: WebSocket, problem: Problem) -> None:
    await websocket.send_text(wire.dumps({"type": "error", "data": {"message": str(problem), "code": problem.code,
                                                                     "status": problem.status}}))


def uvicorn_config(server: EnvServer, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    """uvicorn's settings for ``server`` (WebSocket messages capped a little above ``max_body_bytes``)."""
    return uvicorn.Config(server.app, host=host, port=port, log_level=log_level, lifespan="on",
                          ws_max_size=server.config.max_body_bytes + 1024, timeout_graceful_shutdown=5)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one).

    Raises:
        OSError: the address is taken or cannot be bound (the message names it).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port} ({error.strerror}); choose another --port "
                                   "or --host") from None
    return sock


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGINT or SIGTERM, then close every session.

    Raises:
        ConfigError: the environment cannot be built with the configured options.
        OSError: ``host:port`` cannot be bound.
    """
    env_server = EnvServer(config)
    sock = bind(host, port)
    try:
        uvicorn.Server(uvicorn_config(env_server, host, port, log_level)).run(sockets=[sock])
    finally:
        sock.close()


class ServerThread:
    """A server on a loopback port in a background thread, for tests, notebooks and benchmarks.

    ``with ServerThread(ServerConfig(...)) as server: RemoteEnv(server.url)``; leaving the block stops it.

    Args:
        config: what to serve.
        host: the address to bind.
        port: the port; 0 picks a free one.
    """

    def __init__(self, config: ServerConfig, host: str = "127.0.0.1", port: int = 0):
        self.env_server = EnvServer(config)
        self._socket = bind(host, port)
        self.host, self.port = self._socket.getsockname()[:2]
        self._server = uvicorn.Server(uvicorn_config(self.env_server, host, self.port))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True,
                                        name="visenv-server")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The server on {self.url} did not start.")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()
