"""API models as baselines: ApiPolicy and ``rl eval --api`` against a loopback OpenAI-compatible server
with scripted, failing and slow answers."""

import json
import re
import time

import pytest
from judge_server import JudgeServer, Reply
from test_judges import answer_for

from rl.api import ApiPolicy
from rl.evaluate import evaluate
from rl.jobs.cli import add_job_commands
from visenv.envs.visgen import VisGenEnv
from visenv.tasks import make_suite, save_tasks, visgenbench

ARTIFACT_ID = re.compile(r'"id": "([0-9a-z_]+)"')


def scripted_turn(payload):
    """A tiny scripted API model: one image, then deliver whatever the tools returned."""
    last = payload["messages"][-1]["content"]
    text = last if isinstance(last, str) else " ".join(p["text"] for p in last if p["type"] == "text")
    if text.startswith("Request:"):
        call = {"name": "tool_text2image_qwen", "arguments": {"prompt": "the requested picture"}}
        return f"<think>draw</think><plan>1. tool_text2image_qwen</plan><tool_call>{json.dumps(call)}</tool_call>"
    return f"<answer>{' '.join(ARTIFACT_ID.findall(text))}</answer>"


def request_text(payload):
    """The request line that opens a conversation (which episode a request belongs to)."""
    return next(m["content"] for m in payload["messages"] if m["role"] == "user")


def policy(url, **options):
    options = {"timeout": 5.0, "backoff": 0.01, "max_backoff": 2.0, "max_retries": 3} | options
    return ApiPolicy(url, "api-model", temperature=0.0, **options)


TASKS = make_suite(4, 10_000, modality="image")


