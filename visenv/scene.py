"""Scenes: what a content-aware (semantic) tool output shows, parsed from a prompt and drawn in pixels.

The semantic tier (:mod:`visenv.tools.semantic`) renders every image and video frame from what the
call asked for, so that a program can verify it and a small vision model can learn to read it. This
module holds the three pure pieces it needs, all deterministic:

- :func:`parse_prompt`: a small vocabulary-based parser from prompt text to an *ask*
  (``{"subjects": [{"name", "count", "colour"}], "text", "style"}``). A subject is a noun of
  :data:`SUBJECT_ICONS` (plurals ending in s/es/ies are folded); its count is a number (digits or
  "one" .. "twelve") or "a"/"an" up to three words before it (default 1); its colour is a word of
  :data:`COLOURS` up to three words before it (None: the prompt names none). Text to render is the
  first quoted span ("..." or '...', at most :data:`MAX_TEXT` characters). The style is the
  ``style`` argument or the first word of :data:`STYLE_LOOKS` found in the prompt. A prompt that
  names no known subject asks for one "object".
- :func:`compare`: the defects of a rendered scene against its ask (and the identities it had to
  keep): the single definition of "as asked" that the tier's defect list, the perception reward and
  the tests share.
- :func:`render_image`: the scene as an RGB picture: a style background (palette and texture),
  each subject instance as its icon (:data:`ICONS`) in its colour with its identity's marking, and
  the text on a banner, the whole composition shifted by the scene's ``pose`` (0-99: each
  generation draws its own, so two shots or images of one identity still differ); :func:`describe` and :func:`parse_description` are the text form that the
  analysis tools write and agents read.

Identities are strings ``"<name>-<4 hex digits>"``; an identity fixes the marking drawn on a subject
(one of :data:`MARKINGS`) and, when the ask names no colour, its colour.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_TEXT = 24
RENDER_SIDE = 256
"""Longer side, in pixels, of a rendered image file (the artifact's attributes keep the asked resolution)."""
VIDEO_SIDE = 128
"""Longer side of a rendered video file's frames."""
VIDEO_FILE_FPS = 10
"""Frames per second of a rendered video file (shot cuts fall on tenths of a second)."""

ICONS = ("figure", "animal", "creature", "vessel", "device", "vehicle", "plant", "building", "item",
         "food", "sky", "object")
"""The icon shapes a subject is drawn as (one per vocabulary group)."""
_GROUPS = {
    "figure": "person woman man girl boy child astronaut archer barista chef dancer detective knight pirate "
              "witch princess samurai soldier student superhero explorer firefighter drummer singer painter "
              "photographer sailor monk librarian inventor runner skater florist fisherman shepherd bride "
              "courier mailman botanist seamstress clockmaker hunter racer driver nomad intern apprentice",
    "animal": "fox cat dog corgi kitten puppy elephant goat hare rabbit hedgehog otter panda penguin turtle cub "
              "retriever octopus bird owl horse bear lion tiger deer whale fish",
    "creature": "dragon dinosaur firefly bee honeybee mermaid giant spirit unicorn robot scarecrow",
    "vessel": "mug cup bottle teapot kettle candle lemonade coffee honey vase jar",
    "device": "speaker camera headset projector thermostat vacuum purifier machine tracker wristwatch watch "
              "phone laptop lamp clock",
    "vehicle": "car bicycle bike boat scooter kite rocket train bus plane ship",
    "plant": "tree cactus succulent flower plant leaf rose sunflower",
    "building": "house bakery bookshop cathedral shop store restaurant studio observatory tent school station "
                "castle tower lighthouse",
    "item": "backpack pillow scarf shoe mat desk toothbrush wardrobe puzzle label book ball hat umbrella "
            "guitar gift",
    "food": "dumpling ramen cake pizza apple cookie bread",
    "sky": "moon sun cloud star",
}
SUBJECT_ICONS: Mapping[str, str] = {noun: icon for icon, nouns in _GROUPS.items() for noun in nouns.split()}
"""Vocabulary of subject nouns -> the icon each is drawn as; the parser knows these nouns only."""
FALLBACK_SUBJECT = "object"
COLOURS: Mapping[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 30), "green": (40, 170, 60),
    "blue": (40, 90, 220), "purple": (140, 50, 190), "pink": (245, 120, 180), "brown": (130, 80, 40),
    "black": (20, 20, 20), "white": (245, 245, 245), "grey": (130, 130, 130), "teal": (20, 150, 150)}
