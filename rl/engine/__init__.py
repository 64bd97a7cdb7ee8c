"""Inference engines behind one small protocol (:class:`~rl.engine.base.InferenceEngine`).

Token ids in; sampled token ids and their log-probs out; weight updates in. Three engines:

* :class:`rl.engine.hf.HFEngine`: the in-process transformers engine (continuous batching, KV
  cache kept per conversation between turns);
* :class:`rl.engine.remote.RemoteEngine`: an OpenAI-compatible vLLM or SGLang server;
* :class:`rl.engine.vllm.VLLMEngine`: vLLM's ``AsyncLLM`` in-process on a GPU (extra ``vllm``).
"""

from rl.engine.base import FINISH_REASONS, GenerationRequest, GenerationResult, InferenceEngine

__all__ = ["FINISH_REASONS", "GenerationRequest", "GenerationResult", "InferenceEngine"]
