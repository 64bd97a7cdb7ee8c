"""Policies and agents through the one episode runner (rl.evaluate), and the report comparing named
policies on one page."""

from __future__ import annotations

import json

import pytest
import torch

from baselines.workflow_agent import WorkflowAgent
from rl.evaluate import evaluate, write_policy_report
from rl.policy import AgentPolicy
from rl_helpers import RaisingEnv, echo_tokenizer, tiny_policy
from test_report import parse, run_chromium
from visenv.rewards.clip import ClipAlignment, ClipScorer
from visenv.tasks import make_suite

SHORT = ("official_account_cover", "social_media_cover", "realistic_photography")  # the main job's scenarios
ENV = {"max_turns": 3}


@pytest.fixture(scope="module")
def tokenizer():
    return echo_tokenizer()


@pytest.fixture(scope="module")
def policies(tokenizer):
    """Two tiny Llamas (different initialisations) that write a few tokens a turn."""
    torch.set_num_threads(1)  # as the rl tests: two threads on a shared 2-core machine decode many times slower
    return {"SFT-only": tiny_policy(tokenizer, max_new_tokens=10, seed=0),
            "RL (GRPO)": tiny_policy(tokenizer, max_new_tokens=10, seed=1)}


def actions(results):
    return [[step["action"] for step in r.trajectory] for r in results]


def play(policy, tasks, seed, **options):
    results, _ = evaluate(policy, tasks, seed=seed, env_config=ENV, progress=False, keep_trajectories=True,
                          **options)
    return results


def test_a_policy_samples_deterministically_from_the_episode_seed(policies):
    policy, tasks = policies["SFT-only"], make_suite(3, 5, scenarios=SHORT)
    first, again, other = play(policy, tasks, 11), play(policy, tasks, 11), play(policy, tasks, 12)
    assert actions(first) == actions(again)
    assert [r.reward for r in first] == [r.reward for r in again]
    assert actions(first) != actions(other)
    assert all(len(r.trajectory) == ENV["max_turns"] for r in first)  # the random model never answers
    batched = play(policy, tasks, 11, num_envs=3)
    assert actions(batched) == actions(first)  # a sample does not depend on the batch it was drawn in


class Recording:
    """A policy that remembers the ``first`` flag of each observation it encodes."""

    def __init__(self, policy):
        self.policy, self.firsts = policy, []

    def encode(self, observation, first):
        self.firsts.append(first)
        return self.policy.encode(observation, first)

    def generate(self, conversations):
        return self.policy.generate(conversations)


def test_the_runner_keeps_one_conversation_per_episode(policies):
    policy = Recording(policies["SFT-only"])
    tasks = make_suite(2, 5, scenarios=SHORT)
    alone = play(policy, tasks, 4)
    assert policy.firsts == [True, False, False] * 2  # the final observation is not encoded
    policy.firsts = []
    assert actions(play(policy, tasks, 4, num_envs=2)) == actions(alone)
    assert sorted(policy.firsts) == sorted([True, False, False] * 2)


def test_round_trip_through_agent_policy_reproduces_the_teacher(media_db):
    tasks = make_suite(2, 7, modality="image") + make_suite(2, 7, modality="video")
    env = {"max_turns": 9}  # the long video workflows are cut: rewards differ between tasks
    teacher, _ = evaluate(WorkflowAgent, tasks, seed=3, env_config=env, progress=False, keep_trajectories=True)
    wrapped = AgentPolicy(WorkflowAgent)
    for options in ({}, {"num_envs": 4}):
        played, _ = evaluate(wrapped, tasks, seed=3, env_config=env, progress=False, keep_trajectories=True,
                             **options)
        assert [r.reward for r in played] == [r.reward for r in teacher]
        assert [r.components for r in played] == [r.components for r in teacher]
        assert actions(played) == actions(teacher)
    assert len({r.reward for r in teacher}) > 1


class HostileAgent:
    """Writes turns that are not UTPC and that would be markup if the page did not escape them."""

    TURNS = ('<script>alert("raw")</script> & <b>bold</b>',
             '<tool_call>{"name": "<img src=x onerror=alert(1)>", "arguments": {}}</tool_call>')

    def reset(self, observation, seed=None):
        self.turn = 0

    def act(self, observation):
        self.turn += 1
        return self.TURNS[(self.turn - 1) % 2]


@pytest.fixture(scope="module")
def policy_report(policies, tmp_path_factory, media_db):
    """write_policy_report of the two tiny Llamas on 4 episodes of 3 tasks: (folder, payload, tasks)."""
    folder = tmp_path_factory.mktemp("policy_report")
    tasks = make_suite(3, 5, scenarios=SHORT)
    payload = write_policy_report(policies, tasks, folder, episodes=4, seed=777, env_options=ENV, batch_size=3)
    return folder, payload, tasks


