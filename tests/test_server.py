"""`visenv serve` and RemoteEnv over real HTTP and WebSocket on loopback.

Each server runs in a background thread on a free port (:class:`~visenv.server.ServerThread`) and
stops when its ``with`` block ends; one command-line test runs `visenv serve` as a process.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import gymnasium
import httpx
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from websockets.sync.client import connect

from baselines.workflow_agent import WorkflowAgent
from visenv import wire
from visenv.envs.visgen import VisGenEnv
from visenv.error import ConfigError, RemoteEnvError, ResetNeeded
from visenv.remote import RemoteEnv
from visenv.server import ServerConfig, ServerThread
from visenv.tasks import make_suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = {"max_turns": 9}


@pytest.fixture(scope="module")
def server(media_db):  # media_db: the procedural media database is built once, before any session needs it
    with ServerThread(ServerConfig(env_options=OPTIONS, max_sessions=8)) as running:
        yield running


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def jsonable(value):
    """What a value becomes after a trip through JSON (tuples become lists)."""
    return json.loads(wire.dumps(value))


def ws_call(ws, message):
    ws.send(json.dumps(message))
    return json.loads(ws.recv(timeout=60))


def play_teacher(env, seed, options=None):
    """The scripted teacher's episode: every observation, reward, flag and info."""
    agent = WorkflowAgent(seed=seed)
    observation, info = env.reset(seed=seed, options=options)
    agent.reset(observation, seed=seed)
    trace = [(observation, info)]
    done = False
    while not done:
        observation, reward, terminated, truncated, info = env.step(agent.act(observation))
        trace.append((observation, reward, terminated, truncated, info))
        done = terminated or truncated
    return trace


def test_health_schema_and_metadata(http, server):
    assert http.get("/health").json() == {"status": "healthy", "sessions": 0, "max_sessions": 8}
    schema = http.get("/schema").json()
    assert set(schema) == {"action", "observation", "state"}
    assert schema["action"]["required"] == ["text"]
    local = VisGenEnv(**OPTIONS)
    assert wire.space_from_json(schema["observation"]["x-gym-space"]) == local.observation_space
    assert wire.space_from_json(schema["action"]["x-gym-space"]) == local.action_space
    meta = http.get("/metadata").json()
    assert meta["name"] == "visenv/VisGen-v0" and meta["system_prompt"] == local.system_prompt


def test_http_session_reset_step_state_close(http):
    reset = http.post("/reset", json={"seed": 5, "episode_id": "mine"}).json()
    assert {"observation", "reward", "done", "info", "session_id"} <= set(reset)
    assert reset["reward"] is None and reset["done"] is False
    local = VisGenEnv(**OPTIONS)
    observation, info = local.reset(seed=5)
    assert reset["observation"] == jsonable(observation) and reset["info"] == jsonable(info)
    sid = reset["session_id"]
    step = http.post("/step", json={"session_id": sid, "action": {"text": "no tags at all"}}).json()
    observation, reward, terminated, truncated, info = local.step("no tags at all")
    assert step["observation"] == jsonable(observation) and step["reward"] == reward
    assert (step["terminated"], step["truncated"], step["done"]) == (terminated, truncated, False)
    assert step["info"] == jsonable(info)
    assert http.get("/state", params={"session_id": sid}).json() == {
        "episode_id": "mine", "step_count": 1, "done": False, "session_id": sid}
    assert http.post("/close", json={"session_id": sid}).json()["closed"] is True
    answer = http.post("/step", json={"session_id": sid, "action": {"text": "x"}})
    assert answer.status_code == 404 and "Unknown session" in answer.json()["detail"]


def test_websocket_session_speaks_openenv_messages(server):
    local = VisGenEnv(**OPTIONS)
    with connect(server.url.replace("http", "ws") + "/ws") as ws:
        answer = ws_call(ws, {"type": "reset", "data": {"seed": 2}})
        observation, info = local.reset(seed=2)
        assert answer["type"] == "observation" and answer["data"]["observation"] == jsonable(observation)
        answer = ws_call(ws, {"type": "step", "data": {"text": "<think>x</think>"}})
        observation, reward, *_ = local.step("<think>x</think>")
        assert answer["data"]["observation"] == jsonable(observation) and answer["data"]["reward"] == reward
        state = ws_call(ws, {"type": "state"})
        assert state["type"] == "state" and state["data"]["step_count"] == 1
        error = ws_call(ws, {"type": "jump"})
        assert error["type"] == "error" and error["data"]["code"] == "UNKNOWN_TYPE"
        too_long = ws_call(ws, {"type": "step", "data": {"text": "x" * 70_000}})
        assert too_long["data"]["status"] == 413 and too_long["data"]["code"] == "VALIDATION_ERROR"
        ws.send("{not json")
        assert json.loads(ws.recv(timeout=60))["data"]["code"] == "INVALID_JSON"
        assert ws_call(ws, {"type": "state"})["data"]["step_count"] == 1  # the session survived both
        ws.send(json.dumps({"type": "close"}))


