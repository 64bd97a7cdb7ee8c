"""Run configurations: small self-validating dataclasses, YAML files, and command-line overrides.

A run is one :class:`TrainConfig` (``rl train``), :class:`SFTConfig` (``rl sft``) or
:class:`EvalConfig` (``rl record``). Each section is a dataclass whose docstring documents every field;
``__post_init__`` rejects a bad value with a message naming it and the fix. YAML files mirror the
nesting (``grpo: {group_size: 8}``); on the command line every field is an option
``--section.field VALUE`` whose help is the field's docstring, and ``--set FIELD=VALUE`` sets any
field by its dotted name (values are read as YAML: ``true``, ``3e-4``, ``[a, b]``).

:func:`from_dict` (and so :func:`load` and :func:`apply_overrides`, which any nested dataclass config
can use) checks every value's kind against the type hints before ``__post_init__`` checks its range;
each error is a :class:`~visenv.error.ConfigError` naming the field by its dotted path, the value
and the fix.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import inspect
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import yaml

from visenv.error import ConfigError, VisenvError
from visenv.yamlio import load_yaml

from rl.errors import ModelLoadError
from rl.grpo import GRPOConfig
from rl.ppo import PPOConfig
from rl.rollout import check_chunk_timeout
from rl.sft import SFTStage


@dataclass
class EnvConfig:
    """The environment.

    Attributes:
        id: a gymnasium id of a visenv environment, e.g. "visenv/VisGen-v0" or "visenv/ToolEcho-v0".
        options: keyword options of the environment (e.g. max_turns, observe_pixels).
    """

    id: str = "visenv/ToolEcho-v0"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import gymnasium

        import visenv  # noqa: F401  (registers the ids)

        if self.id not in gymnasium.envs.registry:
            raise ConfigError(f"env.id ({self.id!r}) is not a registered environment; "
                             f"use one of {list(visenv.ENV_IDS)}.")
        try:  # the environment checks its own options (cheap: no episode runs)
            self.make().close()
        except ConfigError as exc:
            raise ConfigError(f"env.options ({self.options!r}): {exc}") from None

    def make(self):
        """A new environment (picklable: Ray workers call it)."""
        import gymnasium

        import visenv  # noqa: F401

        return gymnasium.make(self.id, **self.options)

    def tool_prompt(self) -> str:
        """The environment's documentation of its tools (``env.unwrapped.system_prompt``)."""
        env = self.make()
        try:
            prompt = getattr(env.unwrapped, "system_prompt", None)
        finally:
            env.close()
        if not prompt:
            raise ConfigError(f"policy.system_prompt 'tools' needs an environment that documents its tools; "
                              f"{self.id!r} has no system_prompt. Give the prompt's text or null.")
        return prompt


@dataclass
class LoraConfig:
    """LoRA adapters (needs peft).

    Attributes:
        rank: adapter rank r.
        alpha: LoRA alpha (scale alpha / r).
        target_modules: names of the linear layers that get adapters (the language model's attention
            projections by default; a Qwen-VL vision tower's are named "qkv" and "proj").
        dropout: dropout on the adapters' input during SFT (which trains in train mode); RL samples
            and scores in eval mode, without dropout.
    """

    rank: int = 16
    alpha: float = 32.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1 or not self.target_modules:
            raise ConfigError(f"lora.rank ({self.rank}) must be >= 1 and lora.target_modules non-empty.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout ({self.dropout}) must be in [0, 1), e.g. 0.05.")

    def apply(self, policy):
        """Wrap ``policy``'s model with these adapters (:func:`rl.hf.add_lora`); only they stay trainable."""
        from rl.hf import add_lora

        return add_lora(policy, self.rank, self.alpha, self.target_modules, self.dropout)


