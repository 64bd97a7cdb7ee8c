"""An OpenAI-compatible chat endpoint as a Policy, for evaluation (vLLM, SGLang, llama.cpp, hosted APIs).

Each conversation is sent as chat messages (observations as ``user`` messages, earlier turns as
``assistant`` messages); the reply's text is the turn. Token ids and log-probs are not available,
so the policy can act and be evaluated, not trained.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from rl.errors import ConfigError, EndpointError
from rl.policy import ENV, POLICY, Conversation, Segment


class ApiPolicy:
    """Generates turns with ``POST {base_url}/chat/completions``.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the endpoint serves.
        api_key: sent as a bearer token when given.
        system_prompt: a system message opening each conversation, or None.
        max_tokens: most tokens per turn.
        temperature: sampling temperature.
        timeout: seconds per request.
        concurrency: requests in flight at once.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, system_prompt: str | None = None,
                 max_tokens: int = 1024, temperature: float = 1.0, timeout: float = 120.0, concurrency: int = 8):
        if temperature < 0 or max_tokens < 1 or timeout <= 0 or concurrency < 1:
            raise ConfigError(f"ApiPolicy: temperature ({temperature}) must be >= 0, max_tokens ({max_tokens}) and "
                              f"concurrency ({concurrency}) >= 1, timeout ({timeout}) > 0.")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.timeout = timeout
        self.concurrency = concurrency

    def encode(self, observation: dict[str, Any], first: bool) -> Segment:
        return Segment(ENV, observation["text"], observation=observation)

    def messages(self, conversation: Conversation) -> list[dict[str, str]]:
        """The chat messages of a conversation."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for segment in conversation.segments:
            messages.append({"role": "user" if segment.role == ENV else "assistant", "content": segment.text})
        return messages

    def _complete(self, conversation: Conversation) -> Segment:
        body = {"model": self.model, "messages": self.messages(conversation), "max_tokens": self.max_tokens,
                "temperature": self.temperature, "seed": conversation.turn_seed() % 2**31}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
        except (OSError, ValueError) as exc:  # refused, timed out, HTTP error status, or a body that is not JSON
            raise EndpointError(f"POST {self.url} failed ({exc}); expected an OpenAI-compatible server answering "
                                "JSON there: start it, or fix the base URL (it ends in /v1 for most servers).") from None
        try:
            text = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.url} answered without choices[0].message.content: {str(reply)[:200]}") from None
        return Segment(POLICY, text)

    def generate(self, conversations: Sequence[Conversation]) -> list[Segment]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(conversations)))) as pool:
            return list(pool.map(self._complete, conversations))
