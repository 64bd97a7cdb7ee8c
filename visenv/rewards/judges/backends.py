"""Chat backends of the judges: an OpenAI-compatible HTTP endpoint, or a local transformers model.

A backend turns :class:`ChatPrompt` s into answer texts. Both backends implement the same small
contract (:class:`ChatBackend`): ``model_id`` (part of every judge id), ``vision`` (whether it
accepts images) and ``complete_many(prompts)``, which returns one answer text or one
:class:`~visenv.error.BackendError` per prompt and never raises for a failed request. Both pickle
as their settings alone: clients, locks and models are recreated on first use in each process.

:class:`OpenAIChatBackend` talks to any ``/v1/chat/completions`` server (vLLM, SGLang, a hosted
API). Each request has one deadline, ``timeout_s``, for everything: connect, send, read, retries
and backoff; it holds against a server that drips its answer a byte at a time. Connection errors
(refused, reset, closed early), 408, 429 and 5xx are retried with exponential backoff and jitter
while the deadline allows, a ``Retry-After`` (seconds or HTTP date; 429 and 503 send it) is honoured, other 4xx
and undecodable bodies (bad gzip) fail at once; a body that is not JSON, not UTF-8 or holds no
answer text fails too. At most ``concurrency`` requests are in flight per backend object, across all
threads. Images travel as PNG data URLs. The API key is read from an environment variable at
request time, so it never lands in a pickle or a log.

:class:`TransformersChatBackend` runs a local causal LM (text) or image-text-to-text model,
greedily, in batches, one batch at a time.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import logging
import os
import random
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from visenv.error import BackendError, ConfigError, DependencyNotInstalled

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ChatPrompt:
    """One judge request: a system message and a user message of text and images.

    Attributes:
        system: the system message.
        parts: the user message, in order: text chunks (str) and PNG images (bytes).
    """

    system: str
    parts: tuple[str | bytes, ...]

    @property
    def has_images(self) -> bool:
        return any(isinstance(p, bytes) for p in self.parts)


class ChatBackend(Protocol):
    """What a judge needs from a backend."""

    model_id: str
    vision: bool

    def complete_many(self, prompts: Sequence[ChatPrompt]) -> list[str | BackendError]:
        """One answer text, or the error that stopped it, per prompt."""


def user_content(parts: Sequence[str | bytes]) -> list[dict[str, Any]]:
    """OpenAI content parts of text chunks (str) and PNG images (bytes, sent as data URLs)."""
    return [{"type": "text", "text": part} if isinstance(part, str) else
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(part).decode()}}
            for part in parts]


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header as seconds from now (delta-seconds or HTTP date); None if absent/bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class OpenAIChatBackend:
    """An OpenAI-compatible chat-completions endpoint.

    Requests run on this backend's own event loop (one daemon thread, started on first use), so
    that the deadline cancels a request at any point: connecting, waiting for headers, or reading a
    body that drips in a byte at a time (httpx's own timeouts restart with every byte read).

    Args:
        base_url: the API root, e.g. "http://127.0.0.1:8000/v1" (``/chat/completions`` is appended).
        model: the served model's name; it is the backend's ``model_id``.
        api_key_env: the environment variable holding the API key (None or unset: no key).
        timeout_s: the deadline of one request, all of it: connect, send, read, every retry and
            every backoff. A request still unanswered then fails (the judgement is None).
        max_retries: attempts after the first before giving up.
        backoff_s: first retry delay; doubles each retry, times a jitter in [0.5, 1].
        max_backoff_s: longest delay between attempts; a ``Retry-After`` longer than this fails the
            request at once rather than stalling the caller.
        concurrency: most requests in flight at once (all threads together).
        temperature: sampling temperature (0: the judge answers the same each time).
        max_tokens: longest answer.
        vision: whether the model accepts images (judges that show media refuse a text-only backend).

    Attributes:
        attempts, retries, rate_limited, failures: counters for this process.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, max_retries: int = 4, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, concurrency: int = 8, temperature: float = 0.0,
                 max_tokens: int = 1024, vision: bool = True):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"OpenAIChatBackend.base_url ({base_url!r}) must start with http:// or https://, "
                              "e.g. 'http://127.0.0.1:8000/v1'.")
        for name, value in (("timeout_s", timeout_s), ("backoff_s", backoff_s), ("max_backoff_s", max_backoff_s)):
            if not value > 0:
                raise ConfigError(f"OpenAIChatBackend.{name} ({value}) must be > 0.")
        if max_retries < 0 or concurrency < 1:
            raise ConfigError(f"OpenAIChatBackend needs max_retries >= 0 and concurrency >= 1 "
                              f"(got {max_retries} and {concurrency}).")
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.max_backoff_s, self.concurrency = max_backoff_s, concurrency
        self.temperature, self.max_tokens, self.vision = temperature, max_tokens, vision
        self._setup()

    _UNPICKLED = ("_pid", "_lock", "_loop", "_client", "_slots")

    def _setup(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._slots: asyncio.Semaphore | None = None
        self.attempts = self.retries = self.rate_limited = self.failures = 0

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._UNPICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    @property
    def model_id(self) -> str:
        return self.model

    def _runner(self) -> asyncio.AbstractEventLoop:
        """This backend's event loop, its client and its concurrency slots (made on first use)."""
        if self._pid != os.getpid():  # a forked copy: the parent's loop thread did not come along
            self._setup()
        with self._lock:
            if self._loop is None:
                try:
                    import httpx
                except ImportError:
                    raise DependencyNotInstalled("httpx", "judge", "The OpenAI-compatible judge backend") from None
                limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
                self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), limits=limits)
                self._slots = asyncio.Semaphore(self.concurrency)
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name=f"judge-http {self.base_url}", daemon=True).start()
                weakref.finalize(self, loop.call_soon_threadsafe, loop.stop)
                self._loop = loop
            return self._loop

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def messages(self, prompt: ChatPrompt) -> list[dict[str, Any]]:
        """The OpenAI ``messages`` of a prompt (a plain string user message when it has no images)."""
        content: Any = user_content(prompt.parts) if prompt.has_images else "".join(prompt.parts)
        return [{"role": "system", "content": prompt.system}, {"role": "user", "content": content}]

    def _delay(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)

    def _fail(self, message: str) -> BackendError:
        self._count("failures")
        return BackendError(message)

    async def _complete(self, messages: list[dict[str, Any]], extra: dict[str, Any]) -> str:
        """One request under its deadline (see :meth:`complete`)."""
        url = f"{self.base_url}/chat/completions"
        assert self._slots is not None
        async with self._slots:
            deadline = asyncio.get_running_loop().time() + self.timeout_s
            failed: list[str] = []
            try:
                async with asyncio.timeout_at(deadline):
                    return await self._attempts(url, messages, extra, deadline, failed)
            except TimeoutError:
                earlier = f"; earlier: {failed[-1]}" if failed else ""
                raise self._fail(f"{url} gave no answer within timeout_s ({self.timeout_s:g} s): attempt "
                                 f"{len(failed) + 1} was cut off{earlier}.") from None

    async def _attempts(self, url: str, messages: list[dict[str, Any]], extra: dict[str, Any], deadline: float,
                        failed: list[str]) -> str:
        """The attempts of one request; ``failed`` gets each failed attempt's reason."""
        import httpx

        payload = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": self.max_tokens, **extra}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for attempt in range(self.max_retries + 1):
            self._count("attempts")
            delay = self._delay(attempt)
            try:
                response = await self._client.post(url, json=payload, headers=headers)
            except httpx.TransportError as err:  # refused, reset, closed early, protocol errors
                failed.append(f"{type(err).__name__}: {err}")
            except httpx.HTTPError as err:  # an undecodable body (bad gzip), too many redirects
                raise self._fail(f"{url} sent a response that cannot be read ({type(err).__name__}: {err}); "
                                 "not retried.") from None
            else:
                status = response.status_code
                if status == 200:
                    return self._answer(response)
                failed.append(f"HTTP {status}: {response.text[:300]}")
                if status not in RETRY_STATUSES:
                    raise self._fail(f"{url} answered {failed[-1]}; not retried.")
                if status == 429:
                    self._count("rate_limited")
                wait = retry_after_seconds(response.headers.get("retry-after"))
                if wait is not None and wait > self.max_backoff_s:
                    state = "rate-limited" if status == 429 else "unavailable"
                    raise self._fail(f"{url} is {state} for {wait:.0f} s (HTTP {status}, Retry-After), longer than "
                                     f"max_backoff_s ({self.max_backoff_s:g} s).")
                delay = delay if wait is None else wait
            if attempt == self.max_retries:
                break
            left = deadline - asyncio.get_running_loop().time()
            if delay >= left:
                raise self._fail(f"{url} failed ({failed[-1]}); the next attempt, in {delay:.2f} s, would pass "
                                 f"timeout_s ({self.timeout_s:g} s), {max(left, 0.0):.2f} s from now.")
            self._count("retries")
            logger.debug("judge request to %s failed (%s); retry %d in %.2f s", url, failed[-1], attempt + 1, delay)
            await asyncio.sleep(delay)
        raise self._fail(f"{url} failed after {self.max_retries + 1} attempts; last: {failed[-1]}")

    def _answer(self, response: Any) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, RecursionError):
            content = None  # ValueError covers bad JSON and invalid UTF-8
        if not isinstance(content, str):
            raise self._fail(f"The chat endpoint returned no answer text: {response.text[:300]!r}")
        return content

    async def _gather(self, conversations: Sequence[list[dict[str, Any]]],
                      extras: Sequence[dict[str, Any]]) -> list[str | BackendError]:
        async def one(messages: list[dict[str, Any]], extra: dict[str, Any]) -> str | BackendError:
            try:
                return await self._complete(messages, extra)
            except BackendError as err:
                return err

        return list(await asyncio.gather(*(one(m, e) for m, e in zip(conversations, extras, strict=True))))

    def chat_many(self, conversations: Sequence[list[dict[str, Any]]],
                  extras: Sequence[dict[str, Any]] | None = None) -> list[str | BackendError]:
        """Each conversation's answer text, or its BackendError; up to ``concurrency`` at once, each
        ending within ``timeout_s`` of getting its slot.

        Args:
            conversations: OpenAI ``messages`` lists (multi-turn, images as :func:`user_content` parts).
            extras: per conversation, more request fields (e.g. ``{"seed": 7}``); None sends none.
        """
        if not conversations:
            return []
        extras = [{}] * len(conversations) if extras is None else extras
        return asyncio.run_coroutine_threadsafe(self._gather(conversations, extras), self._runner()).result()

    def complete_many(self, prompts: Sequence[ChatPrompt]) -> list[str | BackendError]:
        """Each prompt's answer, or its BackendError (see :meth:`chat_many`)."""
        return self.chat_many([self.messages(p) for p in prompts])

    def complete(self, prompt: ChatPrompt) -> str:
        """The answer text of one prompt.

        Raises:
            BackendError: the request failed for good: the deadline passed, retries ran out, a
                non-retryable status, a Retry-After beyond ``max_backoff_s``, an undecodable body,
                or a response without answer text.
        """
        answer = self.complete_many([prompt])[0]
        if isinstance(answer, BackendError):
            raise answer
        return answer

    def __repr__(self) -> str:
        return f"OpenAIChatBackend({self.base_url!r}, {self.model!r})"


