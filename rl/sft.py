"""Supervised fine-tuning and PST (progressive specialisation) on chat trajectories.

Data: JSONL files, one trajectory per line, ``{"messages": [{"role": ..., "content": ...}, ...]}``
with roles ``system`` (optional, first), ``user`` or ``tool`` (the environment's turns) and
``assistant`` (the policy's turns, the only tokens trained on). Each message is encoded as its own
segment exactly as a rollout would encode it (:meth:`~rl.hf.CausalLMPolicy.env_segment` for
environment turns; the assistant text plus the end token for policy turns), so SFT and RL see the same tokens.

A ``user`` or ``tool`` message may carry ``"images": [path, ...]`` (newest first, as VisGen's
``pixels``; relative paths are read from the JSONL file's folder): the tool outputs the teacher saw
(``rl data build --images`` writes them). A VLM policy shows the first ``images_per_turn`` of an
environment turn's images, as it would in a rollout; a text policy refuses them. The images of
one dataset must share a size (RL's VisGen thumbnails all have ``pixel_size``).

PST (PAPER.md section 4): stage after stage, each mixing ``general_count`` trajectories of a general
tool-use dataset with ``visual_weight`` (lambda) times the visual-creation dataset; later stages use
fewer general trajectories, so the visual data weighs more.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from rl.errors import ChatDataError, ConfigError
from rl.hf import CausalLMPolicy
from rl.policy import ENV, POLICY, Segment, TokenBatch

if TYPE_CHECKING:
    from rl.learner import Shard

ENV_ROLES = ("user", "tool")


def load_chat_jsonl(path: str) -> list[list[dict[str, str]]]:
    """The trajectories of a JSONL file; the error names the file, line and what is wrong."""
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ChatDataError(f"{path}:{number}: expected a JSON object with a 'messages' list ({exc}).") from None
            check_messages(messages, f"{path}:{number}")
            examples.append(_with_image_paths(messages, os.path.dirname(os.path.abspath(path)), f"{path}:{number}"))
    return examples


def _with_image_paths(messages: list[dict[str, Any]], folder: str, where: str) -> list[dict[str, Any]]:
    """The messages with relative image paths made absolute (from ``folder``); every image must exist."""
    for i, message in enumerate(messages):
        if "images" in message:
            message["images"] = [os.path.join(folder, image) for image in message["images"]]
            missing = [image for image in message["images"] if not os.path.isfile(image)]
            if missing:
                raise ChatDataError(f"{where}: message {i} names {len(missing)} image file(s) that do not exist, "
                                    f"e.g. {missing[0]!r}; keep the images folder next to the JSONL file.")
    return messages


def load_images(paths: Sequence[str]) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` RGB pixels of image files of one size (as VisGen's ``pixels``)."""
    from PIL import Image

    pictures = []
    for path in paths:
        with Image.open(path) as image:
            pictures.append(np.asarray(image.convert("RGB")))
    sizes = {picture.shape for picture in pictures}
    if len(sizes) > 1:
        raise ChatDataError(f"The images {list(paths)} have different sizes {sorted(sizes)}: the images of one dataset "
                            "must share a size (rl data build --images writes the env's pixel_size); resize them.")
    return np.stack(pictures)


def check_messages(messages: Any, where: str) -> None:
    """Raise ChatDataError unless ``messages`` is a trajectory this module can train on."""
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: 'messages' must be a non-empty list.")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "assistant", *ENV_ROLES) or not isinstance(message.get("content"), str):
            raise ChatDataError(f"{where}: message {i} must have a role in system/user/tool/assistant and a "
                             f"string content; got {message!r:.80}.")
        if role == "system" and i:
            raise ChatDataError(f"{where}: a system message may only come first (message {i}).")
        images = message.get("images")
        if images is not None and (role not in ENV_ROLES or not isinstance(images, list) or not images
                                   or not all(isinstance(image, str) and image for image in images)):
            raise ChatDataError(f"{where}: message {i} ({role}) has 'images' {images!r:.80}: only user and tool "
                                "messages may carry images, as a non-empty list of image file paths.")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatDataError(f"{where}: the trajectory has no assistant message to learn from.")