@dataclass
class PolicyConfig:
    """The policy.

    Attributes:
        model: folder (or hub id) of the model and its tokenizer, e.g. the "policy" folder that
            ``rl sft`` writes.
        kind: "causal_lm" (text) or "vlm" (image-text-to-text; sees tool images). The VLM policy
            follows the model's model_type: "llava" (fixed tokens per image), "qwen2_vl",
            "qwen2_5_vl" or "qwen3_vl" (dynamic resolution; needs chat "chatml").
        chat: chat format: "plain" (tokenizers trained by rl) or "chatml" (Qwen and similar).
        system_prompt: text of the system segment that opens each episode, "tools" for the
            environment's documentation of its tools (what a policy needs to call them), or null.
            A pretrained chat model (chat "chatml" or kind "vlm") learns of the tools only here:
            ``rl train`` and ``rl record`` refuse null for it ("" runs it without one on purpose).
        max_new_tokens: most tokens in one policy turn.
        temperature: sampling temperature (0: greedy).
        dtype: "float32", "bfloat16" or "float16".
        device: "cpu", "cuda", or "auto" (cuda when available).
        images_per_turn: (vlm) most images shown per observation.
        lora: LoRA adapters, or null to train all weights.
    """

    model: str = ""
    kind: str = "causal_lm"
    chat: str = "plain"
    system_prompt: str | None = None
    max_new_tokens: int = 128
    temperature: float = 1.0
    dtype: str = "float32"
    device: str = "auto"
    images_per_turn: int = 1
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        choices = {"kind": ("causal_lm", "vlm"), "chat": ("plain", "chatml"),
                   "dtype": ("float32", "bfloat16", "float16"), "device": ("cpu", "cuda", "auto")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"policy.{name} ({getattr(self, name)!r}) must be one of {allowed}.")
        if self.max_new_tokens < 1 or self.temperature < 0:
            raise ConfigError(f"policy.max_new_tokens ({self.max_new_tokens}) must be >= 1 and "
                             f"policy.temperature ({self.temperature}) >= 0.")

    @classmethod
    def for_folder(cls, model: str, **options: Any) -> "PolicyConfig":
        """The config of a saved policy folder: kind from its model_type, chat from its tokenizer
        (Qwen's ``<|im_start|>`` -> "chatml"), and, for a pretrained chat model (chatml or VLM),
        ``system_prompt: tools``: the tool documentation reaches it as it reaches the presets' models."""
        from transformers import PreTrainedTokenizerFast

        from rl.hf import VISION_POLICIES, read_model_type

        kind = "vlm" if read_model_type(model) in VISION_POLICIES else "causal_lm"
        chatml = "<|im_start|>" in PreTrainedTokenizerFast.from_pretrained(model).get_vocab()
        config = cls(model=model, kind=kind, chat="chatml" if chatml else "plain", **options)
        return config if config.system_prompt is not None or not config.needs_tools else \
            dataclasses.replace(config, system_prompt="tools")

    @property
    def needs_tools(self) -> bool:
        """Whether the policy is a pretrained chat model (chat "chatml" or kind "vlm"), which learns of
        the tools only from its system prompt (a tiny "plain" model learns them from the SFT data)."""
        return self.chat == "chatml" or self.kind == "vlm"

    def check_sees_tools(self) -> None:
        """Refuse a pretrained chat model (:attr:`needs_tools`) without a system prompt."""
        if self.needs_tools and self.system_prompt is None:
            raise ConfigError(f"policy.system_prompt is null for a {self.kind!r} policy with chat {self.chat!r}: the "
                              "model would never see the tools. Set it to 'tools' (the environment's tool "
                              "documentation), to a text, or to \"\" to run without a system prompt on purpose.")

    def for_env(self, env: EnvConfig) -> "PolicyConfig":
        """This config, with ``system_prompt: tools`` replaced by ``env``'s tool documentation."""
        if self.system_prompt != "tools":
            return self
        return dataclasses.replace(self, system_prompt=env.tool_prompt())

    def build(self):
        """Load the policy (picklable: Ray workers call it); resolve ``system_prompt: tools`` first (:meth:`for_env`)."""
        import torch
        from safetensors import SafetensorError

        from rl.hf import CausalLMPolicy, vision_policy_class

        if not self.model:
            raise ConfigError("policy.model is empty: give the folder of a model (e.g. the policy folder "
                             "written by `rl sft`) or a hub id.")
        if self.system_prompt == "tools":
            raise ConfigError("policy.system_prompt 'tools' is resolved from the environment: build the policy "
                              "through a run config (rl train / rl record) or call PolicyConfig.for_env(env) first.")
        options = dict(chat=self.chat, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                       system_prompt=self.system_prompt)
        try:
            if self.kind == "vlm":
                policy = vision_policy_class(self.model).from_pretrained(
                    self.model, self.dtype, images_per_turn=self.images_per_turn, **options)
            else:
                policy = CausalLMPolicy.from_pretrained(self.model, self.dtype, **options)
        except VisenvError:
            raise
        except (OSError, ValueError, SafetensorError) as exc:  # transformers' ways of saying "cannot read it"
            found = "is a folder that cannot be read" if os.path.isdir(self.model) else "is not a folder"
            raise ModelLoadError(
                f"policy.model ({self.model!r}) {found} ({str(exc).splitlines()[0]}). Expected a model folder "
                "with config.json, weights and tokenizer (the policy folder written by `rl sft`, a checkpoint's "
                "policy/ folder) or a hub id in the local cache: fix the path, or re-save a damaged folder.") from None
        if self.lora is not None:
            self.lora.apply(policy)
        device = "cuda" if self.device == "auto" and torch.cuda.is_available() else self.device
        policy.model.to("cpu" if device == "auto" else device)
        return policy


