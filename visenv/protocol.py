"""The UTPC turn protocol: parse what a model writes, render what the environment answers.

A turn is the text a model writes in one step. Following VisionCreator's UTPC phases and the
Hermes/Qwen tool-call convention (ours), it is a sequence of tagged elements::

    <think>
    The user wants a mascot; I have no palette yet.
    </think>
    <plan>
    1. tool_search_inspire: find a palette
    2. tool_text2image_qwen: draw the mascot (after 1)
    </plan>
    <tool_call>
    {"name": "tool_search_inspire", "arguments": {"query": "mascot palette"}}
    </tool_call>

Rules of a well-formed turn (each broken rule is one :class:`FormatProblem`, see
:data:`PROBLEM_CODES`):

* Tags are ``<think>``, ``<plan>``, ``<reflection>``, ``<tool_call>`` and ``<answer>``, written
  exactly: lowercase, no spaces, no attributes. Near misses (``< think >``, ``<Think>``,
  ``<tool-call>``, ``<think/>``) are not tags; at the top level they are reported as
  ``unknown_tag`` with the exact spelling to use. Unknown tags *inside* an element are ordinary
  text (an ``<answer>`` may quote HTML), but the five tags above may not appear there.
* Each tag appears at most once, is closed, is not nested, and holds non-whitespace content (the
  content is stripped of surrounding whitespace). No text may stand outside the tags.
* ``<think>``, when present, comes first; ``<think>``, ``<plan>`` and ``<reflection>`` come before
  the action (so ``<reflection>`` follows ``<think>`` and ``<plan>`` precedes ``<tool_call>``).
* The turn ends with exactly one action: a ``<tool_call>`` holding the JSON object
  ``{"name": str, "arguments": object}``, or an ``<answer>``, which ends the episode.
* The environment's ``<tool_response>`` is never written by the model.

How broken turns are still read (the problems are reported either way):

* An element that is never closed ends where the next tag begins (when no matching close tag
  follows), or at the end of the turn. An unclosed ``<tool_call>`` whose JSON is complete is
  executed: generation stopped at ``</tool_call>`` by a stop string loses only the closing tag.
* Of duplicated tags the first is used; only the first ``<tool_call>`` is executed.
* A turn with both a ``<tool_call>`` and an ``<answer>`` executes the call and ignores the
  answer: a turn that holds a ``<tool_call>`` tag never ends the episode, even if the call cannot
  be executed (the agent has not seen its result yet).
* The JSON may be wrapped in a Markdown fence (```` ```json ... ``` ````); this is accepted
  silently, as the JSON itself is unambiguous.
* ``"arguments"`` given as a JSON-encoded string of an object (the OpenAI wire format), or missing
  (taken as ``{}``), still executes the call but is reported as ``bad_call_shape``, because the
  protocol asks for an object. So are keys other than ``"name"`` and ``"arguments"``, which are
  ignored. ``NaN``/``Infinity``, numbers too large for a double (``1e999``), escapes of lone
  surrogates, and values nested deeper than :data:`MAX_JSON_DEPTH` are not valid JSON here.

Input hygiene: :func:`parse_turn` never raises for any input. Bytes are decoded as UTF-8 with
replacement, other objects go through ``str()``, text longer than ``max_chars`` is cut before
parsing, and NUL characters and lone surrogates are replaced by U+FFFD, so ``Turn.raw`` can
always be encoded as UTF-8. The scan is linear: one compiled regular expression finds the tags,
with no backtracking-prone patterns, so adversarial input (100k ``<``, deeply repeated tags,
megabytes of text) parses in linear time; repeats of one problem are merged into one message with
a count, so the feedback stays short.

:func:`format_turn` writes the canonical text of a well-formed turn (think, reflection, plan, then
the action). Content that could not round-trip (tag text, invalid characters, blank) is rejected
with ``ValueError`` rather than escaped, because the parser has no unescaping step. Inside the
tool call's JSON, tag text is escaped as ``\\u003c``, which JSON decodes back exactly.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from visenv.error import ConfigError

__all__ = [
    "PROBLEM_CODES",
    "TAGS",
    "FormatProblem",
    "ToolCall",
    "Turn",
    "format_turn",
    "parse_tool_response",
    "parse_turn",
    "render_error",
    "render_tool_response",
]

TAGS = ("think", "plan", "reflection", "tool_call", "answer")
"""The tags of a turn."""

PROBLEM_CODES = (
    "not_text",
    "invalid_characters",
    "truncated",
    "no_tags",
    "unknown_tag",
    "unclosed_tag",
    "stray_closing_tag",
    "nested_tag",
    "duplicate_tag",
    "multiple_tool_calls",
    "empty_tag",
    "text_outside_tags",
    "wrong_order",
    "bad_json",
    "bad_call_shape",
    "both_call_and_answer",
    "missing_action",
)
"""Every :attr:`FormatProblem.code` that :func:`parse_turn` can report."""

_Element = tuple[str, int, int, int]  # a top-level element: (tag, open_at, content_start, content_end)
_ACTIONS = ("tool_call", "answer")
_CANONICAL_ORDER = ("think", "reflection", "plan", "tool_call", "answer")
_FORMAT_HINT = (
    "Expected: <think>...</think>, optionally <reflection>...</reflection> and <plan>...</plan>, "
    'then exactly one <tool_call>{"name": "...", "arguments": {...}}</tool_call> '
    "or <answer>...</answer>."
)
_OPEN_TEXT = {tag: f"<{tag}>" for tag in TAGS}
_CLOSE_TEXT = {tag: f"</{tag}>" for tag in TAGS}
_RESPONSE_OPEN = "<tool_response>"
_RESPONSE_CLOSE = "</tool_response>"

_TAG_RE = re.compile(r"<(/?)(think|plan|reflection|tool_call|answer)>")
# Anything shaped like markup, for reporting near misses and unknown tags. Possessive quantifiers
# keep it linear: no run of characters is ever re-read by backtracking.
_MARKUP_RE = re.compile(r"<(\s*+)(/?)(\s*+)([A-Za-z][\w-]*+)([^<>]*+)>")
_INVALID_RE = re.compile("[\x00\ud800-\udfff\ufffd]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_NON_SPACE_RE = re.compile(r"\S")
_SPACE_RE = re.compile(r"\s*+")
_FENCE_RE = re.compile(r"```(?:json|JSON)?")
_JSON_ESCAPE_RE = re.compile(r"<(?=/?(?:think|plan|reflection|tool_call|answer)>)|\ufffd")
# A step marker at the start of a line; group 1 is set for numbered markers, unset for bullets.
_STEP_RE = re.compile(r"[ \t]*+(?:((?:[Ss]tep[ \t]*+)?\d++[ \t]*+[.):])|[-*+\u2022])(?:[ \t]++|$)")


MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a tool call may hold (the call object itself is level 1)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large (numbers must lie within +-1.8e308)")
    return value


_CALL_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_RESPONSE_DECODER = json.JSONDecoder()
_MISSING = object()


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool invocation, as written in a ``<tool_call>`` element.

    Attributes:
        name: the tool's name, e.g. ``"tool_text2image_qwen"``.
        arguments: the call's arguments, a JSON object.
    """

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class FormatProblem:
    """One way a turn departs from the protocol.

    Attributes:
        code: one of :data:`PROBLEM_CODES`, for rewards and metrics.
        message: for the agent: what was expected, what was found, and where (character offsets
            count from 0 in :attr:`Turn.raw`).
    """

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Turn:
    """A parsed turn.

    Attributes:
        raw: the text that was parsed, after decoding, truncation and character replacement.
        think: the stripped content of the first ``<think>``, or None if absent.
        plan: the stripped content of the first ``<plan>``, or None if absent.
        reflection: the stripped content of the first ``<reflection>``, or None if absent.
        answer: the stripped content of the first ``<answer>``, or None if absent. It is kept even
            when a tool call overrides it; :attr:`action` says what the turn does.
        tool_call: the call to execute: the first ``<tool_call>``, when usable; else None.
        tool_call_error: why a present ``<tool_call>`` cannot be executed (agent-readable), else
            None.
        plan_steps: the plan split into steps: numbered (``1.``, ``2)``, ``Step 3:``) or bulleted
            lines start a step, unmarked lines continue it, markers are removed and whitespace
            collapsed; a plan without markers has one step per line. Empty without a plan.
        tags: the top-level elements in the order they appeared, duplicates included.
        problems: every departure from the protocol, in the order found.
    """

    raw: str
    think: str | None
    plan: str | None
    reflection: str | None
    answer: str | None
    tool_call: ToolCall | None
    tool_call_error: str | None
    plan_steps: tuple[str, ...]
    tags: tuple[str, ...]
    problems: tuple[FormatProblem, ...]

    @property
    def well_formed(self) -> bool:
        """True when the turn has no format problem."""
        return not self.problems

    @property
    def action(self) -> str:
        """What the turn does: ``"tool_call"``, ``"answer"`` or ``"none"``.

        ``"tool_call"``: execute :attr:`tool_call`. ``"answer"``: end the episode; only when the
        turn holds no ``<tool_call>`` tag at all. ``"none"``: no usable action (a broken call, or
        neither tag).
        """
        if self.tool_call is not None:
            return "tool_call"
        if self.answer is not None and self.tool_call_error is None:
            return "answer"
        return "none"

    def feedback(self) -> str:
        """One agent-readable paragraph listing the problems; ``""`` for a well-formed turn."""
        if not self.problems:
            return ""
        count = len(self.problems)
        items = " ".join(f"({i}) {p.message}" for i, p in enumerate(self.problems, 1))
        return f"Your turn has {count} format problem{'s' if count > 1 else ''}: {items}"


