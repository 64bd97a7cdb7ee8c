"""Real backends: a Python callable and an OpenAI-compatible HTTP service on loopback."""

import pickle
import socket
import threading
import time

import pytest

from cache_fixtures import local_generator, png_bytes, request, wav_bytes
from loopback_images import ImageServer
from visenv.error import BackendError, ConfigError
from visenv.tools.backends import BackendAnswer, BackendChain, ToolFailure
from visenv.tools.cache import ExactCacheBackend, ToolCache
from visenv.tools.real import (Generation, GeneratedMedia, JsonHttpClient, OpenAIImagesBackend, RealBackend,
                               record_calls)

T2I = "tool_text2image_qwen"
FAST = {"backoff": 0.01, "max_backoff": 0.05}


@pytest.fixture
def server():
    with ImageServer() as srv:
        yield srv


@pytest.fixture
def cache(tmp_path):
    return ToolCache(tmp_path / "cache")


def http_backend(server, cache, **options):
    return OpenAIImagesBackend(server.url, "test-image-model", cache=cache, **{**FAST, **options})


def test_http_backend_generates_measures_and_records(server, cache):
    backend = http_backend(server, cache, send_seed=True)
    answer = backend.answer(request(T2I, {"prompt": "a red fox", "n": 2, "aspect_ratio": "16:9", "style": "ink"},
                                    seed=2**40 + 5))
    assert isinstance(answer, BackendAnswer) and answer.backend == "real"
    assert [o.attributes for o in answer.outputs] == [{"width": 1328, "height": 744}] * 2
    [payload] = server.requests
    assert payload == {"model": "test-image-model", "prompt": "a red fox\nStyle: ink", "n": 2, "size": "1328x744",
                       "response_format": "b64_json", "seed": (2**40 + 5) % 2**31}
    replay = ExactCacheBackend(cache).answer(request(T2I, {"prompt": "a red fox", "aspect_ratio": "16:9", "n": 2,
                                                           "style": "ink"}, seed=2**40 + 5))
    assert [o.sha256 for o in replay.outputs] == [o.sha256 for o in answer.outputs]
    assert cache.counters()[T2I]["real_call"] == 1


def test_size_overrides_and_unserved_calls(server, cache):
    backend = http_backend(server, cache, sizes={"1:1": "64x64"})
    answer = backend.answer(request(T2I, {"prompt": "fox"}))
    assert answer.outputs[0].attributes == {"width": 64, "height": 64}
    assert backend.answer(request(T2I, {"prompt": "fox", "reference_images": ["img_1"]})) is None
    assert backend.answer(request("tool_text2video_veo", {"prompt": "fox"})) is None  # not a text2image tool
    assert len(server.requests) == 1


def test_server_errors_and_rate_limits_are_retried(server, cache):
    server.script.extend(["500", "429", "503"])
    answer = http_backend(server, cache, max_retries=3).answer(request(T2I, {"prompt": "fox"}))
    assert answer.backend == "real" and len(server.requests) == 4


def test_a_stalled_request_times_out_and_is_retried(server, cache):
    server.script.append("stall")
    server.stall_seconds = 2.0
    start = time.monotonic()
    answer = http_backend(server, cache, timeout=0.3, max_retries=1).answer(request(T2I, {"prompt": "fox"}))
    assert answer.backend == "real" and len(server.requests) == 2
    assert time.monotonic() - start < 1.9  # did not wait for the stall to end


def test_exhausted_retries_raise_or_pass(server, cache):
    server.script.extend(["500"] * 3)
    with pytest.raises(BackendError, match=r"failed after 3 attempts; last: HTTP 500"):
        http_backend(server, cache, max_retries=2).answer(request(T2I, {"prompt": "fox"}))
    server.script.extend(["stall"] * 2)
    server.stall_seconds = 0.5
    chain = BackendChain([http_backend(server, cache, max_retries=1, timeout=0.2, on_error="pass"),
                          ExactCacheBackend(cache)])
    failure = chain.answer(request(T2I, {"prompt": "fox"}))
    assert isinstance(failure, ToolFailure) and "unavailable" in failure.message
    assert cache.counters()[T2I]["real_error"] == 1


def test_a_refusal_is_an_agent_readable_failure_and_is_not_recorded(server, cache):
    server.script.append("400")
    failure = http_backend(server, cache).answer(request(T2I, {"prompt": "fox"}))
    assert isinstance(failure, ToolFailure)
    assert "refused the call (HTTP 400): prompt rejected by the safety system" in failure.message
    assert len(cache) == 0 and len(server.requests) == 1