@pytest.mark.parametrize("path, body, status, message", [
    ("/reset", b"{nope", 400, r"not valid JSON"),
    ("/reset", b"[1, 2]", 422, r"must be a JSON object"),
    ("/reset", b'{"seed": -1}', 422, r"seed \(-1\) must be a non-negative integer"),
    ("/reset", b'{"sead": 1}', 422, r"remove \['sead'\]"),
    ("/reset", b'{"options": {"task": 999}}', 422, r"index 999 is outside the suite"),
    ("/reset", b'{"options": {"task": {"request": 1}}}', 422, r"not a valid task"),
    ("/reset", b'{"episode_id": 5}', 422, r"episode_id \(5\) must be a string"),
    ("/reset", b'{"session_id": "feed"}', 404, r"Unknown session 'feed'"),
    ("/step", b'{"session_id": "feed", "action": {"text": "x"}}', 404, r"Unknown session 'feed'"),
    ("/step", b'{"session_id": "feed"}', 422, r"POST /step takes"),
    ("/state", None, 422, r"session_id must be the string"),
])
def test_bad_requests_get_clear_4xx_answers(http, path, body, status, message):
    answer = http.get(path) if body is None else http.post(path, content=body)
    assert answer.status_code == status, answer.text
    assert __import__("re").search(message, answer.json()["detail"]), answer.json()


def test_bad_actions_and_call_order(http):
    sid = http.post("/reset", json={"seed": 1}).json()["session_id"]
    for action in ("text only", {"txt": "x"}, {"text": 3}, {"text": "x", "extra": 1}):
        answer = http.post("/step", json={"session_id": sid, "action": action})
        assert answer.status_code == 422 and "must be an object" in answer.json()["detail"]
    answer = http.post("/step", json={"session_id": sid, "action": {"text": "x" * 70_000}})
    assert answer.status_code == 413 and "at most 65536" in answer.json()["detail"]
    answer = http.post("/step", content=b'{"pad": "' + b"x" * (2 << 20) + b'"}')
    assert answer.status_code == 413 and "at most 1048576" in answer.json()["detail"]
    while not http.post("/step", json={"session_id": sid, "action": {"text": "<answer>x</answer>"}}).json()["done"]:
        pass
    answer = http.post("/step", json={"session_id": sid, "action": {"text": "x"}})
    assert answer.status_code == 409 and "after the episode ended" in answer.json()["detail"]
    http.post("/close", json={"session_id": sid})


def test_interleaved_sessions_match_two_local_envs(server):
    remote = [RemoteEnv(server.url), RemoteEnv(server.url)]
    local = [VisGenEnv(**OPTIONS), VisGenEnv(**OPTIONS)]
    agents = [[WorkflowAgent(seed=s), WorkflowAgent(seed=s)] for s in (11, 12)]
    observations = []
    for k, seed in enumerate((11, 12)):
        pair = [env.reset(seed=seed) for env in (remote[k], local[k])]
        assert jsonable(pair[0]) == jsonable(pair[1])
        for agent, (observation, _) in zip(agents[k], pair):
            agent.reset(observation, seed=seed)
        observations.append([p[0] for p in pair])
    done = [False, False]
    while not all(done):
        for k in (0, 1):  # one step of each session in turn
            if done[k]:
                continue
            results = [env.step(agent.act(obs)) for env, agent, obs in zip((remote[k], local[k]), agents[k],
                                                                           observations[k])]
            assert jsonable(results[0]) == jsonable(results[1])
            observations[k] = [r[0] for r in results]
            done[k] = results[0][2] or results[0][3]
    for env in remote:
        env.close()


def test_remote_env_plays_the_teacher_exactly_like_a_local_env(server):
    env = RemoteEnv(server.url)
    task = make_suite(1, 3, modality="video")[0]
    for seed, options in ((0, None), (1, None), (4, {"task": task})):
        remote, local = play_teacher(env, seed, options), play_teacher(VisGenEnv(**OPTIONS), seed, options)
        assert len(remote) == len(local) > 2
        for got, want in zip(remote, local):
            assert got[0] == {**want[0], "artifacts": tuple(want[0]["artifacts"])}
            assert jsonable(got[1:]) == jsonable(want[1:])
        assert remote[-1][1] == local[-1][1]  # the final reward
    assert env.state()["step_count"] == len(remote) - 1
    env.close()