def test_api_policy_sends_the_tool_documentation_and_the_latest_images():
    with JudgeServer(lambda payload, n: Reply(content=scripted_turn(payload))) as server:
        env_config = {"observe_pixels": True}
        system = VisGenEnv(env_config).system_prompt
        player = policy(server.url, system_prompt=system, vision=True)
        results, summary = evaluate(player, TASKS[:2], env_config=env_config, num_envs=2, progress=False)
    assert [r.error for r in results] == [None, None] and summary["overall"]["episodes_failed"] == 0
    assert all(r.calls == 1 and r.failed_calls == 0 and r.checks["s_rate"] for r in results)
    first, second = sorted(server.requests, key=lambda p: len(p["messages"]))[::2][:2]
    assert first["messages"][0] == {"role": "system", "content": system} and "tool_text2image_qwen" in system
    assert isinstance(first["messages"][-1]["content"], str)  # the request holds no image yet
    shown = second["messages"][-1]["content"]
    assert [part["type"] for part in shown] == ["image_url", "text"]
    assert shown[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert all(isinstance(m["content"], str) for m in second["messages"][:-1])  # earlier turns: text only
    assert {"seed", "max_tokens", "temperature"} <= set(first)


def test_a_flaky_server_is_retried_and_its_retry_after_honoured():
    def reply(payload, number):
        if number == 0:
            return Reply(status=503, headers={"Retry-After": "0.6"})
        if number == 1:
            return Reply(reset=True)
        if number == 2:
            return Reply(status=429, headers={"Retry-After": "0"})
        return Reply(content=scripted_turn(payload))

    with JudgeServer(reply) as server:
        player = policy(server.url)
        results, summary = evaluate(player, TASKS[:1], progress=False)
    assert results[0].error is None and results[0].checks["s_rate"]
    assert server.arrivals[1] - server.arrivals[0] >= 0.6  # waited as Retry-After asked, not the 0.01 s backoff
    assert player.counters == {"attempts": 5, "retries": 3, "rate_limited": 1, "failures": 0}


def test_failing_and_slow_answers_become_failed_episodes_and_the_evaluation_goes_on():
    doomed, slow = request_text_of(TASKS[1]), request_text_of(TASKS[2])

    def reply(payload, number):
        if request_text(payload) == doomed:
            return Reply(status=500, body=b'{"error": "overloaded"}')
        if request_text(payload) == slow and len(payload["messages"]) > 2:
            return Reply(content=scripted_turn(payload), delay_s=3.0)
        return Reply(content=scripted_turn(payload))

    with JudgeServer(reply) as server:
        player = policy(server.url, timeout=1.0, max_retries=2)
        start = time.perf_counter()
        results, summary = evaluate(player, TASKS, num_envs=4, progress=False)
    assert time.perf_counter() - start < 10
    errors = [r.error for r in results]
    assert errors[0] is None and errors[3] is None
    assert errors[1].startswith("PolicyError: ") and "failed after 3 attempts; last: HTTP 500" in errors[1]
    assert errors[2].startswith("PolicyError: ") and "no answer within timeout_s (1 s)" in errors[2]
    slow_turns = [len(p["messages"]) for p in server.requests if request_text(p) == slow]
    assert slow_turns == [1, 3]  # its first turn was answered, its second cut off at the deadline (no retry)
    assert len([p for p in server.requests if request_text(p) == doomed]) == 3  # the first try and 2 retries
    assert summary["overall"]["episodes_failed"] == 2 and summary["overall"]["s_rate"] == 0.5


def request_text_of(task):
    env = VisGenEnv()
    observation, _ = env.reset(seed=0, options={"task": task})
    return observation["text"]


def test_rl_eval_api_prints_the_visgenbench_table_with_the_o_score(tmp_path, capsys):
    import argparse

    def reply(payload, number):
        if "VisGenBench" in payload["messages"][0]["content"] or payload["model"] == "grader":
            return Reply(content=answer_for(payload))
        return Reply(content=scripted_turn(payload))

    bench = [t for t in visgenbench(0) if t.requirements.modality == "image"]
    one_per_dimension = list({t.dimension: t for t in bench}.values())
    save_tasks(one_per_dimension, tmp_path / "bench.jsonl")  # what `visenv tasks --bench` writes, cut short
    with JudgeServer(reply) as server:
        parser = argparse.ArgumentParser()
        add_job_commands(parser.add_subparsers())
        out = tmp_path / "results.json"
        args = parser.parse_args(["eval", "--api", server.url, "--api-model", "api-model",
                                  "--tasks", str(tmp_path / "bench.jsonl"), "--grader-base-url", server.url,
                                  "--grader-model", "grader", "--no-report", "--out", str(out)])
        assert args.func(args) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    block = saved["summary"]["visgenbench"]["overall"]
    assert block["o_score"] is not None and "grader: grader|grade:" in printed
    assert f"{block['o_score']:.3f}" in printed.splitlines()[printed.splitlines().index(
        next(line for line in printed.splitlines() if line.startswith("group") and "O-Score" in line)) + 2]
    assert any(p["model"] == "api-model" and "tool_text2image_qwen" in p["messages"][0]["content"]
               for p in server.requests)


def test_a_failed_turn_fails_its_episode_in_the_async_runner_too():
    import pickle

    from rl.evaluate import evaluation_specs
    from rl.rollout import run_episodes

    doomed = request_text_of(TASKS[0])

    def reply(payload, number):
        if request_text(payload) == doomed:
            return Reply(status=400, body=b'{"error": "bad request"}')
        return Reply(content=scripted_turn(payload))

    with JudgeServer(reply) as server:
        player = pickle.loads(pickle.dumps(policy(server.url)))  # what a Ray worker receives
        envs = [VisGenEnv() for _ in range(2)]
        episodes, stats = run_episodes(player, envs, evaluation_specs(TASKS[:3], 0), mode="async")
    assert stats.episodes_failed == 1 and [e.error is None for e in episodes] == [False, True, True]
    assert "answered HTTP 400" in episodes[0].error and episodes[0].reward != episodes[0].reward  # NaN
    assert all(e.terminated for e in episodes[1:])


def test_an_evaluation_in_which_no_turn_came_back_is_refused():
    from rl.api import check_some_answered
    from rl.errors import EndpointError

    check_some_answered([None, "PolicyError: x failed"])  # some answered: the failures are results
    check_some_answered(["TypeError: the env broke"])  # not the endpoint's fault
    with pytest.raises(EndpointError, match=r"Every episode failed: POST http://h/v1/chat/completions failed after "
                                            r"5 attempts\. Expected an OpenAI-compatible server there"):
        check_some_answered(["PolicyError: http://h/v1/chat/completions failed after 5 attempts"] * 2)
