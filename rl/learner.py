"""The learner on several processes: data-parallel GRPO, PPO and SFT on Ray actors that hold a torch.distributed group.

A learner of one process is :class:`~rl.grpo.GRPO` (:class:`~rl.ppo.PPO`, or :func:`~rl.sft.train_sft`) in the driver. With
``learner.num_workers`` N > 1, :class:`LearnerGroup` starts N :class:`LearnerWorker` Ray actors; each
joins a ``torch.distributed`` process group (rendezvous on a TCP address of rank 0; "gloo" on CPU,
"nccl" on GPUs) and holds a replica of the policy, the reference and the optimizer.

DDP semantics, exact: every rank receives all of the iteration's episodes (one object-store copy, token
ids only) and computes the same group advantages and the same shuffled minibatches; each rank runs the
forward/backward passes of its share of every minibatch (:meth:`Shard.part`), with the loss normalised
by the token (or sequence) count of the *whole* minibatch, which every rank knows. The sum over ranks of
the gradients is then the one-process gradient, so :meth:`Shard.sum_gradients` all-reduces a sum (not a
mean) and every rank clips and steps the same way: the update equals the one-process update on the same
batch, up to float rounding (tests/test_rl_learner.py measures it). SFT does the same per batch. PPO
too: every rank computes the old log-probs and values of all episodes (GAE and the whitening of the
advantages need the whole batch), then trains its share of each minibatch; the value head's gradients
are summed with the policy's, and rank 0's initial value head goes to every rank, which holds it whole
(with FSDP too: its gradients are all-reduced, the policy's reduce-scattered).

Why actors with a process group rather than Ray Train's ``TorchTrainer``: a TorchTrainer runs one
training function to its end, while :class:`~rl.train.Trainer` needs a persistent learner that
receives new episodes each iteration between rollouts, hands its weights to the rollout workers and
saves checkpoints; long-lived actors that hold the process group (as verl and OpenRLHF do) keep the
replicas, optimizer states and the group alive across iterations. Why an explicit all-reduce rather
than wrapping the model in ``DistributedDataParallel``: the update accumulates gradients over a
varying number of length-sorted chunks per rank (a rank may have none in a small minibatch), which
DDP's per-backward hooks do not allow; one all-reduce of a flat gradient bucket per optimizer step is
simple and its equivalence is plain. (It does not overlap communication with the backward pass as
DDP's buckets do.)

FSDP2 (``learner.strategy: fsdp``, for models whose weights, gradients and AdamW states do not fit one
device): each rank's model is sharded with ``torch.distributed.fsdp.fully_shard`` (:func:`shard_model`:
every decoder layer, then the root), so a rank holds 1/N of every parameter, gradient and optimizer
state. The data split and the loss normalisation are DDP's; the gradients are summed
by FSDP's own reduce-scatter in each backward pass (divide factor 1: a sum, not a mean), accumulated
in the sharded gradients over the chunks, and only the unsharded ones (none for a policy) are
all-reduced. Every forward pass all-gathers parameters, so every rank must run as many passes as
the others: a rank with fewer chunks in a minibatch adds passes of weight 0 (:meth:`Shard.passes`),
which add zero gradients. The optimizer steps on the shards (AdamW is elementwise) and the grad norm
is the global one. A policy's frozen reference (KL) is sharded the same way; a LoRA policy's
reference is its base model, adapters off.

Mixed precision (``learner.mixed_precision: bfloat16``, fsdp only): each rank casts the trainable weights
to float32 before sharding (the master weights; AdamW's state follows them) and shards with FSDP2's
``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: every pass all-gathers the
parameters in bfloat16 and computes in it, and the gradients are reduce-scattered in float32 into the
float32 shards. The frozen reference keeps the policy's dtype and computes in bfloat16 too. What rank 0
returns is float32; the driver's policy casts it to its own dtype (``policy.dtype``, which the rollout
workers and saved policy folders keep), so :meth:`LearnerWorker.state_dict` also returns the float32
masters ("master_weights"), which a resume loads instead of the driver's copy.

Weight sync and checkpoints: after each update rank 0 returns its weights (with FSDP gathered whole
to rank 0's CPU: ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``), which go into the
driver's policy, a mirror of rank 0; :class:`~rl.train.Trainer` sends that mirror to the rollout
backend (``Rollout.set_weights``) and saves it with rank 0's optimizer state (:meth:`LearnerGroup.state_dict`;
with FSDP gathered whole by ``get_optimizer_state_dict`` and keyed by parameter index as
``torch.optim`` keys it), so a checkpoint is the one-process checkpoint and a resume
(:meth:`LearnerGroup.load_state_dict`, which pushes the mirror's restored weights and the state to every
rank, each keeping its shard) is exact. A learner actor that dies ends the run; resume it from its
last checkpoint. Only a LoRA policy's adapters are trained, summed, synced and checkpointed as
weights (its trainable parameters), with either strategy.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from rl.errors import ConfigError, RolloutError
from rl.policy import TrainablePolicy
from rl.rollout import check_cluster_fits

STRATEGIES = ("ddp", "fsdp")
MIXED_PRECISION = (None, "bfloat16")


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel learner group (torch.distributed must be initialised
    when ``world_size`` > 1; ``Shard(0, 1)`` is a learner of one process).

    Attributes:
        rank: this process's rank.
        world_size: processes in the group.
        sharded: the model is sharded with FSDP2 (every forward/backward pass is a collective).
    """

    rank: int
    world_size: int
    sharded: bool = False

    def part(self, rows: Sequence[int]) -> list[int]:
        """This rank's share of a minibatch's rows: every ``world_size``-th row from ``rank`` on."""
        return list(rows)[self.rank::self.world_size]

    def passes(self, keys_of: Callable[["Shard"], list]) -> list[tuple[Any, float]]:
        """This rank's forward(/backward) passes: ``(key, 1.0)`` for each of ``keys_of(self)``.

        ``keys_of(shard)`` lists the passes (chunk keys) of any rank. With FSDP every pass all-gathers
        the parameters (and its backward reduce-scatters the gradients), so every rank runs as many
        passes as the rank with most: the missing ones are ``(key, 0.0)``, a pass over another rank's
        first key whose loss and metrics the caller multiplies by 0.
        """
        mine = [(key, 1.0) for key in keys_of(self)]
        if not self.sharded:
            return mine
        everyone = [keys_of(replace(self, rank=rank)) for rank in range(self.world_size)]
        filler = next((keys[0] for keys in everyone if keys), None)
        return mine + [(filler, 0.0)] * (max(map(len, everyone)) - len(mine))

    def sum_gradients(self, parameters: Sequence[torch.nn.Parameter], metrics: dict[str, float]) -> None:
        """Sum the gradients of ``parameters`` and the values of ``metrics`` over the group, in place.

        One all-reduce of one flat float32 bucket; a parameter without a gradient (this rank ran no
        rows) counts as zeros, so every rank takes part in every step. Parameters FSDP shards
        (DTensors) are skipped: their backward passes summed them already. A group of one does nothing.
        """
        if self.world_size == 1:
            return
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        device = parameters[0].device
        parameters = [p for p in parameters if not isinstance(p, DTensor)]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        names = sorted(metrics)
        bucket = torch.cat([g.reshape(-1).float() for g in grads]
                           + [torch.tensor([metrics[n] for n in names], dtype=torch.float32, device=device)])
        dist.all_reduce(bucket, op=dist.ReduceOp.SUM)
        offset = 0
        for parameter in parameters:
            size = parameter.numel()
            parameter.grad = bucket[offset:offset + size].view_as(parameter).to(parameter.dtype).clone()
            offset += size
        for name, value in zip(names, bucket[offset:].tolist()):
            metrics[name] = value

    def clip_gradients(self, parameters: Sequence[torch.nn.Parameter], max_norm: float) -> float:
        """``torch.nn.utils.clip_grad_norm_`` over ``parameters`` (after :meth:`sum_gradients`); returns the
        norm before clipping. With FSDP some may be shards (DTensors: their norm is summed over the ranks)
        and some whole on every rank (PPO's value head: counted once); the norm is the global one."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in parameters if p.grad is not None]
        sharded = [g for g in grads if isinstance(g, DTensor)]
        if not sharded or len(sharded) == len(grads):
            return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        norms = [torch.nn.utils.get_total_norm(sharded).full_tensor(),
                 torch.nn.utils.get_total_norm([g for g in grads if not isinstance(g, DTensor)])]
        total = torch.linalg.vector_norm(torch.stack([norm.to(norms[0].device) for norm in norms]))
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0).item()
        for grad in grads:
            grad.mul_(scale)
        return float(total)


def shard_model(model: torch.nn.Module, device_type: str, mixed_precision: str | None = None) -> None:
    """FSDP2 in place over the default process group: ``fully_shard`` every decoder layer of the language
    model (``model.get_decoder().layers``), then the root, which holds the rest (embeddings, LM head, a
    VLM's vision tower: all-gathered for every pass, so a rank whose chunk has no image runs the same
    collectives as one whose chunk has). Gradients are summed over the ranks, not averaged (each rank's
    loss is normalised over the whole minibatch); a parameter a rank's pass did not use (the vision
    tower on a text-only chunk) takes part in the reduce-scatter with zeros. With ``mixed_precision``
    "bfloat16" (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``) every pass
    all-gathers the parameters in bfloat16 and computes in it, and the gradients are reduce-scattered in
    float32 into the shards, which keep the parameters' own dtype."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, mixed_precision), reduce_dtype=torch.float32) \
        if mixed_precision else MixedPrecisionPolicy()
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.set_reduce_scatter_unused_params(True)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def rekey(state: dict, keys: dict) -> dict:
    """An optimizer state dict with its parameter keys mapped through ``keys`` (names <-> indices)."""
    return {"state": {keys[k]: v for k, v in state["state"].items()},
            "param_groups": [{**group, "params": [keys[k] for k in group["params"]]} for group in state["param_groups"]]}


