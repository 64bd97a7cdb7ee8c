"""Tests of the UTPC turn protocol: parsing, problems, canonical formatting, tool responses."""

from __future__ import annotations

import pickle
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visenv.error import ConfigError
from visenv.protocol import (
    PROBLEM_CODES,
    TAGS,
    FormatProblem,
    ToolCall,
    Turn,
    format_turn,
    parse_tool_response,
    parse_turn,
    render_error,
    render_tool_response,
)

CALL = '{"name": "tool_text2image_qwen", "arguments": {"prompt": "a red fox", "count": 2}}'
GOOD = (
    "<think>\nThe user wants a fox.\n</think>\n"
    "<plan>\n1. tool_search_inspire: find a palette\n2. tool_text2image_qwen: draw the fox (after 1)\n</plan>\n"
    f"<tool_call>\n{CALL}\n</tool_call>"
)
FRAGMENTS = [f"<{tag}>" for tag in TAGS] + [f"</{tag}>" for tag in TAGS] + [
    "<", ">", "</", "< think >", "<Think>", "<tool_response>", "{", "}", '"', ",", ":", "```", "```json",
    '{"name": "t", "arguments": {}}', '"arguments": "{}"', "\\u", "\\ud800", "\x00", "\ud800", "\ufffd",
    "1. ", "- ", "\n", " ", "NaN", "[" * 50,
]


def codes(turn: Turn) -> list[str]:
    return [p.code for p in turn.problems]


def problem(turn: Turn, code: str) -> FormatProblem:
    found = [p for p in turn.problems if p.code == code]
    assert found, f"expected a {code!r} problem, got {codes(turn)}"
    return found[0]


def assert_matches(pattern: str, message: str | None) -> None:
    assert message is not None and re.search(pattern, message), f"{pattern!r} not found in {message!r}"


def assert_consistent(turn: Turn, max_chars: int | None = None) -> None:
    """The invariants every parsed turn keeps, whatever the input."""
    assert isinstance(turn, Turn)
    assert isinstance(turn.raw, str)
    turn.raw.encode("utf-8")  # no lone surrogates survive
    assert "\x00" not in turn.raw
    if max_chars is not None:
        assert len(turn.raw) <= max_chars
    assert all(isinstance(p, FormatProblem) and p.code in PROBLEM_CODES and p.message for p in turn.problems)
    assert turn.well_formed == (not turn.problems)
    assert (turn.feedback() == "") == turn.well_formed
    assert set(turn.tags) <= set(TAGS)
    for tag in ("think", "plan", "reflection", "answer"):
        value = getattr(turn, tag)
        assert (value is None) == (tag not in turn.tags)
        assert value is None or (isinstance(value, str) and value == value.strip())
    assert turn.action in ("tool_call", "answer", "none")
    if turn.tool_call is not None:
        assert isinstance(turn.tool_call.name, str) and turn.tool_call.name
        assert isinstance(turn.tool_call.arguments, dict)
        assert turn.tool_call_error is None
    if turn.tool_call_error is not None:
        assert "tool_call" in turn.tags and turn.action == "none"
    assert isinstance(turn.plan_steps, tuple) and all(isinstance(s, str) and s for s in turn.plan_steps)
    if turn.plan is None:
        assert turn.plan_steps == ()


# --- valid turns ---------------------------------------------------------------------------------


def test_a_complete_turn_parses_into_its_fields():
    turn = parse_turn(GOOD)
    assert turn.well_formed and turn.problems == () and turn.feedback() == ""
    assert turn.think == "The user wants a fox."
    assert turn.plan.startswith("1. tool_search_inspire")
    assert turn.plan_steps == ("tool_search_inspire: find a palette", "tool_text2image_qwen: draw the fox (after 1)")
    assert turn.tool_call == ToolCall("tool_text2image_qwen", {"prompt": "a red fox", "count": 2})
    assert turn.tool_call_error is None and turn.answer is None and turn.reflection is None
    assert turn.tags == ("think", "plan", "tool_call")
    assert turn.action == "tool_call"
    assert turn.raw == GOOD


def test_an_answer_turn_with_reflection_ends_the_episode():
    turn = parse_turn("<think>done</think><reflection>The fox matches the brief.</reflection><answer>img_1</answer>")
    assert turn.well_formed
    assert (turn.reflection, turn.answer, turn.action) == ("The fox matches the brief.", "img_1", "answer")


