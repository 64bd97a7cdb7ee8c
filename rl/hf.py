"""Policies on transformers models: a causal LM and VLMs (image-text-to-text) that see tool images.

:class:`CausalLMPolicy` (text), :class:`VisionLMPolicy` (Llava-style: fixed tokens per image) and
:class:`QwenVLPolicy` (Qwen2-VL / Qwen2.5-VL / Qwen3-VL: dynamic resolution, multimodal RoPE) implement
:class:`~rl.policy.TrainablePolicy`. Generation is a plain KV-cached decoding loop
over a left-padded batch with inverse-CDF sampling: each row draws its uniforms for the whole turn
from its own generator seeded by :meth:`~rl.policy.Conversation.turn_seed`, so a sample does not
depend on which other conversations share the batch (the serial and Ray backends give the same samples). Scoring
recomputes log-probs of a :class:`~rl.policy.TokenBatch` with position ids taken from the attention
mask (for Qwen-VL, the model's 3-D RoPE index over the real tokens), so left padding does not shift
positions.

Conversations are written with a :class:`ChatFormat`: each observation becomes one environment
segment (closing the previous turn and opening the next policy turn); the policy writes its turn and
an end token; its ids go back into the conversation unchanged.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from rl import core
from rl.checkpoint import MARKER, incomplete, write_folder
from rl.errors import ConfigError, DependencyNotInstalled
from rl.policy import ENV, POLICY, Conversation, Scores, Segment, TokenBatch

PLAIN_SPECIAL_TOKENS = ("<|pad|>", "<|system|>", "<|env|>", "<|agent|>", "<|end|>", "<|image|>")
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                         "<|image_pad|>", "<|video_pad|>")
"""The special tokens of Qwen's chat format and vision markers (for tokenizers trained in code)."""


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
        raise ConfigError(f"chat format {name!r} must be 'plain' or 'chatml'.")

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


