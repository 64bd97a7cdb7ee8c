"""`visenv serve` under load: 64 concurrent WebSocket sessions stepping the scripted teacher over loopback.

The server runs as its own process (`python -m visenv.cli serve`), as it would on a rollout node; this
process opens ``--sessions`` sessions at once (OpenEnv's ``/ws`` messages, the transport RemoteEnv
uses), and each session plays ``--episodes`` episodes of the scripted teacher (baselines'
WorkflowAgent). A step's latency is the time from sending the turn to receiving its observation; the
teacher's own thinking is outside it. An error is any ``{"type": "error"}`` answer, lost connection
or observation outside the served space. One warm-up episode runs before the clock starts.

    python benchmarks/env_server.py [--sessions 64] [--episodes 8] [--quick] [--out benchmarks/results/env_server.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

from baselines.workflow_agent import WorkflowAgent
from visenv import wire

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(port: int, sessions: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "visenv.cli", "serve", "--port", str(port), "--max-sessions",
                                str(sessions), "--log-level", "warning"], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).raise_for_status()
            return process
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("the server did not start") from None
            time.sleep(0.2)


async def play(url: str, session: int, episodes: int, space, latencies: list[float], errors: list[str]) -> int:
    """One session: ``episodes`` teacher episodes; returns the steps it took."""
    steps = 0
    try:
        async with connect(url, max_size=64 << 20) as ws:
            async def call(message):
                start = time.perf_counter()
                await ws.send(json.dumps(message))
                answer = json.loads(await ws.recv())
                elapsed = time.perf_counter() - start
                if answer["type"] == "error":
                    raise RuntimeError(answer["data"]["message"])
                return answer["data"], elapsed

            for episode in range(episodes):
                seed = session * 1000 + episode
                agent = WorkflowAgent(seed=seed)
                data, _ = await call({"type": "reset", "data": {"seed": seed}})
                observation = wire.decode(data["observation"], space)
                agent.reset(observation, seed=seed)
                while True:
                    data, elapsed = await call({"type": "step", "data": {"text": agent.act(observation)}})
                    latencies.append(elapsed)
                    steps += 1
                    observation = wire.decode(data["observation"], space)
                    if not space.contains(observation):
                        errors.append(f"session {session}: observation outside the space")
                    if data["done"]:
                        break
            await ws.send(json.dumps({"type": "close"}))
    except Exception as error:  # counted, not raised: the benchmark reports every failure
        errors.append(f"session {session}: {type(error).__name__}: {error}")
    return steps


async def run(url: str, sessions: int, episodes: int, space) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    await play(url, 10_000, 1, space, [], errors)  # warm-up
    start = time.perf_counter()
    steps = await asyncio.gather(*(play(url, s, episodes, space, latencies, errors) for s in range(sessions)))
    wall = time.perf_counter() - start
    ordered = sorted(latencies)

    def percentile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")

    return {"sessions": sessions, "episodes_per_session": episodes, "steps": sum(steps), "wall_s": wall,
            "steps_per_s": sum(steps) / wall, "latency_ms_p50": percentile(0.50), "latency_ms_p99": percentile(0.99),
            "latency_ms_max": ordered[-1] * 1000 if ordered else float("nan"),
            "latency_ms_mean": statistics.fmean(ordered) * 1000 if ordered else float("nan"),
            "errors": len(errors), "error_samples": errors[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--episodes", type=int, default=8, help="episodes per session")
    parser.add_argument("--quick", action="store_true", help="one episode per session")
    parser.add_argument("--out", default="benchmarks/results/env_server.json")
    args = parser.parse_args()
    episodes = 1 if args.quick else args.episodes
    port = free_port()
    load_before = os.getloadavg()
    server = start_server(port, args.sessions + 1)
    try:
        schema = httpx.get(f"http://127.0.0.1:{port}/schema", timeout=10).json()
        space = wire.space_from_json(schema["observation"]["x-gym-space"])
        result = asyncio.run(run(f"ws://127.0.0.1:{port}/ws", args.sessions, episodes, space))
    finally:
        server.terminate()
        server.wait(timeout=60)
    result.update({
        "command": "python benchmarks/env_server.py" + (" --quick" if args.quick else "" if episodes == 8 else f" --episodes {episodes}")
                   + (f" --sessions {args.sessions}" if args.sessions != 64 else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (server and clients share them)",
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
    })
    print(f"{'metric':<26}{'value':>12}")
    for key, label, form in (("sessions", "concurrent sessions", ".0f"), ("steps", "steps", ".0f"),
                             ("steps_per_s", "steps/s", ".1f"), ("latency_ms_p50", "step latency p50, ms", ".1f"),
                             ("latency_ms_p99", "step latency p99, ms", ".1f"), ("errors", "errors", ".0f")):
        print(f"{label:<26}{result[key]:>12{form}}")
    print(f"load average before/after: {result['load_average_1_5_15_before']} / {result['load_average_1_5_15_after']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