def test_policy_report_plays_the_same_episodes_as_evaluate(policies, policy_report):
    folder, payload, tasks = policy_report
    played = [tasks[i % 3] for i in range(4)]
    assert payload["tasks"] == [t.task_id for t in played] and list(payload["policies"]) == list(policies)
    for name, policy in policies.items():
        alone = play(policy, played, 777)
        assert [[s["action"] for s in e["trajectory"]] for e in payload["policies"][name]["episodes"]] == actions(alone)
    stored = json.loads((folder / "results.json").read_text())
    assert stored == json.loads(json.dumps(payload, default=str))
    sft, rl = (payload["policies"][name]["episodes"] for name in policies)
    assert [e["trajectory"][0]["action"] for e in sft] != [e["trajectory"][0]["action"] for e in rl]


def expected_run_cells(name, summary) -> dict:
    """(run, group, metric) -> the text a comparison page must show for one run's summary."""
    blocks = {"overall": summary["overall"], **{f"modality:{k}": v for k, v in summary["by_modality"].items()},
              **{f"scenario:{k}": v for k, v in summary["by_scenario"].items()}}
    return {(name, group, metric): "n/a" if block[metric] is None else f"{block[metric]:.3f}"
            for group, block in blocks.items() for metric in ("s_rate", "reward", "turns", "failed_call_rate")}


def test_policy_report_in_chromium_shows_both_policies_as_in_results_json(policy_report, tmp_path):
    folder, _, _ = policy_report
    stored = json.loads((folder / "results.json").read_text())
    dom = run_chromium(tmp_path, "--dump-dom", (folder / "report.html").resolve().as_uri())
    page = parse(dom)
    for name, run in stored["policies"].items():
        expected = expected_run_cells(name, run["summary"])
        assert {k: page.run_cells[k] for k in expected} == expected
        assert f"{name}: mean reward {run['summary']['overall']['reward']:.3f}" in dom
        components = {b["data-label"]: b["data-value"] for b in page.bars if b["data-series"] == name}
        assert components["total"] == f"{run['summary']['overall']['components']['total']:.3f}"
    assert [(e["data-run"], e["data-task"]) for e in page.episodes] == [
        (name, task) for task in stored["tasks"] for name in stored["policies"]]
    assert page.body.get("data-images-broken") == "0"


def expected_metric_cells(name, summary, episodes, metric) -> dict:
    """(run, group, metric) -> the text a page must show for a logged metric: the mean of the episodes'
    scores in results.json (None left out), "n/a" where none has one."""
    scores = [row[metric] for row in summary["visgenbench"]["episodes"]]
    groups = {"overall": range(len(episodes))}
    for field in ("modality", "scenario"):
        for i, e in enumerate(episodes):
            groups.setdefault(f"{field}:{e[field]}", []).append(i)
    cells = {}
    for group, members in groups.items():
        kept = [scores[i] for i in members if scores[i] is not None]
        cells[(name, group, metric)] = f"{sum(kept) / len(kept):.3f}" if kept else "n/a"
    return cells


def test_policy_report_shows_a_logged_clip_metric_per_policy_in_chromium(policies, tmp_path, media_db):
    """The tiny random CLIP as a logged metric: a column per group and policy, the numbers of results.json."""
    both = {"teacher": AgentPolicy(WorkflowAgent), "tiny Llama": policies["SFT-only"]}
    metric = ClipAlignment(ClipScorer.tiny(tmp_path / "clip"))
    write_policy_report(both, make_suite(3, 5, scenarios=SHORT), tmp_path / "report", episodes=3, seed=777,
                        env_options={"max_turns": 5}, metrics={"clip_alignment": metric})
    stored = json.loads((tmp_path / "report" / "results.json").read_text())
    page = parse(run_chromium(tmp_path, "--dump-dom", (tmp_path / "report" / "report.html").resolve().as_uri()))
    shown = {}
    for name, run in stored["policies"].items():
        benchmark = run["summary"]["visgenbench"]
        assert benchmark["metric_ids"] == {"clip_alignment": metric.judge_id}
        expected = expected_metric_cells(name, run["summary"], run["episodes"], "clip_alignment")
        assert {k: page.run_cells[k] for k in expected} == expected
        overall = benchmark["overall"]["clip_alignment"]
        assert expected[(name, "overall", "clip_alignment")] == ("n/a" if overall is None else f"{overall:.3f}")
        shown[name] = expected
    assert all(v != "n/a" for v in shown["teacher"].values())  # the teacher delivers an image every episode
    assert set(shown["tiny Llama"].values()) == {"n/a"}  # the random model delivers nothing
    html = (tmp_path / "report" / "report.html").read_text()
    assert f'title="{metric.judge_id}">clip_alignment</th>' in html
    assert f"<code>clip_alignment</code> = <code>{metric.judge_id}</code>" in html