@dataclass
class RolloutConfig:
    """Where and how episodes run.

    Attributes:
        backend: "serial" (this process, the debugging twin) or "ray" (rollout worker actors).
        num_envs: environments per process: the batch size of each generate call (per worker on Ray).
        num_workers: (ray) rollout worker actors.
        placement: (ray) "colocate" keeps a GRPO group on one worker; "spread" splits it.
        worker_num_cpus: (ray) CPUs each worker reserves (fractions allowed).
        worker_num_gpus: (ray) GPUs each worker reserves (fractions allowed; 0 without GPUs).
        torch_threads: (ray) torch threads per worker.
        max_restarts: (ray) worker deaths tolerated per iteration before the run stops.
        chunk_timeout_s: (ray) seconds a worker may take over one chunk of ``num_envs`` episodes
            before it counts as hung (an env step, tool or judge that never returns): it is killed and
            replaced and the chunk re-run, as for a dead worker (a death toward ``max_restarts``). Null
            waits forever. Size it well above a slow chunk: a chunk cut short is played again from its
            start.
        step_timeout_s: (async, either backend) seconds one env reset or step, or one deferred
            end-of-episode score, may run; past it the episode fails (its error starts with
            ``StepTimeout``; the trainers leave failed episodes out), the call is left to its thread and its
            environment is replaced by a fresh one. The serial backend's answer to a hung tool or judge
            (the Ray backend also has chunk_timeout_s). Null waits forever; size it well above the slowest
            real tool call or judge.
        max_staleness: (ray) iterations the workers' weights may lag the learner's (0: on-policy;
            more saves weight transfers and makes GRPO use the sampler's log-probs).
        ray_address: (ray) null starts a local Ray; "auto" or "host:port" joins a cluster.
        mode: "sync" (one batched generate, then the env steps in turn) or "async" (env steps, tool
            calls and judges on threads while generation goes on; the same episodes), in every backend.
        max_concurrent_judges: (async) end-of-episode scores (rubric and judges) running at once per
            process, on a pool that frees each finished episode's env at once; 0 scores inside the
            env's last step.
        overlap: roll out the next iteration while the update runs: iteration it samples with the weights
            after update it-2 (staleness exactly 1 after the first iteration); needs grpo.off_policy: true
            and max_staleness 0; the serial backend then samples with its own copy of the policy. In
            async mode both backends stream: the next iteration starts generating while the last
            episodes of the current one are scored (rl.rollout.EpisodeStream, on each Ray worker),
            with the same episodes.
    """

    backend: str = "serial"
    num_envs: int = 64
    num_workers: int = 2
    placement: str = "colocate"
    worker_num_cpus: float = 1.0
    worker_num_gpus: float = 0.0
    torch_threads: int = 1
    max_restarts: int = 3
    chunk_timeout_s: float | None = None
    step_timeout_s: float | None = None
    max_staleness: int = 0
    ray_address: str | None = None
    mode: str = "sync"
    max_concurrent_judges: int = 16
    overlap: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"rollout.mode ({self.mode!r}) must be 'sync' or 'async'.")
        if self.backend not in ("serial", "ray"):
            raise ConfigError(f"rollout.backend ({self.backend!r}) must be 'serial' or 'ray'.")
        if self.placement not in ("colocate", "spread"):
            raise ConfigError(f"rollout.placement ({self.placement!r}) must be 'colocate' or 'spread'.")
        if self.num_envs < 1 or self.num_workers < 1 or self.torch_threads < 1:
            raise ConfigError(f"rollout.num_envs ({self.num_envs}), num_workers ({self.num_workers}) and "
                             f"torch_threads ({self.torch_threads}) must be at least 1.")
        if isinstance(self.max_concurrent_judges, bool) or not isinstance(self.max_concurrent_judges, int) \
                or self.max_concurrent_judges < 0:
            raise ConfigError(f"rollout.max_concurrent_judges ({self.max_concurrent_judges!r}) must be an int >= 0 "
                              "(0 scores each episode inside its env's last step).")
        check_chunk_timeout(self.chunk_timeout_s, "rollout.chunk_timeout_s")
        if self.chunk_timeout_s is not None and self.backend != "ray":
            raise ConfigError(f"rollout.chunk_timeout_s ({self.chunk_timeout_s!r}) needs backend 'ray' (a hung worker "
                              "process is killed and replaced; the serial backend has none). Set it to null.")
        check_chunk_timeout(self.step_timeout_s, "rollout.step_timeout_s")
        if self.step_timeout_s is not None and self.mode != "async":
            raise ConfigError(f"rollout.step_timeout_s ({self.step_timeout_s!r}) needs rollout.mode 'async' (env calls "
                              "on threads, which a call past its time can be left to). Set mode: async or the "
                              "timeout to null.")
        if self.max_staleness < 0:
            raise ConfigError(f"rollout.max_staleness ({self.max_staleness}) must be >= 0.")
        if self.max_staleness and self.backend == "serial":
            raise ConfigError(f"rollout.max_staleness ({self.max_staleness}) needs backend 'ray': the serial "
                             "backend always samples with the learner's latest weights. Set it to 0.")
        if self.overlap and self.max_staleness:
            raise ConfigError(f"rollout.max_staleness ({self.max_staleness}) must be 0 with rollout.overlap: true "
                              "(overlap already samples with the weights one update behind). Set one of them off.")

    def check_local_cpus(self) -> None:
        """Before a local Ray starts (no ray_address, Ray not running): the workers fit this machine's CPUs."""
        import ray

        cpus, needed = os.cpu_count() or 1, self.num_workers * self.worker_num_cpus
        if self.ray_address is None and not ray.is_initialized() and needed > cpus:
            raise ConfigError(f"rollout.num_workers ({self.num_workers}) x rollout.worker_num_cpus "
                              f"({self.worker_num_cpus}) needs {needed:g} CPUs; this machine has {cpus}. Lower "
                              "num_workers or worker_num_cpus (fractions allowed), or join a cluster with ray_address.")

    def build(self, policy, make_policy: Callable[[], Any], make_env: Callable[[], Any], finish: Any = None):
        """The rollout backend; Ray is started (or joined) here when needed.

        ``finish`` is the runner's end-of-episode hook (:func:`rl.rollout.run_episodes`), e.g. an
        evaluation's :class:`rl.evaluate.Recorder`. With ``overlap`` the serial backend samples with a copy
        of ``policy`` (the update changes the learner's while the next iteration is sampled).
        """
        from rl.rollout import RayRollout, SerialRollout

        if self.backend == "serial":
            return SerialRollout(copy.deepcopy(policy) if self.overlap else policy, make_env, self.num_envs, finish,
                                 self.mode, self.max_concurrent_judges, self.step_timeout_s)
        self.check_local_cpus()
        start_ray(self.ray_address)
        return RayRollout(make_policy, make_env, self.num_workers, self.num_envs, self.placement,
                          self.worker_num_cpus, self.worker_num_gpus, self.torch_threads, self.max_restarts, finish,
                          self.mode, self.max_concurrent_judges, self.chunk_timeout_s, self.step_timeout_s)


