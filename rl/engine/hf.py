"""The in-process transformers engine: continuous batching and KV caches kept between turns.

A background thread runs the decoding loop. Before every decoding step it admits the requests that
arrived meanwhile (up to ``max_batch_size`` rows): they are prefilled together in one pass and their
KV caches are merged into the running batch (left-padded to a common length), so a request joins at
the very next step, not the next batch; finished rows leave the batch at once. Sampling is the inverse-CDF
sampler of :mod:`rl.hf`: each request draws its uniforms for the whole turn from its own generator
seeded by ``request.seed``, so its tokens do not depend on what else is in the batch (up to float
rounding of the padded attention, far below the sampler's resolution).

With ``request.session`` set, a finished turn's KV cache is kept (up to ``max_sessions``, least
recently used dropped first) and the next request of the session prefills only the tokens after the
longest common prefix with the cached ones: a conversation's earlier turns are never recomputed.
Weight updates wait for the running rows to finish, then load the weights and drop every kept cache
(it was computed with the old weights), so each turn is sampled by exactly one weight version.

The running batch's KV cache is preallocated (:class:`SlabLayer`): each decoding step writes its keys
and values in place, with room reserved for the longest remaining turn when rows join, instead of
``DynamicCache``'s concatenation (a copy of the whole cache per step and layer). Rows that join a
running batch take free row slots of the slab (rows that finished, then spare rows the slab keeps)
when their prompt fits within the batch's columns: only their own keys and values are copied; else the
slab is rebuilt with the running rows and the new ones (:meth:`HFEngine._place`). The rows' sampling
state (uniforms, counts, positions, temperatures) is kept as tensors, rebuilt only when rows join or
leave; the host reads the sampled ids and log-probs once per step.

Supports causal LMs whose cache layers are full-attention ``DynamicLayer`` s (Llama, Qwen2, Mistral
without sliding window, ...). Text only: VLM policies keep :meth:`rl.hf.CausalLMPolicy.generate`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from rl.engine.base import GenerationRequest, GenerationResult, InferenceEngine, Weights, named_tensors
from rl.policy import POLICY, Conversation, Segment
from visenv.error import BackendError, ConfigError

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer, keys and values ``(B, heads, L, head_dim)``."""


@dataclass(frozen=True)
class HFEngineConfig:
    """Settings of :class:`HFEngine`.

    Attributes:
        max_batch_size: most requests decoding at once; more wait in the queue.
        max_sessions: most conversations whose KV cache is kept between turns (0 keeps none).
    """

    max_batch_size: int = 64
    max_sessions: int = 256

    def __post_init__(self):
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ConfigError(f"HFEngineConfig.max_batch_size ({self.max_batch_size!r}) must be an int >= 1.")
        if not isinstance(self.max_sessions, int) or self.max_sessions < 0:
            raise ConfigError(f"HFEngineConfig.max_sessions ({self.max_sessions!r}) must be an int >= 0 "
                              "(0 keeps no KV cache between turns).")


@dataclass
class _Row:
    """A request being decoded: its sampled tokens so far and its real tokens in the batch cache."""

    request: GenerationRequest
    future: Future
    uniforms: torch.Tensor
    length: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    done: bool = False


@dataclass
class _Session:
    """A finished turn's KV cache (batch 1, no padding) and the token ids it covers."""

    ids: tuple[int, ...]
    kv: KV