def test_policy_report_escapes_malformed_turns(policies, tmp_path):
    hostile = {"hostile": AgentPolicy(HostileAgent), "tiny": policies["SFT-only"]}
    payload = write_policy_report(hostile, make_suite(1, 5, scenarios=SHORT), tmp_path, episodes=1, seed=0,
                                  env_options={"max_turns": 2})
    html = (tmp_path / "report.html").read_text()
    assert html.count("<script") == 1  # the page's own picture check
    assert "&lt;script&gt;alert(&quot;raw&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert payload["policies"]["hostile"]["summary"]["overall"]["failed_call_rate"] == 1.0
    with pytest.raises(ValueError, match="at least one policy"):
        write_policy_report({}, make_suite(1, 5), tmp_path, episodes=1, seed=0)
    with pytest.raises(ValueError, match=r"episodes \(0\)"):
        write_policy_report(hostile, make_suite(1, 5), tmp_path, episodes=0, seed=0)


# ------------------------------------------------------------------ rl eval: any agent or policy


def eval_args(out, *who):
    return ["eval", *who, "--n", "3", "--scenarios", ",".join(SHORT), "--max-turns", "3", "--seed", "5",
            "--out", str(out / "results.json")]


def test_rl_eval_plays_a_saved_policy_as_evaluate_does(policies, tmp_path):
    from rl.cli import main

    folder = tmp_path / "policy"
    policies["SFT-only"].save(str(folder))
    assert main(eval_args(tmp_path / "cli", "--policy", str(folder), "--max-new-tokens", "10",
                          "--num-envs", "2")) == 0
    written = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert (tmp_path / "cli" / "report.html").is_file()
    # the same episodes as evaluate over the same policy, tasks and seeds, one at a time
    tasks = make_suite(3, 10_000, scenarios=SHORT)
    results, summary = evaluate(policies["SFT-only"], tasks, seed=5, progress=False, env_config=ENV,
                                keep_trajectories=True)
    assert [[s["action"] for s in e["trajectory"]] for e in written["episodes"]] == actions(results)
    assert written["summary"]["overall"]["reward"] == pytest.approx(summary["overall"]["reward"])
    # results.json records the suite, so `visenv report` re-plays it without suite arguments
    assert written["suite"] == {"suite": "all", "n": 3, "task_seed": 10_000, "scenarios": list(SHORT), "seed": 5,
                                "env_config": ENV}
    import visenv.cli

    assert visenv.cli.main(["report", str(tmp_path / "cli" / "results.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.html").is_file()


def test_rl_eval_takes_an_agent_class_and_names_bad_choices(tmp_path, capsys):
    from rl.cli import main

    assert main(eval_args(tmp_path / "teacher", "--agent", "teacher", "--no-report")) == 0
    assert main(eval_args(tmp_path / "class", "--agent", "baselines.workflow_agent:WorkflowAgent", "--no-report")) == 0
    teacher, by_class = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("teacher", "class"))
    assert by_class["summary"] == teacher["summary"]  # the class got the same seed
    for who, message in [(["--agent", "nobody"], "must be 'package.module:name', e.g. 'teacher', 'random'"),
                         (["--agent", "baselines.nowhere:Agent"], "cannot import it"),
                         (["--policy", str(tmp_path / "missing")], "is not a policy folder"),
                         (["--api-base-url", "http://127.0.0.1:9/v1"], "needs --api-model")]:
        capsys.readouterr()
        assert main(eval_args(tmp_path / "bad", *who)) == 2
        assert message in capsys.readouterr().err


def test_an_evaluation_records_an_episode_whose_env_raises_as_failed(media_db):
    from rl.rollout import SerialRollout

    tasks = make_suite(3, 7, modality="image")

    def make_rollout(policy, make_env, finish):
        return SerialRollout(policy, lambda: RaisingEnv(11, make_env), 2, finish)

    results, summary = evaluate(WorkflowAgent, tasks, seed=10, make_rollout=make_rollout, progress=False)
    clean, _ = evaluate(WorkflowAgent, tasks, seed=10, progress=False)
    assert [r.error for r in results] == [None, "OverflowError: int too large to convert to float", None]
    assert summary["overall"]["episodes_failed"] == 1 and summary["visgenbench"]["overall"]["episodes"] == 3
    assert results[1].checks["s_rate"] is False and results[1].turns == 0 and results[1].reward != results[1].reward
    assert [r.reward for i, r in enumerate(results) if i != 1] == [r.reward for i, r in enumerate(clean) if i != 1]