class _ProblemLog:
    """Collects problems, merging repeats of the same kind so adversarial input stays short.

    A problem is keyed by its code and a key (usually the tag): the first occurrence keeps its
    message, built lazily, and later ones only raise its count.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], list] = {}

    def add(self, code: str, key: str, describe: Callable[[], str]) -> str:
        """Records one occurrence and returns the message of the first one of its kind."""
        entry = self._entries.get((code, key))
        if entry is None:
            entry = self._entries[(code, key)] = [describe(), 1]
        else:
            entry[1] += 1
        return entry[0]

    def problems(self) -> tuple[FormatProblem, ...]:
        """The problems in the order first found, repeats counted in the message."""
        if not self._entries:
            return ()
        return tuple(
            FormatProblem(code, message if count == 1 else f"{message} (This happened {count:,} times.)")
            for (code, _), (message, count) in self._entries.items()
        )


class _NextFinder:
    """``str.find`` of fixed needles at non-decreasing positions, amortised linear per needle."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._hits: dict[str, int] = {}

    def find(self, needle: str, pos: int) -> int:
        """Offset of the first ``needle`` at or after ``pos`` (which never decreases), or -1."""
        hit = self._hits.get(needle)
        if hit is None or 0 <= hit < pos:
            hit = self._hits[needle] = self._text.find(needle, pos)
        return hit