class LearnerWorker:
    """A Ray actor's body: one rank of the learner group, with its policy replica (or, with FSDP, shards).

    Args:
        rank: this worker's rank.
        world_size: workers in the group.
        make_policy: picklable zero-argument callable that builds the policy (weights come later).
        torch_threads: torch threads of this worker.
        strategy: "ddp" (a replica per rank) or "fsdp" (FSDP2 shards, once training starts).
        gradient_checkpointing: recompute activations in the backward passes of GRPO and PPO updates
            (:func:`rl.hf.checkpoint_activations`).
        mixed_precision: (fsdp) "bfloat16": float32 master weights (the trainable ones are cast to float32
            before sharding), passes in bfloat16 (:func:`shard_model`); None: the policy's own dtype.
    """

    def __init__(self, rank: int, world_size: int, make_policy: Callable[[], TrainablePolicy], torch_threads: int,
                 strategy: str = "ddp", gradient_checkpointing: bool = False, mixed_precision: str | None = None):
        torch.set_num_threads(torch_threads)
        self.shard = Shard(rank, world_size, sharded=strategy == "fsdp")
        self.gradient_checkpointing = gradient_checkpointing
        self.mixed_precision = mixed_precision
        self.policy = make_policy()
        self.algorithm: Any = None
        self.device_type = "cpu"
        self.sharded = False  # whether shard_model has run on the policy

    def rendezvous(self) -> str:
        """(rank 0) A free TCP address of this node for the group's rendezvous."""
        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def join(self, address: str, backend: str) -> None:
        import torch.distributed as dist

        dist.init_process_group(backend, init_method=address, rank=self.shard.rank, world_size=self.shard.world_size)
        if backend == "nccl":  # Ray gives each GPU actor its own visible device; nccl reduces CUDA tensors
            torch.cuda.set_device(0)
            self.policy.model.to("cuda")
            self.device_type = "cuda"

    def _shard(self, *models: torch.nn.Module) -> None:
        """With FSDP, shard the policy's model (and ``models``, e.g. the reference's, frozen: kept in its
        dtype) once; with mixed precision the trainable weights become float32 first (the masters)."""
        if self.shard.sharded and not self.sharded:
            for parameter in self.policy.parameters() if self.mixed_precision else ():
                parameter.data = parameter.data.float()
            for model in (self.policy.model, *models):
                shard_model(model, self.device_type, self.mixed_precision)
            self.sharded = True

    def _trainable(self, module: torch.nn.Module | None = None) -> list[str]:
        return [name for name, p in (module or self.policy.model).named_parameters() if p.requires_grad]

    def _stepped(self) -> torch.nn.Module:
        """What the optimizer steps, as one module: the policy's model, with PPO's value head (whole on
        every rank) beside it; its trainable parameters are in the optimizer's order."""
        head = getattr(self.algorithm, "value_head", None)
        if head is None:
            return self.policy.model
        return torch.nn.ModuleDict({"policy": self.policy.model, "value_head": head})

    def _weights(self) -> dict[str, torch.Tensor] | None:
        """Rank 0's trainable weights, whole and on the CPU (None on other ranks); with FSDP a collective
        (every rank calls it) that gathers them to rank 0."""
        if not self.sharded:
            return self.policy.get_weights() if self.shard.rank == 0 else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {name: full[name] for name in self._trainable()} if self.shard.rank == 0 else None

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Set the trainable weights from whole tensors (with FSDP each rank keeps its shard)."""
        if not self.sharded:
            self.policy.set_weights(weights)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.policy.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))

    def start(self, config: Any, weights: dict[str, torch.Tensor]) -> None:
        """Set the replica to ``weights`` (the reference is a copy of them) and build its update: GRPO, or
        PPO for a :class:`~rl.ppo.PPOConfig` (whose value head every rank takes from rank 0)."""
        import torch.distributed as dist

        from rl.grpo import GRPO
        from rl.hf import AdapterOffReference, checkpoint_activations, reference_policy
        from rl.ppo import PPO, PPOConfig

        if self.sharded:
            raise RuntimeError("start on a learner worker that has trained already: start a new LearnerGroup.")
        self.load_weights(weights)
        reference = reference_policy(self.policy) if config.kl_coef > 0 else None
        self._shard(*[reference.model] if reference is not None and not isinstance(reference, AdapterOffReference)
                    else [])
        if self.gradient_checkpointing:
            checkpoint_activations(self.policy.model)
        if isinstance(config, PPOConfig):
            self.algorithm = PPO(self.policy, reference, config, self.shard)
            for tensor in self.algorithm.value_head.state_dict().values():
                dist.broadcast(tensor, 0)
        else:
            self.algorithm = GRPO(self.policy, reference, config, self.shard)

    def update(self, episodes: Sequence[Any], iteration: int) -> tuple[dict[str, float], dict | None]:
        """One update (GRPO or PPO) on this rank's shard; rank 0 also returns its new weights."""
        metrics = self.algorithm.update(episodes, iteration)
        return metrics, self._weights()

    def run_pst(self, stages: Sequence[Any], seed: int) -> tuple[list[dict[str, float]], list, dict | None]:
        """The PST stages on this rank's shard of every batch: (stage results, rank 0's per-step metrics,
        rank 0's final weights)."""
        from rl.sft import run_pst

        self._shard()
        logged: list[tuple[int, dict[str, float]]] = []
        results = run_pst(self.policy, stages, seed, lambda step, m: logged.append((step, m)), self.shard)
        return results, logged if self.shard.rank == 0 else [], self._weights()

    def get_weights(self) -> dict[str, torch.Tensor]:
        """This rank's trainable weights as it holds them: a whole replica, or with FSDP its shards."""
        if not self.sharded:
            return self.policy.get_weights()
        return {name: p.to_local().detach().cpu().clone()
                for name, p in self.policy.model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict | None:
        """Rank 0's optimizer and scheduler state in the one-process format (None on other ranks); with
        FSDP a collective that gathers the optimizer state whole to rank 0; with mixed precision also the
        float32 master weights ("master_weights"), which the driver's copy may hold rounded to its dtype."""
        state = self.algorithm.state_dict()
        if self.mixed_precision:
            state["master_weights"] = self._weights()
        # (an optimizer that has not stepped has no state to gather, and torch.distributed.checkpoint would
        # step it once with zero gradients to make some, which shifts AdamW's bias correction)
        if self.sharded and self.algorithm.optimizer.state:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            stepped = self._stepped()
            whole = get_optimizer_state_dict(stepped, self.algorithm.optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.shard.rank > 0:  # (the whole state went to rank 0 only)
                return None
            state["optimizer"] = rekey(whole, {name: i for i, name in enumerate(self._trainable(stepped))})
        return state if self.shard.rank == 0 else None

    def load_state_dict(self, state: dict, weights: dict[str, torch.Tensor]) -> None:
        """Resume: ``weights`` (the driver's), or the state's float32 master weights when it has them."""
        self.load_weights(state.get("master_weights") or weights)
        if self.sharded:  # torch.distributed.checkpoint shards the whole optimizer state into the optimizer
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            stepped = self._stepped()
            set_optimizer_state_dict(stepped, self.algorithm.optimizer,
                                     rekey(state["optimizer"], dict(enumerate(self._trainable(stepped)))),
                                     options=StateDictOptions(full_state_dict=True))
            state = {**state, "optimizer": self.algorithm.optimizer.state_dict()}
        self.algorithm.load_state_dict(state)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class LearnerGroup:
    """N learner actors training data-parallel; for :class:`~rl.train.Trainer` an algorithm like GRPO.

    Ray must be running. The group's weights start as ``policy``'s; after every update ``policy`` holds
    rank 0's weights (the driver's mirror, which rollouts and checkpoints read).

    Args:
        policy: the driver's policy (the mirror of rank 0).
        make_policy: picklable zero-argument callable that builds the same policy in a worker.
        num_workers: learner actors (ranks).
        num_cpus: CPUs each actor reserves (fractions allowed).
        num_gpus: GPUs each actor reserves.
        backend: "gloo" or "nccl".
        torch_threads: torch threads per actor.
        strategy: "ddp" (every rank a replica) or "fsdp" (FSDP2: every rank holds 1/N of the model).
        gradient_checkpointing: recompute activations in the backward passes of GRPO and PPO updates
            (:func:`rl.hf.checkpoint_activations`; SFT follows its policy's model).
        mixed_precision: (fsdp) "bfloat16": every rank keeps float32 master weights, gradients and AdamW
            state (its shards) and computes in bfloat16; the driver's policy keeps its dtype (what it
            receives is cast to it) and checkpoints hold the masters too. None: the policy's dtype throughout.
    """

    def __init__(self, policy: TrainablePolicy, make_policy: Callable[[], TrainablePolicy], num_workers: int,
                 num_cpus: float = 1.0, num_gpus: float = 0.0, backend: str = "gloo", torch_threads: int = 1,
                 strategy: str = "ddp", gradient_checkpointing: bool = False, mixed_precision: str | None = None):
        import ray

        if not ray.is_initialized():
            raise RolloutError("LearnerGroup needs Ray running: call ray.init() (or rl.config.start_ray) first.")
        if strategy not in STRATEGIES:
            raise ConfigError(f"learner.strategy ({strategy!r}) must be one of {STRATEGIES}.")
        if mixed_precision not in MIXED_PRECISION or (mixed_precision and strategy != "fsdp"):
            raise ConfigError(f"learner.mixed_precision ({mixed_precision!r}) must be one of {MIXED_PRECISION}, and "
                              f"'bfloat16' needs learner.strategy 'fsdp' (got {strategy!r}).")
        check_cluster_fits(f"learner.num_workers ({num_workers})", num_workers, num_cpus, num_gpus)
        self._ray = ray
        self.policy = policy
        self.strategy = strategy
        actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(LearnerWorker)
        self.workers = [actor.remote(rank, num_workers, make_policy, torch_threads, strategy, gradient_checkpointing,
                                     mixed_precision) for rank in range(num_workers)]
        address = ray.get(self.workers[0].rendezvous.remote())
        ray.get([worker.join.remote(address, backend) for worker in self.workers])

    def _all(self, method: str, *args: Any) -> list[Any]:
        return self._ray.get([getattr(worker, method).remote(*args) for worker in self.workers])

    def start_grpo(self, config: Any) -> "LearnerGroup":
        """Every rank gets the driver policy's weights and a GRPO update with ``config``; returns self."""
        self._all("start", config, self._ray.put(self.policy.get_weights()))
        return self

    def start_ppo(self, config: Any) -> "LearnerGroup":
        """Every rank gets the driver policy's weights and a PPO update with ``config`` (and rank 0's value
        head, which every rank holds whole); returns self."""
        self._all("start", config, self._ray.put(self.policy.get_weights()))
        return self

    def update(self, episodes: Sequence[Any], iteration: int) -> dict[str, float]:
        """One data-parallel update; the driver's policy gets rank 0's new weights."""
        (metrics, weights), *_ = self._all("update", self._ray.put(list(episodes)), iteration)
        self.policy.set_weights(weights)
        return metrics

    def run_pst(self, stages: Sequence[Any], seed: int,
                on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Data-parallel PST (:func:`rl.sft.run_pst`) from the driver policy's weights; the driver's policy gets
        the result. ``on_step`` receives rank 0's step metrics after the stages (every data file the stages
        name must be readable where the workers run)."""
        self._all("load_weights", self._ray.put(self.policy.get_weights()))
        (results, logged, weights), *_ = self._all("run_pst", list(stages), seed)
        self.policy.set_weights(weights)
        for step, metrics in logged if on_step is not None else ():
            on_step(step, metrics)
        return results

    def state_dict(self) -> dict:
        """Rank 0's optimizer and scheduler state (every rank's is the same; FSDP gathers it whole)."""
        return self._all("state_dict")[0]

    def load_state_dict(self, state: dict) -> None:
        """Resume: every rank takes ``state`` and the driver policy's (just restored) weights."""
        self._all("load_state_dict", self._ray.put(state), self._ray.put(self.policy.get_weights()))

    def worker_weights(self) -> list[dict[str, torch.Tensor]]:
        """Every rank's weights as it holds them: equal replicas, or with FSDP each rank's shards (tests check both)."""
        return self._all("get_weights")

    def close(self) -> None:
        """End the process group and the actors."""
        try:
            self._all("close")
        finally:
            for worker in self.workers:
                self._ray.kill(worker)
            self.workers = []