def test_unknown_markup_inside_an_element_is_text():
    turn = parse_turn('<answer><div class="hero">Hi</div> and a < b > c</answer>')
    assert turn.well_formed and turn.answer == '<div class="hero">Hi</div> and a < b > c'


@pytest.mark.parametrize("plan, steps", [
    ("1. a\n2) b\n3: c", ("a", "b", "c")),
    ("Step 1: search\nStep 2: draw", ("search", "draw")),
    ("Plan:\n- a\n- b", ("a", "b")),
    ("1. a\n   with details\n2. b", ("a with details", "b")),
    ("1. draw\n   - wide shot\n   - close-up\n2. edit", ("draw - wide shot - close-up", "edit")),
    ("- a\n* b\n\u2022 c", ("a", "b", "c")),
    ("search first\n\n  then   draw  ", ("search first", "then draw")),
    ("1.\n   search\n2. draw", ("search", "draw")),
])
def test_plan_steps_follow_the_numbering_or_bullets(plan, steps):
    assert parse_turn(f"<plan>{plan}</plan><answer>x</answer>").plan_steps == steps


def test_a_fenced_json_call_is_accepted_silently():
    turn = parse_turn(f"<tool_call>\n```json\n{CALL}\n```\n</tool_call>")
    assert turn.well_formed and turn.tool_call.name == "tool_text2image_qwen"


def test_turns_pickle_for_ray_workers():
    turn = parse_turn("<think>x</think>" + GOOD)
    assert pickle.loads(pickle.dumps(turn)) == turn


# --- every problem code --------------------------------------------------------------------------

PROBLEM_CASES = [
    ("not_text", b"<answer>x</answer>", r"got bytes, decoded as UTF-8"),
    ("invalid_characters", "<answer>a\x00b</answer>", r"invalid characters \(1 NUL\), the first at char 9"),
    ("no_tags", "Sure, I will draw it.", r"no tags \(found 'Sure, I will draw it\.'\)\. Expected: <think>"),
    ("unknown_tag", "<tool>x</tool><answer>y</answer>", r"'<tool>' at char 0, .*did you mean <tool_call>\?"),
    ("unclosed_tag", "<answer>done", r"<answer> opened at char 0 is never closed: expected </answer> before the end"),
    ("stray_closing_tag", "</think><answer>x</answer>", r"Found </think> at char 0 with no <think> open before it"),
    ("nested_tag", "<think>a <plan>b</plan></think><answer>x</answer>",
     r"<plan> at char 9 inside <think> \(opened at char 0\); tags cannot be nested"),
    ("duplicate_tag", "<think>a</think><think>b</think><answer>x</answer>",
     r"second <think> at char 16; only the first \(char 0\) was used"),
    ("multiple_tool_calls", f"<tool_call>{CALL}</tool_call><tool_call>{CALL}</tool_call>",
     r"another <tool_call> at char \d+; only the first \(char 0\) was executed"),
    ("empty_tag", "<think> </think><answer>x</answer>", r"<think> at char 0 is empty"),
    ("text_outside_tags", "Sure!\n<answer>x</answer>", r"text outside the tags at char 0: 'Sure!'"),
    ("wrong_order", "<plan>p</plan><think>t</think><answer>x</answer>",
     r"out of order \(found plan -> think -> answer\): <think> must come first, but <plan> comes before it"),
    ("bad_json", '<tool_call>{"name": "t", "arguments": {"a": 1,}}</tool_call>',
     r"not hold valid JSON: Expecting property name enclosed in double quotes at char 46 \(line 1, column 36"),
    ("bad_call_shape", '<tool_call>{"arguments": {}}</tool_call>', r'has no "name"; "name" must be the tool\'s name'),
    ("both_call_and_answer", f"<tool_call>{CALL}</tool_call><answer>x</answer>",
     r"both a <tool_call> \(char 0\) and an <answer> \(char \d+\); the tool call was executed and the answer was ignored"),
    ("missing_action", "<think>hmm</think>", r"neither a <tool_call> nor an <answer> \(found <think>\)"),
]


@pytest.mark.parametrize("code, text, message", PROBLEM_CASES, ids=[case[0] for case in PROBLEM_CASES])
def test_each_problem_has_a_precise_message(code, text, message):
    turn = parse_turn(text)
    assert not turn.well_formed
    assert_matches(message, problem(turn, code).message)
    assert f"({codes(turn).index(code) + 1}) {problem(turn, code).message}" in turn.feedback()


