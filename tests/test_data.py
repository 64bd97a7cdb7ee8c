"""Teacher data: the funnel, the filters, the chat JSONL that rl.sft reads, and the command."""

from __future__ import annotations

import argparse
import json

import pytest

from rl.sft import load_chat_jsonl
from baselines.data import DataConfig, Funnel, add_data_commands, build_dataset
from visenv.envs.visgen import VisGenEnv
from visenv.error import ConfigError
from visenv.protocol import parse_turn
from visenv.rewards import Entry, LtrReward
from visenv.rewards.rules import RulePlanReward
from visenv.tasks import make_suite, save_tasks


def lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def check_funnel(funnel: Funnel, n: int) -> None:
    assert funnel.generated == n
    assert funnel.kept + sum(funnel.dropped.values()) == n


def test_writes_trajectories_that_rl_sft_reads(tmp_path):
    out = tmp_path / "data" / "vis.jsonl"
    funnel = build_dataset(DataConfig(out=str(out), num_tasks=42, mistake_rate=0.3, min_reward=0.5))
    check_funnel(funnel, 42)
    assert funnel.kept >= 30 and funnel.mistakes_generated >= 5
    examples = load_chat_jsonl(str(out))
    assert len(examples) == funnel.kept
    for line, messages in zip(lines(out), examples):
        assert line["reward"] >= 0.5
        roles = [m["role"] for m in messages]
        assert roles[0] == "user" and messages[0]["content"].startswith("Request: ")
        assert roles[1:] == ["assistant", "tool"] * ((len(roles) - 2) // 2) + ["assistant"]
        turns = [parse_turn(m["content"]) for m in messages if m["role"] == "assistant"]
        assert all(t.well_formed for t in turns)
        assert turns[0].plan and turns[-1].answer is not None
    rewards = [line["reward"] for line in lines(out)]
    assert funnel.mean_reward_kept == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)


def test_messages_are_what_the_environment_said(tmp_path):
    """Replaying the assistant turns in a fresh environment reproduces every user and tool message."""
    out = tmp_path / "vis.jsonl"
    build_dataset(DataConfig(out=str(out), num_tasks=6, tasks="video", seed=9, mistake_rate=0.0))
    tasks = make_suite(6, 0, modality="video")
    env = VisGenEnv(tasks=tasks)
    for i, line in enumerate(lines(out)):
        index = next(k for k, t in enumerate(tasks) if t.task_id == line["task_id"])
        observation, _ = env.reset(seed=9 + index, options={"task": tasks[index]})
        said = [observation["text"]]
        for message in line["messages"]:
            if message["role"] == "assistant":
                observation, *_ = env.step(message["content"])
                said.append(observation["text"])
        heard = [m["content"] for m in line["messages"] if m["role"] != "assistant"]
        assert heard == said[:-1]  # the observation after the answer is left out


def test_images_are_the_pictures_the_environment_showed(tmp_path):
    """With images, each tool message lists, as PNG files, exactly the pixels the env showed with it."""
    import numpy as np
    from PIL import Image

    out = tmp_path / "vis.jsonl"
    build_dataset(DataConfig(out=str(out), num_tasks=3, tasks="image", seed=2, mistake_rate=0.0, images=True,
                             env={"pixel_size": 16}))
    tasks = make_suite(3, 0, modality="image")
    env = VisGenEnv(tasks=tasks, observe_pixels=True, pixel_size=16)
    shown = 0
    for line, examples in zip(lines(out), load_chat_jsonl(str(out))):
        index = next(k for k, t in enumerate(tasks) if t.task_id == line["task_id"])
        env.reset(seed=2 + index, options={"task": tasks[index]})
        for message, loaded in zip(line["messages"], examples):
            if message["role"] == "assistant":
                observation, *_ = env.step(message["content"])
                pixels = observation["pixels"][observation["pixels_mask"].astype(bool)]
            elif message["role"] == "tool":
                names = message.get("images", [])
                assert len(names) == len(pixels)
                assert all(name.startswith("vis_images/") for name in names)  # relative to the JSONL's folder
                assert all(np.array_equal(np.asarray(Image.open(out.parent / name)), picture)
                           for name, picture in zip(names, pixels))
                assert loaded.get("images", []) == [str(out.parent / name) for name in names]  # made absolute
                shown += len(names)
    assert shown >= 6
    # each picture is written once, however many messages show it
    assert len(list((tmp_path / "vis_images").iterdir())) < shown


def test_threshold_drops_exactly_the_low_rewards(tmp_path):
    def build(name, min_reward):
        config = DataConfig(out=str(tmp_path / name), num_tasks=21, tasks="image", mistake_rate=1.0,
                            mistakes=("early_answer", "wrong_count"), min_reward=min_reward)
        return build_dataset(config), lines(config.out)

    everything, all_lines = build("all.jsonl", -1.0)
    assert everything.kept == everything.mistakes_generated == 21 and everything.dropped == {}
    filtered, kept_lines = build("kept.jsonl", 0.8)
    check_funnel(filtered, 21)
    low = [line for line in all_lines if line["reward"] < 0.8]
    assert len(low) >= 5 and filtered.dropped == {"below_threshold": len(low)}
    assert kept_lines == [line for line in all_lines if line["reward"] >= 0.8]
    assert filtered.mistakes_kept == 21 - len(low)


