"""The real tier: call a real generator, and record what it made into the cache.

A :class:`RealBackend` wraps any generator, a Python callable that takes the
:class:`~visenv.tools.backends.ToolRequest` and returns a :class:`Generation` (the files' bytes
and any text), a :class:`~visenv.tools.backends.ToolFailure` (the tool refuses, e.g. a content
policy), or None (the generator cannot serve this call: pass to the next tier). The backend
measures each file's attributes (resolution, duration...) and, given a cache, writes the answer
through (record mode): a chain ``[exact_cache, real]`` builds the cache while it runs, and
``[exact_cache]`` with ``strict=True`` replays the run exactly afterwards.

:class:`OpenAIImagesBackend` is the HTTP implementation for text-to-image tools: an
OpenAI-compatible ``POST {base_url}/images/generations`` with ``response_format="b64_json"``,
through :class:`JsonHttpClient`, which bounds every attempt with timeouts, retries 429s, 5xxs,
timeouts and dropped connections with exponential backoff (honouring ``Retry-After``), and caps
concurrent requests per process. :func:`record_calls` runs a backend over many calls with
bounded concurrency and skips the calls already cached, so an interrupted build resumes.
"""

from __future__ import annotations

import base64
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from visenv.error import BackendError, ConfigError, DependencyNotInstalled
from visenv.media import BlobStore
from visenv.mediadb import MEDIA_SUFFIXES, probe
from visenv.tools.backends import BackendAnswer, MediaOutput, ToolFailure, ToolRequest
from visenv.tools.cache import CacheEntry, ToolCache, open_cache
from visenv.tools.cache_key import CallKey
from visenv.tools.specs import tools_in_group