def test_truncation_is_reported_with_the_limit():
    turn = parse_turn("<answer>" + "x" * 100 + "</answer>", max_chars=50)
    assert len(turn.raw) == 50
    assert "longer than the limit of 50 characters; only the first 50 were read" in problem(turn, "truncated").message
    assert "The turn was truncated" in problem(turn, "unclosed_tag").message


def test_the_problem_table_covers_every_code():
    assert {case[0] for case in PROBLEM_CASES} | {"truncated"} == set(PROBLEM_CODES)


# --- how broken turns are still read -------------------------------------------------------------


def test_an_unclosed_element_ends_at_the_next_tag_and_the_call_still_runs():
    turn = parse_turn(f"<think>I will search<tool_call>{CALL}</tool_call>")
    assert turn.think == "I will search"
    assert turn.tool_call.name == "tool_text2image_qwen"
    assert codes(turn) == ["unclosed_tag"]
    assert "where <tool_call> begins; the <think> was taken to end there" in turn.problems[0].message


def test_an_unclosed_call_cut_by_a_stop_string_is_executed():
    turn = parse_turn(f"<think>go</think><tool_call>{CALL}")
    assert turn.action == "tool_call" and codes(turn) == ["unclosed_tag"]


def test_a_wrong_closing_tag_ends_the_element_with_a_hint():
    turn = parse_turn("<think>a</plan><answer>x</answer>")
    assert turn.think == "a" and turn.answer == "x"
    assert "found </plan>" in problem(turn, "unclosed_tag").message


def test_a_misspelt_closing_tag_is_named_in_the_unclosed_message():
    turn = parse_turn("<think>a</Think><answer>x</answer>")
    assert "Found '</Think>' at char 8: tags are case-sensitive" in problem(turn, "unclosed_tag").message


def test_a_tag_reopened_before_its_close_does_not_borrow_that_close():
    turn = parse_turn(f"<think>a <tool_call>{CALL}</tool_call><think>b</think>")
    assert turn.think == "a" and turn.tool_call is not None
    assert set(codes(turn)) == {"unclosed_tag", "duplicate_tag"}


@pytest.mark.parametrize("written", ["< think >", "<Think>", "<think >", "<THINK>", "<think/>", "<think class='x'>"])
def test_near_miss_tags_are_not_tags_and_name_the_exact_spelling(written):
    turn = parse_turn(f"{written}hmm</think><answer>x</answer>")
    assert turn.think is None
    assert f"Found {written!r} at char 0, which is not a tag: write exactly <think>" in problem(turn, "unknown_tag").message


def test_a_dashed_tag_is_a_near_miss_of_the_underscored_one():
    turn = parse_turn(f"<tool-call>{CALL}</tool-call>")
    assert "write exactly <tool_call>" in problem(turn, "unknown_tag").message
    assert turn.action == "none"


def test_a_written_tool_response_is_called_out():
    turn = parse_turn(f'<tool_call>{CALL}</tool_call>\n<tool_response>{{"status": "ok"}}</tool_response>')
    assert "<tool_response> is written by the environment, never by you" in problem(turn, "unknown_tag").message
    assert turn.tool_call is not None


@pytest.mark.parametrize("written, guess", [("<thinking>", "think"), ("<tool>", "tool_call"), ("<a>", None)])
def test_unknown_tags_guess_the_tag_meant_only_from_a_real_prefix(written, guess):
    message = problem(parse_turn(f"{written}<answer>x</answer>"), "unknown_tag").message
    assert ("did you mean" in message) == (guess is not None)
    assert guess is None or f"did you mean <{guess}>?" in message


def test_prose_with_angle_brackets_outside_tags_is_text_not_a_tag():
    turn = parse_turn("if a < b and c > d\n<answer>x</answer>")
    assert codes(turn) == ["text_outside_tags"]


def test_repeated_problems_are_merged_with_a_count():
    turn = parse_turn("</plan>" * 5 + "<answer>x</answer>")
    assert codes(turn) == ["stray_closing_tag"]
    assert turn.problems[0].message.endswith("(This happened 5 times.)")