def sample(logits: torch.Tensor, uniforms: torch.Tensor, temperatures: torch.Tensor,
           any_greedy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row by inverse CDF at the row's uniform (argmax where the temperature is 0), and
    its log-prob under ``log_softmax(logits / temperature)`` (temperature 1 for greedy rows).
    ``any_greedy=False`` (no row has temperature 0) skips the argmax."""
    greedy = temperatures == 0
    logp = torch.log_softmax(logits / torch.where(greedy, 1.0, temperatures)[:, None], dim=-1)
    cdf = logp.exp().cumsum(-1)  # first token whose cdf exceeds u: never one of probability 0
    tokens = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], side="right").squeeze(-1)
    tokens = tokens.clamp(max=logits.shape[-1] - 1)
    if any_greedy:
        tokens = torch.where(greedy, logp.argmax(-1), tokens)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class SlabLayer(DynamicLayer):
    """A full-attention cache layer over a preallocated buffer ``(rows, heads, capacity, head_dim)``.

    The batch is the buffer's first ``batch`` rows (the rest are spare, for rows that join later:
    :meth:`place`). :meth:`update` writes the new keys and values in place after the filled columns and
    returns views of the filled part (``keys``/``values``, as ``DynamicLayer`` exposes them); the buffer is
    reallocated (doubled) only when a write would pass its capacity. Padding columns hold zeros (or the
    keys and values of a row that left, in a row slot taken over by :meth:`place`: masked all the same).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int, rows: int = 0):
        super().__init__()
        batch, heads, length, dim = keys.shape
        self._keys = keys.new_zeros(max(rows, batch), heads, max(capacity, length), dim)
        self._values = values.new_zeros(max(rows, batch), heads, max(capacity, length), values.shape[3])
        self._keys[:batch, :, :length] = keys
        self._values[:batch, :, :length] = values
        self.batch = batch
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True
        self._show(length)

    @classmethod
    def right_aligned(cls, parts: list[tuple[torch.Tensor, torch.Tensor]], length: int, capacity: int,
                      rows: int = 0) -> "SlabLayer":
        """The rows of every part (keys, values) stacked, each part right-aligned at column ``length``, in
        a buffer of at least ``rows`` rows."""
        keys, values = parts[0]
        layer = cls(keys[:0, :, :0], values[:0, :, :0], 0)
        batch = sum(k.shape[0] for k, _ in parts)
        layer._keys = keys.new_zeros(max(rows, batch), keys.shape[1], max(capacity, length), keys.shape[3])
        layer._values = values.new_zeros(max(rows, batch), values.shape[1], max(capacity, length), values.shape[3])
        row = 0
        for k, v in parts:
            layer._keys[row:row + k.shape[0], :, length - k.shape[2]:length] = k
            layer._values[row:row + v.shape[0], :, length - v.shape[2]:length] = v
            row += k.shape[0]
        layer.batch = batch
        layer._show(length)
        return layer

    @property
    def rows(self) -> int:
        """Rows the buffer holds (the batch and the spare ones)."""
        return self._keys.shape[0]

    def _show(self, length: int) -> None:
        self.keys, self.values = self._keys[:self.batch, :, :length], self._values[:self.batch, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start, end = self.keys.shape[2], self.keys.shape[2] + key_states.shape[2]
        if end > self._keys.shape[2]:
            grow = max(end, 2 * self._keys.shape[2]) - self._keys.shape[2]
            self._keys = F.pad(self._keys, (0, 0, 0, grow))
            self._values = F.pad(self._values, (0, 0, 0, grow))
        self._keys[:self.batch, :, start:end] = key_states
        self._values[:self.batch, :, start:end] = value_states
        self._show(end)
        return self.keys, self.values

    def place(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write rows joining the batch into row ``slots`` (rows of the batch that left, or the spare rows
        right after it), right-aligned at the filled length; the batch grows to cover them."""
        length = self.keys.shape[2]
        self.batch = max(self.batch, int(slots.max()) + 1)
        self._keys[slots, :, length - keys.shape[2]:length] = keys
        self._values[slots, :, length - values.shape[2]:length] = values
        self._show(length)


def _kv(cache: Cache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _slab(parts: list[KV], length: int, capacity: int, rows: int = 0) -> Cache:
    """One preallocated cache holding the rows of every part, right-aligned at column ``length``, with
    room for ``rows`` rows in all (spare rows for requests that join later)."""
    return Cache(layers=[SlabLayer.right_aligned(list(layer), length, capacity, rows) for layer in zip(*parts)])


def _pad_left(kv: KV, length: int) -> KV:
    return [(F.pad(k, (0, 0, length - k.shape[2], 0)), F.pad(v, (0, 0, length - v.shape[2], 0))) for k, v in kv]


def turn_request(policy, conversation: Conversation, session: str | None = None) -> GenerationRequest:
    """The request for a conversation's next turn with a :class:`rl.hf.CausalLMPolicy`'s sampling
    settings and seed: an engine then samples what ``policy.generate`` samples."""
    return GenerationRequest(conversation.token_ids, policy.max_new_tokens, policy.temperature,
                             conversation.turn_seed(), (policy.stop_id,), session)


def turn_segment(policy, result: GenerationResult) -> Segment:
    """The policy segment of a sampled turn, as ``policy.generate`` writes it (text without the stop token)."""
    ids = result.token_ids[:-1] if result.finish_reason == "stop" else result.token_ids
    return Segment(POLICY, policy.tokenizer.decode(ids, skip_special_tokens=False), result.token_ids,
                   result.logprobs)


class HFEngine(InferenceEngine):
    """A transformers causal LM served in-process with continuous batching.

    Args:
        model: a ``*ForCausalLM`` (eval mode is set) on the device it should run on.
        config: batching and session-cache sizes.
        banned_token_ids: tokens the policy may never sample (as ``CausalLMPolicy.env_only_ids``).
    """

    def __init__(self, model, config: HFEngineConfig = HFEngineConfig(), banned_token_ids: Sequence[int] = ()):
        self.model = model.eval()
        self._device = next(model.parameters()).device
        self.config = config
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.banned = torch.tensor(sorted(banned_token_ids), dtype=torch.long)
        self.version = 0
        self._pending: deque[tuple[GenerationRequest, Future]] = deque()
        self._update: tuple[list[tuple[str, torch.Tensor]], int, Future] | None = None
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._rows: list[_Row] = []
        self._cache: Cache | None = None
        self._mask = self._logits = None
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="HFEngine", daemon=True)
        self._thread.start()

    @classmethod
    def from_policy(cls, policy, config: HFEngineConfig = HFEngineConfig()) -> "HFEngine":
        """The engine of a :class:`rl.hf.CausalLMPolicy`, on the same model object: the learner's
        in-place updates show at once (no copy, no version). When rollouts overlap updates, build
        ``HFEngine(copy.deepcopy(policy.model), ...)`` instead and call :meth:`update_weights`."""
        return cls(policy.model, config, banned_token_ids=policy.env_only_ids)

    @property
    def device(self) -> torch.device:
        return self._device

    # ---- the caller's side -------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Future:
        too_big = [t for t in request.prompt_ids + request.stop_token_ids if t >= self.vocab_size]
        if too_big:
            raise ConfigError(f"Token id {too_big[0]} is outside the model's vocabulary ({self.vocab_size} ids): "
                              "the prompt was encoded with another tokenizer.")
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise BackendError("HFEngine.submit() called after close(): make a new engine.")
            self._pending.append((request, future))
            self._wake.notify()
        return future

    def update_weights(self, weights: Weights, version: int) -> None:
        pairs = named_tensors(weights)
        params = dict(self.model.named_parameters(remove_duplicate=False))  # tied names too
        unknown = sorted(name for name, _ in pairs if name not in params)
        if unknown:
            raise ConfigError(f"update_weights got {len(unknown)} unknown parameter(s), e.g. {unknown[0]!r}: the "
                              "weights come from a model of another architecture (or a LoRA-wrapped one).")
        misshapen = [(name, tuple(value.shape)) for name, value in pairs if value.shape != params[name].shape]
        if misshapen:
            name, shape = misshapen[0]
            raise ConfigError(f"update_weights got {name!r} of shape {shape}, but the model's is "
                              f"{tuple(params[name].shape)}: the weights come from a model of another size.")
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise BackendError("HFEngine.update_weights() called after close(): make a new engine.")
            if self._update is not None:
                raise BackendError("HFEngine.update_weights() called while another update is pending: call it "
                                   "from one thread (the learner's).")
            self._update = (pairs, version, future)
            self._wake.notify()
        future.result()

    def end_session(self, session: str) -> None:
        with self._wake:
            self._sessions.pop(session, None)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    # ---- the engine's thread -----------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._closed or self._rows or self._pending or self._update):
                        self._wake.wait()
                    if self._closed:
                        break
                    update = self._update if not self._rows else None
                    admitted = [] if self._update else [
                        self._pending.popleft()
                        for _ in range(min(len(self._pending), self.config.max_batch_size - self._live()))]
                    sessions = [self._sessions.pop(r.session, None) if r.session else None for r, _ in admitted]
                if update is not None:
                    self._apply(*update)
                    continue
                try:
                    admitted = [(request, future, session) for (request, future), session in zip(admitted, sessions)
                                if future.set_running_or_notify_cancel()]
                    if admitted:
                        self._admit(admitted)
                    if self._rows:
                        self._step()
                except Exception as err:  # e.g. a prompt past the model's positions: fail them, keep serving
                    for future in [row.future for row in self._rows] + [future for _, future, _ in admitted]:
                        if not future.done():
                            future.set_exception(err)
                    self._rows, self._cache, self._mask, self._logits = [], None, None, None
        error = BackendError("HFEngine was closed before the request was sampled.")
        for row in self._rows:
            if not row.done:
                row.future.set_exception(error)
        for _, future in self._pending:
            future.set_exception(error)
        if self._update:
            self._update[2].set_exception(error)

    def _live(self) -> int:
        return sum(not row.done for row in self._rows)

    def _apply(self, pairs: list[tuple[str, torch.Tensor]], version: int, future: Future) -> None:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, value in pairs:
                params[name].copy_(value)
        with self._wake:
            self._sessions.clear()
            self.version = version
            self._update = None
        future.set_result(None)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Cache | None):
        """Next-token logits of every row, and the cache (grown in place by the model)."""
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        layers = out.cache.layers
        if not all(type(layer) in (DynamicLayer, SlabLayer) for layer in layers):
            raise ConfigError(f"HFEngine supports models whose KV cache is full attention (DynamicLayer); this model "
                              f"uses {sorted({type(layer).__name__ for layer in layers})}. Use "
                              "CausalLMPolicy.generate for it.")
        logits = out.logits[:, -1].float()
        if len(self.banned):
            logits = logits.index_fill(-1, self.banned.to(logits.device), float("-inf"))
        return logits, out.cache

    def _admit(self, admitted: list[tuple[GenerationRequest, Future, _Session | None]]) -> None:
        """Prefill the admitted requests in one pass (each after its session's cached prefix) and
        merge them into the batch.

        Each row is ``[padding, cached prefix, padding, new tokens]``: prefixes and new tokens are
        left-padded separately, the mask hides both paddings, and positions count real tokens only.
        """
        self._sync_rows()
        rows, cached = [], []
        for request, future, session in admitted:
            prompt, prefix = request.prompt_ids, 0
            if session is not None:
                common = next((i for i, (a, b) in enumerate(zip(session.ids, prompt)) if a != b),
                              min(len(session.ids), len(prompt)))
                prefix = min(common, len(prompt) - 1)  # at least one token to prefill: its logits sample
            cached.append([(k[:, :, :prefix], v[:, :, :prefix]) for k, v in session.kv] if prefix else None)
            uniforms = torch.rand(request.max_new_tokens, generator=torch.Generator().manual_seed(request.seed))
            rows.append(_Row(request, future, uniforms, prefix))
        width = max(row.length for row in rows)  # the longest cached prefix
        new = max(len(row.request.prompt_ids) - row.length for row in rows)
        ids = torch.zeros(len(rows), new, dtype=torch.long)
        mask = torch.zeros(len(rows), width + new, dtype=torch.long)
        positions = torch.zeros(len(rows), new, dtype=torch.long)
        for i, row in enumerate(rows):
            suffix = row.request.prompt_ids[row.length:]
            ids[i, new - len(suffix):] = torch.tensor(suffix)
            mask[i, width - row.length:width] = 1
            mask[i, width + new - len(suffix):] = 1
            positions[i, new - len(suffix):] = torch.arange(row.length, row.length + len(suffix))
            row.length = len(row.request.prompt_ids)
        cache = None
        if width:
            like = next(c for c in cached if c is not None)
            empty = [(k[:, :, :0], v[:, :, :0]) for k, v in like]
            cache = DynamicCache(ddp_cache_data=[
                (torch.cat([k for k, _ in layer]), torch.cat([v for _, v in layer]))
                for layer in zip(*(_pad_left(c if c is not None else empty, width) for c in cached))])
        device = self.device
        mask = mask.to(device)
        logits, cache = self._forward(ids.to(device), mask, positions.to(device), cache)
        if self._place(rows, logits, cache, mask):
            return
        parts, masks, logits_parts = [], [], []
        keep = [i for i, row in enumerate(self._rows) if not row.done]
        if keep:  # the running rows (finished ones dropped) and the admitted ones, copied once into one slab
            kept, start = self._kept(keep)
            parts, masks, logits_parts = kept, [self._mask[:, start:]], [self._logits]
        else:
            self._rows = []
        parts.append(_kv(cache))
        masks.append(mask)
        logits_parts.append(logits)
        self._rows += rows
        length = max(m.shape[1] for m in masks)
        self._cache = _slab(parts, length, length + self._reserve(), self._room(len(self._rows)))
        self._mask = torch.cat([F.pad(m, (length - m.shape[1], 0)) for m in masks])
        self._logits = torch.cat(logits_parts) if len(logits_parts) > 1 else logits
        self._row_tensors()

    def _place(self, rows: list[_Row], logits: torch.Tensor, cache: Cache, mask: torch.Tensor) -> bool:
        """Admit prefilled ``rows`` (their next-token ``logits``, KV ``cache`` and ``mask``) into free row
        slots of the running batch's slab, copying only their own keys and values: the slots of rows that
        finished, then the slab's spare rows. Done only when rows are running, the new rows' columns fit
        within the batch's filled ones (right-aligned, as a rebuilt slab would hold them), at most a
        quarter of the columns would be padding in every row (a rebuild drops those, so the attention
        does not span them) and there are enough free slots; else False, nothing changed (the caller
        rebuilds the slab)."""
        live = [i for i, row in enumerate(self._rows) if not row.done]
        if not live or mask.shape[1] > self._mask.shape[1]:
            return False
        length = self._mask.shape[1]
        first = min(int(self._mask[live].any(0).nonzero()[0]), length - mask.shape[1] + int(mask.any(0).nonzero()[0]))
        if 4 * first > length:  # over a quarter of the columns would be padding in every row: rebuild (trims them)
            return False
        layers = self._cache.layers
        holes = [i for i, row in enumerate(self._rows) if row.done][:len(rows)]
        appended = len(rows) - len(holes)
        if appended > layers[0].rows - len(self._rows):
            return False
        slots = holes + list(range(len(self._rows), len(self._rows) + appended))
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        for layer, (keys, values) in zip(layers, _kv(cache)):
            layer.place(index, keys, values)
        if appended:
            self._mask = F.pad(self._mask, (0, 0, 0, appended))
            self._logits = F.pad(self._logits, (0, 0, 0, appended))
        self._mask[index] = 0
        self._mask[index, length - mask.shape[1]:] = mask
        self._logits[index] = logits
        for slot, row in zip(slots, rows):
            if slot < len(self._rows):
                self._rows[slot] = row
            else:
                self._rows.append(row)
        self._row_tensors()
        return True

    def _room(self, rows: int) -> int:
        """Rows of a new slab for a batch of ``rows``: spare ones for requests that join later
        (:meth:`_place`), within ``max_batch_size``."""
        return max(rows, min(self.config.max_batch_size, rows + max(8, rows // 2)))

    def _row_tensors(self) -> None:
        """The running rows' sampling state as tensors (rebuilt when rows join or leave): each row's
        uniforms, how many tokens it sampled, its next position, its temperature."""
        rows, device = self._rows, self.device
        turn = max(len(row.uniforms) for row in rows)
        self._draws = torch.zeros(len(rows), turn + 1)  # a spare column for finished rows still in the batch
        for i, row in enumerate(rows):
            self._draws[i, :len(row.uniforms)] = row.uniforms
        self._draws = self._draws.to(device)
        self._counts = torch.tensor([len(row.tokens) for row in rows], device=device).clamp(max=turn)
        self._positions = torch.tensor([row.length for row in rows], device=device)
        self._temperatures = torch.tensor([float(row.request.temperature) for row in rows], device=device)
        self._any_greedy = any(row.request.temperature == 0 for row in rows)

    def _sync_rows(self) -> None:
        """Write the running rows' positions back to them (before the rows change)."""
        if self._rows:
            for row, position in zip(self._rows, self._positions.tolist()):
                row.length = position

    def _step(self) -> None:
        """Sample one token for every live row, finish the rows that are done, feed the tokens.

        A finished row stays in the batch (its samples ignored) until a quarter of the rows are
        finished or new rows join: compacting the cache copies it, so it is done in bulk.
        """
        rows = self._rows
        uniforms = self._draws.gather(1, self._counts[:, None]).squeeze(1)
        tokens, logprobs = sample(self._logits, uniforms, self._temperatures, self._any_greedy)
        self._counts.add_(1).clamp_(max=self._draws.shape[1] - 1)
        for i, (row, token, logprob) in enumerate(zip(rows, tokens.tolist(), logprobs.tolist())):
            if row.done:
                continue
            row.tokens.append(token)
            row.logprobs.append(logprob)
            stopped = token in row.request.stop_token_ids
            if stopped or len(row.tokens) == row.request.max_new_tokens:
                self._finish(i, row, "stop" if stopped else "length")
        live = [i for i, row in enumerate(rows) if not row.done]
        if not live:
            self._rows, self._cache, self._mask, self._logits = [], None, None, None
            return
        if 4 * (len(rows) - len(live)) >= len(rows):
            tokens = tokens[self._compact(live)]
        self._mask = F.pad(self._mask, (0, 1), value=1)
        self._logits, self._cache = self._forward(tokens[:, None], self._mask, self._positions[:, None], self._cache)
        self._positions += 1

    def _compact(self, keep: list[int]) -> torch.Tensor:
        """Keep only the rows ``keep`` (and drop the columns that are padding in all of them); their index."""
        self._sync_rows()
        parts, start = self._kept(keep)
        length = self._mask.shape[1] - start
        self._mask = self._mask[:, start:]
        self._cache = _slab(parts, length, length + self._reserve(), self._room(len(self._rows)))
        self._row_tensors()
        return torch.tensor(keep, dtype=torch.long, device=self.device)

    def _kept(self, keep: list[int]) -> tuple[list[KV], int]:
        """Keep the rows ``keep`` (sorted) of the running batch: rows, mask and logits selected; the KV cache
        returned as views of its runs of consecutive kept rows, from the first column that is not padding
        in all of them (that column returned too), for :func:`_slab` to copy once."""
        if len(keep) < len(self._rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self._rows = [self._rows[i] for i in keep]
            self._mask, self._logits = self._mask[index], self._logits[index]
        start = int(self._mask.any(0).nonzero()[0])
        runs, first = [], 0
        for n in range(1, len(keep) + 1):  # runs of consecutive rows: views, no copy before the slab's
            if n == len(keep) or keep[n] != keep[n - 1] + 1:
                runs.append((keep[first], keep[n - 1] + 1))
                first = n
        kv = _kv(self._cache)
        return [[(k[a:b, :, start:], v[a:b, :, start:]) for k, v in kv] for a, b in runs], start

    def _reserve(self) -> int:
        """The most cache columns a running row may still write (each sampled token but its last is fed)."""
        return max((row.request.max_new_tokens - len(row.tokens) for row in self._rows if not row.done), default=0)

    def _finish(self, i: int, row: _Row, reason: str) -> None:
        session = row.request.session
        if session and self.config.max_sessions:
            real = self._mask[i].bool()  # the row's tokens, without the paddings inside and before them
            kv = [(k[i:i + 1, :, real], v[i:i + 1, :, real]) for k, v in _kv(self._cache)]
            with self._wake:
                self._sessions[session] = _Session(row.request.prompt_ids + tuple(row.tokens[:-1]), kv)
                while len(self._sessions) > self.config.max_sessions:
                    self._sessions.popitem(last=False)
        row.done = True
        row.future.set_result(GenerationResult(row.tokens, row.logprobs, reason, self.version))
