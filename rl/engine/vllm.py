"""The vLLM engine for GPU workers: ``AsyncLLM`` in-process, token ids in and out (extra ``vllm``).

Not yet run on a GPU (see docs/engines.md): written against vLLM's ``vllm/v1/engine/async_llm.py``
(``AsyncLLM.from_engine_args``, ``generate(TokensPrompt, SamplingParams, request_id)``,
``collective_rpc``, ``reset_prefix_cache``) and ``vllm/sampling_params.py``.

Each request is one ``SamplingParams(n=1)`` with the request's ``seed`` (vLLM's per-request
generator), ``stop_token_ids`` and ``ignore_eos=True`` (only the request's stop tokens end a turn),
``logprobs=0`` (the sampled token's log-prob) and the engine built with
``logprobs_mode="processed_logprobs"`` (after temperature: what the trainer recomputes). vLLM
batches concurrent requests itself (continuous batching) and caches shared prefixes (automatic
prefix caching), so a conversation's earlier turns are not recomputed while they stay cached.

Weight sync: :meth:`VLLMEngine.update_weights` waits for the requests in flight, writes the weights
as safetensors into a private folder and calls the workers' ``visenv_load_weights`` (the
:class:`WeightLoader` worker extension: ``model.load_weights`` with the checkpoint's names), then
drops the prefix cache (it holds keys and values of the old weights).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from rl.engine.base import (GenerationRequest, GenerationResult, InferenceEngine, VersionGate, Weights,
                            served_result)
from rl.engine.remote import load_weights, save_weights
from visenv.error import ConfigError, DependencyNotInstalled


def _vllm():
    try:
        import vllm
    except ImportError:
        raise DependencyNotInstalled("vllm", "vllm", "rl.engine.vllm.VLLMEngine") from None
    return vllm


class WeightLoader:
    """vLLM worker extension (``worker_extension_cls="rl.engine.vllm.WeightLoader"``): loads the
    weights :func:`rl.engine.remote.save_weights` wrote, by the model's own ``load_weights``."""

    def visenv_load_weights(self, folder: str) -> None:
        self.model_runner.model.load_weights(weights=load_weights(folder).items())


@dataclass(frozen=True)
class VLLMEngineConfig:
    """Settings of :class:`VLLMEngine`.

    Attributes:
        model: the model folder (or hub id) vLLM loads.
        dtype: the weights' dtype on the GPU ("bfloat16", "float16", "float32", "auto").
        gpu_memory_utilization: the share of GPU memory vLLM may take (weights and KV cache).
        max_model_len: the longest conversation in tokens (None: the model's own limit).
        seed: the engine's seed (requests carry their own).
        engine_args: further ``AsyncEngineArgs`` fields, passed as they are.
    """

    model: str
    dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.5
    max_model_len: int | None = None
    seed: int = 0
    engine_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"VLLMEngineConfig.gpu_memory_utilization ({self.gpu_memory_utilization!r}) must be "
                              "in (0, 1].")
        reserved = {"model", "dtype", "gpu_memory_utilization", "max_model_len", "seed", "logprobs_mode",
                    "worker_extension_cls"} & set(self.engine_args)
        if reserved:
            raise ConfigError(f"VLLMEngineConfig.engine_args sets {sorted(reserved)}, which the engine sets itself: "
                              "use the config's own fields.")


class VLLMEngine(InferenceEngine):
    """vLLM's ``AsyncLLM`` on its own event loop thread, behind :class:`InferenceEngine`."""

    def __init__(self, config: VLLMEngineConfig):
        vllm = _vllm()
        self.config = config
        self._gate = VersionGate()
        self._vllm = vllm
        self._weights_dir = tempfile.mkdtemp(prefix="visenv-vllm-weights-")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="VLLMEngine", daemon=True)
        self._thread.start()
        args = vllm.AsyncEngineArgs(model=config.model, dtype=config.dtype, seed=config.seed,
                                    gpu_memory_utilization=config.gpu_memory_utilization,
                                    max_model_len=config.max_model_len, logprobs_mode="processed_logprobs",
                                    worker_extension_cls=f"{__name__}.WeightLoader", **config.engine_args)
        self._llm = self._run(self._start(args))

    async def _start(self, args):
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(args)

    def _run(self, coroutine, timeout: float | None = None):
        """Run a coroutine on the engine's loop and wait for it (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    @property
    def version(self) -> int:
        return self._gate.version

    def submit(self, request: GenerationRequest) -> Future:
        future = asyncio.run_coroutine_threadsafe(self._generate(request, self._gate.enter()), self._loop)
        future.add_done_callback(self._gate.leave)
        return future

    async def _generate(self, request: GenerationRequest, version: int) -> GenerationResult:
        vllm = self._vllm
        params = vllm.SamplingParams(n=1, max_tokens=request.max_new_tokens, temperature=request.temperature,
                                     seed=request.seed, stop_token_ids=list(request.stop_token_ids), ignore_eos=True,
                                     logprobs=0, skip_special_tokens=False, detokenize=False)
        final = None
        async for output in self._llm.generate(vllm.TokensPrompt(prompt_token_ids=list(request.prompt_ids)), params,
                                               request_id=uuid.uuid4().hex):
            final = output
        sample = final.outputs[0]
        ids = list(sample.token_ids)
        logprobs = [float(position[token].logprob) for token, position in zip(ids, sample.logprobs)]
        return served_result(request, ids, logprobs, sample.finish_reason, version, "vLLM")

    def update_weights(self, weights: Weights, version: int) -> None:
        folder = os.path.join(self._weights_dir, f"v{version}")
        save_weights(weights, folder)
        with self._gate.update(version):
            self._run(self._llm.collective_rpc("visenv_load_weights", args=(folder,)))
            self._run(self._llm.reset_prefix_cache())
        shutil.rmtree(folder)  # loaded into the workers' memory

    def close(self) -> None:
        self._llm.shutdown()
        shutil.rmtree(self._weights_dir, ignore_errors=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