def test_a_multiple_call_turn_executes_only_the_first():
    second = CALL.replace("qwen", "gpt")
    turn = parse_turn(f"<tool_call>{CALL}</tool_call><tool_call>{second}</tool_call>")
    assert turn.tool_call.name == "tool_text2image_qwen"
    assert turn.tags == ("tool_call", "tool_call")


def test_a_call_with_an_answer_runs_the_call_and_ignores_the_answer():
    turn = parse_turn(f"<tool_call>{CALL}</tool_call><answer>x</answer>")
    assert turn.action == "tool_call" and turn.answer == "x"


def test_an_unusable_call_with_an_answer_does_not_end_the_episode():
    turn = parse_turn("<tool_call>{oops}</tool_call><answer>x</answer>")
    assert turn.action == "none"
    assert "could not be executed and the answer was ignored" in problem(turn, "both_call_and_answer").message


@pytest.mark.parametrize("order", [
    ("answer", "think"), ("tool_call", "plan"), ("reflection", "think", "answer"), ("answer", "reflection"),
])
def test_wrong_orders_are_reported(order):
    body = "".join(f"<{tag}>{CALL if tag == 'tool_call' else 'x'}</{tag}>" for tag in order)
    assert "wrong_order" in codes(parse_turn(body))


@pytest.mark.parametrize("order", [
    ("think", "plan", "tool_call"), ("think", "reflection", "plan", "answer"), ("plan", "reflection", "answer"),
    ("reflection", "tool_call"), ("answer",),
])
def test_right_orders_are_accepted(order):
    body = "".join(f"<{tag}>{CALL if tag == 'tool_call' else 'x'}</{tag}>" for tag in order)
    assert parse_turn(body).well_formed


# --- the call's JSON -----------------------------------------------------------------------------


