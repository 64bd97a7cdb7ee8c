"""The learner on several processes: data-parallel GRPO and SFT on Ray actors that hold a torch.distributed group.

A learner of one process is :class:`~rl.grpo.GRPO` (or :func:`~rl.sft.train_sft`) in the driver. With
``learner.num_workers`` N > 1, :class:`LearnerGroup` starts N :class:`LearnerWorker` Ray actors; each
joins a ``torch.distributed`` process group (rendezvous on a TCP address of rank 0; "gloo" on CPU,
"nccl" on GPUs) and holds a replica of the policy, the reference and the optimizer.

DDP semantics, exact: every rank receives all of the iteration's episodes (one object-store copy, token
ids only) and computes the same group advantages and the same shuffled minibatches; each rank runs the
forward/backward passes of its share of every minibatch (:meth:`Shard.part`), with the loss normalised
by the token (or sequence) count of the *whole* minibatch, which every rank knows. The sum over ranks of
the gradients is then the one-process gradient, so :meth:`Shard.sum_gradients` all-reduces a sum (not a
mean) and every rank clips and steps the same way: the update equals the one-process update on the same
batch, up to float rounding (tests/test_rl_learner.py measures it). SFT does the same per batch.

Why actors with a process group rather than Ray Train's ``TorchTrainer``: a TorchTrainer runs one
training function to its end, while :class:`~rl.train.Trainer` needs a persistent learner that
receives new episodes each iteration between rollouts, hands its weights to the rollout workers and
saves checkpoints; long-lived actors that hold the process group (as verl and OpenRLHF do) keep the
replicas, optimizer states and the group alive across iterations. Why an explicit all-reduce rather
than wrapping the model in ``DistributedDataParallel``: the update accumulates gradients over a
varying number of length-sorted chunks per rank (a rank may have none in a small minibatch), which
DDP's per-backward hooks do not allow; one all-reduce of a flat gradient bucket per optimizer step is
simple and its equivalence is plain. (It does not overlap communication with the backward pass as
DDP's buckets do.) FSDP2 (sharded parameters for models that do not fit one device) is not
implemented: every rank holds a whole replica.

Weight sync and checkpoints: after each update rank 0 returns its weights, which go into the driver's
policy, a mirror of rank 0; :class:`~rl.train.Trainer` sends that mirror to the rollout backend
(``Rollout.set_weights``) and saves it with rank 0's optimizer state (:meth:`LearnerGroup.state_dict`),
so a checkpoint is the one-process checkpoint and a resume (:meth:`LearnerGroup.load_state_dict`, which
pushes the mirror's restored weights and the state to every rank) is exact. A learner actor that dies
ends the run; resume it from its last checkpoint.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from rl.errors import RolloutError
from rl.policy import TrainablePolicy
from rl.rollout import check_cluster_fits


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel learner group (torch.distributed must be initialised).

    Attributes:
        rank: this process's rank.
        world_size: processes in the group.
    """

    rank: int
    world_size: int

    def part(self, rows: Sequence[int]) -> list[int]:
        """This rank's share of a minibatch's rows: every ``world_size``-th row from ``rank`` on."""
        return list(rows)[self.rank::self.world_size]

    def sum_gradients(self, parameters: Sequence[torch.nn.Parameter], metrics: dict[str, float]) -> None:
        """Sum the gradients of ``parameters`` and the values of ``metrics`` over the group, in place.

        One all-reduce of one flat float32 bucket; a parameter without a gradient (this rank ran no
        rows) counts as zeros, so every rank takes part in every step.
        """
        import torch.distributed as dist

        device = parameters[0].device
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