def _quote(text: str, limit: int = 40) -> str:
    """A short, quoted excerpt of ``text`` for messages."""
    return repr(text[:limit] + "..." if len(text) > limit else text)


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def parse_turn(text: object, max_chars: int | None = None) -> Turn:
    """Parses one model turn. Never raises for any ``text``: every flaw becomes a problem.

    Args:
        text: the turn; normally a str. Bytes (and bytearray, memoryview) are decoded as UTF-8
            with replacement, None is read as empty text, other objects through ``str()``; each
            of these is reported as ``not_text``.
        max_chars: if given, only the first ``max_chars`` characters are parsed (``truncated``).

    Returns:
        The parsed :class:`Turn`.

    Raises:
        ConfigError: ``max_chars`` is not a positive int or None (a caller's bug, not the
            policy's).
    """
    if max_chars is not None and (type(max_chars) is not int or max_chars < 1):
        raise ConfigError(f"max_chars must be a positive int or None; got {max_chars!r}.")
    log = _ProblemLog()
    raw = _as_text(text, max_chars, log)
    truncated = max_chars is not None and len(raw) > max_chars
    if truncated:
        log.add("truncated", "", lambda: (
            f"The turn is longer than the limit of {max_chars:,} characters; only the first "
            f"{max_chars:,} were read. Write shorter turns."))
        raw = raw[:max_chars]
    if _has_invalid(raw):
        raw = _replace_invalid(raw, log)
    elements, outside = _scan(raw, truncated, log)
    return _assemble(raw, elements, outside, log)


def _as_text(text: object, max_chars: int | None, log: _ProblemLog) -> str:
    """The input as a str, reporting ``not_text`` for anything else.

    Bytes beyond ``4 * max_chars + 4`` cannot reach the parsed prefix (UTF-8 needs at most four
    bytes a character), so they are not decoded: decoding 10 MB of invalid bytes takes tens of
    milliseconds.
    """
    if type(text) is str:
        return text
    if isinstance(text, str):
        return str.__str__(text)
    kind = type(text).__name__
    if text is None:
        log.add("not_text", "", lambda: "Expected the turn as text (str); got None, read as empty text.")
        return ""
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            data = bytes(text)
        except (TypeError, ValueError) as exc:  # a released or exotic buffer
            message = f"Expected the turn as text (str); got {kind} that could not be read ({exc})."
            log.add("not_text", "", lambda: message)
            return ""
        if max_chars is not None:
            data = data[: 4 * max_chars + 4]
        log.add("not_text", "", lambda: f"Expected the turn as text (str); got {kind}, decoded as UTF-8.")
        return data.decode("utf-8", "replace")
    try:
        converted = str(text)
    except Exception as exc:  # foreign code: any __str__ may fail, and parse_turn must not
        message = f"Expected the turn as text (str); got {kind}, and str() of it failed ({exc!r})."
        log.add("not_text", "", lambda: message)
        return ""
    log.add("not_text", "", lambda: f"Expected the turn as text (str); got {kind}, read through str().")
    return converted