ON_ERROR = ("raise", "pass")
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class GeneratedMedia:
    """One file a real tool produced.

    Attributes:
        data: the file's bytes.
        suffix: its file suffix (".png", ".mp4", ".wav", ...), which tells its kind.
        attributes: attributes the file cannot show (shots, has_audio...); measured ones win.
    """

    data: bytes
    suffix: str
    attributes: Mapping[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """"image", "video" or "audio", from the suffix."""
        try:
            return MEDIA_SUFFIXES[self.suffix.lower()]
        except KeyError:
            raise BackendError(f"A generator returned a {self.suffix!r} file; use one of "
                               f"{', '.join(MEDIA_SUFFIXES)}.") from None


@dataclass(frozen=True)
class Generation:
    """What a real tool returned for one call: media files and/or text."""

    media: tuple[GeneratedMedia, ...] = ()
    text: str = ""


Generate = Callable[[ToolRequest], "Generation | ToolFailure | None"]


class RealBackend:
    """Calls a real generator; with a cache, writes every answer through (record mode).

    Args:
        generate: the generator (see the module docstring).
        cache: a cache (or its directory) to record into; its blob store also holds the files.
        media_dir: where to keep the files when there is no cache.
        tools: the tool names this backend serves (None: all); other calls pass.
        on_error: "raise" a :class:`~visenv.error.BackendError` when the generator fails (server
            down after all retries), or "pass" the call to the next tier.
    """

    name = "real"

    def __init__(self, generate: Generate, cache: ToolCache | str | os.PathLike | None = None,
                 media_dir: str | os.PathLike | None = None, tools: Iterable[str] | None = None,
                 on_error: str = "raise"):
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error ({on_error!r}) must be one of {ON_ERROR}.")
        if cache is None and media_dir is None:
            raise ConfigError("RealBackend needs a cache to record into, or a media_dir for its files.")
        self.generate = generate
        self.cache = None if cache is None else open_cache(cache)
        self.store = self.cache.blobs if self.cache is not None else BlobStore(media_dir)
        self.tools = None if tools is None else frozenset(tools)
        self.on_error = on_error

    def answer(self, request: ToolRequest) -> BackendAnswer | ToolFailure | None:
        """Generate (and record) the answer; None when this backend does not serve the call."""
        result = self.call(request, request.seed)
        if result is None or isinstance(result, ToolFailure):
            return result
        if isinstance(result, CacheEntry):
            return BackendAnswer(tuple(out.to_media() for out in result.outputs), result.text, self.name)
        return result

    def call(self, request: ToolRequest, record_seed: int | None
             ) -> CacheEntry | BackendAnswer | ToolFailure | None:
        """Run the generator once; with a cache, store the answer under ``record_seed``.

        Returns:
            The stored entry (record mode; another writer's if it stored the key first), the
            answer (no cache), the tool's refusal, or None when the call is not served.
        """
        spec = request.spec
        if (self.tools is not None and spec.name not in self.tools) or spec.stateful:
            return None
        try:
            generated = self.generate(request)
        except BackendError:
            if self.on_error == "raise":
                raise
            if self.cache is not None:
                self.cache.count(spec.name, "real_error")
            return None
        if generated is None or isinstance(generated, ToolFailure):
            return generated
        outputs = tuple(self._materialise(request, media) for media in generated.media)
        if self.cache is None:
            return BackendAnswer(outputs, generated.text, self.name)
        self.cache.count(spec.name, "real_call")
        key = CallKey.of(spec, request.arguments, request.inputs, record_seed)
        return self.cache.put(spec, key, outputs, generated.text, source=self.name)

    def _materialise(self, request: ToolRequest, media: GeneratedMedia) -> MediaOutput:
        expected = request.spec.output.kind
        if media.kind != expected:
            raise BackendError(f"The generator of {request.spec.name} returned a {media.kind} file "
                               f"({media.suffix}); the tool produces {expected}.")
        sha, path = self.store.put_bytes(media.data, media.suffix.lower())
        try:
            measured = probe(path, media.kind)
        except (OSError, ValueError) as exc:
            raise BackendError(f"The generator of {request.spec.name} returned an unreadable "
                               f"{media.suffix} file: {exc}") from None
        prompt = request.arguments.get("prompt", "")
        return MediaOutput(media.kind, sha, str(path), {**media.attributes, **measured}, prompt)


class JsonHttpClient:
    """POSTs JSON with timeouts, retries with exponential backoff, and a concurrency limit.

    Args:
        base_url: the service root, e.g. "http://127.0.0.1:8000/v1".
        headers: extra headers (e.g. Authorization).
        timeout: seconds to wait for a response (read, write and pool) per attempt.
        connect_timeout: seconds to wait for a connection per attempt.
        max_retries: retries after the first attempt (so at most ``max_retries + 1`` attempts).
        backoff: the first retry's delay in seconds; each retry doubles it (with jitter).
        max_backoff: the longest delay, also the cap on a server's ``Retry-After``.
        max_concurrency: requests in flight at once from this process.
    """

    def __init__(self, base_url: str, headers: Mapping[str, str] | None = None, timeout: float = 120.0,
                 connect_timeout: float = 10.0, max_retries: int = 4, backoff: float = 1.0,
                 max_backoff: float = 30.0, max_concurrency: int = 4):
        if max_concurrency < 1 or max_retries < 0:
            raise ConfigError(f"max_concurrency ({max_concurrency}) must be >= 1 and max_retries "
                              f"({max_retries}) >= 0.")
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers or {})
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.max_concurrency = max_concurrency
        self._setup()

    def _setup(self) -> None:
        self._client = None
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_concurrency)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_client", "_lock", "_slots")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    def _http(self):
        with self._lock:
            if self._client is None:
                try:
                    import httpx
                except ImportError:
                    raise DependencyNotInstalled("httpx", "real", "The HTTP tool backend") from None
                self._client = httpx.Client(headers=self.headers, timeout=httpx.Timeout(
                    self.timeout, connect=self.connect_timeout))
            return self._client

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
        if retry_after is not None and retry_after.strip().isdigit():
            delay = max(delay, min(self.max_backoff, float(retry_after)))
        return delay

    def post(self, path: str, payload: Mapping[str, Any]) -> tuple[int, Any]:
        """(status, decoded JSON body) of the final response: a success or a non-retryable error.

        Raises:
            BackendError: every attempt failed with a retryable status, a timeout or a network error.
        """
        import httpx

        url = f"{self.base_url}/{path.lstrip('/')}"
        problem = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            with self._slots:
                try:
                    response = self._http().post(url, json=dict(payload))
                except (httpx.TimeoutException, httpx.TransportError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                else:
                    if response.status_code not in RETRY_STATUSES:
                        try:
                            return response.status_code, response.json()
                        except ValueError:
                            return response.status_code, {"error": {"message": response.text[:500]}}
                    problem = f"HTTP {response.status_code}: {response.text[:200]}"
                    retry_after = response.headers.get("retry-after")
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, retry_after))
        raise BackendError(f"POST {url} failed after {self.max_retries + 1} attempts; last: {problem}. "
                           "Check that the service is up, or raise max_retries/timeout.")