class LearnerWorker:
    """A Ray actor's body: one rank of the learner group, with its policy replica.

    Args:
        rank: this worker's rank.
        world_size: workers in the group.
        make_policy: picklable zero-argument callable that builds the policy (weights come later).
        torch_threads: torch threads of this worker.
    """

    def __init__(self, rank: int, world_size: int, make_policy: Callable[[], TrainablePolicy], torch_threads: int):
        torch.set_num_threads(torch_threads)
        self.shard = Shard(rank, world_size)
        self.policy = make_policy()
        self.algorithm: Any = None

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

    def start_grpo(self, config: Any, weights: dict[str, torch.Tensor]) -> None:
        """Set the replica to ``weights`` (the reference is a copy of them) and build its GRPO update."""
        from rl.grpo import GRPO
        from rl.hf import reference_policy

        self.policy.set_weights(weights)
        reference = reference_policy(self.policy) if config.kl_coef > 0 else None
        self.algorithm = GRPO(self.policy, reference, config, self.shard)

    def update(self, episodes: Sequence[Any], iteration: int) -> tuple[dict[str, float], dict | None]:
        """One GRPO update on this rank's shard; rank 0 also returns its new weights."""
        metrics = self.algorithm.update(episodes, iteration)
        return metrics, self.policy.get_weights() if self.shard.rank == 0 else None

    def run_pst(self, stages: Sequence[Any], seed: int) -> tuple[list[dict[str, float]], list, dict | None]:
        """The PST stages on this rank's shard of every batch: (stage results, rank 0's per-step metrics,
        rank 0's final weights)."""
        from rl.sft import run_pst

        logged: list[tuple[int, dict[str, float]]] = []
        results = run_pst(self.policy, stages, seed, lambda step, m: logged.append((step, m)), self.shard)
        rank0 = self.shard.rank == 0
        return results, logged if rank0 else [], self.policy.get_weights() if rank0 else None

    def get_weights(self) -> dict[str, torch.Tensor]:
        return self.policy.get_weights()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.policy.set_weights(weights)

    def state_dict(self) -> dict:
        return self.algorithm.state_dict()

    def load_state_dict(self, state: dict, weights: dict[str, torch.Tensor]) -> None:
        self.policy.set_weights(weights)
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
    """

    def __init__(self, policy: TrainablePolicy, make_policy: Callable[[], TrainablePolicy], num_workers: int,
                 num_cpus: float = 1.0, num_gpus: float = 0.0, backend: str = "gloo", torch_threads: int = 1):
        import ray

        if not ray.is_initialized():
            raise RolloutError("LearnerGroup needs Ray running: call ray.init() (or rl.config.start_ray) first.")
        check_cluster_fits(f"learner.num_workers ({num_workers})", num_workers, num_cpus, num_gpus)
        self._ray = ray
        self.policy = policy
        actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(LearnerWorker)
        self.workers = [actor.remote(rank, num_workers, make_policy, torch_threads) for rank in range(num_workers)]
        address = ray.get(self.workers[0].rendezvous.remote())
        ray.get([worker.join.remote(address, backend) for worker in self.workers])

    def _all(self, method: str, *args: Any) -> list[Any]:
        return self._ray.get([getattr(worker, method).remote(*args) for worker in self.workers])

    def start_grpo(self, config: Any) -> "LearnerGroup":
        """Every rank gets the driver policy's weights and a GRPO update with ``config``; returns self."""
        self._all("start_grpo", config, self._ray.put(self.policy.get_weights()))
        return self

    def update(self, episodes: Sequence[Any], iteration: int) -> dict[str, float]:
        """One data-parallel GRPO update; the driver's policy gets rank 0's new weights."""
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
        """Rank 0's optimizer and scheduler state (every rank's is the same)."""
        return self._ray.get(self.workers[0].state_dict.remote())

    def load_state_dict(self, state: dict) -> None:
        """Resume: every rank takes ``state`` and the driver policy's (just restored) weights."""
        self._all("load_state_dict", self._ray.put(state), self._ray.put(self.policy.get_weights()))

    def worker_weights(self) -> list[dict[str, torch.Tensor]]:
        """Every rank's weights (they are equal; tests check it)."""
        return self._all("get_weights")

    def close(self) -> None:
        """End the process group and the actors."""
        try:
            self._all("close")
        finally:
            for worker in self.workers:
                self._ray.kill(worker)
            self.workers = []