def _has_invalid(raw: str) -> bool:
    """Whether ``raw`` holds a NUL, a lone surrogate or U+FFFD (C-speed checks, no regex)."""
    if raw.isascii():
        return "\x00" in raw
    if "\x00" in raw or "\ufffd" in raw:
        return True
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _replace_invalid(raw: str, log: _ProblemLog) -> str:
    """Replaces NUL characters and lone surrogates by U+FFFD, reporting all invalid characters."""
    first = _INVALID_RE.search(raw).start()
    nul = raw.count("\x00")
    replacement = raw.count("\ufffd")
    if nul:
        raw = raw.replace("\x00", "\ufffd")
    raw, surrogates = _SURROGATE_RE.subn("\ufffd", raw)
    kinds = [f"{n:,} {what}" for n, what in ((nul, "NUL"), (surrogates, "lone surrogate"),
                                             (replacement, "U+FFFD replacement character")) if n]
    log.add("invalid_characters", "", lambda: (
        f"The turn contains invalid characters ({', '.join(kinds)}), the first at char {first}; NUL "
        "and lone surrogates were replaced by U+FFFD. Write plain UTF-8 text."))
    return raw


def _scan(raw: str, truncated: bool, log: _ProblemLog) -> tuple[list[_Element], list[tuple[int, int]]]:
    """One linear pass over the tags.

    Returns:
        The top-level elements as ``(tag, open_at, content_start, content_end)`` and the spans of
        text outside them as ``(start, end)``.
    """
    elements: list[_Element] = []
    outside: list[tuple[int, int]] = []
    finder = _NextFinder(raw)
    open_name: str | None = None  # the open element's tag, if one is open
    open_at = content_start = 0  # where the open element's tag and content begin
    nested: set[str] = set()  # tags opened inside the open element, read as its text
    text_start = 0
    for match in _TAG_RE.finditer(raw):
        slash, name = match.groups()
        at, end = match.span()
        if open_name is None:
            if at > text_start:
                outside.append((text_start, at))
            text_start = end
            if slash:
                log.add("stray_closing_tag", name, lambda: (
                    f"Found </{name}> at char {at} with no <{name}> open before it; remove it."))
            else:
                open_name, open_at, content_start = name, at, end
            continue
        if slash and name == open_name:
            elements.append((open_name, open_at, content_start, at))
            open_name, text_start = None, end
            if nested:
                nested.clear()
            continue
        if slash and name in nested:
            continue
        close_at = finder.find(_CLOSE_TEXT[open_name], end)
        if close_at >= 0 and not 0 <= finder.find(_OPEN_TEXT[open_name], end) < close_at:
            # The open element is closed later, by a close tag that no other open tag claims.
            if slash:
                log.add("stray_closing_tag", name, lambda: (
                    f"Found </{name}> at char {at} inside <{open_name}> (opened at char {open_at}), "
                    f"which is still open; remove it or close </{open_name}> first."))
            else:
                nested.add(name)
                log.add("nested_tag", name, lambda: (
                    f"Found <{name}> at char {at} inside <{open_name}> (opened at char {open_at}); "
                    f"tags cannot be nested, so it was read as <{open_name}> text. Close "
                    f"</{open_name}> before opening <{name}>."))
            continue
        # The open element is never closed: it ends here.
        elements.append((open_name, open_at, content_start, at))
        log.add("unclosed_tag", open_name, lambda: (
            f"<{open_name}> opened at char {open_at} is never closed: expected </{open_name}> "
            f"before char {at}, where {f'found </{name}>' if slash else f'<{name}> begins'}; "
            f"the <{open_name}> was taken to end there."
            + _near_miss_hint(raw, open_name, content_start, at)))
        if nested:
            nested.clear()
        if slash:
            open_name, text_start = None, end
        else:
            open_name, open_at, content_start = name, at, end
    if open_name is not None:
        elements.append((open_name, open_at, content_start, len(raw)))
        log.add("unclosed_tag", open_name, lambda: (
            f"<{open_name}> opened at char {open_at} is never closed: expected </{open_name}> "
            f"before the end of the turn; the <{open_name}> was taken to run to the end."
            + (" The turn was truncated, which may have cut it." if truncated else "")
            + _near_miss_hint(raw, open_name, content_start, len(raw))))
    elif text_start < len(raw):
        outside.append((text_start, len(raw)))
    return elements, outside


def _near_miss_hint(raw: str, tag: str, start: int, end: int) -> str:
    """A hint naming a misspelt closing tag of ``tag`` in ``raw[start:end]``, or ``""``."""
    for match in _MARKUP_RE.finditer(raw, start, end):
        if match.group(2) and match.group(4).lower().replace("-", "_") == tag:
            return (f" (Found {match.group()!r} at char {match.start()}: tags are case-sensitive "
                    f"and take no spaces; write </{tag}>.)")
    return ""


