"""What every visenv environment shares: text spaces, observation rendering and call-order checks.

Observations are a ``Dict`` with the text message and the ids of the episode's artifacts (and,
when asked for, small pixel arrays of the latest images and video frames, zero-padded to a fixed
count, with a mask that tells real images from padding). Actions are text: one
model turn. Text spaces use :data:`CHARSET` (printable ASCII); observation text outside it is
replaced by ``?`` so that every observation is inside the space, while actions may be any string.
"""

from __future__ import annotations

import string
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from visenv.error import ResetNeeded

CHARSET = "".join(sorted(set(string.printable) - {"\x0b", "\x0c"}))
ID_CHARSET = "".join(sorted(set("0123456789abcdef_imgvdu")))
ID_LENGTH = 16
_DELETE_CONTROLS = {i: None for i in range(32) if chr(i) not in "\t\n\r"}
_DELETE_CONTROLS[127] = None


def fit_text(text: str, max_chars: int) -> str:
    """``text`` made to fit a :data:`CHARSET` space of ``max_chars``: non-ASCII -> '?', cut with a marker."""
    text = text.encode("ascii", "replace").decode("ascii").translate(_DELETE_CONTROLS)
    if len(text) > max_chars:
        marker = "\n[... cut to fit the observation ...]"
        text = text[: max_chars - len(marker)] + marker
    return text


def observation_space(max_chars: int, pixels: tuple[int, int] | None = None) -> spaces.Dict:
    """The observation space: text, artifact ids, and optionally pixels with their mask.

    Args:
        max_chars: most characters of the observation text.
        pixels: ``(max_images, size)`` adds ``"pixels"``, uint8 ``(max_images, size, size, 3)``, and
            ``"pixels_mask"``, ``MultiBinary(max_images)`` (int8): 1 on the rows that hold an image, 0
            on zero padding (an all-black image is a 1).
    """
    entries: dict[str, spaces.Space] = {
        "text": spaces.Text(max_length=max_chars, min_length=0, charset=CHARSET),
        "artifacts": spaces.Sequence(spaces.Text(ID_LENGTH, min_length=ID_LENGTH, charset=ID_CHARSET)),
    }
    if pixels is not None:
        count, size = pixels
        entries["pixels"] = spaces.Box(0, 255, (count, size, size, 3), dtype=np.uint8)
        entries["pixels_mask"] = spaces.MultiBinary(count)
    return spaces.Dict(entries)


def action_space(max_chars: int) -> spaces.Text:
    """The action space: one model turn of at most ``max_chars`` characters (longer turns are cut)."""
    return spaces.Text(max_length=max_chars, min_length=0, charset=CHARSET)


def vector_info(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` as gymnasium's vector envs can merge it: entries that are None are left out, in every dict.

    ``SyncVectorEnv`` and ``AsyncVectorEnv`` stack each info key across envs into an array typed by
    the first env's value, so a key that is a number in one env and None in another (or a dict in
    one and None in another) breaks the merge. With None left out, a key is absent where it does
    not apply and keeps one kind where it does.
    """
    return {key: vector_info(value) if isinstance(value, dict) else value
            for key, value in info.items() if value is not None}


def coerce_action(action: Any) -> str:
    """Any action as text: bytes are decoded as UTF-8 with replacement, other objects str()-ed."""
    if isinstance(action, str):
        return action
    if isinstance(action, (bytes, bytearray)):
        return bytes(action).decode("utf-8", errors="replace")
    if isinstance(action, np.ndarray) and action.shape == ():
        return str(action.item())
    return str(action)


class TextEnv(gym.Env):
    """Base class: call-order checks shared by the text environments.

    Subclasses call :meth:`_begin_episode` in ``reset`` and :meth:`_check_can_step` at the top of
    ``step``, and set ``self._ended`` when an episode terminates or is truncated.
    """

    metadata = {"render_modes": ["ansi"]}

    _started = False
    _ended = False

    def _begin_episode(self) -> None:
        self._started = True
        self._ended = False

    def _check_can_step(self) -> None:
        if not self._started:
            raise ResetNeeded(f"{type(self).__name__}.step() was called before reset(): "
                              "call env.reset(seed=...) first.")
        if self._ended:
            raise ResetNeeded(f"{type(self).__name__}.step() was called after the episode ended "
                              "(terminated or truncated): call env.reset() to start a new one.")


@runtime_checkable
class DeferredScoring(Protocol):
    """An environment that can hand over the scoring of a finished episode (the rubric and its judges),
    so that it is free for the next episode while the score runs elsewhere.

    With ``defer_scoring`` True, the step that ends an episode returns that step's own reward and
    ``info["reward_pending"] = True``; :meth:`detach_pending_score` then returns an object whose
    ``run()`` gives ``(reward, info)``: what the step would have returned without deferral. Off
    (the default), ``step`` scores the episode itself. :class:`~visenv.envs.visgen.VisGenEnv`
    implements it.
    """

    defer_scoring: bool

    def detach_pending_score(self) -> Any:
        """The finished episode's pending score (its ``run()`` gives the reward and info)."""
        ...
