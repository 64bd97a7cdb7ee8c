"""The engine protocol and the in-process transformers engine (rl/engine/base.py, rl/engine/hf.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import threading

import pytest
import torch

from rl.engine import GenerationRequest, GenerationResult
from rl.engine.base import served_result
from rl.engine.hf import HFEngine, HFEngineConfig, turn_request, turn_segment
from rl.hf import tiny_causal_lm
from rl.policy import Conversation
from rl_helpers import ECHO, echo_tokenizer, tiny_policy
from visenv.error import BackendError, ConfigError, DependencyNotInstalled

VOCAB = 64
LOGPROB_ATOL = 1e-4
"""Log-probs of the same tokens from differently shaped passes (batched, padded, cached, from scratch):
float32 sums in another order (~1e-6 measured)."""


def prompt(seed: int, length: int) -> list[int]:
    return random.Random(seed).choices(range(VOCAB), k=length)


def request(seed: int, length: int = 7, max_new_tokens: int = 10, **options) -> GenerationRequest:
    return GenerationRequest(prompt(seed, length), max_new_tokens, seed=seed, **options)


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(VOCAB, hidden_size=32, intermediate_size=64, seed=0)


@pytest.fixture
def engine(model):
    with HFEngine(model, HFEngineConfig(max_batch_size=8)) as engine:
        yield engine


class PrefillCounter:
    """Counts the tokens the model's embedding layer sees (prefill and decode alike)."""

    def __init__(self, model):
        self.tokens = 0
        self.handle = model.get_input_embeddings().register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.tokens += inputs[0].numel()


def test_requests_validate_themselves():
    with pytest.raises(ConfigError, match="prompt_ids is empty"):
        GenerationRequest([], 4)
    with pytest.raises(ConfigError, match="non-negative int token ids; got -1"):
        GenerationRequest([1, -1], 4)
    with pytest.raises(ConfigError, match=r"max_new_tokens \(0\) must be an int >= 1"):
        GenerationRequest([1], 0)
    with pytest.raises(ConfigError, match=r"temperature \(-0.5\) must be a finite number >= 0"):
        GenerationRequest([1], 4, temperature=-0.5)
    with pytest.raises(ConfigError, match="seed .* must be an int in"):
        GenerationRequest([1], 4, seed=2**63)
    with pytest.raises(ValueError, match="2 token ids but 1 log-probs"):
        GenerationResult([1, 2], [0.0], "stop")
    with pytest.raises(ValueError, match=r"finish_reason \('eos'\)"):
        GenerationResult([1], [0.0], "eos")
    with pytest.raises(ConfigError, match="max_batch_size"):
        HFEngineConfig(max_batch_size=0)


def test_engine_samples_what_the_policy_samples():
    """Same seeds, same weights, two turns: the engine's segments are CausalLMPolicy.generate's."""
    tokenizer = echo_tokenizer()
    policy = tiny_policy(tokenizer, max_new_tokens=12)
    env = ECHO.make()
    ours, theirs = ([Conversation(seed=seed, segments=[policy.encode(env.reset(seed=seed)[0], True)])
                     for seed in range(4)] for _ in range(2))
    with HFEngine.from_policy(policy) as engine:
        for turn in range(2):
            expected = policy.generate(theirs)
            got = engine.generate_many([turn_request(policy, c, session=str(i)) for i, c in enumerate(ours)])
            for conv, other, segment, result in zip(ours, theirs, expected, got):
                mine = turn_segment(policy, result)
                assert (mine.text, mine.token_ids) == (segment.text, segment.token_ids)
                assert mine.logprobs == pytest.approx(segment.logprobs, abs=LOGPROB_ATOL)
                assert result.finish_reason == ("stop" if segment.token_ids[-1] == policy.stop_id else "length")
                observation = policy.encode({"text": f"Turn {turn}: say cat."}, False)
                conv.segments += [mine, observation]
                other.segments += [segment, observation]


def test_same_seed_same_tokens_whatever_the_batch(engine):
    alone = [engine.generate_many([request(seed, length=3 + seed)])[0] for seed in (2, 5)]
    crowd = engine.generate_many([request(seed, length=3 + seed) for seed in range(8)])
    for seed, result in zip((2, 5), alone):
        assert crowd[seed].token_ids == result.token_ids
        assert crowd[seed].logprobs == pytest.approx(result.logprobs, abs=LOGPROB_ATOL)
    assert len({tuple(r.token_ids) for r in crowd}) == 8  # different seeds and prompts sample differently
    assert all(r.finish_reason == "length" and len(r.token_ids) == 10 for r in crowd)