def start_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True) -> bool:
    """Start a local Ray (``address`` None) or join a cluster, unless Ray is already up; True if this call did.

    A local Ray's workers import visenv, rl and baselines from the same checkout as this process (its
    root goes first on their PYTHONPATH); a cluster's workers keep their own environment. Whoever gets
    True shuts Ray down when done.
    """
    import os

    import ray

    if ray.is_initialized():
        return False
    runtime_env = None
    if address is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join(dict.fromkeys([root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
        runtime_env = {"env_vars": {"PYTHONPATH": path}}
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
             runtime_env=runtime_env)
    return True


@dataclass
class LearnerConfig:
    """The learner: this process, or a data-parallel group of Ray actors (:mod:`rl.learner`, docs/scaling.md).

    Attributes:
        num_workers: learner processes; 1 trains in this process (no Ray), more start that many Ray
            actors, each holding a replica of the policy that trains on its share of every minibatch
            (gradients summed over a torch.distributed group): the same update as one process.
        num_cpus: (num_workers > 1) CPUs each learner actor reserves (fractions allowed).
        num_gpus: (num_workers > 1) GPUs each learner actor reserves: 0 on CPU, 1 with backend "nccl".
        backend: the torch.distributed backend: "gloo" (CPU) or "nccl" (one GPU per worker).
        torch_threads: (num_workers > 1) torch threads per learner actor.
        strategy: (num_workers > 1) "ddp" (every actor holds a whole replica and optimizer) or "fsdp"
            (FSDP2: every actor holds 1/num_workers of the weights, gradients and optimizer state, for
            models that do not fit one device; the same update).
        gradient_checkpointing: recompute activations in the backward passes of the RL updates (GRPO,
            PPO; transformers' gradient checkpointing of every decoder layer, dropout still off): the
            same update with activation memory of about one layer instead of all, for about a third
            more update compute. Sampling is unaffected; SFT has its own (sft.gradient_checkpointing).
        mixed_precision: (strategy "fsdp") "bfloat16": the learner actors keep float32 master weights,
            gradients and AdamW state (their shards) and run every forward/backward pass in bfloat16
            (FSDP2's MixedPrecisionPolicy; gradients reduce-scattered in float32), for full fine-tuning
            with a small learning rate; the driver's copy, the rollout workers and the saved policy
            folders keep policy.dtype (e.g. bfloat16) and checkpoints also hold the float32 masters (an
            exact resume). null: the learner trains in policy.dtype.
    """

    num_workers: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    backend: str = "gloo"
    torch_threads: int = 1
    strategy: str = "ddp"
    gradient_checkpointing: bool = False
    mixed_precision: str | None = None

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.torch_threads < 1:
            raise ConfigError(f"learner.num_workers ({self.num_workers}) and learner.torch_threads "
                             f"({self.torch_threads}) must be at least 1.")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError(f"learner.num_cpus ({self.num_cpus}) and learner.num_gpus ({self.num_gpus}) must be >= 0.")
        if self.backend not in ("gloo", "nccl"):
            raise ConfigError(f"learner.backend ({self.backend!r}) must be 'gloo' (CPU) or 'nccl' (GPUs).")
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"learner.strategy ({self.strategy!r}) must be 'ddp' (a replica per worker) or 'fsdp' "
                              "(the model sharded over the workers).")
        if self.mixed_precision not in (None, "bfloat16"):
            raise ConfigError(f"learner.mixed_precision ({self.mixed_precision!r}) must be null or 'bfloat16'.")
        if self.mixed_precision and (self.strategy != "fsdp" or self.num_workers < 2):
            raise ConfigError(f"learner.mixed_precision 'bfloat16' (float32 master weights, bfloat16 passes) is "
                              f"FSDP2's: it needs learner.strategy 'fsdp' and num_workers >= 2, got strategy "
                              f"{self.strategy!r} with num_workers {self.num_workers}. Use strategy fsdp, or "
                              "mixed_precision null and policy.dtype bfloat16 to train in bfloat16.")
        if self.backend == "nccl" and self.num_gpus != 1:
            raise ConfigError(f"learner.backend 'nccl' needs learner.num_gpus 1 (one GPU per worker), got "
                             f"{self.num_gpus}; use backend 'gloo' on CPU.")

    def start(self, policy, make_policy: Callable[[], Any], ray_address: str | None = None, other_cpus: float = 0.0):
        """The :class:`rl.learner.LearnerGroup` of ``num_workers`` actors, starting from ``policy``'s weights.

        Ray is started (or joined at ``ray_address``) when it is not running; on a local Ray the learner
        actors and ``other_cpus`` (e.g. the rollout workers') must fit this machine's CPUs.
        """
        import ray

        from rl.learner import LearnerGroup

        needed, cpus = self.num_workers * self.num_cpus + other_cpus, os.cpu_count() or 1
        if ray_address is None and not ray.is_initialized() and needed > cpus:
            raise ConfigError(f"learner.num_workers ({self.num_workers}) x learner.num_cpus ({self.num_cpus}) and "
                              f"{other_cpus:g} CPUs of rollout workers need {needed:g} CPUs; this machine has {cpus}. "
                              "Lower num_workers or num_cpus (fractions allowed), or join a cluster.")
        start_ray(ray_address)
        return LearnerGroup(policy, make_policy, self.num_workers, self.num_cpus, self.num_gpus, self.backend,
                            self.torch_threads, self.strategy, self.gradient_checkpointing, self.mixed_precision)


@dataclass
class TinyModelConfig:
    """A Llama built from scratch, with a BPE tokenizer trained on the SFT data.

    Attributes:
        vocab_size: tokenizer vocabulary size (special tokens and 256 bytes included).
        hidden_size: model width.
        num_layers: transformer layers.
        num_heads: attention heads.
        intermediate_size: MLP width.
        id_pairs: the tokenizer splits an artifact id's 12 hex digits into six two-digit tokens, every
            pair in the vocabulary (:func:`rl.tokenizer.train_tokenizer`; up to 256 tokens more).
    """

    vocab_size: int = 1000
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 352
    id_pairs: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"tiny.hidden_size ({self.hidden_size}) must be divisible by tiny.num_heads "
                             f"({self.num_heads}).")
        if not isinstance(self.id_pairs, bool):
            raise ConfigError(f"tiny.id_pairs ({self.id_pairs!r}) must be true or false.")


