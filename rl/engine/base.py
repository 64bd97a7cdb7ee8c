"""The protocol every inference engine implements: token ids in; ids + log-probs out; weights in.

The rollout loop builds a :class:`GenerationRequest` per policy turn (the conversation's token ids so
far, the turn's seed) and awaits :meth:`InferenceEngine.generate`; many episodes await at once and
the engine batches what is pending. Log-probs are those of the sampled tokens under the sampling
distribution, ``log_softmax(logits / temperature)`` (temperature 1 when sampling greedily), which
is what :meth:`rl.hf.CausalLMPolicy.score` recomputes for the trainer.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from visenv.error import BackendError, ConfigError

FINISH_REASONS = ("stop", "length")
"""``"stop"``: a stop token was sampled (it ends ``token_ids``); ``"length"``: ``max_new_tokens`` reached."""

Weights = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
"""A state dict or named tensors (parameter names as the model's ``named_parameters``)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One policy turn to sample.

    Attributes:
        prompt_ids: the conversation's token ids so far (never re-tokenised text).
        max_new_tokens: most tokens to sample.
        temperature: sampling temperature; 0 samples greedily (log-probs then at temperature 1).
        seed: the turn's sampling seed; the same seed, prompt and weights give the same tokens
            whatever else the engine batches with them.
        stop_token_ids: tokens that end the turn (kept as its last token).
        session: a conversation id; an engine that keeps state between turns (the KV cache of the
            in-process engine) reuses it for the next request of the same session.
    """

    prompt_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 1.0
    seed: int = 0
    stop_token_ids: Sequence[int] = ()
    session: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(self.prompt_ids))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name in ("prompt_ids", "stop_token_ids"):
            bad = [t for t in getattr(self, name) if not isinstance(t, int) or isinstance(t, bool) or t < 0]
            if bad:
                raise ConfigError(f"GenerationRequest.{name} must hold non-negative int token ids; got {bad[0]!r}. "
                                  "Pass the ids the tokenizer produced.")
        if not self.prompt_ids:
            raise ConfigError("GenerationRequest.prompt_ids is empty: a turn needs at least one prompt token "
                              "(encode the observation first).")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"GenerationRequest.max_new_tokens ({self.max_new_tokens!r}) must be an int >= 1.")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ConfigError(f"GenerationRequest.temperature ({self.temperature!r}) must be a finite number >= 0 "
                              "(0 samples greedily).")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"GenerationRequest.seed ({self.seed!r}) must be an int in [0, 2**63): "
                              "use Conversation.turn_seed().")


@dataclass(frozen=True)
class GenerationResult:
    """What an engine sampled for a :class:`GenerationRequest`.

    Attributes:
        token_ids: the sampled ids, ending with the stop token when one was sampled.
        logprobs: the sampler's log-prob of each id in ``token_ids``.
        finish_reason: one of :data:`FINISH_REASONS`.
        weight_version: the weight version (as given to :meth:`InferenceEngine.update_weights`)
            that sampled every token of the turn.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    weight_version: int = 0

    def __post_init__(self):
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"GenerationResult has {len(self.token_ids)} token ids but {len(self.logprobs)} "
                             "log-probs: an engine must return one log-prob per sampled token.")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"GenerationResult.finish_reason ({self.finish_reason!r}) must be one of "
                             f"{FINISH_REASONS}.")


class InferenceEngine(abc.ABC):
    """Token ids in; sampled ids and log-probs out; weight updates in.

    Engines implement :meth:`submit` (thread-safe, returns at once) and the weight and lifecycle
    methods; :meth:`generate` (asyncio) and :meth:`generate_many` (blocking) are built on it. Use an
    engine as a context manager, or call :meth:`close`.
    """

    version: int = 0
    """The weight version the engine samples with now."""

    @abc.abstractmethod
    def submit(self, request: GenerationRequest) -> Future:
        """Queue a request; the future resolves to its :class:`GenerationResult`. Returns at once,
        except while :meth:`update_weights` runs (the request then waits for the new weights)."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Sample one turn; many callers may await at once (the engine batches them)."""
        return await asyncio.wrap_future(self.submit(request))

    def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Sample all requests concurrently and wait for them (results in request order)."""
        futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    @abc.abstractmethod
    def update_weights(self, weights: Weights, version: int) -> None:
        """Load new weights; every request submitted afterwards samples with them (blocks until done)."""

    def end_session(self, session: str) -> None:
        """Forget what the engine keeps for a finished conversation (nothing, by default)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the engine; requests still queued fail."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VersionGate:
    """Keeps each turn on one weight version for engines whose server batches for itself: a request
    enters (and reads the version) only while no update runs; an update waits for the requests in
    flight to leave, and the requests that arrive meanwhile wait for the update."""

    def __init__(self):
        self.version = 0
        self._cond = threading.Condition()
        self._in_flight = 0
        self._updating = False

    def enter(self) -> int:
        """Wait out an update; count the request in flight; the version it samples with."""
        with self._cond:
            self._cond.wait_for(lambda: not self._updating)
            self._in_flight += 1
            return self.version

    def leave(self, *_ignored) -> None:
        """The request is done (usable as a future's done-callback)."""
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def update(self, version: int):
        """Hold new requests, wait for those in flight, run the block; on success ``version`` holds."""
        with self._cond:
            self._updating = True
            self._cond.wait_for(lambda: self._in_flight == 0)
        try:
            yield
            self.version = version
        finally:
            with self._cond:
                self._updating = False
                self._cond.notify_all()


def served_result(request: GenerationRequest, ids: list[int], logprobs: list[float], reason: str, version: int,
                  server: str) -> GenerationResult:
    """A serving engine's answer as a result, checked: ``"stop"`` exactly when the turn ends with a
    stop token (so the stop token is in the ids, as the trainer needs it), else ``"length"``."""
    stopped = bool(ids) and ids[-1] in request.stop_token_ids
    if reason not in FINISH_REASONS or (reason == "stop") != stopped:
        raise BackendError(f"{server} answered finish_reason {reason!r} with last token {ids[-1] if ids else None} "
                           f"(stop tokens {list(request.stop_token_ids)}): expected 'stop' exactly when the turn "
                           "ends with a stop token. Is it the server version and flags docs/engines.md names?")
    return GenerationResult(list(ids), [float(lp) for lp in logprobs], reason, version)


def named_tensors(weights: Weights) -> list[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs of a state dict or of an iterable of pairs."""
    return list(weights.items()) if isinstance(weights, Mapping) else list(weights)