class TransformersChatBackend:
    """A local transformers model: a causal LM (text) or an image-text-to-text model (vision).

    The kind is read from the model's config. Generation is greedy. A tokenizer without a chat
    template gets a plain "system: ... / user: ... / assistant:" transcript.

    Args:
        model: a local folder or a Hub id already in the local cache (it is the ``model_id``).
        max_new_tokens: longest answer.
        batch_size: prompts per ``generate`` call.
        device: a torch device; None picks "cuda" when available, else "cpu".
    """

    def __init__(self, model: str, *, max_new_tokens: int = 512, batch_size: int = 8, device: str | None = None):
        if max_new_tokens < 1 or batch_size < 1:
            raise ConfigError(f"TransformersChatBackend needs max_new_tokens >= 1 and batch_size >= 1 "
                              f"(got {max_new_tokens} and {batch_size}).")
        self.model, self.max_new_tokens, self.batch_size, self.device = model, max_new_tokens, batch_size, device
        self._setup()

    def _setup(self) -> None:
        self._lock = threading.Lock()
        self._net: Any = None
        self._processor: Any = None
        self._vision: bool | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("model", "max_new_tokens", "batch_size", "device")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    @property
    def model_id(self) -> str:
        return self.model

    @property
    def vision(self) -> bool:
        """Whether the model is image-text-to-text (read from its config, without loading weights)."""
        if self._vision is None:
            transformers = _transformers()
            from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

            model_type = transformers.AutoConfig.from_pretrained(self.model).model_type
            self._vision = model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        return self._vision

    def _load(self) -> None:
        import torch

        transformers = _transformers()
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.vision:
            processor = transformers.AutoProcessor.from_pretrained(self.model)
            net = transformers.AutoModelForImageTextToText.from_pretrained(self.model, dtype="auto")
            tokenizer = processor.tokenizer
        else:
            processor = tokenizer = transformers.AutoTokenizer.from_pretrained(self.model)
            net = transformers.AutoModelForCausalLM.from_pretrained(self.model, dtype="auto")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._processor, self._net = processor, net.to(device).eval()

    def _conversation(self, prompt: ChatPrompt) -> list[dict[str, Any]]:
        from PIL import Image

        parts = [{"type": "text", "text": p} if isinstance(p, str) else
                 {"type": "image", "image": Image.open(io.BytesIO(p)).convert("RGB")} for p in prompt.parts]
        return [{"role": "system", "content": [{"type": "text", "text": prompt.system}]},
                {"role": "user", "content": parts}]

    def _text_inputs(self, prompts: Sequence[ChatPrompt]) -> Any:
        tokenizer = self._processor
        if tokenizer.chat_template:
            texts = [tokenizer.apply_chat_template(
                [{"role": "system", "content": p.system}, {"role": "user", "content": "".join(p.parts)}],
                tokenize=False, add_generation_prompt=True) for p in prompts]
        else:
            texts = [f"system: {p.system}\nuser: {''.join(p.parts)}\nassistant: " for p in prompts]
        return tokenizer(texts, return_tensors="pt", padding=True)

    def _generate(self, prompts: Sequence[ChatPrompt]) -> list[str]:
        import torch

        if self.vision:
            inputs = self._processor.apply_chat_template(
                [self._conversation(p) for p in prompts], add_generation_prompt=True, tokenize=True,
                return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})
        else:
            inputs = self._text_inputs(prompts)
        inputs = inputs.to(self._net.device)
        tokenizer = self._processor.tokenizer if self.vision else self._processor
        with torch.inference_mode():
            out = self._net.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def complete_many(self, prompts: Sequence[ChatPrompt]) -> list[str | BackendError]:
        """Each prompt's answer (an image prompt to a text model, or running out of GPU memory,
        gives a BackendError for that prompt or batch)."""
        import torch

        if not prompts:
            return []
        with self._lock:
            if self._net is None:
                self._load()
            results: list[Any] = [
                BackendError(f"{self.model} is a text-only model; this prompt holds images.")
                if p.has_images and not self.vision else None for p in prompts]
            todo = [i for i, r in enumerate(results) if r is None]
            for start in range(0, len(todo), self.batch_size):
                batch = todo[start:start + self.batch_size]
                try:
                    answers: list[Any] = self._generate([prompts[i] for i in batch])
                except torch.OutOfMemoryError as err:
                    answers = [BackendError(f"{self.model} ran out of memory: {err}")] * len(batch)
                for i, answer in zip(batch, answers):
                    results[i] = answer
        return results

    def __repr__(self) -> str:
        return f"TransformersChatBackend({self.model!r})"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise DependencyNotInstalled("transformers", "judge-local", "The local transformers judge backend") from None
    return transformers
