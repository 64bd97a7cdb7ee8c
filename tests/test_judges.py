"""LLM/VLM judges against a real loopback HTTP server: parsing, retries, rate limits, stalls,
concurrency, the None policy, the cache, pickling, the grader, and a tiny local transformers model."""

import base64
import dataclasses
import json
import logging
import math
import pickle
import re
import threading
import time

import pytest

from judge_server import JudgeServer, Reply
from reward_episodes import PLAN, episode, media, task, tiny_clip
from visenv.error import BackendError, ConfigError
from visenv.rewards import Entry, LtrReward
from visenv.rewards.judges import (BenchmarkGrader, ChatPrompt, OpenAIChatBackend, PlanJudge, ReflectionJudge,
                                   TrajectoryJudge, format_benchmark, grade_benchmark)
from visenv.rewards.judges.backends import retry_after_seconds
from visenv.rewards.judges.templates import GRADER, PLAN as PLAN_TEMPLATE, REFLECTION, TRAJECTORY
from visenv.rewards.rules import FormatReward, ToolReward

PLAN_ANSWER = {"fulfilment": 1, "coherence": 8, "executability": 6, "atomicity": 10, "optimality": 4}
PLAN_SCORE = (0.8 + 0.6 + 1.0 + 0.4) / 4


def answer_for(payload):
    """A well-formed judge answer for whichever template the request uses."""
    system = payload["messages"][0]["content"]
    if "vPlanJudger" in system:
        marker = re.search(r"\[coherence=(\d+)\]", json.dumps(payload["messages"][1]["content"]))
        return json.dumps(PLAN_ANSWER | ({"coherence": int(marker.group(1))} if marker else {}))
    if "trajectories" in system:
        return '<think>{"agreement": 0} is wrong</think>```json\n{"agreement": 7, "rationale": "ok"}\n```'
    if "reflections" in system:
        return '{"satisfied": 1}'
    dimension = next(d for d in GRADER if d.replace("_", " ") in system)
    return json.dumps({f.name: 10 - 2 * i for i, f in enumerate(GRADER[dimension].fields)})


def scripted(payload, number):
    return Reply(content=answer_for(payload))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("judge-media")


@pytest.fixture
def server():
    with JudgeServer(scripted) as running:
        yield running


def backend(url, **options):
    return OpenAIChatBackend(url, "judge-model", backoff_s=0.01, max_backoff_s=2.0, **options)


def plan_episode(folder, coherence=None, seed=0):
    plan = PLAN + (f"\n[coherence={coherence}]" if coherence is not None else "")
    return episode(task(seed=seed), [media(folder, "image", seed)], plan=plan)


# ---- templates and parsers -------------------------------------------------------------------

def test_parser_scales_fields_and_ignores_think_blocks_and_fences():
    body = json.dumps(PLAN_ANSWER | {"rationale": "x"})
    answer = '<think>maybe {"fulfilment": 0}</think>\n```json\n' + body + "\n```"
    assert PLAN_TEMPLATE.parse(answer) == {"fulfilment": 1.0, "coherence": 0.8, "executability": 0.6,
                                           "atomicity": 1.0, "optimality": 0.4}
    assert TRAJECTORY.parse('Verdict: {"agreement": 7.0}') == {"agreement": 0.7}


@pytest.mark.parametrize("answer, reason", [
    ("The plan is great, 9/10.", "exactly one JSON object, found 0"),
    ('{"agreement": 7} {"agreement": 3}', "exactly one JSON object, found 2"),
    ('{"score": 7}', "lacks the field 'agreement'"),
    ('{"agreement": 11}', r"\(11\) must be within 0..10"),
    ('{"agreement": -1}', r"\(-1\) must be within 0..10"),
    ('{"agreement": 7.5}', "must be an integer, got 7.5"),
    ('{"agreement": "7"}', "must be an integer, got '7'"),
    ('{"agreement": true}', "must be an integer, got True"),
    ('{"agreement": NaN}', "must be an integer, got nan"),
    ('{"agreement": 1e999}', "must be an integer, got inf"),
    ('{"agreement": 7, "agreement": 3}', "repeats the key 'agreement'"),
    ('{"agreement": 7, "why": {"a": 1, "a": 1}}', "repeats the key 'a'"),
    ('{"agreement": ' + "[" * 100_000, "nests JSON too deeply"),
])
def test_parser_is_strict(answer, reason):
    with pytest.raises(ValueError, match=reason):
        TRAJECTORY.parse(answer)


