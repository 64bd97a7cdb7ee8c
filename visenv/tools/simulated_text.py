"""Templated answers of the text-producing tools, for the attribute tier.

The attribute tier (:mod:`visenv.tools.attribute`) simulates the LLM, search, understanding and
beat-detection tools with deterministic templates. The text is useful to a planning agent and
consistent with the call: a storyboard has exactly the requested shots and splits the requested
duration, a script has the word count its duration allows at 2.5 words per second, the to-do list
lives in the episode state, an analysis reports the artifact's true attributes and lineage.

Each simulator takes the :class:`~visenv.tools.backends.ToolRequest` and a seeded
:class:`random.Random`, and returns the text or a :class:`~visenv.tools.backends.ToolFailure`.
Each default text tool carries its simulator as ``output.derive`` (:mod:`visenv.tools.specs`).
"""

from __future__ import annotations

import html
import math
import random
import re

from visenv.media import Artifact
from visenv.tools.backends import ToolFailure, ToolRequest

WORDS_PER_SECOND = 2.5
DEFAULT_SHOT_SECONDS = 4.0
DEFAULT_SCRIPT_SECONDS = 30.0
DEFAULT_SUMMARY_WORDS = 60
MAX_LISTED_BEATS = 64

_SHOT_LINE = re.compile(r"^\s*shot\s+\d+\s*(?:\((\d+(?:\.\d+)?)\s*s\))?\s*[:.\-]?\s*(.*)$", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_SHOT_TYPES = ("Wide establishing shot", "Medium shot", "Close-up", "Detail insert", "Tracking shot",
               "Over-the-shoulder shot", "Aerial view", "Low-angle shot")
_CAMERA_MOVES = ("slow push-in", "static", "pan left", "pan right", "tilt up", "handheld follow",
                 "dolly out", "orbit")
_MIDDLE_BEATS = ("show {t} in action", "reveal a key detail of {t}", "build momentum around {t}",
                 "a human moment with {t}", "contrast before and after with {t}",
                 "show {t} from an unexpected angle")
_COMPOSITIONS = ("centered composition", "rule-of-thirds framing", "low-angle hero framing",
                 "close-up with shallow depth of field", "wide establishing framing", "symmetrical framing")
_LIGHTING = ("soft golden-hour light", "diffused studio lighting", "dramatic rim light",
             "bright natural daylight", "moody low-key lighting", "neon accent lighting")
_DETAILS = ("crisp textures", "rich colour contrast", "clean uncluttered background", "fine surface detail",
            "cinematic colour grading", "balanced negative space")
_CONTINUITY = ("keep the main subject's identity and wardrobe unchanged", "match the colour palette of the "
               "previous shot", "keep the light direction consistent", "end on motion that leads into the next shot")
_SCRIPT_SENTENCES = ("Meet {t}.", "Every detail of {t} is made with care.", "Here is what makes {t} stand out.",
                     "See how {t} fits into everyday life.", "People choose {t} for good reasons.",
                     "Take a closer look at {t}.", "This is the story of {t}.", "Now imagine what {t} can do for you.",
                     "Small moments make {t} memorable.", "Discover {t} today.")
_SEARCH_FACTS = ("{q}: an overview of what it is, who it is for and its main selling points.",
                 "Key facts about {q}: typical specifications, price range and availability.",
                 "{q} in context: recent trends and how audiences talk about it.",
                 "Frequently asked questions about {q}, with short answers suited to captions.",
                 "Visual cues associated with {q}: colours, materials and settings that read well on camera.",
                 "How competitors present {q}: common claims, formats and calls to action.",
                 "Audience for {q}: age groups, motivations and the platforms they use.")
_STYLES = ("minimalist", "retro 80s", "cinematic", "flat illustration", "watercolour", "3D clay render",
           "editorial photography", "cyberpunk neon", "Scandinavian clean", "hand-drawn ink")
_PALETTES = ("warm terracotta and cream", "teal and orange", "pastel pink and mint", "monochrome with one red accent",
             "deep navy and gold", "earthy olive and sand", "electric blue and magenta")
_NAMED_ASPECTS = (("1:1", 1.0), ("16:9", 16 / 9), ("9:16", 9 / 16), ("4:3", 4 / 3), ("3:4", 3 / 4),
                  ("3:2", 3 / 2), ("2:3", 2 / 3), ("21:9", 21 / 9))
_MOODS = ("calm", "energetic", "playful", "premium", "nostalgic", "bold", "dreamy")


def _seconds(value: float) -> str:
    return f"{round(value, 3):g}"


def _split_duration(total: float, shots: int) -> list[float]:
    """``total`` seconds split into ``shots`` parts of whole tenths (at least 0.1 s each), as even as possible."""
    tenths = max(shots, round(total * 10))
    base, extra = divmod(tenths, shots)
    return [(base + (1 if i < extra else 0)) / 10 for i in range(shots)]


def _parse_shots(storyboard: str) -> list[tuple[float | None, str]]:
    """(duration or None, content) per shot line; every non-empty line is a shot if none says "Shot N"."""
    lines = [line for line in storyboard.splitlines() if line.strip()]
    shots = [(float(m.group(1)) if m.group(1) else None, m.group(2).strip())
             for m in map(_SHOT_LINE.match, lines) if m]
    return shots or [(None, line.strip()) for line in lines]


def _shot_line(index: int, duration: float | None, content: str) -> str:
    if duration is None:
        timing = ""
    elif round(duration, 1) == duration:
        timing = f" ({duration:.1f}s)"
    else:
        timing = f" ({_seconds(duration)}s)"
    return f"Shot {index}{timing}: {content}"


def prompt_refine(request: ToolRequest, rng: random.Random) -> str:
    """The prompt (verbatim, less a final full stop) plus composition, lighting, detail and style."""
    prompt = request.arguments["prompt"].strip().rstrip(".")
    parts = [prompt, rng.choice(_COMPOSITIONS), rng.choice(_LIGHTING), rng.choice(_DETAILS)]
    if request.arguments.get("style"):
        parts.append(f"{request.arguments['style']} style")
    return ", ".join(parts + ["high detail, sharp focus"])


def video_shot_gen(request: ToolRequest, rng: random.Random) -> str:
    """A title line and exactly ``shots`` lines "Shot i (d s): ..." whose durations sum to ``duration``."""
    topic, shots = request.arguments["topic"].strip(), request.arguments["shots"]
    durations = _split_duration(request.arguments.get("duration", DEFAULT_SHOT_SECONDS * shots), shots)
    lines = [f"Storyboard: {topic} ({shots} shots, {sum(durations):.1f}s in total)"]
    for i, seconds in enumerate(durations, start=1):
        if i == 1:
            beat = f"introduce {topic}"
        elif i == shots:
            beat = f"closing image of {topic}, with room for the title"
        else:
            beat = rng.choice(_MIDDLE_BEATS).format(t=topic)
        lines.append(_shot_line(i, seconds, f"{rng.choice(_SHOT_TYPES)}: {beat}; "
                                               f"camera: {rng.choice(_CAMERA_MOVES)}."))
    return "\n".join(lines)


def video_script_gen(request: ToolRequest, rng: random.Random) -> str:
    """A narration of round(duration x 2.5) words (30 s when no duration is given)."""
    topic = request.arguments["topic"].strip()
    seconds = request.arguments.get("duration", DEFAULT_SCRIPT_SECONDS)
    target = max(1, round(seconds * WORDS_PER_SECOND))
    words: list[str] = []
    while len(words) < target:
        words += rng.choice(_SCRIPT_SENTENCES).format(t=topic).split()
    body = " ".join(words[:target]).rstrip(".,;:!?") + "."
    tone = request.arguments.get("tone", "neutral")
    return (f"Narration script ({tone} tone, {target} words, about {_seconds(seconds)} s at "
            f"{WORDS_PER_SECOND} words/s):\n{body}")


def storyboard_polish(request: ToolRequest, rng: random.Random) -> str:
    """The storyboard's shots, same count and durations, each with a continuity note."""
    shots = _parse_shots(request.arguments["storyboard"])
    style = request.arguments.get("style")
    lines = [f"Polished storyboard ({len(shots)} shots{', ' + style + ' style' if style else ''}):"]
    for i, (seconds, content) in enumerate(shots, start=1):
        extra = [rng.choice(_CONTINUITY)] + ([f"{style} look"] if style else [])
        lines.append(_shot_line(i, seconds, f"{content.rstrip('.')}; {'; '.join(extra)}."))
    return "\n".join(lines)


def script_storyboard_merge(request: ToolRequest, rng: random.Random) -> str:
    """The script's sentences spread over the shots in order, with a timing check."""
    shots = _parse_shots(request.arguments["storyboard"])
    sentences = [s for s in _SENTENCE_END.split(request.arguments["script"].strip()) if s]
    n, count = len(shots), len(sentences)
    per_shot: list[list[str]] = [[] for _ in shots]
    for j, sentence in enumerate(sentences):
        per_shot[j * n // count].append(sentence)
    lines = [f"Merged script and storyboard: {n} shots, {count} narration sentences."]
    for i, ((seconds, content), narration) in enumerate(zip(shots, per_shot), start=1):
        lines.append(f"{_shot_line(i, seconds, content)}\n  Narration: {' '.join(narration) or '(none)'}")
    speech = len(request.arguments["script"].split()) / WORDS_PER_SECOND
    timed = [s for s, _ in shots if s is not None]
    if len(timed) == n:
        verdict = "fits" if speech <= sum(timed) + 1e-6 else "is longer than the storyboard; shorten it"
        lines.append(f"Timing: the narration takes about {_seconds(speech)} s and {verdict} "
                     f"({_seconds(sum(timed))} s of shots).")
    return "\n".join(lines)


def content_summary(request: ToolRequest, rng: random.Random) -> str:
    """The content's leading sentences as bullet points, at most ``max_words`` words in all."""
    budget = request.arguments.get("max_words", DEFAULT_SUMMARY_WORDS)
    points: list[str] = []
    for sentence in _SENTENCE_END.split(request.arguments["content"].strip()):
        words = sentence.split()
        if not words:
            continue
        if len(words) > budget:
            if not points:
                points.append(" ".join(words[:budget]) + " ...")
            break
        points.append(" ".join(words))
        budget -= len(words)
    return f"Summary ({len(points)} key points):\n" + "\n".join(f"- {p}" for p in points)


def task_manager(request: ToolRequest, rng: random.Random) -> str | ToolFailure:
    """The to-do list is ``request.state["todo"]``: a list of {"item": str, "done": bool}."""
    todo = request.state.setdefault("todo", [])
    action, item = request.arguments["action"], request.arguments.get("item", "").strip()
    header = ""
    if action in ("add", "complete") and not item:
        return ToolFailure(f"tool_task_manager: action {action!r} needs an 'item' (the to-do text).",
                           backend="attribute")
    if action == "add":
        if any(entry["item"] == item for entry in todo):
            header = f"'{item}' is already on the list.\n"
        else:
            todo.append({"item": item, "done": False})
            header = f"Added '{item}'.\n"
    elif action == "complete":
        match = next((e for e in todo if e["item"] == item), None) or next(
            (e for e in todo if e["item"].casefold() == item.casefold()), None)
        if match is None:
            listed = "; ".join(e["item"] for e in todo) or "the list is empty"
            return ToolFailure(f"tool_task_manager: '{item}' is not on the to-do list ({listed}). "
                               "Add it first, or complete an item exactly as listed.", backend="attribute")
        match["done"] = True
        header = f"Completed '{match['item']}'.\n"
    done = sum(entry["done"] for entry in todo)
    lines = [f"[{'x' if e['done'] else ' '}] {i}. {e['item']}" for i, e in enumerate(todo, start=1)]
    return header + f"To-do list ({done}/{len(todo)} done):" + "".join(f"\n{line}" for line in lines)


def html_builder(request: ToolRequest, rng: random.Random) -> str:
    """An HTML page whose <img> tags reference image artifacts by id (never by path)."""
    title = html.escape(request.arguments["title"])
    sections = request.arguments["sections"]
    images: tuple[Artifact, ...] = request.inputs.get("images", ())
    placed: list[list[Artifact]] = [[] for _ in sections]
    for i, image in enumerate(images):
        placed[i % len(sections)].append(image)
    body = []
    for text, section_images in zip(sections, placed):
        figures = "".join(f'\n  <img src="{im.id}" alt="{html.escape(im.prompt or im.id)}" '
                          f'width="{im.attributes["width"]}" height="{im.attributes["height"]}">'
                          for im in section_images)
        body.append(f"<section>\n  <p>{html.escape(text)}</p>{figures}\n</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><meta name=\"viewport\" "
            f"content=\"width=device-width, initial-scale=1\"><title>{title}</title></head>\n<body>\n"
            f"<header><h1>{title}</h1></header>\n<main>\n" + "\n".join(body) + "\n</main>\n</body>\n</html>")


def beat_detect(request: ToolRequest, rng: random.Random) -> str:
    """Tempo and phase come from the audio's content hash, so the same track always gives the same beats.

    A track of the semantic tier (its ``content`` holds the ``tempo`` it was rendered with) reports
    that tempo, first beat at 0 s: the beats it really has.
    """
    audio = request.inputs["audio"][0]
    duration = float(audio.attributes["duration"])
    if audio.content and audio.content.get("tempo"):
        tempo, offset = audio.content["tempo"], 0.0
    else:
        tempo = 80 + int(audio.sha256[:8], 16) % 61
        offset = int(audio.sha256[8:12], 16) % 1000 / 1000 * (60.0 / tempo)
    period = 60.0 / tempo
    count = max(0, math.ceil((duration - offset) / period - 1e-9))
    beats = [round(offset + k * period, 3) for k in range(count)]
    listed = ", ".join(f"{b:.3f}" for b in beats[:MAX_LISTED_BEATS])
    more = f", ... ({count - MAX_LISTED_BEATS} more, every {period:.3f} s)" if count > MAX_LISTED_BEATS else ""
    bars = ", ".join(f"{b:.3f}" for b in beats[::4][:MAX_LISTED_BEATS // 4])
    return (f"Tempo: {tempo} BPM ({count} beats in {_seconds(duration)} s, one every {period:.3f} s, "
            f"first at {offset:.3f} s).\nBeat times (s): {listed}{more}\nBar starts, every 4 beats (s): {bars}")


def _aspect(width: int, height: int) -> str:
    """The named aspect ratio within 2% of width:height, else the reduced fraction."""
    ratio = width / height
    for name, value in _NAMED_ASPECTS:
        if abs(ratio / value - 1) < 0.02:
            return name
    divisor = math.gcd(width, height)
    return f"{width // divisor}:{height // divisor}"


def _lineage(artifact: Artifact) -> str:
    made = f", made by {artifact.producer}" if artifact.producer else ""
    prompt = f" from the prompt '{artifact.prompt}'" if artifact.prompt else ""
    sources = f", derived from {', '.join(artifact.sources)}" if artifact.sources else ""
    return f"{made}{prompt}{sources}"


def _question(request: ToolRequest, artifact: Artifact) -> str:
    question = request.arguments.get("question")
    if not question:
        return ""
    subject = f"'{artifact.prompt}'" if artifact.prompt else "the content described above"
    return f"\nOn '{question}': it shows {subject}, consistent with how it was made."


def image_analysis(request: ToolRequest, rng: random.Random) -> str:
    """The image's resolution, orientation, aspect ratio and lineage."""
    image = request.inputs["image"][0]
    width, height = image.attributes["width"], image.attributes["height"]
    shape = "square" if width == height else "landscape" if width > height else "portrait"
    return (f"{image.id}: a {shape} image, {width}x{height} (aspect {_aspect(width, height)})"
            f"{_lineage(image)}." + _question(request, image))


def video_analysis(request: ToolRequest, rng: random.Random) -> str:
    """The video's duration, resolution, fps, shots, audio/subtitle/voice-over flags and lineage."""
    video = request.inputs["video"][0]
    a = video.attributes
    flags = ", ".join(f"{name}: {'yes' if a.get(key) else 'no'}" for name, key in
                      (("audio", "has_audio"), ("subtitles", "has_subtitles"), ("voice-over", "has_voiceover")))
    post = f", post-processing: {', '.join(a['postprocess'])}" if a.get("postprocess") else ""
    shots = a.get("shots", 1)
    return (f"{video.id}: a video, {_seconds(a['duration'])} s, {a['width']}x{a['height']}, {_seconds(a['fps'])} fps, "
            f"{shots} shot{'s' if shots != 1 else ''} ({flags}{post}){_lineage(video)}." + _question(request, video))


def audio_analysis(request: ToolRequest, rng: random.Random) -> str:
    """The track's duration, sample rate, kind (music, speech, effects) and lineage."""
    audio = request.inputs["audio"][0]
    kind = {"tool_music_suno": "music", "tool_tts_generation": "speech",
            "tool_sound_fx_gen": "sound effects"}.get(audio.producer, "audio")
    rate = audio.attributes.get("sample_rate")
    rate_text = f", {rate} Hz" if rate else ""
    return (f"{audio.id}: a {kind} track, {_seconds(audio.attributes['duration'])} s{rate_text}"
            f"{_lineage(audio)}." + _question(request, audio))


def search_content(request: ToolRequest, rng: random.Random) -> str:
    """``max_results`` numbered findings about the query, picked by the seed."""
    query = request.arguments["query"].strip()
    count = request.arguments.get("max_results", 3)
    facts = rng.sample(_SEARCH_FACTS, min(count, len(_SEARCH_FACTS)))
    return f"Search results for '{query}':\n" + "\n".join(
        f"{i}. {fact.format(q=query)}" for i, fact in enumerate(facts, start=1))


def search_inspire(request: ToolRequest, rng: random.Random) -> str:
    """``n`` numbered style, palette, composition and mood ideas for the theme."""
    query = request.arguments["query"].strip()
    count = request.arguments.get("n", 3)
    styles = rng.sample(_STYLES, min(count, len(_STYLES)))
    return f"Inspiration for '{query}':\n" + "\n".join(
        f"{i}. {style} take on {query}: palette {rng.choice(_PALETTES)}; {rng.choice(_COMPOSITIONS)}; "
        f"mood {rng.choice(_MOODS)}." for i, style in enumerate(styles, start=1))