@dataclass
class SFTConfig:
    """Supervised fine-tuning in PST stages (``rl sft``, or before RL in ``rl train``).

    Attributes:
        model: "tiny" (train a tokenizer on the data and build a small Llama) or a model folder/hub id.
        tiny: the tiny model's size (used when model is "tiny").
        kind: "causal_lm" (text), "vlm" (image-text-to-text: trains on the images of the data's user
            and tool messages; the class follows the model's model_type, as policy.kind "vlm"), or
            "auto" (from the model folder's config.json; "tiny" is a text model).
        chat: chat format ("plain" for tiny models, "chatml" for Qwen).
        images_per_turn: (vlm) most images shown per environment turn, the first ones of its messages
            (set it as the RL policy's).
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32" or "bfloat16".
        device: "auto" (cuda when available), "cpu" or "cuda".
        gradient_checkpointing: recompute activations in the backward pass (transformers' gradient
            checkpointing): less memory, about a third more compute.
        lora: LoRA adapters to train instead of all weights, or null; the output folder then holds
            "adapter" (peft) and "policy" (adapters merged: RL starts from it).
        stages: the PST stages, in order.
        seed: seeds data mixing, batching and the tiny model's initialisation.
        output_dir: where the fine-tuned policy folder ("policy") and metrics go.
        learner: the learner processes (``rl sft``; within ``rl train`` the top-level learner applies).
    """

    model: str = "tiny"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    kind: str = "auto"
    chat: str = "plain"
    images_per_turn: int = 1
    dtype: str = "auto"
    device: str = "auto"
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    stages: list[SFTStage] = field(default_factory=list)
    seed: int = 0
    output_dir: str = "runs/sft"
    learner: LearnerConfig = field(default_factory=LearnerConfig)

    def __post_init__(self) -> None:
        choices = {"kind": ("auto", "causal_lm", "vlm"), "chat": ("plain", "chatml"),
                   "dtype": ("auto", "float32", "bfloat16"), "device": ("auto", "cpu", "cuda")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"sft.{name} ({getattr(self, name)!r}) must be one of {allowed}.")
        if not self.stages:
            raise ConfigError("sft.stages is empty: give at least one stage with a 'visual' JSONL path.")
        if self.model == "tiny" and self.kind == "vlm":
            raise ConfigError("sft.kind 'vlm' needs a VLM folder in sft.model; 'tiny' builds a text model. Give the "
                              "folder of a Llava or Qwen-VL model, or kind 'auto'.")
        if self.learner.gradient_checkpointing:
            raise ConfigError("sft.learner.gradient_checkpointing is for the RL updates; SFT has its own: set "
                              "sft.gradient_checkpointing: true (rl sft: gradient_checkpointing: true).")
        if self.images_per_turn < 1:
            raise ConfigError(f"sft.images_per_turn ({self.images_per_turn}) must be at least 1.")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("sft.device is 'cuda' but torch sees no CUDA device: use 'auto' or 'cpu'.")

    @property
    def torch_device(self) -> str:
        """The device SFT runs on ("auto" resolved)."""
        import torch

        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device

    @property
    def torch_dtype(self) -> str:
        """The dtype the model trains in ("auto" resolved: bfloat16 on CUDA, float32 on CPU)."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.torch_device == "cuda" else "float32"

    def policy_config(self, system_prompt: str | None = None) -> PolicyConfig:
        """The policy to fine-tune (sft.model a folder or hub id), as :class:`PolicyConfig` loads it."""
        from rl.hf import VISION_POLICIES, read_model_type

        kind = self.kind
        if kind == "auto":
            kind = "vlm" if read_model_type(self.model) in VISION_POLICIES else "causal_lm"
        return PolicyConfig(model=self.model, kind=kind, chat=self.chat, system_prompt=system_prompt,
                            dtype=self.torch_dtype, device=self.torch_device, images_per_turn=self.images_per_turn,
                            lora=self.lora)


@dataclass
class TrainConfig:
    """An RL run (``rl train``): optional PST, then GRPO or PPO.

    Attributes:
        algorithm: "grpo" or "ppo".
        env: the environment.
        policy: the policy to train (its model is replaced by the SFT result when sft is set).
        rollout: rollout backend and layout.
        learner: the learner processes (of the SFT warm start too).
        grpo: GRPO hyperparameters (algorithm "grpo").
        ppo: PPO hyperparameters (algorithm "ppo").
        sft: PST stages to run first, or null.
        iterations: RL iterations.
        seed: seeds tasks and sampling of every iteration.
        output_dir: checkpoints ("checkpoints/iter_*"), metrics.jsonl and TensorBoard files.
        checkpoint_every: save every this many iterations (and at the end); 0 only at the end.
        resume: continue from the newest checkpoint in output_dir when there is one.
        tensorboard: write TensorBoard scalars.
        wandb_project: also log to this W&B project, or null.
        progress: show a progress bar with the live reward.
    """

    algorithm: str = "grpo"
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    sft: SFTConfig | None = None
    iterations: int = 100
    seed: int = 0
    output_dir: str = "runs/train"
    checkpoint_every: int = 10
    resume: bool = True
    tensorboard: bool = True
    wandb_project: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in ("grpo", "ppo"):
            raise ConfigError(f"algorithm ({self.algorithm!r}) must be 'grpo' or 'ppo'.")
        if self.iterations < 1 or self.checkpoint_every < 0:
            raise ConfigError(f"iterations ({self.iterations}) must be >= 1 and checkpoint_every "
                             f"({self.checkpoint_every}) >= 0.")
        if self.algorithm == "grpo" and self.rollout.max_staleness and not self.grpo.off_policy:
            raise ConfigError(f"rollout.max_staleness ({self.rollout.max_staleness}) > 0 needs grpo.off_policy: "
                             "true (the old log-probs must come from the stale sampler).")
        if self.algorithm == "ppo" and self.rollout.max_staleness:
            raise ConfigError(f"rollout.max_staleness ({self.rollout.max_staleness}) must be 0 with ppo.")
        if self.rollout.overlap and (self.algorithm == "ppo" or not self.grpo.off_policy):
            raise ConfigError(f"rollout.overlap: true with algorithm {self.algorithm!r} needs the off-policy "
                              "correction (the old log-probs from the sampler, one update behind the learner): "
                              "use algorithm 'grpo' with grpo.off_policy: true, or rollout.overlap: false.")
        if self.sft is not None and self.sft.learner not in (LearnerConfig(), self.learner):
            raise ConfigError("sft.learner is set inside rl train's sft section: the top-level learner section "
                             "applies to the warm start too. Move the settings to learner: and remove sft.learner.")
        if self.sft is None and not self.policy.model:
            raise ConfigError("policy.model is empty and there is no sft section: give a model folder, or an "
                             "sft section to build one first.")
        if self.sft is not None and "auto" != self.sft.kind != self.policy.kind:
            raise ConfigError(f"sft.kind ({self.sft.kind!r}) differs from policy.kind ({self.policy.kind!r}): RL starts "
                              "from the SFT policy folder, so set both to the same kind.")
        self.policy.check_sees_tools()

    @property
    def groups(self) -> tuple[int, int]:
        """(tasks per iteration, rollouts per task)."""
        if self.algorithm == "grpo":
            return self.grpo.tasks_per_iteration, self.grpo.group_size
        return self.ppo.episodes_per_iteration, 1


@dataclass
class EvalConfig:
    """An evaluation (``rl record``): run a policy on fresh tasks, report rewards, save trajectories.

    Attributes:
        env: the environment.
        policy: the policy, when neither agent nor api is set.
        agent: a baseline agent as "module:Class" (e.g. "baselines.random_agent:RandomAgent"), or null.
        api_base_url: an OpenAI-compatible endpoint to evaluate instead (e.g. "http://127.0.0.1:8000/v1").
        api_model: the model name the endpoint serves.
        episodes: episodes to run (one per task seed).
        seed: seeds the tasks (use a seed never used in training).
        num_envs: environments run together (the batch size of each generate call).
        output_dir: where summary.json and trajectories.jsonl go.
        min_reward: only episodes with at least this reward go to trajectories.jsonl (SFT data), or null for all.
    """

    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    agent: str | None = None
    api_base_url: str | None = None
    api_model: str = ""
    episodes: int = 256
    seed: int = 12345
    num_envs: int = 64
    output_dir: str = "runs/eval"
    min_reward: float | None = None

    def __post_init__(self) -> None:
        if self.episodes < 1 or self.num_envs < 1:
            raise ConfigError(f"episodes ({self.episodes}) and num_envs ({self.num_envs}) must be at least 1.")
        if self.agent is not None and not re.fullmatch(r"[\w.]+:\w+", self.agent):
            raise ConfigError(f"agent ({self.agent!r}) must look like 'module:Class', e.g. "
                             "'baselines.random_agent:RandomAgent'.")
        if self.api_base_url and not self.api_model:
            raise ConfigError("api_base_url is set but api_model is empty: name the model the endpoint serves.")
        if not (self.agent or self.api_base_url):
            self.policy.check_sees_tools()


# ---------------------------------------------------------------- dicts, YAML and command lines


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (also inside ``X | None``), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


_EXAMPLES = {bool: "true or false", int: "an integer such as 8", float: "a number such as 0.001",
             str: 'text in quotes, e.g. "abc"'}
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _kind_error(path: str, value: Any, expected: str, fix: str) -> ConfigError:
    return ConfigError(f"{path}: expected {expected}, got {value!r} ({type(value).__name__}); {fix}.")


def _scalar(value: Any, hint: type, path: str) -> Any:
    """``value`` as a bool, int, float or str field; a ConfigError names the field, the value and the fix."""
    if hint is bool:
        ok = isinstance(value, bool)
    elif isinstance(value, bool):  # YAML's true is not a number
        ok = False
    elif hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 1e3 and 2.0 are whole numbers
        ok = isinstance(value, int)
    elif hint is float:
        ok = isinstance(value, (int, float)) and value == value  # NaN is no setting
        value = float(value) if ok else value
    else:
        ok = isinstance(value, hint)
    if ok:
        return value
    fix = f"write {_EXAMPLES[hint]}"
    if isinstance(value, str) and hint in (int, float):
        fix += " without quotes"
    elif isinstance(value, float) and hint is int and value == value and abs(value) != float("inf"):
        fix = f"write a whole number such as {int(value)} or {int(value) + 1}"
    raise _kind_error(path, value, _KINDS[hint], fix)


def _convert(value: Any, hint: Any, path: str) -> Any:
    """``value`` checked (and converted: int -> float, mapping -> dataclass) against the type hint ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:
            return _convert(value, options[0], path)
        raise TypeError(f"rl.config cannot check the union {hint!r} of {path}; give the field one kind.")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, typing.Mapping):
            return from_dict(hint, value, f"{path}.")
        names = ", ".join(f.name for f in dataclasses.fields(hint))
        raise _kind_error(path, value, f"a mapping of options ({names})",
                          f"write it as `{path.rsplit('.', 1)[-1]}: {{option: value, ...}}`")
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _kind_error(path, value, "a list", "write it as [a, b] or one '- item' line per item")
        item = args[0] if args else Any  # list[X] or tuple[X, ...]
        kind = tuple if tuple in (origin, hint) else list
        return kind(_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, typing.Mapping):
            raise _kind_error(path, value, "a mapping", "write it as {key: value, ...}")
        key_hint, value_hint = args or (Any, Any)
        return {_convert(k, key_hint, path): _convert(v, value_hint, f"{path}.{k}") for k, v in value.items()}
    if hint in _KINDS:
        return _scalar(value, hint, path)
    raise TypeError(f"rl.config cannot check fields of type {hint!r} ({path}); use bool, int, float, str, "
                    "Any, a list, a dict, a dataclass, or X | None.")


