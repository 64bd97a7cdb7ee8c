"""Policies on transformers models: a causal LM and a VLM (image-text-to-text) that sees tool images.

Both implement :class:`~rl.policy.TrainablePolicy`. Generation is a plain KV-cached decoding loop
over a left-padded batch with inverse-CDF sampling: each row draws its uniforms for the whole turn
from its own generator seeded by :meth:`~rl.policy.Conversation.turn_seed`, so a sample does not
depend on which other conversations share the batch (the serial and Ray backends give the same samples). Scoring
recomputes log-probs of a :class:`~rl.policy.TokenBatch` with position ids taken from the attention
mask, so left padding does not shift positions.

Conversations are written with a :class:`ChatFormat`: each observation becomes one environment
segment (closing the previous turn and opening the next policy turn); the policy writes its turn and
an end token; its ids go back into the conversation unchanged.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from rl import core
from rl.policy import ENV, POLICY, Conversation, Scores, Segment, TokenBatch

PLAIN_SPECIAL_TOKENS = ("<|pad|>", "<|system|>", "<|env|>", "<|agent|>", "<|end|>", "<|image|>")


@dataclass(frozen=True)
class ChatFormat:
    """How conversations are written as text around each segment.

    Attributes:
        first: template of an episode's first environment segment; ``{system}`` and ``{text}``.
        first_no_system: the same when the policy has no system prompt.
        env: template of every later environment segment (it follows the policy's end token).
        stop: the token that ends a policy turn.
        image: the placeholder token an image stands for (VLM policies).
    """

    first: str
    first_no_system: str
    env: str
    stop: str
    image: str = "<|image|>"

    @classmethod
    def named(cls, name: str) -> "ChatFormat":
        """``"plain"`` (the tokens of :func:`rl.tokenizer.train_tokenizer`) or ``"chatml"`` (Qwen)."""
        if name == "plain":
            return cls(first="<|system|>{system}<|end|><|env|>{text}<|end|><|agent|>",
                       first_no_system="<|env|>{text}<|end|><|agent|>",
                       env="<|env|>{text}<|end|><|agent|>", stop="<|end|>")
        if name == "chatml":
            return cls(first="<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n"
                             "<|im_start|>assistant\n",
                       first_no_system="<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
                       env="\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", stop="<|im_end|>",
                       image="<|image_pad|>")
        raise ValueError(f"chat format {name!r} must be 'plain' or 'chatml'.")

    def render(self, text: str, first: bool, system: str | None) -> str:
        """The text of one environment segment."""
        if not first:
            return self.env.format(text=text)
        if system:
            return self.first.format(system=system, text=text)
        return self.first_no_system.format(text=text)


def tiny_causal_lm(vocab_size: int, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                   intermediate_size: int = 352, max_positions: int = 2048, seed: int = 0):
    """A randomly initialised Llama with tied embeddings (hidden 128 x 2 layers: about 0.5M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         intermediate_size=intermediate_size, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_vlm(vocab_size: int, image_token_id: int, hidden_size: int = 64, num_layers: int = 2,
             image_size: int = 32, patch_size: int = 8, seed: int = 0):
    """A randomly initialised Llava: a 1-layer CLIP vision tower on a tiny Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=4, intermediate_size=2 * hidden_size,
                       tie_word_embeddings=True, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


class CausalLMPolicy:
    """A transformers causal LM as a trainable policy.

    The model is kept in eval mode (no dropout), so the log-probs the trainer recomputes are the ones
    the sampler drew with; gradients flow all the same.

    Args:
        model: a ``*ForCausalLM`` model (any architecture that takes ``position_ids``).
        tokenizer: its fast tokenizer; must know the chat format's tokens.
        chat: the :class:`ChatFormat` (or its name).
        max_new_tokens: most tokens in one policy turn; a turn cut there has no end token.
        temperature: sampling temperature; 0 samples greedily (log-probs then at temperature 1).
        system_prompt: text of the system segment that opens each episode, or None.
    """

    def __init__(self, model, tokenizer, chat: ChatFormat | str = "plain", max_new_tokens: int = 64,
                 temperature: float = 1.0, system_prompt: str | None = None):
        self.model = model.eval()  # dropout off for good: sampled and recomputed log-probs must agree
        self.tokenizer = tokenizer
        self.chat = ChatFormat.named(chat) if isinstance(chat, str) else chat
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.system_prompt = system_prompt
        self.stop_id = self._token_id(self.chat.stop)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_id

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", **options: Any) -> "CausalLMPolicy":
        """Load a model and its tokenizer saved with :meth:`save` (or any hub-format folder)."""
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        return cls(model, PreTrainedTokenizerFast.from_pretrained(path), **options)

    def save(self, path: str) -> None:
        """Save the model (LoRA adapters merged in, so the folder loads as a plain model) and tokenizer."""
        os.makedirs(path, exist_ok=True)
        model = self.model
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def _token_id(self, token: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([token])
        if ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no token {token!r}, which the chat format needs: train it "
                             "with rl.tokenizer.train_tokenizer or pick the chat format of the model family.")
        return ids[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters (only the adapters when LoRA is on)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def encode(self, observation: dict[str, Any], first: bool) -> Segment:
        text = self.chat.render(observation["text"], first, self.system_prompt)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return Segment(ENV, text, ids, observation=observation)

    def _model_inputs(self, batch: TokenBatch) -> dict[str, Any]:
        """Extra model inputs of a batch (the VLM's pixel values)."""
        return {}

    def _restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits with the tokens a policy may never write removed (sampling and scoring alike)."""
        return logits

    def generate(self, conversations: Sequence[Conversation]) -> list[Segment]:
        prompts = [conv.token_ids for conv in conversations]
        batch = TokenBatch.from_segments([[Segment(ENV, "", ids)] for ids in prompts], self.pad_id)
        if any(s.images is not None for conv in conversations for s in conv.segments):
            batch.pixel_values = np.concatenate([s.images for conv in conversations for s in conv.segments
                                                 if s.images is not None])
        rows, device = len(conversations), self.device
        uniforms = torch.stack([torch.rand(self.max_new_tokens, generator=torch.Generator().manual_seed(c.turn_seed()))
                                for c in conversations]).to(device)
        sampled = torch.full((rows, self.max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(rows, self.max_new_tokens, device=device)
        lengths = torch.full((rows,), self.max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        mask = batch.attention_mask.to(device)
        positions = batch.position_ids.to(device)
        with torch.inference_mode():
            out = self.model(input_ids=batch.input_ids.to(device), attention_mask=mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **self._model_inputs(batch))
            for step in range(self.max_new_tokens):
                tokens, token_logprobs = self._sample(self._restrict(out.logits[:, -1].float()), uniforms[:, step])
                sampled[:, step] = torch.where(done, self.pad_id, tokens)
                logprobs[:, step] = torch.where(done, 0.0, token_logprobs)
                stopped = ~done & (tokens == self.stop_id)
                lengths[stopped] = step + 1
                done |= stopped
                if bool(done.all()) or step + 1 == self.max_new_tokens:
                    break
                mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=device)], 1)
                positions = positions[:, -1:] + 1
                out = self.model(input_ids=sampled[:, step:step + 1], attention_mask=mask,
                                 position_ids=positions, cache=out.cache, use_cache=True)
        sampled, logprobs, lengths = sampled.cpu(), logprobs.cpu(), lengths.tolist()
        turns = []
        for row in range(rows):
            ids = sampled[row, : lengths[row]].tolist()
            text_ids = ids[:-1] if ids and ids[-1] == self.stop_id else ids
            text = self.tokenizer.decode(text_ids, skip_special_tokens=False)
            turns.append(Segment(POLICY, text, ids, logprobs[row, : lengths[row]].tolist()))
        return turns

    def _sample(self, logits: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row (inverse CDF at the row's own uniform) and its log-prob."""
        temperature = self.temperature or 1.0
        logp = torch.log_softmax(logits / temperature, dim=-1)
        if self.temperature == 0:
            tokens = logp.argmax(-1)
        else:
            cdf = logp.exp().cumsum(-1)  # first token whose cdf exceeds u: never one of probability 0
            tokens = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], side="right").squeeze(-1)
            tokens = tokens.clamp(max=logits.shape[-1] - 1)  # float rounding of u * cdf[-1] at the top
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)

    def score(self, batch: TokenBatch, with_hidden: bool = False) -> Scores:
        """Log-probs and entropies at the trained tokens (``batch.loss_mask``; 0 elsewhere).

        Logits are computed only at the positions that predict a trained token of some row.
        """
        device = self.device
        ids = batch.input_ids.to(device)
        mask = batch.attention_mask.to(device)
        predictors = batch.loss_mask[:, 1:].bool().any(0).nonzero().flatten().to(device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=batch.position_ids.to(device),
                         output_hidden_states=with_hidden, logits_to_keep=predictors, **self._model_inputs(batch))
        temperature = self.temperature or 1.0
        logits = self._restrict(out.logits)
        targets = predictors + 1
        trained = batch.loss_mask.to(device)[:, targets] * mask[:, predictors]
        logprobs = torch.zeros(ids.shape, device=device)
        entropy = torch.zeros(ids.shape, device=device)
        logprobs[:, targets] = core.token_logprobs(logits, ids[:, targets], temperature) * trained
        entropy[:, targets] = core.entropy(logits, temperature) * trained
        return Scores(logprobs, entropy, out.hidden_states[-1] if with_hidden else None)

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().clone() for name, p in self.model.named_parameters() if p.requires_grad}

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        unknown = sorted(set(weights) - set(params))
        if unknown:
            raise ValueError(f"set_weights got {len(unknown)} unknown parameter(s), e.g. {unknown[0]!r}: "
                             "the weights come from a policy of another architecture.")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)