def test_stop_tokens_greedy_and_temperature(engine):
    sampled = engine.generate_many([request(1, max_new_tokens=12)])[0]
    stop = sampled.token_ids[3]
    stopped = engine.generate_many([request(1, max_new_tokens=12, stop_token_ids=[stop])])[0]
    first = sampled.token_ids.index(stop)
    assert stopped.token_ids == sampled.token_ids[:first + 1] and stopped.finish_reason == "stop"
    greedy = engine.generate_many([request(1, temperature=0.0), request(7, length=7, temperature=0.0)])
    again = engine.generate_many([GenerationRequest(prompt(1, 7), 10, temperature=0.0, seed=99)])[0]
    assert greedy[0].token_ids == again.token_ids  # greedy ignores the seed
    assert all(lp <= 0 for lp in greedy[0].logprobs)
    cold = engine.generate_many([request(1, temperature=0.5)])[0]
    assert cold.token_ids != sampled.token_ids[:10] or cold.logprobs != sampled.logprobs[:10]


def test_requests_join_a_running_batch_at_the_next_step(model):
    """A short request submitted while a long one decodes finishes long before it."""
    started = threading.Event()
    counter = PrefillCounter(model)
    hook = model.get_input_embeddings().register_forward_hook(lambda *a: started.set())
    try:
        with HFEngine(model) as engine:
            long = engine.submit(request(0, max_new_tokens=400))
            started.wait(30)
            short = engine.submit(request(1, max_new_tokens=3))
            assert short.result(60).finish_reason == "length"
            assert not long.done()  # joined the running batch instead of waiting for it
            assert len(long.result(120).token_ids) == 400
    finally:
        hook.remove()
        counter.handle.remove()


def test_async_generate_batches_concurrent_callers(engine):
    async def main():
        return await asyncio.gather(*(engine.generate(request(seed)) for seed in range(6)))

    results = asyncio.run(main())
    assert [r.token_ids for r in results] == [r.token_ids for r in engine.generate_many([request(s) for s in range(6)])]


def test_a_session_extends_its_kv_cache_instead_of_recomputing(model):
    """Turn 2 of a session prefills only the new tokens, and samples what a from-scratch run samples."""
    counter = PrefillCounter(model)
    try:
        with HFEngine(model) as engine:
            first = engine.generate_many([request(3, length=20, max_new_tokens=8, session="episode-3")])[0]
            turn2 = prompt(3, 20) + first.token_ids + prompt(4, 6)
            counter.tokens = 0
            cached = engine.generate_many([GenerationRequest(turn2, 8, seed=11, session="episode-3")])[0]
            prefilled = counter.tokens - 7  # the 7 decoding steps feed one token each
            engine.end_session("episode-3")
            scratch = engine.generate_many([GenerationRequest(turn2, 8, seed=11, session="episode-3")])[0]
    finally:
        counter.handle.remove()
    assert prefilled == 1 + 6  # the last sampled token (never fed) and the new observation
    assert cached.token_ids == scratch.token_ids
    assert cached.logprobs == pytest.approx(scratch.logprobs, abs=LOGPROB_ATOL)


def test_a_session_whose_prompt_diverges_reuses_only_the_common_prefix(engine):
    engine.generate_many([request(5, length=12, session="s")])
    edited = prompt(5, 12)[:6] + prompt(6, 9)
    reused = engine.generate_many([GenerationRequest(edited, 10, seed=5, session="s")])[0]
    fresh = engine.generate_many([GenerationRequest(edited, 10, seed=5)])[0]
    assert reused.token_ids == fresh.token_ids
    assert reused.logprobs == pytest.approx(fresh.logprobs, abs=LOGPROB_ATOL)