def test_truncated_and_invalid_trajectories_are_dropped(tmp_path):
    funnel = build_dataset(DataConfig(out=str(tmp_path / "t.jsonl"), num_tasks=8, env={"max_turns": 2}))
    check_funnel(funnel, 8)
    assert funnel.dropped["truncated"] == 8 - funnel.kept and funnel.dropped["truncated"] >= 6
    failing = LtrReward(plan=Entry(NoPlanScore(), required=True), none_policy="invalid")
    funnel = build_dataset(DataConfig(out=str(tmp_path / "i.jsonl"), num_tasks=8, env={"rubric": failing}))
    assert funnel.dropped == {"invalid_reward": 8} and funnel.kept == 0 and funnel.mean_reward_kept is None
    assert lines(tmp_path / "i.jsonl") == []


class NoPlanScore(RulePlanReward):
    """A plan judge that always fails (answers None)."""

    def score(self, episode):
        return None


class CyclingJudge:
    """Scores None, 0.1, 0.9, None, 0.1, 0.9, ... and remembers its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, records):
        self.calls.append(len(records))
        return [(None, 0.1, 0.9)[i % 3] for i in range(len(records))]


def test_judges_filter_the_survivors_in_one_batch(tmp_path):
    judge = CyclingJudge()
    funnel = build_dataset(DataConfig(out=str(tmp_path / "j.jsonl"), num_tasks=12, mistake_rate=0.0,
                                      judges={"vlm": judge}, min_judge_score=0.5))
    check_funnel(funnel, 12)
    assert judge.calls == [12]
    assert funnel.dropped == {"judge_failed:vlm": 4, "below_judge:vlm": 4} and funnel.kept == 4


def test_tool_docs_and_determinism(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    build_dataset(DataConfig(out=str(a), num_tasks=5, include_tool_docs=True, seed=4))
    build_dataset(DataConfig(out=str(b), num_tasks=5, include_tool_docs=True, seed=4))
    assert a.read_bytes() == b.read_bytes()
    first = lines(a)[0]["messages"]
    assert first[0] == {"role": "system", "content": VisGenEnv().system_prompt}
    assert [m["role"] for m in first[:2]] == ["system", "user"]


def test_plays_a_task_file(tmp_path):
    tasks = make_suite(5, 123, modality="video")
    save_tasks(tasks, tmp_path / "tasks.jsonl")
    funnel = build_dataset(DataConfig(out=str(tmp_path / "f.jsonl"), tasks=str(tmp_path / "tasks.jsonl"), num_tasks=3,
                                      mistake_rate=0.0))
    assert funnel.generated == 3 == funnel.kept
    assert [line["task_id"] for line in lines(tmp_path / "f.jsonl")] == [t.task_id for t in tasks[:3]]


@pytest.mark.parametrize("options, message", [
    ({"num_tasks": 0}, "num_tasks"),
    ({"tasks": "pictures"}, "tasks"),
    ({"mistake_rate": 1.5}, "mistake_rate"),
    ({"mistakes": ("typo",)}, "mistakes"),
    ({"min_reward": float("nan")}, "min_reward"),
    ({"judges": {"x": 3}}, "judges\\['x'\\]"),
    ({"env": {"tasks": "image"}}, "env must not set 'tasks'"),
    ({"env": {"colour": 1}}, "Unknown VisGen option"),
    ({"out": ""}, "out"),
])
def test_config_errors(options, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**{"out": str(tmp_path / "x.jsonl"), **options})


def test_data_build_command(tmp_path, capsys):
    from rl.cli import main

    assert main(["data", "build", "--out", str(tmp_path / "d.jsonl"), "--n", "10", "--suite", "image",
                 "--mistake-rate", "0.5", "--mistakes", "skip_step,wrong_count", "--min-reward", "0.9",
                 "--funnel", str(tmp_path / "funnel.json"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    funnel = json.loads((tmp_path / "funnel.json").read_text())
    assert f"generated {funnel['generated']}" in printed and funnel["generated"] == 10
    assert len(lines(tmp_path / "d.jsonl")) == funnel["kept"]
    assert f"dropped   {funnel['dropped']['below_threshold']:>4}  below_threshold" in printed
    assert main(["data", "build", "--out", str(tmp_path / "e.jsonl"), "--judge", "broken"]) == 2
    assert "NAME=package.module:factory" in capsys.readouterr().err
    parser = argparse.ArgumentParser(prog="mine")  # the command registers on any subparsers object
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "build", "--out", str(tmp_path / "e.jsonl"), "--judge", "broken"])
    with pytest.raises(ConfigError, match="NAME=package.module:factory"):
        args.func(args)