class VisionLMPolicy(CausalLMPolicy):
    """A Llava-style image-text-to-text model that sees the tool outputs as images.

    Observations with a ``"pixels"`` array (VisGen with ``observe_pixels=True``) get the newest
    ``images_per_turn`` non-blank images as placeholder tokens (``image_tokens`` each) in front of their
    text; the images travel with the segment, so scoring sees exactly what sampling saw.

    Args:
        model: a ``LlavaForConditionalGeneration`` (fixed number of tokens per image).
        tokenizer: its fast tokenizer; must know the chat format's image token.
        images_per_turn: most images shown per observation.
        **options: as :class:`CausalLMPolicy`.
    """

    def __init__(self, model, tokenizer, images_per_turn: int = 1, **options: Any):
        super().__init__(model, tokenizer, **options)
        vision = model.config.vision_config
        self.image_size = vision.image_size
        self.image_tokens = (vision.image_size // vision.patch_size) ** 2
        self.image_id = self._token_id(self.chat.image)
        if self.image_id != model.config.image_token_index:
            raise ValueError(f"The chat format's image token {self.chat.image!r} has id {self.image_id}, but the "
                             f"model expects image_token_index {model.config.image_token_index}.")
        self.images_per_turn = images_per_turn

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", **options: Any) -> "VisionLMPolicy":
        from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
        return cls(model, PreTrainedTokenizerFast.from_pretrained(path), **options)

    def encode(self, observation: dict[str, Any], first: bool) -> Segment:
        pixels = observation.get("pixels")
        images = None
        if pixels is not None:
            shown = [image for image in pixels if image.any()][: self.images_per_turn]
            images = np.stack(shown) if shown else None
        count = 0 if images is None else len(images)
        text = self.chat.render(self.chat.image * (self.image_tokens * count) + observation["text"], first,
                                self.system_prompt)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return Segment(ENV, text, ids, images=images, observation=observation)

    def _restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """The image placeholder is the environment's to write: never sampled, never scored."""
        return logits.index_fill(-1, torch.tensor([self.image_id], device=logits.device), float("-inf"))

    def _model_inputs(self, batch: TokenBatch) -> dict[str, Any]:
        if batch.pixel_values is None:
            return {}
        images = torch.from_numpy(batch.pixel_values).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        images = torch.nn.functional.interpolate(images, size=(self.image_size, self.image_size),
                                                 mode="bilinear", align_corners=False)
        return {"pixel_values": images.to(self.device)}


class AdapterOffReference:
    """A LoRA policy's base model (adapters switched off) as the KL reference, without a weight copy."""

    def __init__(self, policy: CausalLMPolicy):
        self.policy = policy

    def score(self, batch: TokenBatch, with_hidden: bool = False) -> Scores:
        with self.policy.model.disable_adapter():
            return self.policy.score(batch, with_hidden)


def reference_policy(policy: CausalLMPolicy) -> CausalLMPolicy | AdapterOffReference:
    """The frozen KL reference: the policy as it is now (the PST policy when RL starts)."""
    if hasattr(policy.model, "disable_adapter"):
        return AdapterOffReference(policy)
    reference = copy.copy(policy)
    reference.model = copy.deepcopy(policy.model).eval()
    reference.model.requires_grad_(False)
    return reference


def add_lora(policy: CausalLMPolicy, rank: int, alpha: float, target_modules: Sequence[str]) -> CausalLMPolicy:
    """Wrap the policy's model with LoRA adapters (peft); only the adapters stay trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA needs the package 'peft', which is not installed. Install it with: "
                          "pip install peft") from None
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules))
    policy.model = get_peft_model(policy.model, config).eval()  # no dropout, as for the base model
    return policy