def _unknown_key(cls: type, key: Any, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f"did you mean {where + close[0]!r}? " if close else ""
    return ConfigError(f"{where}{key}: unknown option; {hint}The options of {where.rstrip('.') or cls.__name__} "
                       f"are {sorted(names)}.")


def from_dict(cls: type, data: typing.Mapping[str, Any] | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts (a YAML file), checking every value against the type hints.

    Kinds are checked here (an integer field refuses 1.5 and "3", a number field takes 3 as 3.0, bool is
    not a number, ``X | None`` takes null, lists, dicts and nested dataclasses recurse); ranges by each
    dataclass's ``__post_init__``. Every error is a :class:`~visenv.error.ConfigError` that names the
    field by its dotted path (``where`` is the prefix, e.g. ``"grpo."``), the value and the fix; an
    unknown key is named with the closest valid one.
    """
    section = where.rstrip(".") or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, typing.Mapping):
        raise _kind_error(section, data, f"a mapping of options ({', '.join(f.name for f in dataclasses.fields(cls))})",
                          "write `option: value` lines")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise _unknown_key(cls, key, where)
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        docs = field_docs(cls)
        raise ConfigError(f"{section}: the option(s) {missing} are required but missing; add them "
                          f"({'; '.join(f'{name}: {docs.get(name, name)}' for name in missing)}).")
    hints = _hints(cls)
    values = {name: _convert(value, hints[name], f"{where}{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ValueError as exc:  # a range check of __post_init__: name the field by its full path
        message = str(exc)
        if not where or message.startswith(where):
            raise ConfigError(message) from None
        named = re.match(r"(\w+) \(", message)
        prefix = where if named and named.group(1) in fields else f"{section}: "
        raise ConfigError(prefix + message) from None


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML and logging)."""
    return dataclasses.asdict(config)


def read_yaml_value(text: str, where: str) -> Any:
    """``text`` read as YAML (``3e-4`` a float, ``[a, b]`` a list); ``where`` names the option in the error."""
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: {text!r} is not valid YAML ({' '.join(str(exc).split())}); quote text "
                          "that holds ':', '{' or '['.") from None


def parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    """``--set FIELD=VALUE`` pairs -> ``{FIELD: VALUE}``, values read as YAML (``3e-4``, ``null``, ``[a, b]``).

    FIELD is dotted (``grpo.kl_coef``, ``env.options.max_turns``, ``stages.0.epochs``); a pair without
    ``=`` or with an empty field is a ConfigError.
    """
    found = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not re.fullmatch(r"\w+(\.\w+)*", name.strip()):
            raise ConfigError(f"--set {pair!r}: expected FIELD=VALUE with a dotted FIELD, e.g. "
                              "--set grpo.kl_coef=0.05 or --set env.options.max_turns=5.")
        found[name.strip()] = read_yaml_value(text, f"--set {name.strip()}")
    return found


def _with_dotted(data: typing.Mapping[str, Any], overrides: typing.Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the nested dicts ``data`` with dotted-key ``overrides`` set; list items by index.

    A missing or null section along the way becomes a mapping; a plain value cannot take a sub-key.
    """
    result = copy.deepcopy(dict(data))
    for dotted, value in overrides.items():
        node: Any = result
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate([*parents, leaf]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{dotted}: {part!r} is not an index of the {len(node)}-item list "
                                      f"{'.'.join(parents[:depth])} (0 to {len(node) - 1}).")
                part = int(part)
            elif not isinstance(node, dict):
                parent = ".".join(parents[:depth])
                raise ConfigError(f"{dotted}: {parent} holds {node!r}, not a section of options; set {parent} "
                                  "itself, or give a field of a section.")
            if depth == len(parents):
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:  # an unset optional section: start it empty
                    node[part] = {}
                node = node[part]
    return result


def apply_overrides(config: Any, overrides: typing.Mapping[str, Any]) -> Any:
    """A copy of dataclass ``config`` with dotted-key overrides, rebuilt (and so checked) by :func:`from_dict`.

    Works for any nested dataclass config: a key names a field through its sections, list items by
    index (``{"grpo.kl_coef": 0.1, "stages.0.epochs": 2, "env.options.max_turns": 3}``). Fields that
    are not overridden keep ``config``'s values.
    """
    return from_dict(type(config), _with_dotted(to_dict(config), overrides))


def load(cls: type, path: str | None = None, overrides: typing.Mapping[str, Any] | None = None) -> Any:
    """Build ``cls`` from a YAML file (or defaults) with dotted-key overrides (``{"grpo.group_size": 4}``)."""
    data: Any = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as handle:
                data = load_yaml(handle)
        except OSError as exc:
            raise ConfigError(f"--config {path!r}: cannot read it ({exc.strerror}); give the path of a YAML "
                              "file (see configs/ for examples).") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}. Fix the line it names "
                              "(indent nested options, quote text that holds ':').") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a YAML mapping of options (option: value lines), not "
                              f"{type(data).__name__}.")
    return from_dict(cls, _with_dotted(data, overrides or {}))


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Each field's description, from the "Attributes:" section of the class docstring."""
    docs: dict[str, str] = {}
    text = inspect.getdoc(cls) or ""
    if "Attributes:" not in text:
        return docs
    current = None
    for line in text.split("Attributes:", 1)[1].splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2)
        elif current and line.startswith("        "):
            docs[current] += " " + line.strip()
    return docs


def add_options(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One ``--prefix.field`` option per leaf field of ``cls`` (nested dataclasses recurse), and at the top
    ``--set FIELD=VALUE`` (repeatable); :func:`overrides_from` reads them all."""
    docs = field_docs(cls)
    if not prefix:
        parser.add_argument("--set", metavar="FIELD=VALUE", action="append", default=[],
                            help="set any field by its dotted name, the value read as YAML (e.g. --set "
                                 "grpo.kl_coef=0.05 --set env.options.max_turns=5); repeatable; wins over the "
                                 "--section.field options")
    for f in dataclasses.fields(cls):
        inner = _dataclass_in(_hints(cls)[f.name])
        if inner is not None:
            add_options(parser, inner, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{prefix}{f.name}", dest=f"set:{prefix}{f.name}", metavar="VALUE", default=None,
                            help=f"{docs.get(f.name, '')} (default: {default!r})")


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--section.field VALUE`` options given on the command line, then ``--set FIELD=VALUE`` (which
    wins), values read as YAML."""
    found = {key[4:]: read_yaml_value(value, f"--{key[4:]}") for key, value in vars(args).items()
             if key.startswith("set:") and value is not None}
    return found | parse_sets(args.set)