"""The colour words a prompt may name, and the RGB each is drawn in ("gray" reads as "grey")."""
STYLE_LOOKS: Mapping[str, tuple[tuple[int, int, int], str]] = {
    "watercolor": ((235, 228, 210), "noise"), "minimalist": ((250, 250, 250), "plain"),
    "cinematic": ((40, 40, 55), "vignette"), "neon": ((15, 10, 35), "grid"), "pastel": ((250, 225, 235), "dots"),
    "retro": ((245, 215, 160), "stripes"), "sketch": ((240, 240, 235), "hatch"), "pixel": ((60, 60, 90), "grid"),
    "oil": ((120, 90, 60), "noise"), "anime": ((200, 230, 250), "dots"), "ink": ((235, 235, 225), "hatch"),
    "studio": ((225, 225, 230), "plain"), "golden-hour": ((250, 200, 120), "vignette"),
    "vector": ((230, 245, 240), "plain"), "collage": ((210, 190, 170), "stripes")}
"""Style words -> (background colour, texture); another style gets a look picked by its hash."""
_TEXTURES = ("plain", "noise", "dots", "stripes", "grid", "hatch", "vignette")
MARKINGS = ("dot", "bar", "ring", "cross", "pair", "notch")
"""The inner markings that tell identities apart."""
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")
MAX_COUNT = 12
_WORD = re.compile(r"[a-z][a-z-]*|\d+")
_QUOTED = re.compile(r"\"([^\"]{1,200})\"|'([^']{1,200})'")
_WINDOW = 3
_STYLE_CLAUSE = re.compile(r"(?:^|[,;:.])\s*((?:[a-z-]+ ){0,2}[a-z-]+)\s+style\b")


def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def _noun(word: str) -> str | None:
    for candidate in (word, word[:-3] + "y" if word.endswith("ies") else "", word[:-2] if word.endswith("es") else "",
                      word[:-1] if word.endswith("s") else ""):
        if candidate in SUBJECT_ICONS:
            return candidate
    return None


def _count(word: str) -> int | None:
    if word.isdigit():
        return min(max(int(word), 1), MAX_COUNT)
    if word in ("a", "an"):
        return 1
    return NUMBER_WORDS.index(word) if word in NUMBER_WORDS[1:] else None


def parse_style(prompt: str, style: str | None = None) -> str | None:
    """The style a call asks for: its ``style`` argument, else the words before "style" in a clause
    of the prompt ("..., flat vector style"), else a :data:`STYLE_LOOKS` word of the prompt."""
    if style and style.strip():
        return style.strip().lower()
    named = _STYLE_CLAUSE.search(prompt.lower())
    if named:
        return named.group(1).strip()
    words = set(_WORD.findall(prompt.lower()))
    return next((s for s in STYLE_LOOKS if s in words), None)


def parse_prompt(prompt: str, style: str | None = None) -> dict[str, Any]:
    """The ask of a prompt: subjects (name, count, colour), text to render, style (see the module doc).

    Example:
        >>> parse_prompt('three red foxes and a blue car, a sign that says "SALE"')["subjects"]
        [{'name': 'fox', 'count': 3, 'colour': 'red'}, {'name': 'car', 'count': 1, 'colour': 'blue'}]
    """
    text = prompt if isinstance(prompt, str) else ""
    quoted = _QUOTED.search(text)
    rendered_text = (quoted.group(1) or quoted.group(2)).strip()[:MAX_TEXT] if quoted else None
    words = _WORD.findall(_QUOTED.sub(" ", text).lower().replace("gray", "grey"))
    subjects: dict[str, dict[str, Any]] = {}
    for position, word in enumerate(words):
        noun = _noun(word)
        if noun is None or noun in subjects:
            continue
        count, colour = 1, None
        for before in reversed(words[max(0, position - _WINDOW):position]):
            if _noun(before):
                break
            if colour is None and before in COLOURS:
                colour = before
            found = _count(before)
            if found is not None:
                count = found
                break
        subjects[noun] = {"name": noun, "count": count, "colour": colour}
    if not subjects:
        subjects[FALLBACK_SUBJECT] = {"name": FALLBACK_SUBJECT, "count": 1, "colour": None}
    return {"subjects": list(subjects.values()), "text": rendered_text or None,
            "style": parse_style(text, style)}


def merge_ask(base: Mapping[str, Any], prompt_ask: Mapping[str, Any], prompt: str) -> dict[str, Any]:
    """A reference-based ask: ``base`` (the reference's ask) updated by what ``prompt`` names.

    Subjects the prompt names replace the reference's of the same name (others are kept); the
    prompt's text and style replace the reference's when it names them.
    """
    named = {s["name"]: dict(s) for s in prompt_ask["subjects"] if s["name"] != FALLBACK_SUBJECT}
    subjects = [named.pop(s["name"], dict(s)) for s in base["subjects"]] + list(named.values())
    return {"subjects": subjects, "text": prompt_ask["text"] or base.get("text"),
            "style": parse_style(prompt) or base.get("style")}