def test_string_arguments_run_the_call_but_are_reported():
    turn = parse_turn('<tool_call>{"name": "t", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert turn.tool_call == ToolCall("t", {"a": 1})
    assert '"arguments" was a JSON-encoded string; write it as a JSON object' in problem(turn, "bad_call_shape").message


def test_missing_arguments_and_extra_keys_run_the_call_but_are_reported():
    turn = parse_turn('<tool_call>{"name": "t", "id": 7}</tool_call>')
    assert turn.tool_call == ToolCall("t", {})
    message = problem(turn, "bad_call_shape").message
    assert 'no "arguments" (taken as {})' in message and "('id')" in message


@pytest.mark.parametrize("body, message", [
    ('["t", {}]', r"holds a JSON array; it must hold an object"),
    ('{"name": 3, "arguments": {}}', r'"name" as a JSON number 3'),
    ('{"name": "", "arguments": {}}', r'"name" as a JSON string ""'),
    ('{"name": "t", "arguments": [1]}', r'"arguments" as a JSON array; it must be a JSON object'),
    ('{"name": "t", "arguments": "[1]"}', r'"arguments" as a string that is not a JSON object'),
])
def test_unusable_call_shapes_explain_themselves(body, message):
    turn = parse_turn(f"<tool_call>{body}</tool_call>")
    assert turn.tool_call is None and turn.action == "none"
    assert_matches(message, turn.tool_call_error)
    assert problem(turn, "bad_call_shape").message == turn.tool_call_error


@pytest.mark.parametrize("body, message", [
    ('{"name": "t", "arguments": {"a": NaN}}', r"NaN is not valid JSON"),
    ('{"name": "t", "arguments": {"a": -1e999}}', r"the number -1e999 is too large"),
    ('{"name": "t", "arguments": "{\\"a\\": 1E+400}"}', r"not a JSON object"),
    ('{"name": "t", "arguments": {"a": ' + "[" * 32 + "]" * 32 + "}}", r"more than 32 levels deep"),
    ('{"name": "t", "arguments": {"a": "\\ud800"}}', r"escapes a lone surrogate"),
    ("[" * 100_000, r"nested too deeply|valid JSON"),
    ('{"name": "t", "arguments": {"a": ' + "1" * 10_000 + "}}", r"valid JSON"),
    ('{"name": "t", "arguments": {}} {"name": "u", "arguments": {}}', r"Extra data at char 42"),
    ("", r"<tool_call> at char 0 is empty"),
])
def test_invalid_json_makes_the_call_unusable(body, message):
    turn = parse_turn(f"<tool_call>{body}</tool_call>")
    assert turn.tool_call is None and turn.tool_call_error
    assert_matches(message, turn.tool_call_error)


def test_nesting_up_to_the_limit_and_large_finite_numbers_are_accepted():
    body = '{"name": "t", "arguments": {"a": ' + "[" * 30 + "1e308" + "]" * 30 + "}}"
    turn = parse_turn(f"<tool_call>{body}</tool_call>")
    assert turn.tool_call is not None and turn.tool_call_error is None
    deep = parse_turn('<tool_call>{"name": "t", "arguments": "{\\"a\\": ' + "[" * 32 + "]" * 32 + '}"}</tool_call>')
    assert deep.tool_call is None and "more than 32 levels deep" in deep.tool_call_error


def test_a_paired_surrogate_escape_is_a_character():
    turn = parse_turn('<tool_call>{"name": "t", "arguments": {"emoji": "\\ud83e\\udd8a"}}</tool_call>')
    assert turn.tool_call.arguments == {"emoji": "\U0001f98a"}


# --- input hygiene -------------------------------------------------------------------------------


@pytest.mark.parametrize("value, message", [
    (None, r"got None, read as empty text"),
    (42, r"got int, read through str\(\)"),
    (bytearray(b"<answer>x</answer>"), r"got bytearray, decoded as UTF-8"),
    (memoryview(b"<answer>x</answer>"), r"got memoryview, decoded as UTF-8"),
])
def test_non_text_input_is_converted_and_reported(value, message):
    turn = parse_turn(value)
    assert_matches(message, problem(turn, "not_text").message)
    assert_consistent(turn)


def test_an_object_whose_str_fails_is_read_as_empty():
    class Hostile:
        def __str__(self):
            raise RuntimeError("no")

    turn = parse_turn(Hostile())
    assert turn.raw == "" and "str() of it failed (RuntimeError('no'))" in problem(turn, "not_text").message


def test_a_str_subclass_is_text():
    class Text(str):
        pass

    turn = parse_turn(Text("<answer>x</answer>"))
    assert turn.well_formed and type(turn.raw) is str


def test_non_utf8_bytes_are_replaced_and_reported():
    turn = parse_turn(b"<answer>caf\xe9 \xff</answer>")
    assert turn.answer == "caf\ufffd \ufffd"
    assert "(2 U+FFFD replacement character), the first at char 11" in problem(turn, "invalid_characters").message


def test_lone_surrogates_and_nul_are_replaced():
    turn = parse_turn("<answer>a\ud800b\x00c</answer>")
    assert turn.answer == "a\ufffdb\ufffdc"
    assert "1 NUL, 1 lone surrogate" in problem(turn, "invalid_characters").message
    turn.raw.encode("utf-8")


def test_a_10_mb_turn_is_cut_before_parsing():
    text = "<think>" + "x" * 10_000_000 + "</think><answer>x</answer>"
    turn = parse_turn(text, max_chars=4096)
    assert len(turn.raw) == 4096 and turn.think == "x" * 4089
    assert codes(turn) == ["truncated", "unclosed_tag", "missing_action"]


def test_10_mb_of_bytes_are_cut_before_decoding():
    turn = parse_turn(b"\xff" * 10_000_000, max_chars=1000)
    assert turn.raw == "\ufffd" * 1000
    assert {"not_text", "truncated", "invalid_characters", "no_tags"} == set(codes(turn))


@pytest.mark.parametrize("max_chars", [0, -1, 2.5, True, "100"])
def test_a_bad_max_chars_is_a_config_error(max_chars):
    with pytest.raises(ConfigError, match=r"max_chars must be a positive int or None; got"):
        parse_turn("<answer>x</answer>", max_chars=max_chars)


@pytest.mark.parametrize("text", [
    "<" * 100_000,
    "<" + " " * 100_000,
    "< " * 50_000,
    "<think>" * 10_000,
    "<think>" * 10_000 + "</think>",
    "</think>" * 10_000,
    "<think><plan>" * 5_000 + "</think>",
    "<think>x</think>" + "".join(f"<a{i}>" for i in range(10_000)),
    "<a b" * 50_000,
    "<plan>" + "1. x\n" * 20_000 + "</plan>",
    "<tool_call>" + "{" * 50_000 + "</tool_call>",
])
def test_adversarial_inputs_parse_with_short_feedback(text):
    turn = parse_turn(text)
    assert_consistent(turn)
    assert len(turn.problems) <= len(PROBLEM_CODES) + len(TAGS) * 4
    assert len(turn.feedback()) < 4000


# --- property-based: never raises ----------------------------------------------------------------

any_text = st.text(alphabet=st.characters() | st.characters(categories=["Cs"]))  # lone surrogates too
tagged_text = st.lists(st.one_of(any_text, st.sampled_from(FRAGMENTS)), max_size=30).map("".join)


@settings(max_examples=400, deadline=None)
@given(text=st.one_of(any_text, tagged_text), max_chars=st.one_of(st.none(), st.integers(1, 200)))
def test_parse_never_raises_on_text(text, max_chars):
    assert_consistent(parse_turn(text, max_chars=max_chars), max_chars)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(), max_chars=st.one_of(st.none(), st.integers(1, 100)))