def test_binary_fields_accept_only_zero_or_one():
    assert REFLECTION.parse('{"satisfied": 0}') == {"satisfied": 0.0}
    with pytest.raises(ValueError, match=r"\(2\) must be within 0..1"):
        REFLECTION.parse('{"satisfied": 2}')


def test_template_hash_changes_with_any_prompt_text():
    assert re.fullmatch(r"[0-9a-f]{12}", PLAN_TEMPLATE.hash)
    assert dataclasses.replace(PLAN_TEMPLATE, system=PLAN_TEMPLATE.system + " ").hash != PLAN_TEMPLATE.hash
    fields = (dataclasses.replace(PLAN_TEMPLATE.fields[0], meaning="other"), *PLAN_TEMPLATE.fields[1:])
    assert dataclasses.replace(PLAN_TEMPLATE, fields=fields).hash != PLAN_TEMPLATE.hash
    assert len({t.hash for t in GRADER.values()}) == 6


def test_retry_after_parses_seconds_and_http_dates():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


# ---- the HTTP backend --------------------------------------------------------------------------

def test_backend_sends_model_messages_and_images_as_data_urls(server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    png = b"\x89PNG fake bytes"
    chat = backend(server.url, api_key_env="JUDGE_KEY")
    prompt = ChatPrompt("vPlanJudger says", ("look:", png))
    assert json.loads(chat.complete(prompt)) == PLAN_ANSWER
    sent = server.requests[0]
    assert sent["model"] == "judge-model" and sent["temperature"] == 0.0
    parts = sent["messages"][1]["content"]
    assert parts[0] == {"type": "text", "text": "look:"}
    url = parts[1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == png
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    assert b"sk-test" not in pickle.dumps(chat)
    text_only = ChatPrompt("vPlanJudger says", ("plain ", "text"))
    assert backend(server.url).messages(text_only)[1]["content"] == "plain text"


def test_server_errors_are_retried_with_growing_backoff():
    def reply(payload, number):
        return Reply(status=500, content="boom") if number < 3 else Reply(content="fine")

    with JudgeServer(reply) as srv:
        chat = OpenAIChatBackend(srv.url, "m", backoff_s=0.05, max_retries=3)
        assert chat.complete(ChatPrompt("s", ("u",))) == "fine"
        gaps = [b - a for a, b in zip(srv.arrivals, srv.arrivals[1:])]
    assert chat.attempts == 4 and chat.retries == 3 and chat.failures == 0
    # Delays are backoff * 2**attempt * jitter in [0.5, 1]: at least 0.025, 0.05, 0.1 s.
    assert [g >= low for g, low in zip(gaps, (0.025, 0.05, 0.1))] == [True] * 3


def test_429_honours_retry_after():
    def reply(payload, number):
        return Reply(status=429, headers={"Retry-After": "1"}) if number == 0 else Reply(content="ok")

    with JudgeServer(reply) as srv:
        chat = backend(srv.url)
        start = time.perf_counter()
        assert chat.complete(ChatPrompt("s", ("u",))) == "ok"
        waited = srv.arrivals[1] - srv.arrivals[0]
    assert waited >= 1.0 and time.perf_counter() - start < 5
    assert chat.rate_limited == 1 and chat.retries == 1


def test_429_with_a_retry_after_beyond_the_cap_fails_at_once():
    with JudgeServer(lambda p, n: Reply(status=429, headers={"Retry-After": "3600"})) as srv:
        chat = backend(srv.url)
        start = time.perf_counter()
        with pytest.raises(BackendError, match=r"rate-limited for 3600 s.*max_backoff_s \(2 s\)"):
            chat.complete(ChatPrompt("s", ("u",)))
    assert time.perf_counter() - start < 1.0 and chat.attempts == 1 and chat.failures == 1


def test_client_errors_are_not_retried():
    with JudgeServer(lambda p, n: Reply(status=400, body=b'{"error": "bad model"}')) as srv:
        chat = backend(srv.url)
        with pytest.raises(BackendError, match=r"HTTP 400.*bad model.*not retried"):
            chat.complete(ChatPrompt("s", ("u",)))
        assert len(srv.requests) == 1


def test_a_stalled_server_fails_the_request_at_its_deadline():
    with JudgeServer(lambda p, n: Reply(stall=True), stall_limit_s=3.0) as srv:
        chat = OpenAIChatBackend(srv.url, "m", timeout_s=0.3, max_retries=1, backoff_s=0.01)
        start = time.perf_counter()
        with pytest.raises(BackendError, match=r"no answer within timeout_s \(0.3 s\): attempt 1 was cut off"):
            chat.complete(ChatPrompt("s", ("u",)))
        elapsed = time.perf_counter() - start
        assert len(srv.requests) == 1  # the deadline covers the retries too
    assert 0.3 <= elapsed < 1.3 and chat.failures == 1


def test_a_slow_drip_is_cut_off_at_the_deadline():
    """A byte every 0.5 s restarts httpx's read timeout each time; the deadline still holds."""
    with JudgeServer(lambda p, n: Reply(content="ok", drip_s=0.5), stall_limit_s=30.0) as srv:
        chat = OpenAIChatBackend(srv.url, "m", timeout_s=2.0, max_retries=2, backoff_s=0.01)
        start = time.perf_counter()
        with pytest.raises(BackendError, match=r"no answer within timeout_s \(2 s\): attempt 1 was cut off"):
            chat.complete(ChatPrompt("s", ("u",)))
        elapsed = time.perf_counter() - start
    assert 2.0 <= elapsed < 3.0


def test_a_retry_that_would_pass_the_deadline_fails_at_once():
    with JudgeServer(lambda p, n: Reply(status=503)) as srv:
        # The first delay is backoff_s x jitter >= 1.0 s, more than what is left of the 1 s deadline.
        chat = OpenAIChatBackend(srv.url, "m", timeout_s=1.0, max_retries=10, backoff_s=2.0)
        start = time.perf_counter()
        with pytest.raises(BackendError, match=r"HTTP 503.*in 1\.\d\d s, would pass timeout_s \(1 s\)"):
            chat.complete(ChatPrompt("s", ("u",)))
        elapsed = time.perf_counter() - start
    assert elapsed < 1.0 and chat.attempts == 1 and chat.retries == 0 and chat.failures == 1


def test_malformed_response_bodies_fail():
    with JudgeServer(lambda p, n: Reply(body=b"<html>gateway</html>")) as srv:
        with pytest.raises(BackendError, match="no answer text"):
            backend(srv.url).complete(ChatPrompt("s", ("u",)))


def test_concurrency_limit_holds_across_threads():
    with JudgeServer(lambda p, n: Reply(content="ok", delay_s=0.1)) as srv:
        chat = backend(srv.url, concurrency=3)
        prompts = [ChatPrompt("s", (f"u{i}",)) for i in range(6)]
        threads = [threading.Thread(target=chat.complete_many, args=(prompts,)) for _ in range(2)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    assert srv.max_in_flight == 3 and len(srv.requests) == 12
    assert elapsed >= 4 * 0.1  # 12 requests, 3 at a time


def test_complete_many_returns_errors_in_place():
    def reply(payload, number):
        text = payload["messages"][1]["content"]
        return Reply(status=400) if text == "bad" else Reply(content=text.upper())

    with JudgeServer(reply) as srv:
        answers = backend(srv.url).complete_many([ChatPrompt("s", (t,)) for t in ("a", "bad", "c")])
    assert answers[0] == "A" and answers[2] == "C" and isinstance(answers[1], BackendError)


def test_backend_pickles_without_its_client_and_still_works(server):
    chat = backend(server.url)
    chat.complete(ChatPrompt("vPlanJudger", ("x",)))
    clone = pickle.loads(pickle.dumps(chat))
    assert clone._client is None and clone.attempts == 0
    assert json.loads(clone.complete(ChatPrompt("vPlanJudger", ("x",)))) == PLAN_ANSWER


def _complete_in_child(chat, queue):
    queue.put(chat.complete(ChatPrompt("vPlanJudger", ("x",))))


def test_backend_works_in_a_forked_child(server):
    """A forked copy (multiprocessing's default on Linux, e.g. AsyncVectorEnv) starts its own loop."""
    import multiprocessing

    chat = backend(server.url)
    chat.complete(ChatPrompt("vPlanJudger", ("x",)))  # the parent's loop thread is running
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_complete_in_child, args=(chat, queue))
    child.start()
    child.join(timeout=20)
    if child.is_alive():  # hung: the parent's loop is gone in the child
        child.kill()
        child.join()
    assert child.exitcode == 0 and json.loads(queue.get(timeout=1)) == PLAN_ANSWER


@pytest.mark.parametrize("options, message", [
    ({"base_url": "127.0.0.1:8000"}, r"must start with http://"),
    ({"timeout_s": 0}, r"timeout_s \(0\) must be > 0"),
    ({"concurrency": 0}, r"concurrency >= 1 \(got 4 and 0\)"),
])
def test_backend_config_errors(options, message):
    arguments = {"base_url": "http://127.0.0.1:1/v1", "model": "m"} | options
    with pytest.raises(ConfigError, match=message):
        OpenAIChatBackend(**arguments)


# ---- judges -------------------------------------------------------------------------------------

def test_plan_judge_scores_the_five_facets_with_the_reference_workflow_in_context(server, folder):
    judge = PlanJudge(backend(server.url))
    assert judge([plan_episode(folder)]) == [pytest.approx(PLAN_SCORE)]
    user = server.requests[0]["messages"][1]["content"]
    assert "Expert reference workflow: Single image" in user
    assert "[refine] tool_prompt_refine" in user and "[generate] tool_text2image_qwen" in user
    assert PLAN in user and "- deliver: 1 image" in user and "tool_music_suno (audio)" in user
    detail = judge.last_details[0]
    assert detail["judge_id"] == judge.judge_id == f"judge-model|R_plan:{PLAN_TEMPLATE.hash}"
    assert detail["answers"][0]["fulfilment"] == 1.0 and detail["error"] is None


def test_plan_judge_batches_keeps_order_and_deduplicates(server, folder):
    judge = PlanJudge(backend(server.url))
    episodes = [plan_episode(folder, coherence=c, seed=c) for c in (0, 10, 5)]
    scores = judge([*episodes, episodes[0]])
    expected = [(c / 10 + 0.6 + 1.0 + 0.4) / 4 for c in (0, 10, 5, 0)]
    assert scores == pytest.approx(expected)
    assert len(server.requests) == 3 and judge.requests_sent == 3


def test_no_plan_scores_zero_without_asking(server, folder):
    judge = PlanJudge(backend(server.url))
    assert judge([episode(task(), [media(folder, "image", 1)], plan=None)]) == [0.0]
    assert server.requests == [] and judge.last_details[0]["answers"] == []


HOSTILE = {
    "prose": (Reply(content="I would rate it highly."), "unparseable answer"),
    "missing field": (Reply(content='{"fulfilment": 1}'), "lacks the field 'coherence'"),
    "duplicate key": (Reply(content=json.dumps(PLAN_ANSWER)[:-1] + ', "fulfilment": 0}'),
                      "unparseable answer: the answer repeats the key 'fulfilment'"),
    "deep answer": (Reply(content='{"fulfilment": ' + "[" * 100_000), "nests JSON too deeply"),
    "5xx": (Reply(status=500), "failed after 2 attempts; last: HTTP 500"),
    "long Retry-After": (Reply(status=429, headers={"Retry-After": "999"}), "rate-limited"),
    "bad gzip": (Reply(body=b"this is not gzip", headers={"Content-Encoding": "gzip"}),
                 r"cannot be read \(DecodingError"),
    "invalid UTF-8": (Reply(body=b'{"choices": [{"message": {"content": "\xff\xfe"}}]}'), "no answer text"),
    "bad JSON": (Reply(body=b'{"choices": [{"message": '), "no answer text"),
    "deep JSON": (Reply(body=b"[" * 100_000 + b"]" * 100_000), "no answer text"),
    "reset": (Reply(reset=True), r"failed after 2 attempts; last: (ReadError|RemoteProtocolError)"),
}
"""A hostile or broken judge server's replies and the reason the failed judgement logs."""


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_failed_judgement_is_none_counted_logged_and_not_cached(case, folder, caplog):
    reply, reason = HOSTILE[case]
    with JudgeServer(lambda p, n: reply) as srv:
        judge = PlanJudge(backend(srv.url, max_retries=1))
        record = plan_episode(folder)
        with caplog.at_level(logging.WARNING):
            assert judge([record, episode(task(), [], plan=None)]) == [None, 0.0]
        assert judge.failures == 1 and judge.last_details[0]["error"]
        assert re.search(reason, caplog.text), caplog.text
        assert judge.judge_id in caplog.text and "score None" in caplog.text
        sent = len(srv.requests)
        assert judge([record]) == [None] and len(srv.requests) > sent  # asked again, not cached
        assert judge.failures == 2


def test_cache_hits_skip_the_server_and_persist(server, folder, tmp_path):
    path = str(tmp_path / "judge.sqlite")
    records = [plan_episode(folder, coherence=c, seed=c) for c in (2, 4)]
    judge = PlanJudge(backend(server.url), cache_path=path)
    first = judge(records)
    assert len(server.requests) == 2
    assert judge(records) == first and len(server.requests) == 2 and judge.cache_hits == 2
    assert judge.last_details[0]["cached"] == 1

    reopened = pickle.loads(pickle.dumps(judge))  # a Ray worker's copy: same file, no client
    assert reopened(records) == first and len(server.requests) == 2

    other_model = PlanJudge(OpenAIChatBackend(server.url, "another-model"), cache_path=path)
    other_model(records)
    assert len(server.requests) == 4  # the judge id is part of the key


def test_trajectory_judge_reads_plan_and_calls(server, folder):
    judge = TrajectoryJudge(backend(server.url))
    record = episode(task(amount=2), [media(folder, "image", 3), media(folder, "image", 4)])
    assert judge([record, episode(task(), [], plan=PLAN)]) == [pytest.approx(0.7), 0.0]
    user = server.requests[0]["messages"][1]["content"]
    assert "0. tool_text2image_qwen" in user and "1. tool_text2image_qwen" in user and "answered" in user


def test_reflection_judge_scores_the_share_of_satisfied_checkpoints(server, folder):
    judge = ReflectionJudge(backend(server.url))
    images = [media(folder, "image", s) for s in (5, 6, 7)]
    record = episode(task(amount=3), images, reflections=("The bike looks right.", None, "Too dark; fine."))
    assert judge([record, episode(task(), [])]) == [pytest.approx(2 / 3), None]
    assert len(server.requests) == 2  # the checkpoint without a reflection is not asked
    texts = sorted(r["messages"][1]["content"][0]["text"] for r in server.requests)  # sent concurrently
    assert "The bike looks right." in texts[0] and "Too dark; fine." in texts[1]
    parts = server.requests[0]["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "text", "image_url"]
    assert parts[2]["image_url"]["url"].startswith("data:image/png;base64,")


def test_vision_judges_refuse_a_text_only_backend(server):
    with pytest.raises(ConfigError, match="ReflectionJudge shows media .* text-only"):
        ReflectionJudge(backend(server.url, vision=False))
    with pytest.raises(ConfigError, match="BenchmarkGrader shows media"):
        BenchmarkGrader(backend(server.url, vision=False))


def test_unreadable_media_fails_the_request_not_the_batch(server, folder, caplog):
    judge = ReflectionJudge(backend(server.url))
    missing = dataclasses.replace(media(folder, "image", 8), sha256="f" * 64, path=str(folder / "gone.png"))
    good = episode(task(), [media(folder, "image", 9)], reflections=("Looks right.",))
    with caplog.at_level(logging.WARNING):
        scores = judge([episode(task(), [missing], reflections=("Fine.",)), good])
    assert scores == [None, 1.0] and judge.failures == 1 and "cannot render media" in caplog.text


def test_grader_scores_the_dimension_rubric(server, folder):
    grader = BenchmarkGrader(backend(server.url))
    images = [media(folder, "image", s) for s in (10, 11)]
    records = [episode(task(amount=2, dimension="variety"), images),
               episode(task(amount=2, consistency=("object",), dimension="object_consistency"), images),
               episode(task(dimension="visual_amount"), images[:1]),
               episode(task(dimension="content_match"), [])]
    scores = grader(records)
    assert scores == [pytest.approx((10 + 8 + 6) / 3 / 10), pytest.approx((10 + 8 + 6) / 3 / 10), None, 0.0]
    assert len(server.requests) == 2
    parts = server.requests[0]["messages"][1]["content"]
    assert sum(p["type"] == "image_url" for p in parts) == 2
    assert grader.judge_id.startswith("judge-model|grade:")


def test_grade_benchmark_reports_nine_dimensions_s_rate_and_o_score(server, folder):
    image, video = media(folder, "image", 12), media(folder, "video", 13)
    long_video = dataclasses.replace(video, attributes=dict(video.attributes) | {"duration": 8.0})
    records = [episode(task(dimension="content_creative"), [image]),
               episode(task(dimension="visual_amount", amount=2), [image]),       # amount check fails
               episode(task(dimension="video_duration", modality="video"), [long_video]),
               episode(task(dimension="style_consistency", amount=2, consistency=("style",)), [])]
    graded = grade_benchmark(records, BenchmarkGrader(backend(server.url)))
    dims = graded["overall"]["dimensions"]
    assert set(dims) == {"content_creative", "visual_amount", "video_duration", "style_consistency"}
    assert dims["content_creative"] == pytest.approx(0.7) and dims["visual_amount"] == 0.0
    assert dims["video_duration"] == 1.0 and dims["style_consistency"] == 0.0
    assert graded["overall"]["s_rate"] == 0.75
    assert graded["overall"]["o_score"] == pytest.approx((0.7 + 0 + 1 + 0 + 0.75) / 5)
    assert graded["by_modality"]["video"]["o_score"] == pytest.approx(1.0)
    assert graded["grader_failures"] == 0 and graded["grader_id"].startswith("judge-model|grade:")

    ungraded = grade_benchmark(records)
    assert ungraded["overall"]["dimensions"]["content_creative"] is None
    assert ungraded["overall"]["dimensions"]["video_duration"] == 1.0 and ungraded["overall"]["o_score"] is None
    table = format_benchmark(graded)
    assert "content_cre" in table and "O-Score" in table and "0.490" in table


def test_grade_benchmark_counts_failed_gradings(folder):
    with JudgeServer(lambda p, n: Reply(content="nice pictures")) as srv:
        records = [episode(task(dimension="content_match"), [media(folder, "image", 14)])]
        graded = grade_benchmark(records, BenchmarkGrader(backend(srv.url)),
                                 metrics={"R_format": FormatReward()})
    assert graded["grader_failures"] == 1 and graded["overall"]["o_score"] is None
    plain = grade_benchmark([episode(task(), [media(folder, "image", 14)])], BenchmarkGrader(backend(srv.url)))
    assert plain["overall"]["dimensions"] == {} and plain["overall"]["o_score"] is None  # no benchmark task
    assert graded["overall"]["R_format"] == pytest.approx(FormatReward()(records)[0])


def test_judges_pickle_and_work_after(server, folder):
    judge = TrajectoryJudge(backend(server.url))
    record = plan_episode(folder)
    judge([record])
    clone = pickle.loads(pickle.dumps(judge))
    assert clone([record]) == [pytest.approx(0.7)] and clone.judge_id == judge.judge_id


# ---- rubric -------------------------------------------------------------------------------------

def test_a_failed_plan_judgement_never_scores_above_a_successful_one(folder):
    """The issue's case: a failed R_plan once gave R_fine (1.0), above the 0.7 its judgement gives."""
    fine = {"R_format": Entry(FormatReward()), "R_tool": Entry(ToolReward())}  # both 1.0 on this episode
    record = plan_episode(folder)
    with JudgeServer(scripted) as srv:
        judged = LtrReward(plan=Entry(PlanJudge(backend(srv.url)), required=True), fine=fine)([record])[0]
    assert judged.total == pytest.approx(PLAN_SCORE * 1.0) and judged.none_policy == "invalid"
    with JudgeServer(lambda p, n: Reply(status=503)) as srv:
        judge = PlanJudge(backend(srv.url, max_retries=0))
        default = LtrReward(plan=Entry(judge, required=True), fine=fine)([record])[0]
        lowest = LtrReward(plan=Entry(judge, required=True), fine=fine, none_policy="lowest")([record])[0]
    assert default.total is None and not default.valid and default.components["R_plan"] is None
    assert default.components["R_fine"] == 1.0 and default.dropped == ("R_plan",)
    assert lowest.total == 0.0 and lowest.none_policy == "lowest" and lowest.components["R_plan"] is None
    assert judge.failures == 2


def test_a_working_judge_multiplies_the_fine_reward(server, folder):
    rubric = LtrReward(plan=Entry(PlanJudge(backend(server.url)), required=True),
                       fine={"R_format": Entry(FormatReward()), "R_traj": Entry(TrajectoryJudge(backend(server.url)))})
    result = rubric([plan_episode(folder)])[0]
    assert result.components["R_plan"] == pytest.approx(PLAN_SCORE)
    assert result.components["R_traj"] == pytest.approx(0.7)
    assert result.total == pytest.approx(PLAN_SCORE * result.components["R_fine"])


# ---- the local transformers backend -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A random 1-layer Llama with the file-free byte-level ByT5 tokenizer, saved as a folder."""
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llm")
    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A random 1-layer Video-LLaVA (CLIP vision tower, Llama text) with a ByT5 tokenizer."""
    import torch
    from transformers import (ByT5Tokenizer, CLIPVisionConfig, LlamaConfig, VideoLlavaConfig,
                              VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor, VideoLlavaProcessor,
                              VideoLlavaVideoProcessor)

    folder = tmp_path_factory.mktemp("tiny-vlm")
    tokenizer = ByT5Tokenizer(extra_ids=0, additional_special_tokens=["<image>", "<video>"])
    template = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<image>{% endif %}{% endfor %}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    size = {"shortest_edge": 16}, {"height": 16, "width": 16}
    processor = VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(size=size[0], crop_size=size[1]),
        video_processor=VideoLlavaVideoProcessor(size=size[0], crop_size=size[1]), tokenizer=tokenizer,
        patch_size=8, vision_feature_select_strategy="default", chat_template=template)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = VideoLlavaConfig(vision_config=vision, text_config=text,
                              image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                              video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                              vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    VideoLlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def test_local_text_model_generates_and_garbage_parses_to_none(tiny_llm, folder, caplog):
    from visenv.rewards.judges import TransformersChatBackend

    local = TransformersChatBackend(tiny_llm, max_new_tokens=12, batch_size=2)
    assert not local.vision and local.model_id == tiny_llm
    answers = local.complete_many([ChatPrompt("judge", ("short",)), ChatPrompt("judge", ("a longer prompt",)),
                                   ChatPrompt("judge", ("with a picture", b"png"))])
    assert all(isinstance(a, str) for a in answers[:2]) and isinstance(answers[2], BackendError)
    again = local.complete_many([ChatPrompt("judge", ("a longer prompt",))])
    assert again == answers[1:2]  # greedy, and left padding does not change the answer
    judge = PlanJudge(local)
    with caplog.at_level(logging.WARNING):
        assert judge([plan_episode(folder)]) == [None]
    assert judge.failures == 1 and "unparseable answer" in caplog.text
    clone = pickle.loads(pickle.dumps(local))
    assert clone._net is None and clone.model == tiny_llm


def test_local_vision_model_sees_images(tiny_vlm, folder):
    from visenv.rewards.judges import TransformersChatBackend

    local = TransformersChatBackend(tiny_vlm, max_new_tokens=8)
    assert local.vision
    judge = ReflectionJudge(local)  # accepted: the model is image-text-to-text
    record = episode(task(), [media(folder, "image", 15)], reflections=("Looks right.",))
    assert judge([record]) == [None] and judge.failures == 1 and judge.requests_sent == 1
    answers = local.complete_many([ChatPrompt("judge", ("look", judge._prompt(judge.requests(record)[0]).parts[-1]))])
    assert isinstance(answers[0], str)


# ---- inside the environment and the evaluator ---------------------------------------------------

class OneImageAgent:
    """Plans, makes one image, then answers with it: the shortest complete episode."""

    def reset(self, observation, seed=None):
        self.turn = 0

    def act(self, observation):
        self.turn += 1
        if self.turn == 1:
            call = {"name": "tool_text2image_qwen", "arguments": {"prompt": "a red bicycle by a canal"}}
            return f"<think>One photo.</think><plan>{PLAN}</plan><tool_call>{json.dumps(call)}</tool_call>"
        return f"<answer>Here it is: {observation['artifacts'][-1]}</answer>"


def test_a_rubric_of_rule_clip_and_judge_components_runs_in_the_env_and_the_evaluator(server, tmp_path):
    from rl.evaluate import evaluate
    from visenv.rewards.clip import ClipAlignment, ClipScorer

    chat = backend(server.url)
    scorer = ClipScorer(model=tiny_clip(tmp_path), pretrained=None)
    rubric = LtrReward(plan=Entry(PlanJudge(chat, cache_path=str(tmp_path / "judge.sqlite")), required=True),
                       fine={"R_format": Entry(FormatReward()), "R_tool": Entry(ToolReward()),
                             "R_traj": Entry(TrajectoryJudge(chat)), "R_clip": Entry(ClipAlignment(scorer))},
                       none_policy="invalid")
    results, summary = evaluate(OneImageAgent, [task()], env_config={"rubric": rubric}, progress=False)
    components = results[0].components
    assert components["R_plan"] == pytest.approx(PLAN_SCORE) and components["R_traj"] == pytest.approx(0.7)
    assert 0.0 <= components["R_clip"] <= 1.0 and components["R_format"] == 1.0
    assert results[0].reward == pytest.approx(components["total"]) and components["total"] > 0
    assert summary["overall"]["components"]["R_plan"] == pytest.approx(PLAN_SCORE)
    assert len(server.requests) == 2  # one plan and one trajectory judgement
    assert summary["reward_none_policy"] == "invalid"


def judged_episode(url, **options):
    """OneImageAgent's episode under LtrReward with a PlanJudge at ``url``: (the last step's
    seconds, its reward and info)."""
    from visenv.envs.visgen import VisGenEnv

    judge = PlanJudge(OpenAIChatBackend(url, "judge-model", backoff_s=0.01, **options))
    env = VisGenEnv(tasks=[task()], rubric=LtrReward(plan=Entry(judge, required=True)))
    agent = OneImageAgent()
    observation, _ = env.reset(seed=0)
    agent.reset(observation)
    observation, *_ = env.step(agent.act(observation))
    action = agent.act(observation)
    start = time.perf_counter()
    _, reward, terminated, _, info = env.step(action)
    assert terminated and judge.failures == 1
    return time.perf_counter() - start, reward, info


@pytest.mark.parametrize("case", ["duplicate key", "bad gzip", "invalid UTF-8", "bad JSON", "deep JSON", "reset", "5xx"])
def test_a_hostile_judge_server_never_raises_out_of_env_step(case):
    with JudgeServer(lambda p, n: HOSTILE[case][0]) as srv:
        _, reward, info = judged_episode(srv.url, max_retries=1)
    assert math.isnan(reward) and info["reward_valid"] is False and info["reward_none_policy"] == "invalid"
    assert "R_plan" not in info["reward_components"] and info["reward_dropped"] == ["R_plan", "R_cons"]
    json.dumps(info, allow_nan=False)  # strict JSON


def test_a_slow_drip_judge_holds_the_episode_no_longer_than_its_deadline():
    """The issue's case: a byte every 0.5 s held one episode for 125 s with timeout_s=2, max_retries=2."""
    with JudgeServer(lambda p, n: Reply(content=json.dumps(PLAN_ANSWER), drip_s=0.5), stall_limit_s=30.0) as srv:
        seconds, reward, info = judged_episode(srv.url, timeout_s=2.0, max_retries=2)
    assert 2.0 <= seconds < 3.5 and math.isnan(reward) and "R_plan" not in info["reward_components"]
