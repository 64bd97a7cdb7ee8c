"""An engine on an OpenAI-compatible server (vLLM or SGLang serving the policy): token ids both ways.

vLLM (``server="vllm"``): ``POST /v1/completions`` with the prompt as token ids (``prompt: [int]``),
``logprobs: 0`` (the sampled token's log-prob only), ``return_token_ids: true`` (the choice's
``token_ids``), ``seed``, ``stop_token_ids`` and ``ignore_eos: true`` (only the request's stop tokens
end a turn), as ``vllm/entrypoints/openai/completion/protocol.py`` (``CompletionRequest``) defines
them. Start the server with ``--logprobs-mode processed_logprobs`` (log-probs after temperature,
what the trainer recomputes; the default ``raw_logprobs`` is before it).

SGLang (``server="sglang"``): ``POST /generate`` with ``input_ids``, ``sampling_params``
(``max_new_tokens``, ``temperature``, ``stop_token_ids``, ``sampling_seed``, ``no_stop_trim``,
``ignore_eos``; ``python/sglang/srt/sampling/sampling_params.py``) and ``return_logprob: true``; the
sampled ids and log-probs come from ``meta_info.output_token_logprobs`` (``[logprob, id, text]`` per
token). SGLang's log-probs are after temperature unless ``SGLANG_RETURN_ORIGINAL_LOGPROB`` is set
(leave it unset); it honours ``sampling_seed`` only with ``--enable-deterministic-inference``.

Weight sync writes the weights as ``model.safetensors`` into ``weights_dir/v<version>/`` (a folder
the server can read) and then:

* SGLang: ``POST /update_weights_from_disk`` with ``model_path``, ``weight_version`` and
  ``flush_cache`` (``python/sglang/srt/entrypoints/http_server.py``); the folder also gets the
  served model's config and tokenizer files (copied from ``model_dir``).
* vLLM (``VLLM_SERVER_DEV_MODE=1`` and ``--worker-extension-cls rl.engine.vllm.WeightLoader``):
  ``POST /pause?mode=wait``, ``POST /collective_rpc`` with ``{"method": "visenv_load_weights", "args":
  [folder]}``, ``POST /reset_prefix_cache``, ``POST /resume`` (``vllm/entrypoints/serve/dev/``:
  ``rlhf/api_router.py`` and ``rpc/api_router.py``).

Connection errors, HTTP 429 and 5xx are retried with exponential backoff until the request's
deadline; any other 4xx fails at once with the server's message.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import torch

from rl.engine.base import (GenerationRequest, GenerationResult, InferenceEngine, VersionGate, Weights, named_tensors,
                            served_result)
from visenv.error import BackendError, ConfigError

SERVERS = ("vllm", "sglang")
WEIGHT_FILE = "model.safetensors"


@dataclass(frozen=True)
class RemoteEngineConfig:
    """Where the server is and how to talk to it.

    Attributes:
        base_url: the server's root, e.g. ``http://127.0.0.1:8000`` (without ``/v1``).
        server: ``"vllm"`` or ``"sglang"``: which request format and weight-sync calls to use.
        model: the served model name sent with vLLM's completions (None: the server's only model).
        weights_dir: a folder the server can read, where :meth:`RemoteEngine.update_weights` writes
            each version; None disables weight sync.
        model_dir: the served model's folder; SGLang reloads whole model folders, so its config and
            tokenizer files are copied next to each new version's weights (SGLang only).
        max_concurrency: most requests in flight at once (the server batches them).
        deadline_s: most seconds one request (or one weight sync) may take, retries included.
        backoff_s: first pause before a retry; doubled after each failed attempt.
        api_key: sent as ``Authorization: Bearer`` when set.
    """

    base_url: str
    server: str = "vllm"
    model: str | None = None
    weights_dir: str | None = None
    model_dir: str | None = None
    max_concurrency: int = 64
    deadline_s: float = 600.0
    backoff_s: float = 0.5
    api_key: str | None = None

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"RemoteEngineConfig.base_url ({self.base_url!r}) must start with http:// or https://, "
                              "e.g. 'http://127.0.0.1:8000'.")
        if self.server not in SERVERS:
            raise ConfigError(f"RemoteEngineConfig.server ({self.server!r}) must be one of {SERVERS}.")
        if self.server == "sglang" and self.weights_dir and not self.model_dir:
            raise ConfigError("RemoteEngineConfig.model_dir is None but server 'sglang' with weights_dir needs it: "
                              "SGLang reloads a whole model folder, so give the served model's folder.")
        if not isinstance(self.max_concurrency, int) or self.max_concurrency < 1:
            raise ConfigError(f"RemoteEngineConfig.max_concurrency ({self.max_concurrency!r}) must be an int >= 1.")
        if not self.deadline_s > 0 or not self.backoff_s > 0:
            raise ConfigError(f"RemoteEngineConfig.deadline_s ({self.deadline_s!r}) and backoff_s "
                              f"({self.backoff_s!r}) must be > 0.")


class RemoteEngine(InferenceEngine):
    """Samples on a vLLM or SGLang server; see the module docstring for the exact calls."""

    def __init__(self, config: RemoteEngineConfig):
        self.config = config
        self._gate = VersionGate()
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._client = httpx.Client(base_url=config.base_url.rstrip("/"), headers=headers,
                                    limits=httpx.Limits(max_connections=config.max_concurrency + 4))
        self._pool = ThreadPoolExecutor(config.max_concurrency, thread_name_prefix="RemoteEngine")

    @property
    def version(self) -> int:
        return self._gate.version

    # ---- sampling -----------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Future:
        return self._pool.submit(self._generate, request)

    def _generate(self, request: GenerationRequest) -> GenerationResult:
        version = self._gate.enter()
        try:
            if self.config.server == "vllm":
                return self._vllm(request, version)
            return self._sglang(request, version)
        finally:
            self._gate.leave()

    def _vllm(self, request: GenerationRequest, version: int) -> GenerationResult:
        body = {"model": self.config.model, "prompt": list(request.prompt_ids), "max_tokens": request.max_new_tokens,
                "temperature": request.temperature, "seed": request.seed,
                "stop_token_ids": list(request.stop_token_ids), "ignore_eos": True, "logprobs": 0,
                "return_token_ids": True, "skip_special_tokens": False}
        choice = self._post("/v1/completions", body)["choices"][0]
        return served_result(request, choice["token_ids"], choice["logprobs"]["token_logprobs"],
                             choice["finish_reason"], version, "The vLLM server")

    def _sglang(self, request: GenerationRequest, version: int) -> GenerationResult:
        params = {"max_new_tokens": request.max_new_tokens, "temperature": request.temperature,
                  "stop_token_ids": list(request.stop_token_ids), "sampling_seed": request.seed,
                  "ignore_eos": True, "no_stop_trim": True, "skip_special_tokens": False}
        meta = self._post("/generate", {"input_ids": list(request.prompt_ids), "sampling_params": params,
                                        "return_logprob": True})["meta_info"]
        sampled = meta["output_token_logprobs"]
        return served_result(request, [entry[1] for entry in sampled], [entry[0] for entry in sampled],
                             meta["finish_reason"]["type"], version, "The SGLang server")

    # ---- HTTP with retries --------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any] | None = None, params: dict[str, str] | None = None) -> Any:
        """POST with retries on connection errors, 429 and 5xx until the deadline; 4xx raise at once."""
        deadline = time.monotonic() + self.config.deadline_s
        pause, problem = self.config.backoff_s, ""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError(f"POST {self.config.base_url}{path} failed for {self.config.deadline_s:g} s "
                                   f"(last: {problem}): is the {self.config.server} server up? Raise "
                                   "RemoteEngineConfig.deadline_s for slow servers.")
            try:
                response = self._client.post(path, json=body, params=params, timeout=remaining)
            except httpx.TransportError as err:
                problem = f"{type(err).__name__}: {err}"
            else:
                if response.status_code < 400:
                    return response.json() if response.content else None
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code != 429 and response.status_code < 500:
                    raise BackendError(f"The {self.config.server} server refused POST {path} ({problem}). Check "
                                       "the model name, the prompt length and the server flags in docs/engines.md.")
            time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
            pause *= 2

    # ---- weights and lifecycle ----------------------------------------------------------------

    def update_weights(self, weights: Weights, version: int) -> None:
        if not self.config.weights_dir:
            raise ConfigError("RemoteEngine.update_weights needs RemoteEngineConfig.weights_dir: a folder the "
                              "server can read, where each weight version is written.")
        folder = os.path.abspath(os.path.join(self.config.weights_dir, f"v{version}"))
        save_weights(weights, folder)
        with self._gate.update(version):
            if self.config.server == "sglang":
                for name in os.listdir(self.config.model_dir):
                    source = os.path.join(self.config.model_dir, name)
                    if os.path.isfile(source) and not name.endswith((".safetensors", ".bin", ".pt")):
                        shutil.copy(source, folder)
                answer = self._post("/update_weights_from_disk", {"model_path": folder, "weight_version": str(version),
                                                                  "flush_cache": True})
                if not answer.get("success"):
                    raise BackendError(f"SGLang refused the weights in {folder}: {answer.get('message')!r}.")
            else:
                self._post("/pause", params={"mode": "wait"})
                try:
                    self._post("/collective_rpc", {"method": "visenv_load_weights", "args": [folder]})
                    self._post("/reset_prefix_cache")
                finally:
                    self._post("/resume")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()


def save_weights(weights: Weights, folder: str) -> str:
    """Write weights as one safetensors file in ``folder`` (tied tensors stored under each name)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, WEIGHT_FILE)
    save_file({name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in named_tensors(weights)},
              path)
    return path


def load_weights(folder: str) -> dict[str, torch.Tensor]:
    """The weights :func:`save_weights` wrote in ``folder``."""
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, WEIGHT_FILE))