def _check_outside(raw: str, outside: list[tuple[int, int]], has_tags: bool, log: _ProblemLog) -> None:
    """Reports unknown tags and (when the turn has tags at all) text outside the elements."""
    for start, end in outside:
        if _NON_SPACE_RE.search(raw, start, end) is None:
            continue
        text_at = text_end = -1
        cursor = start
        for match in _MARKUP_RE.finditer(raw, start, end):
            if _report_markup(match, log):
                if text_at < 0:
                    text_at, text_end = _first_text(raw, cursor, match.start()), match.start()
                cursor = match.end()
        if text_at < 0:
            text_at, text_end = _first_text(raw, cursor, end), end
        if text_at >= 0 and has_tags:
            log.add("text_outside_tags", "", lambda: (
                f"Found text outside the tags at char {text_at}: "
                f"{_quote(raw[text_at:text_end].rstrip())}. Write everything inside <think>, <plan>, "
                "<reflection>, <tool_call> or <answer>."))


def _first_text(raw: str, start: int, end: int) -> int:
    """Offset of the first non-whitespace character in ``raw[start:end]``, or -1."""
    match = _NON_SPACE_RE.search(raw, start, end)
    return -1 if match is None else match.start()


def _report_markup(match: re.Match, log: _ProblemLog) -> bool:
    """Reports a top-level piece of markup as an unknown tag; False if it is not tag-like.

    ``a < b and c > d`` and ``<a+b>`` are prose, not tags: markup with a space after ``<``, or a
    name not followed by ``>``, ``/>`` or a space, counts as a tag only when it names one of
    :data:`TAGS`.
    """
    space_before, slash, space_after, name, rest = match.groups()
    written, at = match.group(), match.start()
    tag = name.lower().replace("-", "_")
    if tag in TAGS:
        exact = f"</{tag}>" if slash else f"<{tag}>"
        log.add("unknown_tag", tag, lambda: (
            f"Found {written!r} at char {at}, which is not a tag: write exactly {exact} (tags are "
            "lowercase, without spaces or attributes)."))
        return True
    if space_before or space_after or (rest and not rest[0].isspace() and rest != "/"):
        return False
    if tag == "tool_response":
        log.add("unknown_tag", tag, lambda: (
            f"Found {written!r} at char {at}: <tool_response> is written by the environment, "
            "never by you. End your turn after </tool_call> and wait for the response."))
        return True
    log.add("unknown_tag", "", lambda: _unknown_tag_message(written, at, tag))
    return True


def _unknown_tag_message(written: str, at: int, tag: str) -> str:
    """The message for markup that is not a tag, guessing the tag meant by a prefix match
    (``<thinking>``, ``<tool>``); names shorter than four letters (``<a>``, ``<p>``) get no guess."""
    guess = next((t for t in TAGS if len(tag) >= 4 and (t.startswith(tag) or tag.startswith(t))), None)
    return (f"Found {written!r} at char {at}, which is not a tag of this format"
            + (f" (did you mean <{guess}>?)" if guess else "")
            + ". The only tags are <think>, <plan>, <reflection>, <tool_call> and <answer>.")


def _assemble(raw: str, elements: list[_Element], outside: list[tuple[int, int]], log: _ProblemLog) -> Turn:
    """Builds the :class:`Turn` from the scanned elements, adding the content-level problems."""
    contents: dict[str, str] = {}  # the text tags' content
    opened_at: dict[str, int] = {}  # where each tag first opened
    call: ToolCall | None = None
    call_error: str | None = None
    for name, at, start, end in elements:
        first = opened_at.get(name)
        if first is not None:
            if name == "tool_call":
                log.add("multiple_tool_calls", name, lambda: (
                    f"Found another <tool_call> at char {at}; only the first (char {first}) was "
                    "executed. Make one tool call per turn and wait for its <tool_response>."))
            else:
                log.add("duplicate_tag", name, lambda: (
                    f"Found a second <{name}> at char {at}; only the first (char {first}) was "
                    f"used. Write each tag once per turn."))
            continue
        opened_at[name] = at
        if name == "tool_call":
            call, call_error = _parse_call(raw, start, end, log)
            continue
        content = contents[name] = raw[start:end].strip()
        if not content:
            log.add("empty_tag", name, lambda: (
                f"<{name}> at char {at} is empty; write its content or leave the tag out."))
    tags = tuple([element[0] for element in elements])
    _check_outside(raw, outside, bool(tags), log)
    if not tags:
        text_at = _first_text(raw, 0, len(raw))
        found = "no text" if text_at < 0 else _quote(raw[text_at:text_at + 60].rstrip())
        log.add("no_tags", "", lambda: f"The turn has no tags (found {found}). {_FORMAT_HINT}")
    else:
        _check_order(tags, log)
        _check_action(opened_at, call, log)
    plan = contents.get("plan")
    return Turn(
        raw=raw,
        think=contents.get("think"),
        plan=plan,
        reflection=contents.get("reflection"),
        answer=contents.get("answer"),
        tool_call=call,
        tool_call_error=call_error,
        plan_steps=_split_plan(plan) if plan else (),
        tags=tags,
        problems=log.problems(),
    )