def test_remote_env_passes_the_checker_pickles_and_makes_by_id(server):
    env = RemoteEnv(server.url)
    check_env(env, skip_render_check=True)
    copy = pickle.loads(pickle.dumps(env))
    assert copy.url == env.url and copy.observation_space == env.observation_space
    make_env = pickle.loads(pickle.dumps(functools.partial(RemoteEnv, server.url)))  # what RayRollout ships
    shipped = make_env()
    assert shipped.reset(seed=3)[1]["task_id"] == env.reset(seed=3)[1]["task_id"]
    shipped.close()
    made = gymnasium.make("visenv/Remote-v0", url=server.url)
    observation, _ = made.reset(seed=0)
    assert made.observation_space.contains(observation)
    for closing in (env, copy, made):
        closing.close()


def test_pixel_observations_travel_as_base64_arrays(media_db):
    options = {"observe_pixels": True, "pixel_size": 16, "max_pixel_images": 2}
    with ServerThread(ServerConfig(env_options=options)) as running:
        remote, local = play_teacher(RemoteEnv(running.url), 0), play_teacher(VisGenEnv(**options), 0)
    got, want = remote[-1][0], local[-1][0]
    assert got["pixels"].dtype == np.uint8 and got["pixels_mask"].dtype == np.int8
    assert np.array_equal(got["pixels"], want["pixels"]) and np.array_equal(got["pixels_mask"], want["pixels_mask"])
    assert want["pixels"].any()


def test_session_cap_and_idle_timeout():
    config = ServerConfig(env_id="visenv/ToolEcho-v0", max_sessions=2, idle_timeout=0.5)
    with ServerThread(config) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        first = http.post("/reset", json={"seed": 0}).json()["session_id"]
        with connect(running.url.replace("http", "ws") + "/ws") as ws:
            assert ws_call(ws, {"type": "reset", "data": {"seed": 0}})["type"] == "observation"
            full = http.post("/reset", json={"seed": 0})
            assert full.status_code == 503 and "All 2 sessions are taken" in full.json()["detail"]
            with connect(running.url.replace("http", "ws") + "/ws") as third:
                assert json.loads(third.recv(timeout=10))["data"]["code"] == "CAPACITY_REACHED"
            idle = json.loads(ws.recv(timeout=10))  # the WebSocket session times out by itself
            assert idle["data"]["code"] == "SESSION_ERROR" and "idle" in idle["data"]["message"]
        deadline = time.monotonic() + 10
        while http.get("/health").json()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert http.get("/health").json()["sessions"] == 0
        assert http.post("/step", json={"session_id": first, "action": {"text": "x"}}).status_code == 404
        assert http.post("/reset", json={}).status_code == 200  # room again
        env = RemoteEnv(running.url, timeout=10)
        env.reset(seed=0)
        time.sleep(1.5)
        with pytest.raises(RemoteEnvError, match=r"step\(\).*idle for 0.5 s"):
            env.step("x")
        env.reset(seed=0)
        time.sleep(1.5)
        assert env.reset(seed=1)[0]  # a reset after the timeout opens a new session by itself
        env.close()


def test_remote_env_errors_are_clear(media_db):
    with pytest.raises(RemoteEnvError, match=r"Cannot read http://127.0.0.1:9/schema .*is `visenv serve` running"):
        RemoteEnv("http://127.0.0.1:9", timeout=5)
    with pytest.raises(ConfigError, match=r"url \('localhost:8000'\) must be the server's address"):
        RemoteEnv("localhost:8000")
    running = ServerThread(ServerConfig(env_id="visenv/ToolEcho-v0"))
    with running:
        env = RemoteEnv(running.url, timeout=10)
        with pytest.raises(ResetNeeded, match=r"step\(\).*before .*reset\(\)"):
            env.step("x")
        env.reset(seed=0)
    with pytest.raises(RemoteEnvError, match=r"step\(\) failed: the connection to .* was lost.*call reset\(\)"):
        env.step("x")
    with pytest.raises(RemoteEnvError, match=r"Cannot open a session on ws://"):
        env.reset(seed=0)


class CrashingEnv(gymnasium.Env):
    """Steps raise: a library bug inside a served environment."""

    observation_space = action_space = gymnasium.spaces.Text(16)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return "ready", {}

    def step(self, action):
        raise RuntimeError("boom")