def _image_suffix(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    raise BackendError("The image service returned bytes that are not PNG, JPEG or WebP.")


class OpenAIImageGenerator:
    """A generator for text-to-image tools through an OpenAI-compatible images endpoint.

    Sends ``{"model", "prompt", "n", "size", "response_format": "b64_json"}`` (plus ``"seed"``
    when ``send_seed``) to ``/images/generations``. ``size`` is the tool's resolution for the
    call's aspect ratio, unless ``sizes`` maps that aspect ratio to another "WxH". The style
    argument is appended to the prompt. Calls with reference images pass (the endpoint takes
    none). A 4xx other than 408/429 is the tool refusing the call: the agent reads the service's
    message.

    Args:
        client: the HTTP client (base URL, timeouts, retries, concurrency).
        model: the model name the service expects.
        sizes: aspect ratio -> "WxH" overrides (e.g. OpenAI accepts only a few sizes).
        send_seed: send the call's seed (services that honour it then make builds reproducible).
    """

    def __init__(self, client: JsonHttpClient, model: str, sizes: Mapping[str, str] | None = None,
                 send_seed: bool = False):
        self.client = client
        self.model = model
        self.sizes = dict(sizes or {})
        self.send_seed = send_seed

    def __call__(self, request: ToolRequest) -> Generation | ToolFailure | None:
        spec, args = request.spec, request.arguments
        if spec.group != "text2image":
            raise BackendError(f"OpenAIImageGenerator serves text-to-image tools, not {spec.name} "
                               f"({spec.group}); give the backend only {list(tools_in_group('text2image'))}.")
        if args.get("reference_images"):
            return None
        aspect = args.get("aspect_ratio", "1:1")
        width, height = spec.output.resolutions[aspect]
        prompt = args["prompt"] + (f"\nStyle: {args['style']}" if args.get("style") else "")
        payload = {"model": self.model, "prompt": prompt, "n": int(args.get("n", 1)),
                   "size": self.sizes.get(aspect, f"{width}x{height}"), "response_format": "b64_json"}
        if self.send_seed:
            payload["seed"] = request.seed % 2**31
        status, body = self.client.post("images/generations", payload)
        if status >= 400:
            message = body.get("error", {}).get("message", "") if isinstance(body, dict) else str(body)
            return ToolFailure(f"{spec.name}: the image service refused the call (HTTP {status}): "
                               f"{message or 'no reason given'}", backend="real")
        try:
            images = [base64.b64decode(item["b64_json"], validate=True) for item in body["data"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"The image service's answer is not an OpenAI images response "
                               f"with b64_json data ({type(exc).__name__}: {exc}).") from None
        return Generation(media=tuple(GeneratedMedia(data, _image_suffix(data)) for data in images))


class OpenAIImagesBackend(RealBackend):
    """A :class:`RealBackend` for the text-to-image tools over an OpenAI-compatible HTTP service.

    Args:
        base_url: the service root, e.g. "http://127.0.0.1:8000/v1".
        model: the model name.
        cache: the cache to record into (or its directory).
        media_dir: where to keep files when there is no cache.
        api_key: sent as a Bearer token.
        sizes: aspect ratio -> "WxH" overrides.
        send_seed: send the call's seed.
        on_error: see :class:`RealBackend`.
        **client_options: :class:`JsonHttpClient` options (timeout, max_retries, backoff, ...).
    """

    def __init__(self, base_url: str, model: str, cache: ToolCache | str | os.PathLike | None = None,
                 media_dir: str | os.PathLike | None = None, api_key: str | None = None,
                 sizes: Mapping[str, str] | None = None, send_seed: bool = False, on_error: str = "raise",
                 **client_options: Any):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        client = JsonHttpClient(base_url, headers=headers, **client_options)
        super().__init__(OpenAIImageGenerator(client, model, sizes, send_seed), cache=cache, media_dir=media_dir,
                         tools=tools_in_group("text2image"), on_error=on_error)


@dataclass(frozen=True)
class BuildReport:
    """What :func:`record_calls` did.

    Attributes:
        recorded: calls generated and stored.
        skipped: calls already in the cache (an earlier, interrupted build made them).
        failed: (position in the call list, reason) of the calls that failed or were refused.
    """

    recorded: int
    skipped: int
    failed: tuple[tuple[int, str], ...]


def record_calls(backend: RealBackend, requests: Sequence[tuple[ToolRequest, int | None]],
                 concurrency: int = 4, progress: bool = True) -> BuildReport:
    """Generate and record many calls with bounded concurrency, skipping those already cached.

    Args:
        backend: a real backend with a cache.
        requests: (request, the seed to record under: None for a seedless entry) pairs.
        concurrency: calls in flight at once.
        progress: show a progress bar.
    """
    from tqdm import tqdm

    if backend.cache is None:
        raise ConfigError("record_calls needs a RealBackend with a cache to record into.")
    todo = []
    for position, (request, seed) in enumerate(requests):
        key = CallKey.of(request.spec, request.arguments, request.inputs, seed)
        if backend.cache.get_intact(key) is None:  # a damaged entry is quarantined and made again
            todo.append((position, request, seed))
    failed: list[tuple[int, str]] = []
    recorded = 0
    with ThreadPoolExecutor(max_workers=concurrency) as pool, \
            tqdm(total=len(todo), desc="build", unit="call", disable=not progress) as bar:
        futures = {pool.submit(backend.call, request, seed): position for position, request, seed in todo}
        for future in as_completed(futures):
            bar.update()
            try:
                result = future.result()
            except BackendError as exc:
                failed.append((futures[future], str(exc)))
                continue
            if isinstance(result, CacheEntry):
                recorded += 1
            else:
                reason = result.message if isinstance(result, ToolFailure) else "the backend does not serve this tool"
                failed.append((futures[future], reason))
    return BuildReport(recorded, len(requests) - len(todo), tuple(sorted(failed)))