def _order_violations(order: tuple[str, ...]) -> list[str]:
    """The ordering rules that the first occurrences of the tags, in order, break."""
    rules = []
    if "think" in order and order[0] != "think":
        rules.append(f"<think> must come first, but <{order[0]}> comes before it")
    action = next((i for i, tag in enumerate(order) if tag in _ACTIONS), None)
    if action is not None:
        late = [f"<{tag}>" for tag in order[action + 1:] if tag not in _ACTIONS]
        if late:
            rules.append(f"<{order[action]}> must come last, but {', '.join(late)} "
                         f"{'follows' if len(late) == 1 else 'follow'} it")
    return rules


_WELL_ORDERED = frozenset(
    order for size in range(1, len(TAGS) + 1) for order in itertools.permutations(TAGS, size)
    if not _order_violations(order)
)


def _check_order(tags: tuple[str, ...], log: _ProblemLog) -> None:
    """Reports ``wrong_order``: ``<think>`` first, the action after every other tag."""
    if tags in _WELL_ORDERED:
        return
    order = tuple(dict.fromkeys(tags))
    rules = _order_violations(order)
    if rules:
        log.add("wrong_order", "", lambda: (
            f"The tags are out of order (found {' -> '.join(order)}): {'; '.join(rules)}. "
            "Write <think> first, then <reflection> and <plan>, and the <tool_call> or <answer> last."))


def _check_action(opened_at: dict[str, int], call: ToolCall | None, log: _ProblemLog) -> None:
    """Reports ``both_call_and_answer`` and ``missing_action``."""
    if "tool_call" in opened_at and "answer" in opened_at:
        outcome = "was executed" if call is not None else "could not be executed"
        log.add("both_call_and_answer", "", lambda: (
            f"The turn has both a <tool_call> (char {opened_at['tool_call']}) and an <answer> "
            f"(char {opened_at['answer']}); the tool call {outcome} and the answer was ignored. "
            "Answer in a later turn, after you have seen the tool's result."))
    elif "tool_call" not in opened_at and "answer" not in opened_at:
        found = ", ".join(f"<{tag}>" for tag in opened_at)
        log.add("missing_action", "", lambda: (
            f"The turn has neither a <tool_call> nor an <answer> (found {found}). End every turn "
            "with one <tool_call> to use a tool, or an <answer> to finish."))


