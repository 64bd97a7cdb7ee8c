"""RemoteEngine against a loopback server speaking vLLM's and SGLang's token-id APIs (tests/openai_server.py)."""

from __future__ import annotations

import random

import pytest

from openai_server import OpenAIServer
from rl.engine import GenerationRequest
from rl.engine.hf import HFEngine
from rl.engine.remote import RemoteEngine, RemoteEngineConfig
from rl.hf import tiny_causal_lm
from visenv.error import BackendError, ConfigError

VOCAB = 64
LOGPROB_ATOL = 1e-4  # as tests/test_engine.py


def request(seed: int, **options) -> GenerationRequest:
    return GenerationRequest(random.Random(seed).choices(range(VOCAB), k=6), 8, seed=seed, **options)


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(VOCAB, hidden_size=32, intermediate_size=64, seed=0)


@pytest.fixture(scope="module")
def expected(model):
    with HFEngine(model) as engine:
        return engine.generate_many([request(seed) for seed in range(4)])


def remote(server: OpenAIServer, kind: str, **options) -> RemoteEngine:
    return RemoteEngine(RemoteEngineConfig(server.url, kind, backoff_s=0.01, **options))


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_token_ids_and_logprobs_round_trip(model, expected, kind):
    with OpenAIServer(model) as server, remote(server, kind) as engine:
        got = engine.generate_many([request(seed) for seed in range(4)])
        stop = expected[0].token_ids[2]
        stopped = engine.generate_many([request(0, stop_token_ids=[stop])])[0]
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    for result, want in zip(got, expected):  # the server batches them its own way: float rounding differs
        assert result.logprobs == pytest.approx(want.logprobs, abs=LOGPROB_ATOL)
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == stop
    path, body = server.calls[-1]  # the stopped request, sent alone
    if kind == "vllm":
        assert path == "/v1/completions" and body["prompt"] == list(request(0).prompt_ids)
        assert body["return_token_ids"] and body["logprobs"] == 0 and body["seed"] == 0
        assert body["stop_token_ids"] == [stop]
    else:
        assert path == "/generate" and body["input_ids"] == list(request(0).prompt_ids)
        assert body["return_logprob"] and body["sampling_params"]["sampling_seed"] == 0
        assert body["sampling_params"]["stop_token_ids"] == [stop]


def test_retries_5xx_and_dropped_connections_then_succeeds(model, expected):
    with OpenAIServer(model, faults=[503, "drop", 500]) as server, remote(server, "vllm") as engine:
        assert engine.generate_many([request(1)])[0].token_ids == expected[1].token_ids
    assert len(server.calls) == 4


def test_a_4xx_fails_at_once_with_the_servers_message(model):
    with OpenAIServer(model, faults=[400]) as server, remote(server, "sglang") as engine:
        with pytest.raises(BackendError, match=r"refused POST /generate \(HTTP 400: .*scripted fault"):
            engine.generate_many([request(0)])
    assert len(server.calls) == 1


def test_the_deadline_bounds_the_retries(model):
    with OpenAIServer(model, faults=[503] * 1000) as server, remote(server, "vllm", deadline_s=0.3) as engine:
        with pytest.raises(BackendError, match=r"failed for 0.3 s \(last: HTTP 503"):
            engine.generate_many([request(0)])


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_weight_sync_through_the_servers_api(kind, tmp_path):
    model = tiny_causal_lm(VOCAB, hidden_size=32, intermediate_size=64, seed=0)
    other = tiny_causal_lm(VOCAB, hidden_size=32, intermediate_size=64, seed=1)
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "config.json").write_text("{}")
    with HFEngine(other) as reference:
        wanted = reference.generate_many([request(2)])[0]
    with OpenAIServer(model) as server, remote(server, kind, weights_dir=str(tmp_path / "weights"),
                                               model_dir=str(tmp_path / "served")) as engine:
        before = engine.generate_many([request(2)])[0]
        engine.update_weights(other.state_dict(), version=5)
        after = engine.generate_many([request(2)])[0]
    assert before.token_ids != wanted.token_ids or before.logprobs != wanted.logprobs
    assert (after.token_ids, after.weight_version) == (wanted.token_ids, 5)
    assert after.logprobs == pytest.approx(wanted.logprobs, abs=LOGPROB_ATOL)
    paths = [path for path, _ in server.calls]
    if kind == "vllm":
        assert paths[1:5] == ["/pause?mode=wait", "/collective_rpc", "/reset_prefix_cache", "/resume"]
    else:
        assert paths[1] == "/update_weights_from_disk"
        assert server.calls[1][1]["weight_version"] == "5"
        assert (tmp_path / "weights" / "v5" / "config.json").exists()


def test_config_checks():
    with pytest.raises(ConfigError, match="must start with http"):
        RemoteEngineConfig("localhost:8000")
    with pytest.raises(ConfigError, match="server .'tgi'. must be one of"):
        RemoteEngineConfig("http://x", "tgi")
    with pytest.raises(ConfigError, match="model_dir is None but server 'sglang'"):
        RemoteEngineConfig("http://x", "sglang", weights_dir="/tmp/w")
    with RemoteEngine(RemoteEngineConfig("http://127.0.0.1:9")) as engine:
        with pytest.raises(ConfigError, match="needs RemoteEngineConfig.weights_dir"):
            engine.update_weights({}, 1)