def new_identity(name: str, seed: int) -> str:
    """A fresh identity of subject ``name``, fixed by ``seed``."""
    return f"{name}-{_digest(f'{name}:{seed}') & 0xFFFF:04x}"


def identity_colour(identity: str) -> str:
    """The colour an identity is drawn in when its ask names none."""
    names = sorted(COLOURS)
    return names[_digest(identity) % len(names)]


def realise(ask: Mapping[str, Any], identities: Mapping[str, str], seed: int) -> dict[str, Any]:
    """The scene that shows ``ask`` exactly: kept identities from ``identities``, fresh ones otherwise."""
    subjects = []
    for subject in ask["subjects"]:
        identity = identities.get(subject["name"]) or new_identity(subject["name"], seed)
        subjects.append({"name": subject["name"], "icon": SUBJECT_ICONS.get(subject["name"], "object"),
                         "count": subject["count"], "colour": subject["colour"] or identity_colour(identity),
                         "identity": identity})
    return {"subjects": subjects, "text": ask.get("text"), "style": ask.get("style"), "pose": seed % 100}


def defect(kind: str, subject: str = "", expected: Any = "", actual: Any = "") -> dict[str, str]:
    """One defect record: what kind, on which subject, what was asked and what was drawn (all text)."""
    return {"kind": kind, "subject": str(subject), "expected": str(expected), "actual": str(actual)}