def _parse_call(raw: str, start: int, end: int, log: _ProblemLog) -> tuple[ToolCall | None, str | None]:
    """Reads the JSON of a ``<tool_call>`` element.

    Returns:
        ``(call, None)`` when the call can be executed, else ``(None, why)``.
    """
    body = raw[start:end]
    offset = start + len(body) - len(body.lstrip())
    body = body.strip()
    if not body:
        return None, log.add("empty_tag", "tool_call", lambda: (
            f"<tool_call> at char {start - len('<tool_call>')} is empty; it must hold a JSON object "
            '{"name": "...", "arguments": {...}}.'))
    if body.startswith("```"):
        fence = _FENCE_RE.match(body)
        if body.endswith("```") and len(body) >= fence.end() + 3:
            inner = body[fence.end():-3]
            offset += fence.end() + len(inner) - len(inner.lstrip())
            body = inner.strip()
    try:
        value = _CALL_DECODER.decode(body)
    except json.JSONDecodeError as exc:
        at = offset + exc.pos
        message = (f"The <tool_call> does not hold valid JSON: {exc.msg} at char {at} (line "
                   f"{exc.lineno}, column {exc.colno} of the call), where it reads "
                   f"{_quote(raw[at:at + 20])}. Write one JSON object: "
                   '{"name": "...", "arguments": {...}}.')
        return None, log.add("bad_json", "", lambda: message)
    except (ValueError, RecursionError) as exc:  # NaN, digit-count limit, or nesting too deep
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        return None, log.add("bad_json", "", lambda: (
            f"The <tool_call> at char {offset} does not hold valid JSON: {reason}."))
    if _depth(value) > MAX_JSON_DEPTH:
        return None, log.add("bad_json", "", lambda: (
            f"The <tool_call> at char {offset} nests arrays or objects more than {MAX_JSON_DEPTH} levels "
            "deep; tool arguments are flat: write each argument as a string, number, or list."))
    if "\\u" in body and _has_lone_surrogate(value):
        return None, log.add("bad_json", "", lambda: (
            f"The <tool_call> at char {offset} escapes a lone surrogate (\\ud800-\\udfff without "
            "its pair), which is not a character; write the text itself."))
    return _call_from_json(value, offset, log)


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in a decoded JSON value (0 for a scalar); iterative."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a decoded JSON value holds a lone surrogate anywhere (keys included).

    Iterative, as the value may be nested as deeply as the decoder allows.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE_RE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _call_from_json(value: Any, offset: int, log: _ProblemLog) -> tuple[ToolCall | None, str | None]:
    """Checks the shape of a decoded call: ``{"name": str, "arguments": object}``."""
    shape = '{"name": "...", "arguments": {...}}'
    if not isinstance(value, dict):
        kind = _json_type(value)
        return None, log.add("bad_call_shape", "", lambda: (
            f"The <tool_call> at char {offset} holds a JSON {kind}; it must hold an object {shape}."))
    name = value.get("name", _MISSING)
    if not isinstance(name, str) or not name:
        found = ('no "name"' if name is _MISSING
                 else f'"name" as a JSON {_json_type(name)} {json.dumps(name)[:40]}')
        return None, log.add("bad_call_shape", "", lambda: (
            f"The <tool_call> at char {offset} has {found}; \"name\" must be the tool's name as a "
            f"non-empty string: {shape}."))
    arguments = value.get("arguments", _MISSING)
    notes: list[str] = []
    if arguments is _MISSING:
        arguments = {}
        notes.append('it has no "arguments" (taken as {}); write "arguments": {} for a tool without '
                     "arguments")
    elif isinstance(arguments, str):
        try:
            decoded = _CALL_DECODER.decode(arguments)
        except (ValueError, RecursionError):
            decoded = None
        if isinstance(decoded, dict) and _depth(decoded) >= MAX_JSON_DEPTH:
            return None, log.add("bad_call_shape", "", lambda: (
                f"The <tool_call> at char {offset} gives \"arguments\" as a string whose JSON nests more "
                f"than {MAX_JSON_DEPTH} levels deep; write \"arguments\" as a flat JSON object: {shape}."))
        if not isinstance(decoded, dict) or _has_lone_surrogate(decoded):
            return None, log.add("bad_call_shape", "", lambda: (
                f"The <tool_call> at char {offset} gives \"arguments\" as a string that is not a "
                f"JSON object; \"arguments\" must be a JSON object: {shape}."))
        arguments = decoded
        notes.append('"arguments" was a JSON-encoded string; write it as a JSON object')
    elif not isinstance(arguments, dict):
        kind = _json_type(arguments)
        return None, log.add("bad_call_shape", "", lambda: (
            f"The <tool_call> at char {offset} gives \"arguments\" as a JSON {kind}; it must be a "
            f"JSON object: {shape}."))
    if len(value) > 1 + ("arguments" in value):
        extra = [key for key in value if key not in ("name", "arguments")]
        notes.append(f'it has keys other than "name" and "arguments" ({", ".join(map(repr, extra[:5]))}), '
                     "which were ignored")
    if notes:
        log.add("bad_call_shape", "", lambda: (
            f"The <tool_call> at char {offset} was executed, but {'; '.join(notes)}: {shape}."))
    return ToolCall(name, arguments), None


def _split_plan(plan: str) -> tuple[str, ...]:
    """Splits a plan into steps.

    A step starts at a line marked like the plan's first marked line: numbered (``1.``, ``2)``,
    ``3:``, ``Step 4:``) or bulleted (``-``, ``*``, ``+``, ``•``). Unmarked lines continue the step
    above; text before the first marker (a heading such as ``Plan:``) is not a step. A plan with
    no marker has one step per non-blank line. Markers are removed and whitespace is collapsed.
    """
    steps: list[list[str]] = []  # the lines of each step
    preamble: list[str] = []
    bulleted = None  # the kind of marker that starts a step, once the first one is seen
    for line in plan.splitlines():
        mark = _STEP_RE.match(line)
        if mark is not None and bulleted in (None, mark.group(1) is None):
            bulleted = mark.group(1) is None
            steps.append([line[mark.end():]])
        elif steps:
            steps[-1].append(line)
        else:
            preamble.append(line)
    chosen = [[line] for line in preamble] if bulleted is None else steps
    return tuple(step for step in (" ".join(" ".join(lines).split()) for lines in chosen) if step)


def render_tool_response(payload: Mapping[str, Any]) -> str:
    """The observation text returning a tool's result (or an error) to the agent.

    Args:
        payload: a JSON-serialisable mapping, e.g. ``{"status": "ok", "artifacts": [...]}``.

    Returns:
        ``"<tool_response>\\n" + json + "\\n</tool_response>"`` with sorted keys and non-ASCII text
        kept as is; :func:`parse_tool_response` reads it back.
    """
    body = json.dumps(dict(payload), ensure_ascii=False, sort_keys=True)
    return f"{_RESPONSE_OPEN}\n{body}\n{_RESPONSE_CLOSE}"


def render_error(message: str, **extra: Any) -> str:
    """A tool response reporting an error: ``{"status": "error", "error": message, **extra}``."""
    return render_tool_response({"status": "error", "error": message, **extra})


