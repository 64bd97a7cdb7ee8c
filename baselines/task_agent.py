"""The TaskAgent of the scripted VisionAgent teacher (PAPER.md section 5).

The paper's TaskAgent classifies a request into a task type and picks one of 15 workflow templates;
the MetaAgent then executes it. This scripted TaskAgent reads the request text only: it classifies
the scenario by its distinctive phrases (the longest match wins, so "picture book video" beats
"picture book"), then parses the requirements: amount, duration, shots, aspect ratio, consistency,
audio tracks, and the style and content keywords from the vocabulary of the scenario pools. Text it
cannot make sense of gets a sensible default route; it never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from visenv.tasks import SCENARIOS, WORKFLOWS, PlannedCall, Requirements, Task
from visenv.tasks.scenario import NUMBER_WORDS
from visenv.tasks.task import CONSISTENCY, MAX_DURATION, MAX_IMAGES, MAX_SHOTS, VIDEO_ASPECT_RATIOS

DEFAULT_SCENARIO = {"image": "realistic_photography", "video": "story_video"}
"""Where a request that names no known task type goes (single image, or a narrative video)."""

_TRIGGERS = {
    "product_images": r"product photos?",
    "detail_page": r"detail[- ]page",
    "key_visual": r"key visuals?",
    "landing_page": r"landing page|h5",
    "brand_visual_identity": r"visual identity|brand identity",
    "banner": r"banners?",
    "official_account_cover": r"official[- ]account",
    "social_media_cover": r"social[- ]media|xiaohongshu|instagram",
    "marketing_poster": r"posters?",
    "avatar": r"avatars?|profile picture",
    "static_emoji": r"emojis?|stickers?",
    "icon": r"icons?",
    "logo": r"logos?",
    "mini_game_ui": r"mini[- ]game",
    "character_design": r"character design|original character",
    "character_action_design": r"action poses?",
    "scene_design": r"scene design|concept paintings?",
    "storyboard": r"storyboards?",
    "picture_book": r"picture book",
    "stylization": r"styliz\w*|restyl\w*",
    "realistic_photography": r"realistic photographs?|photorealistic",
    "product_marketing": r"product (?:marketing|promo)|marketing video",
    "public_service_ad": r"public service|psa",
    "corporate_promotion": r"corporate|company promo",
    "brand_story": r"brand story",
    "event_promotion": r"event promo(?:tion)?",
    "instructional": r"tutorial|instructional|how-to",
    "popular_science": r"popular science|science explainer",
    "music_video": r"music video",
    "concert": r"concert",
    "variety_show": r"variety show",
    "story_video": r"story video",
    "video_podcast": r"podcast",
    "picture_book_video": r"picture book video|animated picture book",
    "dynamic_comic": r"dynamic comic|motion comic",
    "animated_short": r"animated short",
    "animated_movie": r"animated (?:movie|feature)",
    "game_adaptation_film": r"game adaptation",
    "game_video": r"game video|gameplay|game trailer",
    "movie": r"movie",
    "short_drama": r"short drama|mini drama",
    "story_explanation": r"story (?:explanation|recap)",
}
_VIDEO_WORDS = re.compile(r"\b(?:video|clip|film|movie|animation|trailer|footage)s?\b")
_NUMBER = r"\d+|" + "|".join(NUMBER_WORDS[1:])
_RATIO = re.compile(r"\b(1:1|16:9|9:16|4:3|3:4)\b")
_ORIENTATION = re.compile(r"\b(vertical|portrait)\b")
_FROM_ONE = re.compile(r"from one [\w -]+? to the next")  # "one" there is not a count
_AMOUNT = re.compile(rf"\b({_NUMBER})\b")
_SECONDS = re.compile(rf"\b({_NUMBER})[- ]seconds?\b")
_MINUTES = re.compile(rf"\b({_NUMBER}|a)[- ]minutes?\b")
_SHOTS = re.compile(rf"\b({_NUMBER})[- ]shots?\b")
_SAME = re.compile(r"\b(?:same|consistent|identical)\b")
_CONSISTENCY_NOUNS = {
    "object": re.compile(r"\b(?:product|character|mascot|subject|singer|performer|host|hero|founder|"
                         r"protagonist)\b"),
    "scene": re.compile(r"\b(?:setting|location|environment|background|scene)\b"),
    "style": re.compile(r"\b(?:style|palette)\b"),
}
_AUDIO = {
    "music": re.compile(r"background music|original (?:soundtrack|song)|music bed"),
    "sfx": re.compile(r"sound effects?"),
    "voiceover": re.compile(r"voice-?over|narrat(?:ion|ed|or)"),
}


@dataclass(frozen=True)
class Route:
    """Where a request goes and what it asks for.

    Attributes:
        scenario: the scenario id, e.g. "picture_book".
        workflow: the id of the workflow template to execute.
        requirements: the requirements parsed from the request.
    """

    scenario: str
    workflow: str
    requirements: Requirements


def _value(word: str) -> int:
    return int(word) if word.isdigit() else NUMBER_WORDS.index(word)


def _phrase_pattern(phrases: set[str]) -> re.Pattern[str]:
    """One pattern matching any phrase, the longest first at each position."""
    ordered = sorted(phrases, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(p.lower()) for p in ordered) + r")\b")


class TaskAgent:
    """Routes a request to a scenario, a workflow and the requirements it states.

    The vocabulary (styles, subjects, settings) is read once from the scenario pools of
    :data:`visenv.tasks.SCENARIOS`.
    """

    def __init__(self) -> None:
        self._triggers = {name: re.compile(rf"\b(?:{pattern})\b") for name, pattern in _TRIGGERS.items()}
        self._canonical = {}
        for scenario in SCENARIOS.values():
            for phrase in (*scenario.subjects, *scenario.settings, *filter(None, scenario.styles)):
                self._canonical[phrase.lower()] = phrase
        self._styles = {s for scenario in SCENARIOS.values() for s in scenario.styles if s}
        self._subjects = {s for scenario in SCENARIOS.values() for s in scenario.subjects}
        self._settings = {s for scenario in SCENARIOS.values() for s in scenario.settings}
        self._lexicon = _phrase_pattern(set(self._canonical))

    def route(self, request: str) -> Route:
        """The route of ``request``, parsed from its text alone; never raises."""
        text = request.lower() if isinstance(request, str) else ""
        name = self._classify(text)
        scenario = SCENARIOS[name]
        phrases = [self._canonical[m.group(0)] for m in self._lexicon.finditer(text)]
        style = next((p for p in phrases if p in self._styles), None)
        subject = next((p for p in phrases if p in scenario.subjects),
                       next((p for p in phrases if p in self._subjects), None))
        setting = next((p for p in phrases if p in scenario.settings),
                       next((p for p in phrases if p in self._settings), None))
        keywords = tuple(k for k in (subject, setting) if k)
        counted = _FROM_ONE.sub(" ", text)
        consistency = self._consistency(text)
        if scenario.modality == "image":
            match = _AMOUNT.search(_RATIO.sub(" ", counted))
            amount = min(max(_value(match.group(1)), 1), MAX_IMAGES) if match else 1
            ratio = _RATIO.search(text)
            requirements = Requirements(
                modality="image", amount=amount, duration=None, shots=None,
                consistency=consistency if amount >= 2 else (), style=style, keywords=keywords,
                aspect_ratio=ratio.group(1) if ratio else "1:1")
        else:
            ratio = _RATIO.search(text)
            aspect = ratio.group(1) if ratio and ratio.group(1) in VIDEO_ASPECT_RATIOS else (
                "9:16" if _ORIENTATION.search(text) else "16:9")
            requirements = Requirements(
                modality="video", amount=1, duration=self._duration(counted), shots=self._shots(counted),
                consistency=consistency, style=style, keywords=keywords,
                audio=tuple(sorted(track for track, pattern in _AUDIO.items() if pattern.search(text))),
                aspect_ratio=aspect)
        return Route(scenario=name, workflow=scenario.workflow, requirements=requirements)

    def plan(self, request: str) -> list[PlannedCall]:
        """The expert calls for ``request``: its route's workflow instantiated for its requirements."""
        route = self.route(request)
        text = request.strip() if isinstance(request, str) and request.strip() else "(empty request)"
        task = Task(task_id=f"routed-{route.scenario}", scenario=route.scenario, workflow=route.workflow,
                    request=text, requirements=route.requirements, seed=0)
        return WORKFLOWS[route.workflow].instantiate(task)

    def _classify(self, text: str) -> str:
        best: tuple[int, int, str] | None = None
        for name, pattern in self._triggers.items():
            for match in pattern.finditer(text):
                key = (len(match.group(0)), -match.start(), name)
                best = key if best is None or key[:2] > best[:2] else best
        if best is not None:
            return best[2]
        return DEFAULT_SCENARIO["video" if _VIDEO_WORDS.search(text) else "image"]

    @staticmethod
    def _consistency(text: str) -> tuple[str, ...]:
        found = set()
        for sentence in re.split(r"(?<=[.!?;])\s+", text):
            if _SAME.search(sentence):
                found |= {kind for kind, pattern in _CONSISTENCY_NOUNS.items() if pattern.search(sentence)}
        return tuple(kind for kind in CONSISTENCY if kind in found)

    @staticmethod
    def _duration(text: str) -> float | None:
        match = _SECONDS.search(text)
        if match:
            seconds = float(_value(match.group(1)))
        elif match := _MINUTES.search(text):
            seconds = 60.0 * (1 if match.group(1) == "a" else _value(match.group(1)))
        else:
            return None
        return seconds if 0 < seconds <= MAX_DURATION else None

    @staticmethod
    def _shots(text: str) -> int | None:
        match = _SHOTS.search(text)
        return _value(match.group(1)) if match and 1 <= _value(match.group(1)) <= MAX_SHOTS else None