def chat_segments(policy: CausalLMPolicy, messages: Sequence[dict[str, Any]]) -> list[Segment]:
    """A trajectory as segments: environment messages merged per turn (their texts joined by newlines,
    the first ``images_per_turn`` of their images shown); assistant text + end token."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else policy.system_prompt
    segments: list[Segment] = []
    pending: list[str] = []
    paths: list[str] = []
    for message in messages:
        if message["role"] in ENV_ROLES:
            pending.append(message["content"])
            paths += message.get("images", [])
        elif message["role"] == "assistant":
            if pending:
                shown = paths[:policy.images_per_turn]
                images = load_images(shown) if shown else None
                segments.append(policy.env_segment("\n".join(pending), not segments, system, images))
                pending, paths = [], []
            ids = policy.tokenizer.encode(message["content"], add_special_tokens=False) + [policy.stop_id]
            segments.append(Segment(POLICY, message["content"], ids))
    return segments


def mix(general: Sequence[Any], visual: Sequence[Any], general_count: int, visual_weight: float,
        rng: random.Random) -> list[Any]:
    """One PST stage's data: ``general_count`` general examples + ``visual_weight`` x the visual set.

    ``general_count`` are drawn without replacement (all of them when it exceeds the set). The visual
    set is repeated ``floor(visual_weight)`` times, plus a random ``frac(visual_weight)`` share of it.
    The result is shuffled.
    """
    if general_count < 0 or visual_weight < 0:
        raise ConfigError(f"general_count ({general_count}) and visual_weight ({visual_weight}) must be >= 0.")
    mixed = rng.sample(list(general), min(general_count, len(general)))
    whole = math.floor(visual_weight)
    mixed += list(visual) * whole
    mixed += rng.sample(list(visual), round((visual_weight - whole) * len(visual)))
    rng.shuffle(mixed)
    return mixed


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), batches in random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class SFTStage:
    """One SFT stage.

    Attributes:
        visual: JSONL path of the visual-creation trajectories (D_vis).
        general: JSONL path of the general tool-use trajectories (D_gen), or None.
        general_count: general trajectories in this stage (the paper: 500K, then 200K).
        visual_weight: lambda, copies of D_vis in this stage.
        epochs: passes over the stage's mixture (an upper bound when a budget below ends the stage first).
        batch_size: trajectories per optimizer step.
        learning_rate: AdamW learning rate.
        max_steps: the stage stops after this many optimizer steps, or null for no step budget.
        max_seconds: the stage stops after the step during which this much wall time (data encoding
            included) was spent, or null for no time budget.
    """

    visual: str
    general: str | None = None
    general_count: int = 0
    visual_weight: float = 1.0
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 1e-3
    max_steps: int | None = None
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.general is None and self.general_count:
            raise ConfigError(f"general_count ({self.general_count}) needs a general dataset path: set general.")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be at least 1.")
        if self.visual_weight <= 0 and not self.general_count:
            raise ConfigError("The stage is empty: set visual_weight > 0 or general_count > 0.")
        if ((self.max_steps is not None and self.max_steps < 1)
                or (self.max_seconds is not None and self.max_seconds <= 0)):
            raise ConfigError(f"max_steps ({self.max_steps}) must be null or >= 1 and max_seconds ({self.max_seconds}) "
                              "null or > 0.")

    def examples(self, rng: random.Random) -> list[list[dict[str, str]]]:
        general = load_chat_jsonl(self.general) if self.general else []
        return mix(general, load_chat_jsonl(self.visual), self.general_count, self.visual_weight, rng)


def train_sft(policy: CausalLMPolicy, examples: Sequence[Sequence[dict[str, str]]], epochs: int,
              batch_size: int, learning_rate: float, seed: int,
              on_step: Callable[[int, dict[str, float]], None] | None = None, max_steps: int | None = None,
              max_seconds: float | None = None, shard: Shard | None = None) -> dict[str, float]:
    """Minimise the mean negative log-likelihood of the assistant tokens, in length-bucketed batches.

    The model trains in train mode (its dropout, if any, and gradient checkpointing act) and is left in
    eval mode, as rollouts need it. Training ends after ``epochs`` passes, or earlier when a budget is spent: ``max_steps`` optimizer
    steps, or ``max_seconds`` of wall time since the call (checked after each step, so the step running
    when it runs out finishes). A step budget does the same work on any machine; a time budget does not.

    With ``shard`` (a process of a data-parallel learner group, :class:`rl.learner.Shard`) every process
    encodes all examples and forms the same batches, runs its share of each batch, normalises by the
    whole batch's token count and sums gradients over the group: the same step as one process takes.
    The time budget is rank 0's clock, so every process stops after the same step.

    Returns:
        ``loss`` (the last epoch's mean), ``steps``, ``tokens_per_second``, ``seconds`` (wall time of the call).
    """
    began = time.perf_counter()
    encoded = [chat_segments(policy, messages) for messages in examples]
    sizes = {s.images.shape[1:] for segments in encoded for s in segments if s.images is not None}
    if len(sizes) > 1:
        raise ChatDataError(f"The SFT images have {len(sizes)} sizes {sorted(sizes)}: the images of one dataset must "
                            "share a size (rl data build --images writes the env's pixel_size); resize them.")
    lengths = [sum(len(s.token_ids) for s in segments) for segments in encoded]
    policy.model.train()  # the model's (and adapters') dropout and gradient checkpointing act; eval again at the end
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=learning_rate, weight_decay=0.0)
    step, tokens, start, spent = 0, 0, time.perf_counter(), False
    for _ in range(epochs):
        if spent:
            break
        losses = []
        for index in length_batches(lengths, batch_size, rng):
            # this rank's rows in one pass (none: no pass; with FSDP a pass of weight 0, see Shard.passes)
            passes = [(index, 1.0)] if shard is None else shard.passes(lambda s: [s.part(index)] if s.part(index) else [])
            count = sum(len(s.token_ids) for i in index for s in encoded[i] if s.role == POLICY)
            optimizer.zero_grad(set_to_none=True)
            sums = {"sft_loss": 0.0, "tokens": 0.0}
            for mine, weight in passes:
                batch = TokenBatch.from_segments([encoded[i] for i in mine], policy.pad_id)
                mask = batch.loss_mask.to(policy.device)
                loss = -weight * (policy.score(batch).logprobs * mask).sum() / max(count, 1)
                loss.backward()
                sums = {"sft_loss": loss.item(), "tokens": weight * float(batch.attention_mask.sum())}
            late = max_seconds is not None and time.perf_counter() - began >= max_seconds
            sums["late"] = float(late and (shard is None or shard.rank == 0))
            if shard is not None:
                shard.sum_gradients(policy.parameters(), sums)
            optimizer.step()
            step += 1
            tokens += int(sums["tokens"])
            losses.append(sums["sft_loss"])
            if on_step is not None:
                on_step(step, {"sft_loss": losses[-1]})
            spent = step == max_steps or sums["late"] > 0
            if spent:
                break
    policy.model.eval()
    return {"loss": sum(losses) / len(losses), "steps": float(step),
            "tokens_per_second": tokens / (time.perf_counter() - start), "seconds": time.perf_counter() - began}


def run_pst(policy: CausalLMPolicy, stages: Sequence[SFTStage], seed: int,
            on_step: Callable[[int, dict[str, float]], None] | None = None,
            shard: Shard | None = None) -> list[dict[str, float]]:
    """Run the PST stages in order on ``policy``; one metrics dict per stage (``shard``: see :func:`train_sft`)."""
    rng = random.Random(seed)
    results = []
    for number, stage in enumerate(stages):
        examples = stage.examples(rng)
        results.append(train_sft(policy, examples, stage.epochs, stage.batch_size, stage.learning_rate,
                                 seed + number, on_step, stage.max_steps, stage.max_seconds, shard))
    return results
