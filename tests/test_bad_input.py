"""Every kind of bad model output gets an observation the agent can learn from, a penalty, and no crash;
every kind of bad user input to the command lines gets one line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rl.cli import COMMANDS
from rl.config import EvalConfig
from visenv.envs.visgen import VisGenEnv
from visenv.protocol import format_turn, parse_tool_response

PENALTY = 0.05


def call(name, **arguments):
    return format_turn(think="t", tool_call={"name": name, "arguments": arguments})


@pytest.fixture
def env():
    env = VisGenEnv(error_penalty=PENALTY)
    env.reset(seed=0)
    return env


def step_error(env, action):
    obs, reward, terminated, truncated, info = env.step(action)
    response = parse_tool_response(obs["text"])
    assert response is not None, obs["text"]
    assert env.observation_space.contains(obs)
    return response, reward, terminated, info


@pytest.mark.parametrize("action, expected", [
    ("just some prose without any tags", r"no_tags|no UTPC tags|no tags"),
    ("<think>planning", r"unclosed|never closed"),
    ("<think>a <plan>b</plan></think>", r"nested|inside"),
    ("<think>x</think><tool_call>{\"name\": \"tool_text2image_qwen\", \"arguments\": {</tool_call>", r"JSON"),
    ("<think>x</think><tool_call>[1, 2]</tool_call>", r"object"),
])
def test_malformed_turns_answer_with_an_error_and_a_penalty(env, action, expected):
    response, reward, terminated, _ = step_error(env, action)
    assert response["status"] == "error"
    assert pytest.approx(reward) == -PENALTY and not terminated
    text = json.dumps(response)
    assert __import__("re").search(expected, text, flags=2), text


def test_unknown_tool_names_close_matches(env):
    response, reward, *_ = step_error(env, call("tool_text2image_qwn", prompt="cat"))
    assert "tool_text2image_qwen" in response["error"] and reward == -PENALTY


def test_wrong_argument_types_are_named(env):
    response, reward, _, info = step_error(env, call("tool_text2image_qwen", prompt="cat", n="two"))
    assert "n:" in response["error"] and "integer" in response["error"]
    assert info["tool_result"]["error_kind"] == "bad_arguments"


def test_missing_required_arguments_are_named(env):
    response, *_ = step_error(env, call("tool_image2video_keling", prompt="walk"))
    assert "'image' is a required property" in response["error"]


def test_unknown_artifact_id_lists_the_available_ones(env):
    made = env.step(call("tool_text2image_qwen", prompt="cat"))[4]["tool_result"]["outputs"][0]
    response, *_ = step_error(env, call("tool_image_edit_qwen", image="img_000000000000", prompt="x"))
    assert "no artifact 'img_000000000000'" in response["error"] and made in response["error"]


def test_artifact_from_another_episode_is_recognised(env):
    old = env.step(call("tool_text2image_qwen", prompt="cat"))[4]["tool_result"]["outputs"][0]
    env.reset(seed=1)
    response, *_ = step_error(env, call("tool_image_edit_qwen", image=old, prompt="x"))
    assert "earlier episode" in response["error"]


def test_path_strings_are_refused_as_paths(env):
    response, *_ = step_error(env, call("tool_image_edit_qwen", image="/etc/passwd", prompt="x"))
    assert "looks like a file path" in response["error"]


def test_wrong_artifact_kind_is_named(env):
    image = env.step(call("tool_text2image_qwen", prompt="cat"))[4]["tool_result"]["outputs"][0]
    response, *_ = step_error(env, call("tool_video_trim_edit", video=image, start=0, end=1))
    assert "is a image" in response["error"] or "is an image" in response["error"]


def test_tool_failure_from_the_simulation_is_readable(env):
    image = env.step(call("tool_text2image_qwen", prompt="cat", aspect_ratio="16:9"))[4]["tool_result"]["outputs"][0]
    video = env.step(call("tool_image2video_keling", image=image, prompt="go", duration=5))[4]["tool_result"]["outputs"][0]
    response, reward, _, info = step_error(env, call("tool_video_trim_edit", video=video, start=2, end=9))
    assert info["tool_result"]["error_kind"] == "tool_failure" and reward == -PENALTY
    assert "5" in response["error"]


def test_ten_megabyte_turn_is_cut_not_crashed(env):
    response, *_ = step_error(env, "<think>" + "a" * 10_000_000 + "</think>")
    assert "truncated" in json.dumps(response) or "cut" in json.dumps(response)


def test_non_utf8_bytes_and_lone_surrogates_are_survived(env):
    response, *_ = step_error(env, b"<think>\xff\xfe</think><answer>\xc3\x28 done</answer>")
    assert response["status"] in ("done", "error")
    env.reset(seed=0)
    response, *_ = step_error(env, "<think>\ud800</think><tool_call>{\"name\": \"tool_search_inspire\", "
                                   "\"arguments\": {\"query\": \"cats\"}}</tool_call>")
    assert response["status"] == "ok"


def test_non_string_actions_are_coerced(env):
    response, *_ = step_error(env, 12345)
    assert response["status"] == "error"


def test_answer_citing_unknown_ids_is_penalised_and_ends(env):
    obs, reward, terminated, _, info = env.step("<think>x</think><answer>img_0123456789ab</answer>")
    assert terminated and "img_0123456789ab" in parse_tool_response(obs["text"])["problems"][0]
    assert info["reward_components"]["R_result"] == 0.0


# ---------------------------------------------------------------- the command lines (rl, visenv)

# the rl command that plays a policy, agent or API on fresh tasks and saves trajectories
EVAL = next(name for name, (cls, _) in COMMANDS.items() if cls is EvalConfig)


def refused_url() -> str:
    """An HTTP URL on loopback where nothing listens (the port was just free)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files of every kind, a tiny policy folder, and a run folder with a corrupt checkpoint."""
    from rl_helpers import echo_tokenizer, tiny_policy

    root = tmp_path_factory.mktemp("bad_input")
    policy = root / "policy"
    tiny_policy(echo_tokenizer()).save(str(policy))
    shutil.copytree(policy, root / "corrupt_policy")
    (root / "corrupt_policy" / "model.safetensors").write_bytes(b"\x00" * 64)
    from rl.checkpoint import write_folder

    # a complete checkpoint (its marker matches) whose trainer.pt is not a torch file
    checkpoint = root / "run" / "checkpoints" / "iter_000001"
    checkpoint.parent.mkdir(parents=True)
    write_folder(str(checkpoint), lambda folder: (Path(folder) / "trainer.pt").write_bytes(b"PK\x03\x04 not a torch file"))
    texts = {"syntax.yaml": "grpo: {group_size: 4\n", "rollout7.yaml": "rollout: 7\n",
             "iterations.yaml": "iterations: 1.5\n", "list.yaml": "- a\n- b\n",
             "sft_data.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n',
             "sft_json.jsonl": "{not json\n", "results.json": "{truncated", "tasks.jsonl": "garbage\n"}
    for name, text in texts.items():
        (root / name).write_text(text)
    return {"tmp": str(root), "policy": str(policy), "api": refused_url()}


TRAIN = ["train", "--policy.model", "{policy}", "--rollout.num_envs", "2", "--output_dir", "{tmp}/out",
         "--iterations", "1", "--grpo.tasks_per_iteration", "1", "--grpo.group_size", "2", "--progress", "false",
         "--tensorboard", "false"]
RL_CASES = {
    "yaml syntax error": (["train", "--config", "{tmp}/syntax.yaml"], r"syntax.yaml is not valid YAML: .*line 2"),
    "missing config file": (["train", "--config", "{tmp}/nope.yaml"], r"--config '.*nope.yaml': cannot read it"),
    "config not a mapping": (["train", "--config", "{tmp}/list.yaml"], r"must hold a YAML mapping of options"),
    "rollout: 7": (["train", "--config", "{tmp}/rollout7.yaml"],
                   r"rollout: expected a mapping of options \(backend, num_envs,.*\), got 7 \(int\)"),
    "iterations: 1.5": (["train", "--config", "{tmp}/iterations.yaml", "--policy.model", "m"],
                        r"iterations: expected an integer, got 1.5 \(float\); write a whole number such as 1 or 2"),
    "a string in a number field": (["train", "--policy.model", "m", "--grpo.learning_rate", "abc"],
                                   r"grpo.learning_rate: expected a number, got 'abc' \(str\)"),
    "a quoted integer via --set": (["train", "--set", "policy.model=m", "--set", "grpo.epochs='3'"],
                                   r"grpo.epochs: expected an integer, got '3' \(str\).*without quotes"),
    "bool in an integer field": (["train", "--policy.model", "m", "--iterations", "true"],
                                 r"iterations: expected an integer, got True \(bool\)"),
    "unknown option via --set": (["train", "--set", "policy.model=m", "--set", "grpo.kl_coeff=0.1"],
                                 r"grpo.kl_coeff: unknown option; did you mean 'grpo.kl_coef'\?"),
    "--set without =": (["train", "--set", "grpo.kl_coef"], r"--set 'grpo.kl_coef': expected FIELD=VALUE"),
    "option value not YAML": (["train", "--policy.model", "m", "--env.options", "{max_turns: 3"],
                              r"--env.options: '\{max_turns: 3' is not valid YAML"),
    "invalid env option": (["train", "--policy.model", "m", "--env.id", "visenv/VisGen-v0", "--env.options",
                            "{max_turn: 3}"], r"env.options \(\{'max_turn': 3\}\): Unknown VisGen option"),
    "invalid env option value": ([EVAL, "--agent", "baselines.random_agent:RandomAgent", "--env.id",
                                  "visenv/VisGen-v0", "--set", "env.options.max_turns=0"],
                                 r"env.options \(\{'max_turns': 0\}\): max_turns \(0\) must be a positive"),
    "unregistered env id": (["train", "--policy.model", "m", "--env.id", "Nope-v0"],
                            r"env.id \('Nope-v0'\) is not a registered environment"),
    "negative temperature": ([EVAL, "--policy.model", "{policy}", "--policy.temperature", "-1"],
                             r"policy.temperature \(-1.0\) >= 0"),
    "--num_envs 0": ([EVAL, "--agent", "baselines.random_agent:RandomAgent", "--num_envs", "0"],
                     r"num_envs \(0\) must be at least 1"),
    "--rollout.num_envs 0": (["train", "--policy.model", "m", "--rollout.num_envs", "0"],
                             r"rollout.num_envs \(0\).* must be at least 1"),
    "group too small": (["train", "--policy.model", "m", "--grpo.group_size", "1"],
                        r"grpo.group_size \(1\) must be at least 2"),
    "missing model path": ([EVAL, "--policy.model", "{tmp}/no_such_model", "--episodes", "1"],
                           r"policy.model \('.*no_such_model'\) is not a folder .*Expected a model folder"),
    "corrupt model folder": ([EVAL, "--policy.model", "{tmp}/corrupt_policy", "--episodes", "1"],
                             r"policy folder '.*corrupt_policy' is incomplete: model.safetensors should have \d+ bytes"),
    "corrupt checkpoint": (TRAIN + ["--output_dir", "{tmp}/run"],
                           r"iter_000001 is incomplete or damaged: trainer.pt cannot be read"),
    "too many Ray workers": (TRAIN + ["--rollout.backend", "ray", "--rollout.num_workers", "4096"], r"CPU"),
    "bad SFT data": (["sft", "--set", "stages=[{visual: '{tmp}/sft_data.jsonl'}]", "--output_dir", "{tmp}/sft"],
                     r"sft_data.jsonl:1: the trajectory has no assistant message"),
    "SFT data not JSON": (["sft", "--set", "stages=[{visual: '{tmp}/sft_json.jsonl'}]", "--output_dir", "{tmp}/sft"],
                          r"sft_json.jsonl:1: expected a JSON object with a 'messages' list"),
    "missing SFT data": (["sft", "--set", "stages=[{visual: '{tmp}/none.jsonl'}]", "--output_dir", "{tmp}/sft"],
                         r"No such file or directory: '.*none.jsonl'; check the path"),
    "SFT stage without data": (["sft", "--set", "stages=[{epochs: 2}]"],
                               r"stages\[0\]: the option\(s\) \['visual'\] are required but missing"),
    "refused API connection": ([EVAL, "--api_base_url", "{api}", "--api_model", "m", "--episodes", "1",
                                "--num_envs", "1"],
                               r"Every episode failed: POST http://127.0.0.1:\d+/v1/chat/completions failed "
                               r".*ConnectError"),
    "unknown agent module": ([EVAL, "--agent", "no_such_module:Agent"],
                             r"agent \('no_such_module:Agent'\): cannot import it \(No module named"),
}


def fill(argv: list[str], files: dict[str, str]) -> list[str]:
    """The arguments with {tmp}, {policy} and {api} replaced (YAML braces left alone)."""
    for key, value in files.items():
        argv = [arg.replace("{" + key + "}", value) for arg in argv]
    return argv


VISENV_CASES = {
    "task file not JSONL": (["tasks", "--tasks", "{tmp}/tasks.jsonl", "--out", "{tmp}/t.jsonl"],
                            r"tasks.jsonl, line 1: not valid JSON"),
    "missing task file": (["tasks", "--tasks", "{tmp}/none.jsonl", "--out", "{tmp}/t.jsonl"],
                          r"No such file or directory: '.*none.jsonl'"),
    "unknown scenario": (["tasks", "--scenarios", "nope", "--out", "{tmp}/t.jsonl"], r"No scenario named 'nope'"),
    "unwritable output": (["tasks", "--n", "2", "--out", "{tmp}/no_dir/t.jsonl"], r"No such file or directory"),
    "corrupt results.json": (["report", "{tmp}/results.json"], r"is not a results.json written by"),
    "unknown callable module": (["cache", "build", "{tmp}/cache", "{tmp}/tasks.jsonl", "--callable", "no_such_mod:f"],
                                r"--callable \('no_such_mod:f'\): cannot import it"),
    "serve unknown env": (["serve", "--env", "visenv/Nope-v0"], r"env_id \('visenv/Nope-v0'\) is not a registered"),
    "serve bad env option": (["serve", "--option", "max_turns=0"], r"max_turns \(0\) must be a positive integer"),
    "serve unknown env option": (["serve", "--option", "colour=red"], r"Unknown VisGen option\(s\) \['colour'\]"),
    "serve option without value": (["serve", "--option", "max_turns"], r"--option 'max_turns': expected KEY=VALUE"),
    "serve bad port": (["serve", "--port", "70000"], r"--port \(70000\) must be between 0 and 65535"),
    "serve no sessions": (["serve", "--max-sessions", "0"], r"max_sessions \(0\) must be a positive integer"),
    "serve missing config": (["serve", "--config", "{tmp}/none.yaml"], r"No such file or directory"),
}

# The applications (main job, benchmark evaluation, teacher data) are rl commands.
RL_CASES.update({
    "unknown judge module": (["data", "build", "--n", "1", "--out", "{tmp}/d.jsonl", "--judge", "plan=no_such_mod:f"],
                             r"--judge plan= \('no_such_mod:f'\): cannot import it"),
    "--num-envs 0": (["eval", "--policy", "{policy}", "--num-envs", "0", "--n", "1", "--no-report", "--out",
                      "{tmp}/r.json"], r"num_envs \(0\) must be at least 1"),
    "negative API temperature": (["eval", "--api-base-url", "{api}", "--api-model", "m", "--temperature", "-1", "--n",
                                  "1", "--no-report", "--out", "{tmp}/r.json"], r"temperature \(-1.0\) must be >= 0"),
    "refused API connection": (["eval", "--api-base-url", "{api}", "--api-model", "m", "--n", "1", "--no-report",
                                "--out", "{tmp}/r.json"], r"Every episode failed: POST .* failed .*ConnectError"),
})


@pytest.mark.parametrize("program, case", [("rl", case) for case in sorted(RL_CASES)]
                         + [("visenv", case) for case in sorted(VISENV_CASES)])
def test_command_turns_bad_input_into_one_message(program, case, files, capsys):
    import rl.cli
    import visenv.cli

    argv, message = (RL_CASES if program == "rl" else VISENV_CASES)[case]
    code = (rl.cli if program == "rl" else visenv.cli).main(fill(argv, files))
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert f"{program} {argv[0]}: error: " in line and "Traceback" not in err
    assert re.search(message, line), line


@pytest.mark.parametrize("package, option", [("peft", "policy.lora={rank: 4}"), ("tensorboardX", "tensorboard=true")])
def test_a_missing_dependency_names_the_pip_extra(package, option, files, capsys, monkeypatch):
    import rl.cli

    monkeypatch.setitem(sys.modules, package, None)  # import package -> ImportError
    assert rl.cli.main(fill(TRAIN + ["--output_dir", "{tmp}/deps", "--set", option], files)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(rf"needs the package '{package}', which is not installed. Install it with: "
                     r"pip install 'visenv\[rl\]'", line), line


def test_serve_without_its_extra_names_it(capsys, monkeypatch):
    import visenv.cli

    monkeypatch.delitem(sys.modules, "visenv.server", raising=False)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert visenv.cli.main(["serve"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"visenv serve: error: visenv serve \(the HTTP server\) needs the package 'uvicorn', which is "
                     r"not installed. Install it with: pip install 'visenv\[serve\]'", line), line


@pytest.mark.parametrize("argv, message", [
    (["rl.cli", "train", "--config", "{tmp}/syntax.yaml"], "rl train: error: "),
    (["visenv.cli", "report", "{tmp}/results.json"], "visenv report: error: "),
])
def test_no_traceback_reaches_stderr_of_a_real_process(argv, message, files):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", *fill(argv, files)], capture_output=True,
                          text=True, timeout=300, cwd=files["tmp"], env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(message), done.stderr