def test_weight_updates_version_the_results_and_drop_kept_caches():
    model = tiny_causal_lm(VOCAB, hidden_size=32, intermediate_size=64, seed=0)
    other = tiny_causal_lm(VOCAB, hidden_size=32, intermediate_size=64, seed=1)
    with HFEngine(model) as engine, HFEngine(other) as reference:
        before = engine.generate_many([request(2, session="a")])[0]
        assert before.weight_version == 0
        engine.update_weights(other.state_dict(), version=3)
        after = engine.generate_many([request(2, session="a")])[0]
        assert after.weight_version == 3 and engine.version == 3
        assert after.token_ids == reference.generate_many([request(2)])[0].token_ids
        assert after.logprobs != before.logprobs
        with pytest.raises(ConfigError, match="unknown parameter.*'lm_head.extra'"):
            engine.update_weights({"lm_head.extra": torch.zeros(1)}, version=4)
        with pytest.raises(ConfigError, match=r"'lm_head.weight' of shape \(1,\), but the model's is \(64, 32\)"):
            engine.update_weights({"lm_head.weight": torch.zeros(1)}, version=4)
        assert engine.version == 3
        with pytest.raises(ConfigError, match="outside the model's vocabulary"):
            engine.submit(GenerationRequest([VOCAB + 1], 2))
    with pytest.raises(BackendError, match="after close"):
        engine.submit(request(0))


def test_a_served_stop_must_end_with_a_stop_token():
    req = GenerationRequest([1, 2], 4, stop_token_ids=[9])
    assert served_result(req, [3, 9], [-1.0, -2.0], "stop", 2, "X").weight_version == 2
    with pytest.raises(BackendError, match="X answered finish_reason 'stop' with last token 3"):
        served_result(req, [3], [-1.0], "stop", 0, "X")
    with pytest.raises(BackendError, match="finish_reason 'abort'"):
        served_result(req, [3], [-1.0], "abort", 0, "X")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_the_vllm_engine_names_its_extra_when_vllm_is_missing():
    from rl.engine.vllm import VLLMEngine, VLLMEngineConfig

    with pytest.raises(DependencyNotInstalled, match=r"pip install 'visenv\[vllm\]'"):
        VLLMEngine(VLLMEngineConfig("some/model"))
    with pytest.raises(ConfigError, match="engine_args sets \\['logprobs_mode'\\]"):
        VLLMEngineConfig("some/model", engine_args={"logprobs_mode": "raw_logprobs"})


def test_a_failing_pass_fails_its_requests_and_the_engine_keeps_serving(model):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    with HFEngine(model) as engine:
        model.forward = broken
        try:
            with pytest.raises(RuntimeError, match="out of memory"):
                engine.generate_many([request(0), request(1)])
        finally:
            del model.forward
        assert len(engine.generate_many([request(0)])[0].token_ids) == 10


def test_the_preallocated_cache_writes_in_place_and_matches_a_dynamic_cache(model):
    """SlabLayer: decoding into the preallocated buffer (growing it past its capacity) gives the
    logits of DynamicCache's concatenation, and keeps one buffer while there is room."""
    from transformers.cache_utils import Cache, DynamicCache

    from rl.engine.hf import SlabLayer

    ids = torch.tensor([prompt(1, 6), prompt(2, 6)])
    with torch.inference_mode():
        dynamic = model(input_ids=ids, use_cache=True).cache
        slab = Cache(layers=[SlabLayer(layer.keys, layer.values, capacity=8) for layer in dynamic.layers])
        buffer = slab.layers[0]._keys
        for step in range(5):  # columns 6..10: past the capacity of 8 at the third step
            token = torch.tensor([[step + 1], [step + 2]])
            positions = torch.full((2, 1), 6 + step)
            theirs = model(input_ids=token, position_ids=positions, cache=dynamic, use_cache=True).logits
            ours = model(input_ids=token, position_ids=positions, cache=slab, use_cache=True).logits
            assert torch.allclose(ours, theirs, atol=LOGPROB_ATOL)
            if step < 2:
                assert slab.layers[0]._keys is buffer  # written in place
        assert slab.layers[0].keys.shape[2] == 11 and slab.layers[0]._keys.shape[2] >= 11
        assert torch.equal(slab.layers[1].values, dynamic.layers[1].values)