def test_parse_never_raises_on_bytes(data, max_chars):
    turn = parse_turn(data, max_chars=max_chars)
    assert_consistent(turn, max_chars)
    assert "not_text" in codes(turn)


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.sampled_from([b"a", b"<answer>", "\u00e9".encode(), "\U0001f98a".encode(), b"\xf0\x9f", b"\xff"]),
                     max_size=20).map(b"".join), max_chars=st.integers(1, 12))
def test_bytes_are_cut_exactly_like_the_decoded_text(data, max_chars):
    decoded = data.decode("utf-8", "replace")
    turn = parse_turn(data, max_chars=max_chars)
    assert turn.raw == decoded[:max_chars]
    assert ("truncated" in codes(turn)) == (len(decoded) > max_chars)


@settings(max_examples=100, deadline=None)
@given(value=st.one_of(st.none(), st.integers(), st.floats(), st.lists(st.text()), st.dictionaries(st.text(), st.text())))
def test_parse_never_raises_on_other_objects(value):
    assert_consistent(parse_turn(value))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.lists(st.text(max_size=8) | st.sampled_from(FRAGMENTS[:10]), max_size=3).map("".join),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
content = st.lists(st.one_of(st.text(max_size=20), st.sampled_from(FRAGMENTS)), max_size=6).map("".join)
VALID_TURNS = [
    GOOD,
    format_turn(think="check", reflection="fine", answer="img_1, img_2"),
    format_turn(plan="- a\n- b", tool_call={"name": "t", "arguments": {"x": [1, 2.5, None, "</think>"]}}),
]
mutation = st.tuples(
    st.sampled_from(["delete", "insert", "truncate", "replace"]),
    st.floats(0, 1), st.floats(0, 1), st.sampled_from(FRAGMENTS + ["x", "'", "\\"]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(VALID_TURNS), mutations=st.lists(mutation, min_size=1, max_size=6),
       max_chars=st.one_of(st.none(), st.integers(1, 400)))
def test_parse_never_raises_on_mutated_valid_turns(base, mutations, max_chars):
    text = base
    for op, a, b, fragment in mutations:
        i, j = sorted((int(a * len(text)), int(b * len(text))))
        if op == "delete":
            text = text[:i] + text[j:]
        elif op == "insert":
            text = text[:i] + fragment + text[i:]
        elif op == "truncate":
            text = text[:i]
        else:
            text = text[:i] + fragment + text[i + 1:]
    assert_consistent(parse_turn(text, max_chars=max_chars), max_chars)


# --- format_turn ---------------------------------------------------------------------------------


def expect_rejected(value: str) -> bool:
    """Whether format_turn must refuse ``value`` as content: it could not round-trip."""
    has_tag = any(f"<{tag}>" in value or f"</{tag}>" in value for tag in TAGS)
    invalid = any(c == "\x00" or c == "\ufffd" or "\ud800" <= c <= "\udfff" for c in value)
    return has_tag or invalid or not value.strip()


@settings(max_examples=300, deadline=None)
@given(think=st.none() | content, plan=st.none() | content, reflection=st.none() | content,
       answer=content, name=st.text(min_size=1, max_size=10) | st.sampled_from(FRAGMENTS[:10]),
       arguments=st.dictionaries(st.text(max_size=8) | st.sampled_from(FRAGMENTS[:10]), json_values, max_size=4),
       use_call=st.booleans())
def test_format_turn_round_trips_or_refuses(think, plan, reflection, answer, name, arguments, use_call):
    fields = {"think": think, "plan": plan, "reflection": reflection}
    action = {"tool_call": ToolCall(name, arguments)} if use_call else {"answer": answer}
    texts = [v for v in [think, plan, reflection, None if use_call else answer] if v is not None]
    if any(expect_rejected(v) for v in texts) or (use_call and any("\ud800" <= c <= "\udfff" for c in name)):
        with pytest.raises(ValueError, match=r"format_turn: "):
            format_turn(**fields, **action)
        return
    turn = parse_turn(format_turn(**fields, **action))
    assert turn.well_formed, turn.feedback()
    for tag, value in fields.items():
        assert getattr(turn, tag) == (None if value is None else value.strip())
    if use_call:
        assert turn.tool_call == ToolCall(name, arguments) and turn.answer is None
    else:
        assert turn.answer == answer.strip() and turn.tool_call is None


def test_format_turn_writes_the_canonical_layout():
    text = format_turn(answer="done", plan="1. a", reflection="ok", think="t")
    assert text == "<think>\nt\n</think>\n<reflection>\nok\n</reflection>\n<plan>\n1. a\n</plan>\n<answer>\ndone\n</answer>"
    call = format_turn(tool_call={"name": "t", "arguments": {"html": "<answer>x</answer>"}})
    assert "\\u003canswer>x\\u003c/answer>" in call
    assert parse_turn(call).tool_call.arguments == {"html": "<answer>x</answer>"}


@pytest.mark.parametrize("kwargs, error, message", [
    ({}, ValueError, r"exactly one action, tool_call=\.\.\. or answer=\.\.\.; got neither"),
    ({"answer": "a", "tool_call": ToolCall("t", {})}, ValueError, r"got both"),
    ({"answer": "  "}, ValueError, r"answer is blank; pass None"),
    ({"think": "see </think> here", "answer": "a"}, ValueError, r"think contains the tag text '</think>' at char 4"),
    ({"answer": "a\x00"}, ValueError, r"invalid character '\\x00' at char 1"),
    ({"answer": 3}, TypeError, r"answer must be a str or None; got int"),
    ({"tool_call": ToolCall("", {})}, ValueError, r"tool name must be a non-empty str"),
    ({"tool_call": ToolCall("t", [])}, ValueError, r"arguments must be a dict; got list"),
    ({"tool_call": ToolCall("t", {"a": (1, 2)})}, ValueError, r"does not survive JSON exactly"),
    ({"tool_call": ToolCall("t", {1: "a"})}, ValueError, r"does not survive JSON exactly"),
    ({"tool_call": ToolCall("t", {"a": "\ud800"})}, ValueError, r"does not survive JSON exactly"),
    ({"tool_call": ToolCall("t", {"a": float("nan")})}, ValueError, r"Out of range float"),
    ({"tool_call": {"name": "t"}}, ValueError, r"exactly the keys 'name' and 'arguments'"),
    ({"tool_call": "t"}, TypeError, r"ToolCall or a mapping; got str"),
])
def test_format_turn_refuses_what_cannot_round_trip(kwargs, error, message):
    with pytest.raises(error, match=message):
        format_turn(**kwargs)


# --- tool responses ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(payload=st.dictionaries(st.text(max_size=10), json_values | st.just("</tool_response>"), max_size=5))
def test_tool_responses_round_trip(payload):
    text = render_tool_response(payload)
    assert text.startswith("<tool_response>\n") and text.endswith("\n</tool_response>")
    assert parse_tool_response(text) == payload
    assert parse_tool_response(f"Result:\n{text}\n") == payload


def test_render_tool_response_is_sorted_json_without_ascii_escapes():
    assert render_tool_response({"b": "狐", "a": 1}) == '<tool_response>\n{"a": 1, "b": "狐"}\n</tool_response>'


def test_render_error_builds_an_error_payload():
    text = render_error("unknown tool 'x'", tool="x")
    assert parse_tool_response(text) == {"status": "error", "error": "unknown tool 'x'", "tool": "x"}


@pytest.mark.parametrize("text", [
    "no response here",
    "<tool_response>\n[1, 2]\n</tool_response>",
    "<tool_response>\n{not json}\n</tool_response>",
    '<tool_response>\n{"a": 1}',
    '<tool_response>\n{"a": 1} trailing\n</tool_response>',
    "<tool_response>" + "[" * 100_000,
])
def test_parse_tool_response_returns_none_for_anything_else(text):
    assert parse_tool_response(text) is None