def tiny_qwen_vl(tokenizer, model_type: str = "qwen2_vl", hidden_size: int = 64, num_layers: int = 2,
                 patch_size: int = 4, max_pixels: int = 32 * 32, seed: int = 0):
    """A randomly initialised Qwen2-VL, Qwen2.5-VL or Qwen3-VL (1-block vision tower) and its image processor.

    Args:
        tokenizer: a tokenizer with the tokens of :data:`CHATML_SPECIAL_TOKENS` (the vision markers).
        model_type: "qwen2_vl", "qwen2_5_vl" or "qwen3_vl" (its vision block also feeds a deepstack
            merger into the first language layer; interleaved multimodal RoPE).
        hidden_size: width of the language model (4 heads, 2 key-value heads).
        num_layers: language model layers.
        patch_size: side of a vision patch; 2 x 2 patches merge into one image token.
        max_pixels: images larger than this many pixels are scaled down by the processor.
        seed: seeds the initialisation.

    Returns:
        ``(model, image_processor)``, built from code (no files).
    """
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    half_head = hidden_size // 4 // 2
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                bos_token_id=None, eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [half_head - 2 * (half_head // 3)] + [half_head // 3] * 2})
    vision = dict(depth=1, num_heads=2, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2)
    if model_type == "qwen2_vl":
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision.update(embed_dim=32, hidden_size=hidden_size, mlp_ratio=2)
    elif model_type == "qwen2_5_vl":
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision.update(hidden_size=32, out_hidden_size=hidden_size, intermediate_size=64,
                      window_size=4 * patch_size, fullatt_block_indexes=[0])
    elif model_type == "qwen3_vl":
        config_cls, model_cls = Qwen3VLConfig, Qwen3VLForConditionalGeneration
        text.update(head_dim=hidden_size // 4)
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(hidden_size=32, out_hidden_size=hidden_size, intermediate_size=64,
                      num_position_embeddings=64, deepstack_visual_indexes=[0])
    else:
        raise ConfigError(f"model_type ({model_type!r}) must be 'qwen2_vl', 'qwen2_5_vl' or 'qwen3_vl'.")
    config = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    torch.manual_seed(seed)
    processor = Qwen2VLImageProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                      min_pixels=(2 * patch_size) ** 2, max_pixels=max_pixels)
    return model_cls(config), processor


def shown_images(observation: dict[str, Any], limit: int) -> np.ndarray | None:
    """The images a VLM policy shows for an observation, or None when it has none.

    The rows of ``observation["pixels"]`` (newest first, as VisGen writes them) that
    ``observation["pixels_mask"]`` marks with 1, at most ``limit`` of them. An all-black image is
    shown like any other; padding rows never are. An observation without a mask holds images only.
    """
    pixels = observation.get("pixels")
    if pixels is None:
        return None
    mask = observation.get("pixels_mask")
    images = np.asarray(pixels) if mask is None else np.asarray(pixels)[np.asarray(mask).astype(bool)]
    return images[:limit] if len(images) and limit else None


def check_policy_folder(path: str) -> None:
    """Refuse a local model folder that a killed save left incomplete (hub ids are left to transformers).

    A folder written by :meth:`CausalLMPolicy.save` carries the marker :data:`rl.checkpoint.MARKER` and
    must match it; a folder without one (a model release as published) must hold a readable config.json.
    """
    if not os.path.isdir(path):
        return
    problem = None
    if os.path.exists(os.path.join(path, MARKER)):
        problem = incomplete(path)
    else:
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
                if not isinstance(json.load(handle), dict):
                    raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            problem = f"it has no completion marker {MARKER} and its config.json is unreadable ({exc})"
    if problem is not None:
        raise ConfigError(f"The policy folder {path!r} is incomplete: {problem}. Rerun the command that saved it "
                          "(rl sft; rl train resumes from its last complete checkpoint) or give a complete model folder.")


def read_model_type(model: str) -> str:
    """The ``model_type`` of a model folder's config.json (or a hub id's); an incomplete folder is refused."""
    from transformers import AutoConfig

    check_policy_folder(model)
    return AutoConfig.from_pretrained(model).model_type


def vision_policy_class(model: str) -> type:
    """The VLM policy class for a model folder (or hub id), chosen by its config's ``model_type``.

    ``llava`` -> :class:`VisionLMPolicy`; ``qwen2_vl``, ``qwen2_5_vl`` and ``qwen3_vl`` -> :class:`QwenVLPolicy`.
    """
    model_type = read_model_type(model)
    if model_type not in VISION_POLICIES:
        raise ConfigError(f"The model at {model!r} has model_type {model_type!r}; policy.kind 'vlm' supports "
                         f"{sorted(VISION_POLICIES)}. Use kind 'causal_lm' for a text-only model.")
    return VISION_POLICIES[model_type]


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

    images_per_turn: int | None = None
    """Most images shown per environment turn; None for a text policy, which refuses images."""

    shrink_at: float = 0.75
    """:meth:`generate` drops the finished rows from its batch (and their cache rows) once the running
    rows are at most this fraction of the batch; 0 never drops them (every row runs to the batch's
    longest turn), 1 drops them at every step. Each row samples with its own uniforms, so the tokens are
    the same either way up to float rounding (a smaller matrix can round differently and, rarely, move a
    token whose probability mass sits at its uniform); what changes is the cost of a batch whose turns
    differ in length (``benchmarks/generate_savings.py``)."""

    reuse_prefixes: bool = True
    """:meth:`generate` keeps each row's keys and values (its prompt and sampled tokens) until the next
    call, where a conversation that goes on (the same object, its prompt extending them, the weights
    unchanged) prefills only its new tokens: a turn costs its observation, not the whole episode again.
    Kept: the rows of the last call only (about the memory the batch's cache took); text policies only
    (a subclass with its own model inputs, e.g. images, prefills whole). The same tokens up to float
    rounding, as ``shrink_at``. False prefills every prompt whole."""

    engine_served: ClassVar[bool] = True
    """Whether the async rollout loop serves this policy's turns with the in-process
    :class:`~rl.engine.hf.HFEngine` (continuous batching) instead of :meth:`generate`: text models do;
    the vision policies, whose prompts carry images, set it False."""

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
        self.env_only_ids: tuple[int, ...] = ()
        self._prefixes: tuple[tuple[int, ...], dict[int, tuple[list[int], list]]] = ((), {})
        """(weights version, {id(conversation): (fed token ids, per-layer (keys, values))}) of the last
        :meth:`generate`, see ``reuse_prefixes``."""

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", **options: Any) -> "CausalLMPolicy":
        """Load a model and its tokenizer saved with :meth:`save` (or any hub-format folder)."""
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        check_policy_folder(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        return cls(model, PreTrainedTokenizerFast.from_pretrained(path), **options)

    def save(self, path: str) -> None:
        """Save the model (LoRA adapters merged in, so the folder loads as a plain model) and tokenizer.

        The folder is written atomically with a completion marker (:func:`rl.checkpoint.write_folder`):
        a save killed at any moment leaves the previous folder or none, never a part of one.
        """
        write_folder(path, self._save_files)

    def _save_files(self, folder: str) -> None:
        """Write the model, the tokenizer (and a subclass's processor) into ``folder``."""
        model = self.model
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def _token_id(self, token: str, expected: int | None = None) -> int:
        """The id of a token the chat format needs; ``expected``: the id the model reserves for it."""
        ids = self.tokenizer.convert_tokens_to_ids([token])
        if ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise ConfigError(f"The tokenizer has no token {token!r}, which the chat format needs: train it "
                             "with rl.tokenizer.train_tokenizer or pick the chat format of the model family.")
        if expected is not None and ids[0] != expected:
            raise ConfigError(f"The chat format's token {token!r} has id {ids[0]}, but the model expects id "
                             f"{expected} for it: pick the chat format of the model family.")
        return ids[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        """The width of the last hidden state (``Scores.hidden``)."""
        return self.model.config.get_text_config().hidden_size

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters (only the adapters when LoRA is on)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def encode(self, observation: dict[str, Any], first: bool) -> Segment:
        return self.env_segment(observation["text"], first, self.system_prompt, self.shown(observation), observation)

    def shown(self, observation: dict[str, Any]) -> np.ndarray | None:
        """The images the policy shows for an observation (None: a text policy shows none)."""
        return None

    def image_placeholders(self, images: np.ndarray) -> str:
        """The text that stands for ``images`` in a prompt; a text policy has none and refuses them."""
        raise ConfigError(f"A text policy ({type(self.model).__name__}) cannot take {len(images)} image(s): use a "
                          "VLM (policy.kind / sft.kind 'vlm') or data without images.")

    def env_segment(self, text: str, first: bool, system: str | None, images: np.ndarray | None = None,
                    observation: dict[str, Any] | None = None) -> Segment:
        """An environment segment: ``text`` (after the placeholders of ``images``, uint8 ``(N, H, W, 3)``)
        in the chat format (``system`` opens the first segment), encoded once, with the images the
        placeholders stand for. Rollouts (:meth:`encode`) and SFT data (:func:`rl.sft.chat_segments`)
        both write their environment turns here, so SFT trains on the tokens RL samples after."""
        placeholders = "" if images is None else self.image_placeholders(images)
        text = self.chat.render(placeholders + text, first, system)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return Segment(ENV, text, ids, images=images, observation=observation)

    def _model_inputs(self, batch: TokenBatch) -> dict[str, Any]:
        """The model inputs of a batch besides its ids and mask, on the policy's device: position
        ids counted from the attention mask (and a VLM's images)."""
        return {"position_ids": batch.position_ids.to(self.device)}

    def _restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits with the tokens a policy may never write removed (sampling and scoring alike): a
        VLM's image placeholder (``env_only_ids``) is the environment's to write."""
        if not self.env_only_ids:
            return logits
        banned = torch.tensor(self.env_only_ids, device=logits.device)
        return logits.index_fill(-1, banned, float("-inf"))

    def _weights_version(self) -> tuple[int, ...]:
        """Changes whenever a parameter is written in place (an optimizer step, :meth:`set_weights`) or
        replaced by another tensor."""
        return tuple(x for p in self.model.parameters() for x in (p.data_ptr(), p._version))

    def _prefill(self, conversations: Sequence[Conversation], prompts: list[list[int]], reuse: bool):
        """The first forward pass of a turn: the model's output at each row's last prompt token, the attention
        mask and the position ids. With ``reuse``, a row whose prompt extends the tokens this policy fed for
        the same conversation in its last :meth:`generate` (same weights) prefills only the new tokens
        against the kept keys and values: the cache is each row's kept prefix right-aligned at one column,
        the new tokens follow, left-padded (the mask hides the gaps; positions continue each row's own)."""
        device = self.device
        kept = self._prefixes[1] if reuse else {}
        prefixes = []
        for conv, prompt in zip(conversations, prompts):
            entry = kept.get(id(conv))
            fits = entry is not None and len(entry[0]) < len(prompt) and prompt[: len(entry[0])] == entry[0]
            prefixes.append(entry if fits else None)
        if not any(prefixes):
            batch = TokenBatch.from_segments([[Segment(ENV, "", ids)] for ids in prompts], self.pad_id)
            if any(s.images is not None for conv in conversations for s in conv.segments):
                batch.pixel_values = np.concatenate([s.images for conv in conversations for s in conv.segments
                                                     if s.images is not None])
            mask = batch.attention_mask.to(device)
            inputs = self._model_inputs(batch)
            positions = inputs.pop("position_ids")
            out = self.model(input_ids=batch.input_ids.to(device), attention_mask=mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **inputs)
            return out, mask, positions
        from transformers import DynamicCache

        old = [len(entry[0]) if entry else 0 for entry in prefixes]
        new = [prompt[n:] for prompt, n in zip(prompts, old)]
        rows, width, span = len(prompts), max(old), max(len(ids) for ids in new)
        mask = torch.zeros(rows, width + span, dtype=torch.long, device=device)
        ids = torch.full((rows, span), self.pad_id, dtype=torch.long, device=device)
        positions = torch.zeros(rows, span, dtype=torch.long, device=device)
        like = next(entry for entry in prefixes if entry)[1]
        layers, like = len(like), like[0][0]  # keys of the first layer: (heads, length, head_dim)
        keys = [like.new_zeros(rows, like.shape[0], width, like.shape[2]) for _ in range(layers)]
        values = [like.new_zeros(rows, like.shape[0], width, like.shape[2]) for _ in range(layers)]
        for row, (entry, n, tail) in enumerate(zip(prefixes, old, new)):
            if entry:
                for layer, (k, v) in enumerate(entry[1]):
                    keys[layer][row, :, width - n:] = k
                    values[layer][row, :, width - n:] = v
                mask[row, width - n:width] = 1
            mask[row, width + span - len(tail):] = 1
            ids[row, span - len(tail):] = torch.tensor(tail, dtype=torch.long)
            positions[row, span - len(tail):] = torch.arange(n, n + len(tail))
        cache = DynamicCache()
        for layer in range(layers):
            cache.update(keys[layer], values[layer], layer)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out, mask, positions

    def generate(self, conversations: Sequence[Conversation]) -> list[Segment]:
        prompts = [conv.token_ids for conv in conversations]
        rows, device = len(conversations), self.device
        uniforms = torch.stack([torch.rand(self.max_new_tokens, generator=torch.Generator().manual_seed(c.turn_seed()))
                                for c in conversations]).to(device)
        sampled = torch.full((rows, self.max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(rows, self.max_new_tokens, device=device)
        lengths = torch.full((rows,), self.max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        live = torch.arange(rows, device=device)  # the rows still in the model's batch, in batch order
        keep_prefixes = (self.reuse_prefixes and type(self)._model_inputs is CausalLMPolicy._model_inputs
                         and not any(s.images is not None for c in conversations for s in c.segments))
        weights = self._weights_version()
        stored: dict[int, tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = {}

        def store(batch_rows: torch.Tensor, local: torch.Tensor, cache, mask: torch.Tensor) -> None:
            """Keep the keys and values of finished rows (global ``batch_rows``, cache rows ``local``): the
            prompt and every sampled token fed to the model, so the next turn prefills only what follows."""
            for row, at in zip(batch_rows.tolist(), local.tolist()):
                columns = mask[at].nonzero().squeeze(1)
                fed = prompts[row] + sampled[row, : int(lengths[row]) - 1].tolist()
                if len(columns) == len(fed):
                    stored[row] = (fed, [(layer.keys[at][:, columns], layer.values[at][:, columns])
                                         for layer in cache.layers])

        with torch.inference_mode():
            out, mask, positions = self._prefill(conversations, prompts, keep_prefixes and weights == self._prefixes[0])
            # both savings select cache rows and columns: full-attention layers only (no sliding window,
            # no recurrent state); another cache runs every row to the end and prefills every prompt whole
            from transformers.cache_utils import DynamicLayer

            plain = all(type(layer) is DynamicLayer for layer in getattr(out.cache, "layers", [None]))
            keep_prefixes, shrink_at = keep_prefixes and plain, self.shrink_at if plain else 0.0
            for step in range(self.max_new_tokens):
                tokens, token_logprobs = self._sample(self._restrict(out.logits[:, -1].float()),
                                                      uniforms[live, step])
                finished = done[live]
                sampled[live, step] = torch.where(finished, self.pad_id, tokens)
                logprobs[live, step] = torch.where(finished, 0.0, token_logprobs)
                stopped = live[~finished & (tokens == self.stop_id)]
                lengths[stopped] = step + 1
                done[stopped] = True
                if bool(done.all()) or step + 1 == self.max_new_tokens:
                    break
                running = ~done[live]
                if int(running.sum()) <= shrink_at * len(live):
                    # finished rows leave the batch (their cache rows too): a step costs about its row count
                    if keep_prefixes:
                        store(live[~running], (~running).nonzero().squeeze(1), out.cache, mask)
                    keep = running.nonzero().squeeze(1)
                    out.cache.batch_select_indices(keep)
                    live, mask, positions, running = live[keep], mask[keep], positions.index_select(-2, keep), running[keep]
                # a finished row's fed tokens are masked out: its cache holds exactly the tokens it sampled
                mask = torch.cat([mask, running[:, None].to(mask.dtype)], 1)
                positions = positions[..., -1:] + 1  # (B, 1), or (3, B, 1) for multimodal RoPE
                out = self.model(input_ids=sampled[live, step:step + 1], attention_mask=mask,
                                 position_ids=positions, cache=out.cache, use_cache=True)
            if keep_prefixes:
                store(live, torch.arange(len(live), device=device), out.cache, mask)
        self._prefixes = (weights, {id(conversations[row]): entry for row, entry in stored.items()})
        sampled, logprobs, lengths = sampled.cpu(), logprobs.cpu(), lengths.tolist()
        turns = []
        for row in range(rows):
            ids = sampled[row, : lengths[row]].tolist()
            text_ids = ids[:-1] if ids and ids[-1] == self.stop_id else ids
            text = self.tokenizer.decode(text_ids, skip_special_tokens=False)
            turns.append(Segment(POLICY, text, ids, logprobs[row, : lengths[row]].tolist()))
        return turns

    def engine_turn(self, conversation: Conversation, result: Any) -> Segment:
        """The policy segment of the turn an engine sampled for ``conversation`` (a
        :class:`~rl.engine.base.GenerationResult`), as :meth:`generate` writes it; a subclass may
        derive the turn otherwise (its token ids must stay the sampled ones)."""
        from rl.engine.hf import turn_segment

        return turn_segment(self, result)

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
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=with_hidden, use_cache=False,
                         logits_to_keep=predictors, **self._model_inputs(batch))
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

    Observations with a ``"pixels"`` array (VisGen with ``observe_pixels=True``) get their newest
    ``images_per_turn`` real images (the rows ``"pixels_mask"`` marks; see :func:`shown_images`) as
    placeholder tokens (``image_tokens`` each) in front of their text; the images travel with the
    segment, so scoring sees exactly what sampling saw.

    Args:
        model: a ``LlavaForConditionalGeneration`` (fixed number of tokens per image).
        tokenizer: its fast tokenizer; must know the chat format's image token.
        images_per_turn: most images shown per observation.
        **options: as :class:`CausalLMPolicy`.
    """

    engine_served = False  # prompts carry images: turns come from generate()

    def __init__(self, model, tokenizer, images_per_turn: int = 1, **options: Any):
        super().__init__(model, tokenizer, **options)
        vision = model.config.vision_config
        self.image_size = vision.image_size
        self.image_tokens = (vision.image_size // vision.patch_size) ** 2
        self.image_id = self._token_id(self.chat.image, expected=model.config.image_token_id)
        self.env_only_ids = (self.image_id,)
        self.images_per_turn = images_per_turn

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", **options: Any) -> "VisionLMPolicy":
        from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

        check_policy_folder(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
        return cls(model, PreTrainedTokenizerFast.from_pretrained(path), **options)

    def shown(self, observation: dict[str, Any]) -> np.ndarray | None:
        return shown_images(observation, self.images_per_turn)

    def image_placeholders(self, images: np.ndarray) -> str:
        return self.chat.image * (self.image_tokens * len(images))

    def _model_inputs(self, batch: TokenBatch) -> dict[str, Any]:
        inputs = super()._model_inputs(batch)
        if batch.pixel_values is None:
            return inputs
        images = torch.from_numpy(batch.pixel_values).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        images = torch.nn.functional.interpolate(images, size=(self.image_size, self.image_size),
                                                 mode="bilinear", align_corners=False)
        return inputs | {"pixel_values": images.to(self.device)}


class QwenVLPolicy(CausalLMPolicy):
    """A Qwen2-VL, Qwen2.5-VL or Qwen3-VL model (dynamic resolution) that sees the tool outputs as images.

    Each shown image (the newest ``images_per_turn`` real ones, see :func:`shown_images`) becomes
    ``<|vision_start|>``, one ``<|image_pad|>`` per merged patch (``t * h * w / merge_size**2`` of the
    grid the image processor resizes it to) and ``<|vision_end|>``, in front of the observation's
    text. The raw images travel with the segment and are processed again (deterministically) for each
    forward pass, so scoring sees exactly what sampling saw. Positions are the model's multimodal
    RoPE index (``get_rope_index``: 3-D positions on image tokens, 1-D on text) over each row's real
    tokens, so left padding does not shift them, and sampled tokens continue from the prompt's last
    position, as the recomputation over the whole episode gives them.

    The images of one batch must share a size (``TokenBatch.pixel_values`` is one array): VisGen's
    thumbnails all have ``pixel_size``.

    With ``chat="chatml"`` a conversation is what the model's own chat template writes for the same
    exchange: the UTPC ``<tool_call>`` JSON is Qwen's (Hermes) tool-call format, and the environment's
    ``<tool_response>`` sits in a user turn, as Qwen's template puts a ``tool`` message
    (tests/test_rl_policy.py checks it character for character).

    Args:
        model: a ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
            ``Qwen3VLForConditionalGeneration`` (whose deepstack features enter with the images).
        tokenizer: its fast tokenizer, with the vision start/end tokens and the chat format's image
            token (``chat="chatml"``: ``<|image_pad|>``).
        image_processor: the model's image processor (``Qwen2VLImageProcessor`` for all three
            families) whose patch, merge and temporal patch sizes are
            the vision tower's; its ``min_pixels``/``max_pixels`` bound the tokens per image.
        images_per_turn: most images shown per observation.
        **options: as :class:`CausalLMPolicy`.
    """

    engine_served = False  # prompts carry images: turns come from generate()

    def __init__(self, model, tokenizer, image_processor, images_per_turn: int = 1, **options: Any):
        super().__init__(model, tokenizer, **options)
        config, vision = model.config, model.config.vision_config
        for name, theirs in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                             ("temporal_patch_size", "temporal_patch_size")):
            if getattr(image_processor, name) != getattr(vision, theirs):
                raise ConfigError(f"The image processor's {name} ({getattr(image_processor, name)}) differs from the "
                                 f"vision tower's {theirs} ({getattr(vision, theirs)}): load the processor saved "
                                 "with the model.")
        self.image_processor = image_processor
        self.merge_size = vision.spatial_merge_size
        self.image_id = self._token_id(self.chat.image, expected=config.image_token_id)
        self.env_only_ids = (self.image_id,)
        self.vision_start, self.vision_end = tokenizer.convert_ids_to_tokens(
            [config.vision_start_token_id, config.vision_end_token_id])
        self.images_per_turn = images_per_turn
        self._rope_index = model.model.get_rope_index  # reads only the config; survives LoRA wrapping

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", **options: Any) -> "QwenVLPolicy":
        """Load the model, tokenizer and image processor of a folder (a Qwen-VL release or :meth:`save`)."""
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, PreTrainedTokenizerFast

        check_policy_folder(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
        return cls(model, PreTrainedTokenizerFast.from_pretrained(path), AutoImageProcessor.from_pretrained(path),
                   **options)

    def _save_files(self, folder: str) -> None:
        """The model (LoRA adapters merged in), the tokenizer and the image processor."""
        super()._save_files(folder)
        self.image_processor.save_pretrained(folder)

    def shown(self, observation: dict[str, Any]) -> np.ndarray | None:
        return shown_images(observation, self.images_per_turn)

    def image_placeholders(self, images: np.ndarray) -> str:
        counts = (self._process(images)["image_grid_thw"].prod(-1) // self.merge_size**2).tolist()
        return "".join(self.vision_start + self.chat.image * n + self.vision_end for n in counts)

    def _process(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        """``pixel_values`` (flattened patches) and ``image_grid_thw`` of ``(N, H, W, 3)`` uint8 images."""
        return self.image_processor(images=list(images), return_tensors="pt", input_data_format="channels_last")

    def _model_inputs(self, batch: TokenBatch) -> dict[str, Any]:
        if batch.pixel_values is None:  # text only: 1-D positions, which the model repeats on its 3 axes
            return super()._model_inputs(batch)
        processed = self._process(batch.pixel_values)
        grid = processed["image_grid_thw"]
        token_types = (batch.input_ids == self.image_id).int()
        positions, _ = self._rope_index(batch.input_ids, mm_token_type_ids=token_types, image_grid_thw=grid,
                                        attention_mask=batch.attention_mask)
        device = self.device
        return {"position_ids": positions.to(device), "pixel_values": processed["pixel_values"].to(device),
                "image_grid_thw": grid.to(device)}


VISION_POLICIES = {"llava": VisionLMPolicy, "qwen2_vl": QwenVLPolicy, "qwen2_5_vl": QwenVLPolicy,
                   "qwen3_vl": QwenVLPolicy}
"""The VLM policy class of each supported ``model_type``."""


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


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Transformers' gradient checkpointing on ``model`` for the passes that compute gradients (an RL
    update's), dropout still off.

    Transformers recomputes a checkpointed layer (a ``GradientCheckpointingLayer``: every decoder layer,
    a Qwen-VL's vision blocks) only when that layer is in training mode; the policy's model stays in eval
    mode (no dropout), so only those layers' own ``training`` flags are set, not their submodules' (the
    attention's dropout reads its own flag). Passes without gradients (sampling, old log-probs, the KL
    reference) run as before; with gradients each layer's forward runs again in the backward pass
    instead of keeping its activations: the same loss and gradients, less memory, about a third more
    compute. ``model.eval()`` clears the flags (call this again after it).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.activation_checkpointing_enable()
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True


def add_lora(policy: CausalLMPolicy, rank: int, alpha: float, target_modules: Sequence[str],
             dropout: float = 0.0) -> CausalLMPolicy:
    """Wrap the policy's model with LoRA adapters (peft); only the adapters stay trainable. ``dropout``
    acts only in train mode (SFT); rollouts and RL updates run in eval mode."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DependencyNotInstalled("peft", "rl", "LoRA (policy.lora)") from None
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
    policy.model = get_peft_model(policy.model, config).eval()  # no dropout, as for the base model
    return policy