def test_rows_joining_and_leaving_a_running_batch_sample_what_they_sample_alone(model):
    """Requests of different lengths (rows leave and the batch is compacted) and a second wave that
    joins mid-decoding: each samples what it samples alone."""
    first = [request(seed, length=3 + seed, max_new_tokens=4 + 6 * seed) for seed in range(6)]
    second = [request(seed, length=13 - seed, max_new_tokens=5 + seed) for seed in range(6, 10)]
    with HFEngine(model, HFEngineConfig(max_batch_size=16)) as engine:
        alone = [engine.generate_many([r])[0] for r in first + second]
        started = threading.Event()
        hook = model.get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: started.set() if inputs[0].shape[1] == 1 else None)
        try:
            futures = [engine.submit(r) for r in first]
            started.wait(30)  # the first wave decodes
            futures += [engine.submit(r) for r in second]
            together = [f.result(60) for f in futures]
        finally:
            hook.remove()
    for mine, theirs in zip(together, alone):
        assert mine.token_ids == theirs.token_ids
        assert mine.logprobs == pytest.approx(theirs.logprobs, abs=LOGPROB_ATOL)
    assert [len(r.token_ids) for r in together] == [r.max_new_tokens for r in first + second]


def test_rows_that_finish_between_running_rows_leave_and_the_rest_sample_what_they_sample_alone(model):
    """Every other row finishes early, so the batch is compacted to rows that are not neighbours (its KV
    cache copied as several runs of rows), and a second wave joins the gapped batch: each request samples
    what it samples alone."""
    first = [request(seed, length=4 + seed % 3, max_new_tokens=3 if seed % 2 else 30) for seed in range(8)]
    second = [request(seed, length=9 - seed % 4, max_new_tokens=6) for seed in range(8, 12)]
    with HFEngine(model, HFEngineConfig(max_batch_size=16)) as engine:
        alone = [engine.generate_many([r])[0] for r in first + second]
        compacted = threading.Event()
        original = engine._kept

        def kept(keep):
            if len(keep) > 1 and any(b != a + 1 for a, b in zip(keep, keep[1:])):
                compacted.set()  # rows kept with gaps between them
            return original(keep)

        engine._kept = kept
        futures = [engine.submit(r) for r in first]
        assert compacted.wait(30), "the batch was never compacted around finished rows: the test proved nothing"
        futures += [engine.submit(r) for r in second]
        together = [f.result(60) for f in futures]
    for mine, theirs in zip(together, alone):
        assert mine.token_ids == theirs.token_ids
        assert mine.logprobs == pytest.approx(theirs.logprobs, abs=LOGPROB_ATOL)
    assert [len(r.token_ids) for r in together] == [r.max_new_tokens for r in first + second]


def test_requests_join_free_slots_of_the_running_batch_and_sample_what_they_sample_alone(model):
    """A row that finished leaves a free slot in the batch's KV slab, and the slab keeps spare rows: a
    request whose prompt fits within the batch's columns joins there, only its own keys and values
    copied (no slab rebuilt), and samples what it samples alone."""
    first = [request(seed, length=12, max_new_tokens=200) for seed in range(4)] + [request(4, 12, max_new_tokens=3)]
    hole = [request(5, length=5, max_new_tokens=8)]
    spare = [request(seed, length=6, max_new_tokens=8) for seed in range(6, 9)]
    with HFEngine(model, HFEngineConfig(max_batch_size=16)) as engine:
        alone = [engine.generate_many([r])[0] for r in first + hole + spare]
        placed, original = [], engine._place

        def place(rows, *args):
            before = len(engine._rows)
            joined = original(rows, *args)
            placed.append((len(rows), joined, before, len(engine._rows)))
            return joined

        engine._place = place
        futures = [engine.submit(r) for r in first]
        futures[4].result(60)  # the short row finished: one of five, its slot free (no compaction below a quarter)
        futures += [engine.submit(r) for r in hole]
        futures[5].result(60)
        futures += [engine.submit(r) for r in spare]
        together = [f.result(60) for f in futures]
    assert (1, True, 5, 5) in placed, f"the request did not take the finished row's slot: {placed}"
    # three more: one into the slot the request above left when it finished, two into spare rows
    assert (3, True, 5, 7) in placed, f"the requests did not join the free slot and the spare rows: {placed}"
    for mine, theirs in zip(together, alone):
        assert mine.token_ids == theirs.token_ids
        assert mine.logprobs == pytest.approx(theirs.logprobs, abs=LOGPROB_ATOL)
