"""An OpenAI-compatible chat endpoint as a Policy, for evaluation (vLLM, SGLang, llama.cpp, hosted APIs).

Each conversation is sent as chat messages: the system prompt (give the environment's tool
documentation, ``env.unwrapped.system_prompt``, as ``rl eval`` does), observations as ``user``
messages, earlier turns as ``assistant`` messages; the reply's text is the turn. With ``vision=True``
the latest observation's images (its ``"pixels"`` rows that ``"pixels_mask"`` marks, at most
``images_per_turn``; play the env with ``observe_pixels=True``) travel with it as PNG data URLs;
earlier observations are sent as text, so a request carries only the images the model has not seen
as the newest.

Requests go through :class:`~visenv.rewards.judges.backends.OpenAIChatBackend` (the judges' client):
one deadline per turn (``timeout``) covering connection, retries and backoff; refused or reset
connections, 408, 429 and 5xx are retried with exponential backoff and jitter, and a
``Retry-After`` is honoured. A turn that still gets no answer is not an exception: it comes back as
a policy segment with ``error`` set, and the episode runner ends that episode as a failed one
(``Episode.error``, counted in ``RolloutStats.episodes_failed`` and in the evaluation summary's
``episodes_failed``) while the other episodes go on. Token ids and log-probs are not available, so
the policy can act and be evaluated, not trained.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

from rl.errors import ConfigError, EndpointError
from rl.policy import ENV, POLICY, Conversation, Segment
from visenv.error import BackendError
from visenv.rewards.judges.backends import OpenAIChatBackend, user_content


def png_bytes(image: Any) -> bytes:
    """A ``(H, W, 3)`` uint8 array as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class ApiPolicy:
    """Generates turns with ``POST {base_url}/chat/completions``.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the endpoint serves.
        api_key_env: the environment variable holding the API key, sent as a bearer token (unset: none).
        system_prompt: a system message opening each conversation (the tool documentation), or None.
        max_tokens: most tokens per turn.
        temperature: sampling temperature.
        timeout: seconds one turn may take, all attempts and waits included.
        concurrency: requests in flight at once.
        max_retries: attempts after the first before a turn fails.
        backoff: first retry delay in seconds (doubling each retry, with jitter).
        max_backoff: longest wait between attempts; a longer ``Retry-After`` fails the turn at once.
        vision: send the latest observation's images (the model accepts images).
        images_per_turn: most images sent with one observation.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 system_prompt: str | None = None, max_tokens: int = 1024, temperature: float = 1.0,
                 timeout: float = 120.0, concurrency: int = 8, max_retries: int = 4, backoff: float = 1.0,
                 max_backoff: float = 30.0, vision: bool = False, images_per_turn: int = 4):
        if temperature < 0 or max_tokens < 1 or images_per_turn < 1:
            raise ConfigError(f"ApiPolicy: temperature ({temperature}) must be >= 0, max_tokens ({max_tokens}) and "
                              f"images_per_turn ({images_per_turn}) >= 1.")
        self.backend = OpenAIChatBackend(base_url, model, api_key_env=api_key_env, timeout_s=timeout,
                                         max_retries=max_retries, backoff_s=backoff, max_backoff_s=max_backoff,
                                         concurrency=concurrency, temperature=temperature, max_tokens=max_tokens,
                                         vision=vision)
        self.url = self.backend.base_url + "/chat/completions"
        self.model = model
        self.system_prompt = system_prompt
        self.vision = vision
        self.images_per_turn = images_per_turn

    def encode(self, observation: dict[str, Any], first: bool) -> Segment:
        return Segment(ENV, observation["text"], observation=observation)

    def _images(self, segment: Segment) -> list[bytes]:
        from rl.hf import shown_images

        images = shown_images(segment.observation or {}, self.images_per_turn)
        return [] if images is None else [png_bytes(image) for image in images]

    def messages(self, conversation: Conversation) -> list[dict[str, Any]]:
        """The chat messages of a conversation (with ``vision``, the last observation's images as data URLs)."""
        messages: list[dict[str, Any]] = ([{"role": "system", "content": self.system_prompt}]
                                          if self.system_prompt else [])
        last = len(conversation.segments) - 1
        for i, segment in enumerate(conversation.segments):
            if segment.role != ENV:
                messages.append({"role": "assistant", "content": segment.text})
                continue
            images = self._images(segment) if self.vision and i == last else []
            messages.append({"role": "user", "content": user_content([*images, segment.text]) if images
                             else segment.text})
        return messages

    def generate(self, conversations: Sequence[Conversation]) -> list[Segment]:
        """One turn per conversation; a turn the endpoint never answered is a segment with ``error`` set."""
        answers = self.backend.chat_many([self.messages(c) for c in conversations],
                                         [{"seed": c.turn_seed() % 2**31} for c in conversations])
        return [Segment(POLICY, "", error=str(answer)) if isinstance(answer, BackendError) else Segment(POLICY, answer)
                for answer in answers]

    @property
    def counters(self) -> dict[str, int]:
        """Requests sent, retries, rate-limited answers and failed turns, in this process."""
        b = self.backend
        return {"attempts": b.attempts, "retries": b.retries, "rate_limited": b.rate_limited, "failures": b.failures}


POLICY_ERROR = "PolicyError: "
"""How the episode runner prefixes ``Episode.error`` for a turn the policy could not produce."""


def check_some_answered(errors: Sequence[str | None]) -> None:
    """Refuse an evaluation in which no episode got a single turn from the endpoint (a wrong URL, a
    server that is down): its results say nothing about the model.

    Raises:
        EndpointError: every episode failed with a policy error; the message quotes the first.
    """
    if errors and all(e is not None and e.startswith(POLICY_ERROR) for e in errors):
        raise EndpointError(f"Every episode failed: POST {errors[0][len(POLICY_ERROR):].rstrip('.')}. Expected an "
                            "OpenAI-compatible server there: start it, or fix the base URL (it ends in /v1 for "
                            "most servers) and the model name.")