def test_an_environment_that_raises_gets_500_and_the_session_survives():
    gymnasium.register("visenv-test/Crashing-v0", entry_point=CrashingEnv, disable_env_checker=True)
    try:
        with ServerThread(ServerConfig(env_id="visenv-test/Crashing-v0")) as running:
            env = RemoteEnv(running.url, timeout=10)
            env.reset(seed=0)
            with pytest.raises(RemoteEnvError, match=r"raised RuntimeError in step\(\): boom.*reset to go on"):
                env.step("x")
            assert env.reset(seed=1)[0] == "ready"  # same session, still open
            sid = httpx.post(running.url + "/reset", json={}).json()["session_id"]
            answer = httpx.post(running.url + "/step", json={"session_id": sid, "action": {"text": "x"}})
            assert answer.status_code == 500 and "boom" in answer.json()["detail"]
            env.close()
    finally:
        gymnasium.registry.pop("visenv-test/Crashing-v0")


@pytest.mark.slow
def test_serial_rollout_runs_over_remote_envs(server):
    from rl.policy import AgentPolicy
    from rl.rollout import SerialRollout, make_specs

    specs = make_specs(seed=0, iteration=0, num_groups=2, group_size=2)
    policy = AgentPolicy(WorkflowAgent)
    remote_rollout = SerialRollout(policy, functools.partial(RemoteEnv, server.url), 2)
    local_rollout = SerialRollout(policy, functools.partial(VisGenEnv, **OPTIONS), 2)
    try:
        remote, stats = remote_rollout.sample(specs)
        local, _ = local_rollout.sample(specs)
    finally:
        remote_rollout.close()
        local_rollout.close()
    assert stats.episodes_failed == 0 and [e.error for e in remote] == [None] * 4
    assert [e.rewards for e in remote] == [e.rewards for e in local]
    assert [e.components for e in remote] == [e.components for e in local]


@pytest.mark.slow
def test_ray_rollout_workers_play_remote_envs(server, ray_session):
    from rl.policy import AgentPolicy
    from rl.rollout import RayRollout, SerialRollout, make_specs

    specs = make_specs(seed=1, iteration=0, num_groups=2, group_size=2)
    local = SerialRollout(AgentPolicy(WorkflowAgent), functools.partial(VisGenEnv, **OPTIONS), 2)
    remote = RayRollout(functools.partial(AgentPolicy, WorkflowAgent), functools.partial(RemoteEnv, server.url),
                        num_workers=1, envs_per_worker=2, num_cpus=0.5)
    try:
        episodes, stats = remote.sample(specs)
        expected, _ = local.sample(specs)
    finally:
        remote.close()
        local.close()
    assert stats.episodes_failed == 0 and [e.error for e in episodes] == [None] * 4
    assert [e.rewards for e in episodes] == [e.rewards for e in expected]


@pytest.mark.slow
def test_serve_command_answers_and_stops_cleanly_on_ctrl_c():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "visenv.cli", "serve", "--port", str(port), "--env",
                                "visenv/ToolEcho-v0", "--option", "max_n=1", "--log-level", "warning"],
                               env={**os.environ, "PYTHONPATH": ROOT}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.2)
        assert health.json()["status"] == "healthy"
        env = RemoteEnv(f"http://127.0.0.1:{port}")
        env.reset(seed=0)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        with pytest.raises(RemoteEnvError, match="connection .* was lost"):
            env.step("x")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in process.stderr.read()


OPENENV_CLIENT = """
import sys
from openenv.core.generic_client import GenericEnvClient
with GenericEnvClient(base_url=sys.argv[1]).sync() as env:
    first = env.reset(seed=3)
    assert not first.done and first.reward is None and first.observation["text"].startswith("Request: ")
    last = env.step({"text": "<think>x</think><answer>nothing</answer>"})
    assert last.done and last.reward == float(sys.argv[2]), last
    assert env.state()["step_count"] == 1
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("OPENENV_SITE"), reason="set OPENENV_SITE to a folder holding openenv-core "
                    "(pip install --target DIR openenv-core==0.3.0): it is not a dependency of visenv")
def test_openenv_own_client_plays_the_server(server):
    local = VisGenEnv(**OPTIONS)
    local.reset(seed=3)
    reward = local.step("<think>x</think><answer>nothing</answer>")[1]
    done = subprocess.run([sys.executable, "-c", OPENENV_CLIENT, server.url, repr(reward)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.environ["OPENENV_SITE"]})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