def parse_tool_response(text: str) -> dict[str, Any] | None:
    """Reads the payload of the first ``<tool_response>`` in ``text`` (for scripted agents).

    The JSON is decoded by position, so strings inside it may contain ``</tool_response>``.

    Returns:
        The payload, or None when there is no ``<tool_response>`` or its content is not a JSON
        object followed by ``</tool_response>``.
    """
    start = text.find(_RESPONSE_OPEN)
    if start < 0:
        return None
    pos = _SPACE_RE.match(text, start + len(_RESPONSE_OPEN)).end()
    try:
        payload, end = _RESPONSE_DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError):
        return None
    end = _SPACE_RE.match(text, end).end()
    if not isinstance(payload, dict) or not text.startswith(_RESPONSE_CLOSE, end):
        return None
    return payload


def format_turn(*, think: str | None = None, plan: str | None = None, reflection: str | None = None,
                tool_call: ToolCall | Mapping[str, Any] | None = None, answer: str | None = None) -> str:
    """The canonical text of a well-formed turn.

    Elements are written as ``<tag>\\ncontent\\n</tag>``, joined by newlines, in the order think,
    reflection, plan, then the action. Content is stripped, as :func:`parse_turn` strips it, so
    ``parse_turn(format_turn(...))`` is well-formed and returns exactly the given fields (stripped).

    Args:
        think: the ``<think>`` content, or None to leave it out.
        plan: the ``<plan>`` content, or None.
        reflection: the ``<reflection>`` content, or None.
        tool_call: a :class:`ToolCall` or a mapping with ``"name"`` and ``"arguments"``. Exactly
            one of ``tool_call`` and ``answer`` must be given.
        answer: the ``<answer>`` content, or None.

    Raises:
        ValueError: content that could not round-trip: blank, holding tag text such as
            ``</think>`` (rephrase it: the parser does not unescape), or invalid characters (NUL,
            lone surrogates, U+FFFD); a call whose name is empty or whose arguments are not a dict
            that survives JSON exactly (str keys, lists rather than tuples, finite numbers); both
            or neither of ``tool_call`` and ``answer``.
        TypeError: content that is not a str, or arguments that JSON cannot encode.
    """
    if (tool_call is None) == (answer is None):
        given = "both" if answer is not None else "neither"
        raise ValueError(f"format_turn needs exactly one action, tool_call=... or answer=...; got {given}.")
    texts = {"think": think, "reflection": reflection, "plan": plan, "answer": answer}
    parts = {tag: _checked_content(tag, content) for tag, content in texts.items() if content is not None}
    if tool_call is not None:
        parts["tool_call"] = _call_text(tool_call)
    return "\n".join(f"<{tag}>\n{parts[tag]}\n</{tag}>" for tag in _CANONICAL_ORDER if tag in parts)


def _checked_content(tag: str, content: str) -> str:
    """``content`` stripped, or an error saying why it cannot be the content of ``<tag>``."""
    if not isinstance(content, str):
        raise TypeError(f"format_turn: {tag} must be a str or None; got {type(content).__name__}.")
    content = content.strip()
    if not content:
        raise ValueError(f"format_turn: {tag} is blank; pass None to leave the <{tag}> out.")
    match = _TAG_RE.search(content)
    if match is not None:
        raise ValueError(f"format_turn: {tag} contains the tag text {match.group()!r} at char "
                         f"{match.start()}, which would end or nest the <{tag}>; rephrase it.")
    match = _INVALID_RE.search(content)
    if match is not None:
        raise ValueError(f"format_turn: {tag} contains the invalid character {match.group()!r} at "
                         f"char {match.start()} (NUL, lone surrogate or U+FFFD); remove it.")
    return content


def _call_text(tool_call: ToolCall | Mapping[str, Any]) -> str:
    """The JSON text of a call, with tag text and U+FFFD escaped so that it parses back exactly."""
    if isinstance(tool_call, ToolCall):
        name, arguments = tool_call.name, tool_call.arguments
    elif isinstance(tool_call, Mapping):
        if set(tool_call) != {"name", "arguments"}:
            raise ValueError(f"format_turn: tool_call must have exactly the keys 'name' and "
                             f"'arguments'; got {sorted(map(str, tool_call))}.")
        name, arguments = tool_call["name"], tool_call["arguments"]
    else:
        raise TypeError(f"format_turn: tool_call must be a ToolCall or a mapping; "
                        f"got {type(tool_call).__name__}.")
    if not isinstance(name, str) or not name:
        raise ValueError(f"format_turn: the tool name must be a non-empty str; got {name!r}.")
    if not isinstance(arguments, dict):
        raise ValueError(f"format_turn: arguments must be a dict; got {type(arguments).__name__}.")
    call = {"name": name, "arguments": arguments}
    text = json.dumps(call, ensure_ascii=False, allow_nan=False)
    if _SURROGATE_RE.search(text) or json.loads(text) != call:
        raise ValueError("format_turn: the call does not survive JSON exactly; use str keys, lists "
                         "rather than tuples, and text without lone surrogates.")
    return _JSON_ESCAPE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