def test_a_malformed_answer_is_a_backend_error(server, cache):
    server.script.append("garbage")
    with pytest.raises(BackendError, match="not an OpenAI images response"):
        http_backend(server, cache).answer(request(T2I, {"prompt": "fox"}))


def test_connection_refused_is_retried_then_raised(cache):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    backend = OpenAIImagesBackend(f"http://127.0.0.1:{port}/v1", "m", cache=cache, max_retries=2, **FAST)
    with pytest.raises(BackendError, match="after 3 attempts; last: ConnectError"):
        backend.answer(request(T2I, {"prompt": "fox"}))


def test_concurrency_is_capped(server, cache):
    server.delay = 0.2
    backend = http_backend(server, cache, max_concurrency=2)
    threads = [threading.Thread(target=backend.answer, args=(request(T2I, {"prompt": f"fox {i}"}),)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(server.requests) == 6 and server.max_in_flight == 2
    assert len(cache) == 6


def test_http_backend_pickles(server, cache):
    backend = pickle.loads(pickle.dumps(http_backend(server, cache)))
    assert backend.answer(request(T2I, {"prompt": "fox"})).backend == "real"


def test_client_options_are_checked():
    with pytest.raises(ConfigError, match="max_concurrency"):
        JsonHttpClient("http://127.0.0.1:1", max_concurrency=0)


def test_record_calls_is_bounded_and_resumes(server, cache):
    server.delay = 0.1
    server.script.extend(["ok", "400"])
    backend = http_backend(server, cache, max_concurrency=8)
    calls = [(request(T2I, {"prompt": f"fox {i}"}, seed=0), None) for i in range(6)]
    first = record_calls(backend, calls, concurrency=3, progress=False)
    assert (first.recorded, first.skipped, len(first.failed)) == (5, 0, 1)
    assert "safety system" in first.failed[0][1]
    assert server.max_in_flight <= 3
    second = record_calls(backend, calls, concurrency=3, progress=False)
    assert (second.recorded, second.skipped, second.failed) == (1, 5, ())
    assert len(server.requests) == 7
    exact = ExactCacheBackend(cache)
    assert all(exact.answer(request(T2I, {"prompt": f"fox {i}"}, seed=99)) for i in range(6))  # seedless entries


def test_callable_backend_measures_attributes_and_records(cache):
    backend = RealBackend(local_generator, cache=cache)
    image = backend.answer(request(T2I, {"prompt": "fox", "n": 2}, seed=4))
    assert [o.attributes for o in image.outputs] == [{"width": 24, "height": 16}] * 2
    speech = backend.answer(request("tool_tts_generation", {"text": "one two three four five"}, seed=1))
    assert speech.outputs[0].attributes == {"voice": "narrator", "duration": 2.0, "sample_rate": 8000}
    text = backend.answer(request("tool_prompt_refine", {"prompt": "fox"}, seed=1))
    assert text.text == "refined: fox" and text.outputs == ()
    assert backend.answer(request("tool_text2video_veo", {"prompt": "fox"})) is None
    assert backend.answer(request("tool_task_manager", {"action": "list"})) is None
    assert len(cache) == 3


def test_callable_backend_without_cache_keeps_files_in_media_dir(tmp_path):
    backend = RealBackend(local_generator, media_dir=tmp_path / "media", tools=[T2I])
    answer = backend.answer(request(T2I, {"prompt": "fox"}, seed=1))
    assert answer.outputs[0].path.startswith(str(tmp_path / "media"))
    assert backend.answer(request("tool_prompt_refine", {"prompt": "fox"})) is None  # not among its tools


@pytest.mark.parametrize("media, message", [
    (GeneratedMedia(wav_bytes(1.0), ".wav"), "returned a audio file"),
    (GeneratedMedia(b"not a picture", ".png"), "unreadable .png file"),
    (GeneratedMedia(png_bytes(1), ".gif"), "'.gif' file"),
])
def test_callable_backend_rejects_wrong_outputs(cache, media, message):
    backend = RealBackend(lambda req: Generation(media=(media,)), cache=cache)
    with pytest.raises(BackendError, match=message):
        backend.answer(request(T2I, {"prompt": "fox"}))
    assert len(cache) == 0


def test_real_backend_configuration_is_checked():
    with pytest.raises(ConfigError, match="needs a cache"):
        RealBackend(local_generator)
    with pytest.raises(ConfigError, match="on_error"):
        RealBackend(local_generator, media_dir="x", on_error="ignore")
