"""Judge throughput against a loopback OpenAI-compatible server, and judge-cache hit latency.

A scripted server on 127.0.0.1 (the one the tests use, in its own process so that it does not
share the client's interpreter lock) answers every request with a valid plan judgement after
``--latency-ms`` (a stand-in for the model's generation time; 0 measures the
client and server overhead alone). :class:`~visenv.rewards.judges.PlanJudge` scores distinct
episodes end to end (prompt rendering, HTTP, strict parsing, cache write) with the backend's
concurrency limit at 1, 8 and 32. Cache hits are read from a warm SQLite judge cache by a fresh
(unpickled) judge, so no request is sent.

    python benchmarks/judge_throughput.py [--episodes 128] [--latency-ms 0 50]
        [--out benchmarks/results/judge_throughput.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from judge_server import JudgeServer, Reply  # noqa: E402  (the tests' loopback server)
from reward_episodes import PLAN, episode, media, task  # noqa: E402

from visenv.rewards.judges import OpenAIChatBackend, PlanJudge  # noqa: E402

ANSWER = json.dumps({"fulfilment": 1, "coherence": 8, "executability": 6, "atomicity": 10, "optimality": 4})
CONCURRENCY = (1, 8, 32)


def plan_reply(latency_s: float, payload: dict, number: int) -> Reply:
    return Reply(content=ANSWER, delay_s=latency_s)


def serve(latency_s: float, connection) -> None:
    """Run a server in this (child) process: send its URL, wait for "stop", send its statistics."""
    with JudgeServer(functools.partial(plan_reply, latency_s)) as server:
        connection.send(server.url)
        connection.recv()
        connection.send({"requests": len(server.requests), "max_in_flight": server.max_in_flight})


class ServerProcess:
    """A loopback judge server in a child process, as a context manager yielding its URL."""

    def __init__(self, latency_s: float):
        self.connection, child = multiprocessing.Pipe()
        self.process = multiprocessing.Process(target=serve, args=(latency_s, child), daemon=True)
        self.stats: dict = {}

    def __enter__(self) -> str:
        self.process.start()
        return self.connection.recv()

    def __exit__(self, *exc) -> None:
        self.connection.send("stop")
        self.stats = self.connection.recv()
        self.process.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=128)
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--out", default="benchmarks/results/judge_throughput.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        image = media(Path(tmp), "image", 0)
        records = [episode(task(seed=i), [image], plan=f"{PLAN}\n3. tool_prompt_refine: variant {i}")
                   for i in range(args.episodes)]
        for latency in args.latency_ms:
            for concurrency in CONCURRENCY:
                server = ServerProcess(latency / 1e3)
                with server as url:
                    judge = PlanJudge(OpenAIChatBackend(url, "bench", concurrency=concurrency))
                    start = time.perf_counter()
                    scores = judge(records)
                    elapsed = time.perf_counter() - start
                assert None not in scores and server.stats["requests"] == len(records)
                rows.append({"server_latency_ms": latency, "concurrency": concurrency,
                             "requests_per_s": len(records) / elapsed, "max_in_flight": server.stats["max_in_flight"]})
        server = ServerProcess(0.0)
        with server as url:
            warm = PlanJudge(OpenAIChatBackend(url, "bench"), cache_path=str(Path(tmp) / "judge.sqlite"))
            warm(records)
            fresh = pickle.loads(pickle.dumps(warm))
            start = time.perf_counter()
            fresh(records)
            batch_hit = (time.perf_counter() - start) / len(records)
            singles = []
            for record in records:
                start = time.perf_counter()
                fresh([record])
                singles.append(time.perf_counter() - start)
        assert server.stats["requests"] == len(records), "cache hits must not send requests"
    hits = {"cache_hit_ms_per_episode_in_batch": batch_hit * 1e3,
            "cache_hit_ms_single_episode_median": statistics.median(singles) * 1e3}
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other jobs",
              "python": platform.python_version(), "episodes": args.episodes, "throughput": rows, **hits}
    print(f"{'server latency ms':>18}{'concurrency':>13}{'requests/s':>12}{'max in flight':>15}")
    for row in rows:
        print(f"{row['server_latency_ms']:>18.0f}{row['concurrency']:>13}{row['requests_per_s']:>12.1f}"
              f"{row['max_in_flight']:>15}")
    for key, value in hits.items():
        print(f"{key}: {value:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
