"""The Policy protocol, the token-level trajectory types, and adapters for the scripted baselines.

A conversation is a list of :class:`Segment`: environment turns (observations, encoded by the
policy's :meth:`Policy.encode`) and policy turns (the exact token ids the policy sampled, with their
log-probs). Training reads these ids back unchanged: the policy's text is never re-tokenised, so the
tokens trained on are the tokens sampled, turn after turn (:class:`TokenBatch`).

Two protocols, so that any policy can act and trainable ones can learn:

* :class:`Policy` (``encode`` + ``generate``) is all the rollout loop needs: the transformers
  policies (:mod:`rl.hf`), the OpenAI-compatible endpoint (:mod:`rl.api`) and :class:`AgentPolicy`
  (the scripted and random baselines) implement it.
* :class:`TrainablePolicy` adds ``score`` (log-probs of given tokens, with gradients) and
  ``get_weights`` / ``set_weights`` (weight sync to rollout workers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from rl import core

ENV, POLICY = "env", "policy"


@dataclass
class Segment:
    """One turn of a conversation, as the tokens the model saw or produced.

    Attributes:
        role: ``"env"`` (an observation; never trained on) or ``"policy"`` (sampled by the policy).
        text: the turn's text (for a policy turn, what the environment received).
        token_ids: the exact token ids: the encoded observation (with its chat markup) or the
            sampled ids (with the end-of-turn token when one was sampled). Empty for text-only policies.
        logprobs: for a policy turn, the sampler's log-prob of each id in ``token_ids``.
        images: for an environment turn of a VLM policy, the ``(N, H, W, 3)`` uint8 images that the
            turn's image placeholder tokens stand for.
        observation: the observation an environment turn encodes (for agents and trajectory files).
        error: for a policy turn, why no turn could be produced (an API endpoint that kept failing),
            or None. The episode runner ends that episode as a failed one (``Episode.error``), as
            when the environment raises; the other episodes go on.
    """

    role: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    images: np.ndarray | None = None
    observation: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class Conversation:
    """An episode's conversation so far.

    Attributes:
        seed: the episode's sampling seed; turn ``t`` samples with :meth:`turn_seed`, so a sample
            depends only on this seed, the turn, the weights and the tokens so far (not on batching).
        segments: the turns so far, environment and policy alternating.
        state: per-episode state a policy may keep (e.g. a scripted agent instance).
    """

    seed: int
    segments: list[Segment] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def token_ids(self) -> list[int]:
        """All token ids so far, in order: the prompt of the next turn."""
        return [t for s in self.segments for t in s.token_ids]

    @property
    def turn(self) -> int:
        """How many policy turns the conversation holds."""
        return sum(s.role == POLICY for s in self.segments)

    def turn_seed(self) -> int:
        """The sampling seed of the next policy turn."""
        return (self.seed * 1_000_003 + self.turn) % 2**63


@runtime_checkable
class Policy(Protocol):
    """What the rollout loop needs from a policy: encode observations, generate turns."""

    def encode(self, observation: dict[str, Any], first: bool) -> Segment:
        """The environment segment for ``observation`` (``first``: the episode's first observation)."""
        ...

    def generate(self, conversations: Sequence[Conversation]) -> list[Segment]:
        """One policy turn for each conversation (whose last segment is an environment turn)."""
        ...


@runtime_checkable
class TrainablePolicy(Policy, Protocol):
    """A policy the trainers can update, checkpoint and ship to rollout workers: everything
    :class:`~rl.grpo.GRPO`, :class:`~rl.ppo.PPO`, :class:`~rl.train.Trainer` and the rollout backends
    read (:class:`~rl.hf.CausalLMPolicy` and its VLM subclasses implement it).

    Attributes:
        pad_id: the token id that pads :class:`TokenBatch` rows.
        device: where :meth:`score` computes (batches are moved there).
        hidden_size: the width of ``Scores.hidden`` (what a value head reads).
    """

    pad_id: int

    @property
    def device(self) -> torch.device: ...

    @property
    def hidden_size(self) -> int: ...

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters (what the optimizer updates)."""
        ...

    def score(self, batch: "TokenBatch", with_hidden: bool = False) -> "Scores":
        """Log-probs (with gradients) of the tokens ``batch.loss_mask`` marks, under the current weights."""
        ...

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The trainable state as CPU tensors (what :meth:`set_weights` takes)."""
        ...

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load weights produced by :meth:`get_weights` of a policy of the same architecture."""
        ...

    def save(self, path: str) -> None:
        """Write the policy to a folder its ``from_pretrained`` reads (checkpoints and the trained policy)."""
        ...


@dataclass
class Scores:
    """What :meth:`TrainablePolicy.score` returns, aligned with ``TokenBatch.input_ids`` (B, L).

    Attributes:
        logprobs: ``log p(input_ids[:, t] | input_ids[:, :t])`` where ``loss_mask`` is set, else 0.
        entropy: the entropy of the distribution that predicted position ``t``; 0 likewise.
        hidden: the last hidden state at each position ``(B, L, H)`` when asked for (value heads).
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    hidden: torch.Tensor | None = None


@dataclass
class TokenBatch:
    """Episodes as one left-padded batch of token ids, the form every trainer learns from.

    Attributes:
        input_ids: ``(B, L)`` all token ids of each episode, padded on the left.
        attention_mask: ``(B, L)`` 1 on real tokens.
        loss_mask: ``(B, L)`` 1 on tokens the policy sampled, 0 on environment tokens and padding.
        sampled_logprobs: ``(B, L)`` the sampler's log-prob of each sampled token (0 elsewhere).
        turn_index: ``(B, L)`` index of the policy turn a sampled token belongs to, -1 elsewhere.
        pixel_values: ``(N, H, W, 3)`` uint8 images of the whole batch, in the order their
            placeholder tokens appear (row by row), or None for text-only episodes.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    sampled_logprobs: torch.Tensor
    turn_index: torch.Tensor
    pixel_values: np.ndarray | None = None

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted from each row's first real token (left padding gets position 0)."""
        return (self.attention_mask.long().cumsum(1) - 1).clamp(min=0)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def from_segments(cls, episodes: Sequence[Sequence[Segment]], pad_id: int) -> "TokenBatch":
        """Concatenate each episode's segments, exactly as sampled, and pad on the left."""
        rows = []
        for segments in episodes:
            ids, mask, logp, turn, t = [], [], [], [], 0
            for seg in segments:
                n = len(seg.token_ids)
                ids += seg.token_ids
                is_policy = seg.role == POLICY
                mask += [float(is_policy)] * n
                logp += list(seg.logprobs) if is_policy and seg.logprobs is not None else [0.0] * n
                turn += [t] * n if is_policy else [-1] * n
                t += is_policy
            rows.append((ids, mask, logp, turn))
        length = max(len(r[0]) for r in rows)
        pad = [length - len(r[0]) for r in rows]
        images = [seg.images for segments in episodes for seg in segments if seg.images is not None]
        return cls(
            input_ids=torch.tensor([[pad_id] * p + r[0] for p, r in zip(pad, rows)], dtype=torch.long),
            attention_mask=torch.tensor([[0] * p + [1] * len(r[0]) for p, r in zip(pad, rows)], dtype=torch.long),
            loss_mask=torch.tensor([[0.0] * p + r[1] for p, r in zip(pad, rows)]),
            sampled_logprobs=torch.tensor([[0.0] * p + r[2] for p, r in zip(pad, rows)]),
            turn_index=torch.tensor([[-1] * p + r[3] for p, r in zip(pad, rows)], dtype=torch.long),
            pixel_values=np.concatenate(images) if images else None,
        )


class ChunkedBatches:
    """Episodes as length-sorted :class:`TokenBatch` chunks, for learners that run forward/backward
    passes chunk by chunk (each chunk padded only to its own longest row) and accumulate gradients.

    Args:
        episodes: each episode's segments, exactly as sampled.
        pad_id: the padding token id.
        max_tokens: most padded tokens (rows x longest row) in one chunk; 0 puts all rows in one.

    Attributes:
        lengths: each episode's token count (the real tokens of its row in any chunk, right-aligned).
    """

    def __init__(self, episodes: Sequence[Sequence[Segment]], pad_id: int, max_tokens: int):
        self.episodes = episodes
        self.pad_id = pad_id
        self.max_tokens = max_tokens
        self.lengths = [sum(len(s.token_ids) for s in segments) for segments in episodes]
        self._batches: dict[tuple[int, ...], TokenBatch] = {}

    def chunks(self, rows: Sequence[int]) -> list[tuple[int, ...]]:
        """The rows (episode indices) split into chunks of similar length; each chunk's batch is
        built once and then served by ``self[chunk]``. The same rows, in any order, give the same chunks
        (ties in length go by row index), so a learner that chunks them again reuses the batches."""
        rows = sorted(rows)
        found = []
        for chunk in core.length_chunks([self.lengths[i] for i in rows], self.max_tokens):
            key = tuple(rows[j] for j in chunk)
            if key not in self._batches:
                self._batches[key] = TokenBatch.from_segments([self.episodes[i] for i in key], self.pad_id)
            found.append(key)
        return found

    def __getitem__(self, chunk: tuple[int, ...]) -> TokenBatch:
        """The batch of a chunk that :meth:`chunks` returned."""
        return self._batches[chunk]


class AgentPolicy:
    """Runs a baseline agent (``reset(observation, seed)`` / ``act(observation) -> str``) as a Policy.

    Each conversation gets its own agent from ``make_agent``, reset with the episode's first
    observation and its sampling seed (``Conversation.seed``); the same rollout loop
    (:func:`rl.rollout.run_episodes`) then plays scripted, random and learned policies alike, for
    training, evaluation and the report. This is the one adapter between agents and policies. Its
    turns carry text only (no token ids).

    Args:
        make_agent: a picklable zero-argument callable returning a fresh agent (e.g. the class).
    """

    def __init__(self, make_agent: Callable[[], Any]):
        self.make_agent = make_agent

    def encode(self, observation: dict[str, Any], first: bool) -> Segment:
        return Segment(ENV, observation["text"], observation=observation)

    def generate(self, conversations: Sequence[Conversation]) -> list[Segment]:
        turns = []
        for conv in conversations:
            observation = conv.segments[-1].observation
            if "agent" not in conv.state:
                conv.state["agent"] = self.make_agent()
                conv.state["agent"].reset(observation, seed=conv.seed)
            turns.append(Segment(POLICY, conv.state["agent"].act(observation)))
        return turns