def compare(ask: Mapping[str, Any], scene: Mapping[str, Any] | None,
            identities: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """The defects of ``scene`` against ``ask``; ``identities`` are those a reference required.

    Kinds: ``missing_subject``, ``wrong_count``, ``wrong_colour``, ``missing_text``,
    ``misspelled_text``, ``identity_drift``. Empty when the scene shows what was asked.
    """
    if scene is None:
        return [defect("missing_subject", "", "a rendered scene", "none")]
    drawn = {s["name"]: s for s in scene["subjects"]}
    found = []
    for wanted in ask["subjects"]:
        name = wanted["name"]
        subject = drawn.get(name)
        if subject is None:
            found.append(defect("missing_subject", name, wanted["count"], 0))
            continue
        if subject["count"] != wanted["count"]:
            found.append(defect("wrong_count", name, wanted["count"], subject["count"]))
        if wanted["colour"] and subject["colour"] != wanted["colour"]:
            found.append(defect("wrong_colour", name, wanted["colour"], subject["colour"]))
        kept = (identities or {}).get(name)
        if kept and subject["identity"] != kept:
            found.append(defect("identity_drift", name, kept, subject["identity"]))
    if ask.get("text"):
        if not scene.get("text"):
            found.append(defect("missing_text", "", ask["text"], ""))
        elif scene["text"] != ask["text"]:
            found.append(defect("misspelled_text", "", ask["text"], scene["text"]))
    return found


# ---- text form: what the analysis tools say about a scene ----------------------------------------

def describe(scene: Mapping[str, Any] | None) -> str:
    """One line: ``2 x fox (red, identity fox-3fa2); 1 x car (...). Text: "SALE". Style: watercolor.``"""
    if scene is None:
        return "no recognisable content."
    parts = "; ".join(f"{s['count']} x {s['name']} ({s['colour']}, identity {s['identity']})"
                      for s in scene["subjects"])
    text = f' Text: "{scene["text"]}".' if scene.get("text") else " Text: none."
    return f"{parts or 'nothing'}.{text} Style: {scene.get('style') or 'plain'}. Pose: {scene.get('pose', 0)}."


_DESCRIBED = re.compile(r"(\d+) x ([a-z-]+) \(([a-z]+), identity ([a-z-]+-[0-9a-f]{4})\)")
_DESCRIBED_TEXT = re.compile(r'Text: "([^"]*)"')
_DESCRIBED_POSE = re.compile(r"Pose: (\d+)\.")


def parse_description(line: str) -> dict[str, Any]:
    """The scene a :func:`describe` line states (inverse of :func:`describe` for subjects, text and pose)."""
    subjects = [{"name": name, "icon": SUBJECT_ICONS.get(name, "object"), "count": int(count),
                 "colour": colour, "identity": identity}
                for count, name, colour, identity in _DESCRIBED.findall(line)]
    text = _DESCRIBED_TEXT.search(line)
    pose = _DESCRIBED_POSE.search(line)
    return {"subjects": subjects, "text": text.group(1) if text else None, "pose": int(pose.group(1)) if pose else 0}


_SHOWS = re.compile(r"^(?:Shows|Shot \d+ \([^)]*\)): (.*)$", re.MULTILINE)


def parse_analysis(text: str) -> list[dict[str, Any]]:
    """The scenes an analysis tool's answer states: one for an image ("Shows: ..."), one per shot
    of a video ("Shot i (d s): ..."); empty when the answer describes no content (attribute tier)."""
    return [parse_description(line) for line in _SHOWS.findall(text)]


# ---- pixels --------------------------------------------------------------------------------------

def _look(style: str | None) -> tuple[tuple[int, int, int], str]:
    if not style:
        return (200, 205, 210), "plain"
    for word, look in STYLE_LOOKS.items():
        if word in style:
            return look
    h = _digest(style)
    return (90 + h % 150, 90 + (h >> 8) % 150, 90 + (h >> 16) % 150), _TEXTURES[(h >> 24) % len(_TEXTURES)]


def _background(width: int, height: int, style: str | None) -> np.ndarray:
    colour, texture = _look(style)
    canvas = np.empty((height, width, 3), np.float32)
    canvas[:] = colour
    y, x = np.mgrid[0:height, 0:width]
    shade = np.where(np.array(colour).mean() > 128, -1.0, 1.0)
    if texture == "noise":
        canvas += shade * 18 * (np.sin(x * 0.21 + np.cos(y * 0.13) * 3) * np.cos(y * 0.17))[..., None]
    elif texture == "dots":
        canvas += shade * 25 * (((x % 16) - 8) ** 2 + ((y % 16) - 8) ** 2 < 6)[..., None]
    elif texture == "stripes":
        canvas += shade * 22 * ((y // 8) % 2)[..., None]
    elif texture == "grid":
        canvas += 60 * (((x % 20) == 0) | ((y % 20) == 0))[..., None]
    elif texture == "hatch":
        canvas += shade * 30 * (((x + y) % 10) == 0)[..., None]
    elif texture == "vignette":
        r = np.hypot((x - width / 2) / width, (y - height / 2) / height)
        canvas *= (1.1 - 0.9 * r)[..., None]
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _polygon(cx: float, cy: float, r: float, sides: int, start: float = -math.pi / 2,
             inner: float | None = None) -> list[tuple[float, float]]:
    points = []
    steps = sides * (2 if inner else 1)
    for k in range(steps):
        radius = inner * r if inner and k % 2 else r
        angle = start + 2 * math.pi * k / steps
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw_icon(draw: ImageDraw.ImageDraw, icon: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    outline = (0, 0, 0) if sum(fill) > 200 else (255, 255, 255)
    box = (cx - r, cy - r, cx + r, cy + r)
    if icon == "figure":
        draw.ellipse((cx - r * 0.4, cy - r, cx + r * 0.4, cy - r * 0.2), fill=fill, outline=outline)
        draw.polygon([(cx, cy - r * 0.25), (cx - r * 0.8, cy + r), (cx + r * 0.8, cy + r)], fill=fill, outline=outline)
    elif icon == "animal":
        draw.ellipse((cx - r, cy - r * 0.5, cx + r, cy + r), fill=fill, outline=outline)
        for side in (-1, 1):
            draw.polygon([(cx + side * r * 0.8, cy - r * 0.2), (cx + side * r * 0.3, cy - r * 0.3),
                          (cx + side * r * 0.7, cy - r)], fill=fill, outline=outline)
    elif icon == "creature":
        draw.polygon(_polygon(cx, cy, r, 5, inner=0.45), fill=fill, outline=outline)
    elif icon == "vessel":
        draw.rectangle((cx - r * 0.6, cy - r * 0.8, cx + r * 0.5, cy + r), fill=fill, outline=outline)
        draw.arc((cx + r * 0.2, cy - r * 0.4, cx + r, cy + r * 0.5), -90, 90, fill=fill, width=max(2, int(r / 5)))
    elif icon == "device":
        draw.rounded_rectangle((cx - r, cy - r * 0.7, cx + r, cy + r * 0.7), radius=r * 0.3, fill=fill, outline=outline)
    elif icon == "vehicle":
        draw.polygon(_polygon(cx, cy, r, 6, start=0), fill=fill, outline=outline)
    elif icon == "plant":
        draw.rectangle((cx - r * 0.1, cy, cx + r * 0.1, cy + r), fill=(90, 60, 30))
        draw.ellipse((cx - r * 0.7, cy - r, cx + r * 0.7, cy + r * 0.3), fill=fill, outline=outline)
    elif icon == "building":
        draw.polygon([(cx - r, cy + r), (cx - r, cy - r * 0.2), (cx, cy - r), (cx + r, cy - r * 0.2),
                      (cx + r, cy + r)], fill=fill, outline=outline)
    elif icon == "item":
        draw.polygon(_polygon(cx, cy, r, 4), fill=fill, outline=outline)
    elif icon == "food":
        draw.pieslice(box, 200, 340 + 180, fill=fill, outline=outline)
    elif icon == "sky":
        draw.ellipse(box, fill=fill, outline=outline)
        draw.ellipse((cx - r * 0.2, cy - r, cx + r * 1.2, cy + r * 0.6), fill=None, outline=outline, width=2)
    else:
        draw.polygon(_polygon(cx, cy, r, 3), fill=fill, outline=outline)


def _draw_marking(draw: ImageDraw.ImageDraw, identity: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    mark = (0, 0, 0) if sum(fill) > 300 else (255, 255, 255)
    kind = MARKINGS[_digest(identity) % len(MARKINGS)]
    s = r * 0.25
    if kind == "dot":
        draw.ellipse((cx - s, cy - s, cx + s, cy + s), fill=mark)
    elif kind == "bar":
        draw.rectangle((cx - 2 * s, cy - s / 2, cx + 2 * s, cy + s / 2), fill=mark)
    elif kind == "ring":
        draw.ellipse((cx - s * 1.5, cy - s * 1.5, cx + s * 1.5, cy + s * 1.5), outline=mark, width=max(1, int(s / 2)))
    elif kind == "cross":
        draw.line((cx - s * 1.5, cy, cx + s * 1.5, cy), fill=mark, width=max(1, int(s / 2)))
        draw.line((cx, cy - s * 1.5, cx, cy + s * 1.5), fill=mark, width=max(1, int(s / 2)))
    elif kind == "pair":
        for dx in (-s, s):
            draw.ellipse((cx + dx - s / 2, cy - s / 2, cx + dx + s / 2, cy + s / 2), fill=mark)
    else:
        draw.polygon([(cx, cy - s * 1.5), (cx - s * 1.5, cy + s), (cx + s * 1.5, cy + s)], fill=mark)


def render_image(scene: Mapping[str, Any] | None, width: int, height: int) -> Image.Image:
    """``scene`` drawn at ``width`` x ``height``: background, subject instances on a grid, text banner."""
    style = None if scene is None else scene.get("style")
    image = Image.fromarray(_background(width, height, style))
    if scene is None:
        return image
    draw = ImageDraw.Draw(image)
    instances = [s for s in scene["subjects"] for _ in range(s["count"])]
    banner = int(height * 0.18) if scene.get("text") else 0
    area = height - banner
    if instances:
        columns = math.ceil(math.sqrt(len(instances) * width / max(area, 1)))
        columns = max(1, min(columns, len(instances)))
        rows = math.ceil(len(instances) / columns)
        cell_w, cell_h = width / columns, area / rows
        radius = 0.34 * min(cell_w, cell_h)
        pose = scene.get("pose", 0)
        dx, dy = ((pose % 10) / 9 - 0.5) * 0.25 * cell_w, ((pose // 10) / 9 - 0.5) * 0.25 * cell_h
        for k, subject in enumerate(instances):
            cx, cy = (k % columns + 0.5) * cell_w + dx, (k // columns + 0.5) * cell_h + dy
            fill = COLOURS.get(subject["colour"], (128, 128, 128))
            _draw_icon(draw, subject["icon"], cx, cy, radius, fill)
            _draw_marking(draw, subject["identity"], cx, cy, radius, fill)
    if banner:
        draw.rectangle((0, height - banner, width, height), fill=(250, 250, 250))
        font = ImageFont.load_default(size=max(8, int(banner * 0.6)))
        draw.text((width / 2, height - banner / 2), scene["text"], fill=(10, 10, 10), font=font, anchor="mm")
    return image


def render_size(width: int, height: int, side: int = RENDER_SIDE) -> tuple[int, int]:
    """The file size of a rendering: ``width`` x ``height`` scaled so its longer side is ``side`` (even)."""
    scale = side / max(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def shot_scenes(content: Mapping[str, Any]) -> Sequence[Mapping[str, Any] | None]:
    """The scene of each shot of a video's content (an image's content: its one scene)."""
    if "shots" in content:
        return [shot["scene"] for shot in content["shots"]]
    return [content.get("scene")]
