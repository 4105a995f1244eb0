"""Data-parallel training through torchrun (PyTorch DistributedDataParallel).

``torchrun --nproc_per_node N -m difflo train --config ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`setup` reads them and
joins the process group (NCCL on CUDA GPUs, one GPU per process; gloo on CPU). Without those
variables (or with ``WORLD_SIZE=1``) nothing here does anything and training is the plain
single-process loop.

How a step is shared (the single-process determinism is kept, so N processes compute the step that
one process computes on the whole batch, up to float summation order; tests/unit/test_ddp.py):

* every rank builds the same *global* batch of ``train.batch_size`` images and draws the same
  noise, timesteps and label dropout for all of it from the step's generator, then evaluates the
  network on its own contiguous rows only (:meth:`Dist.rows`): ``batch_size / N`` each;
* DistributedDataParallel averages the gradients over the ranks during ``backward``; the mean of
  the per-rank mean losses is the global mean loss, so the update (clipping included) is the
  single-process one, on every rank;
* EMA, logging, sample grids and checkpoints happen on rank 0 only; every rank resumes from the
  same checkpoint (weights, optimizer, step).

Gradient accumulation (``train.grad_accum: K``) splits each rank's rows into K equal micro-batches
(:meth:`Dist.micro_batches`); each draws the step's randomness for the whole global batch again and
evaluates its own rows, and DDP all-reduces the summed gradients once, after the last micro-batch
(:meth:`Dist.grad_sync`: ``no_sync`` before it).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .errors import DiffloError


@dataclass
class Dist:
    """This process's place in the job: rank, world size, device; world = 1 is a single process."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False           # setup() initialised the process group, so close() ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of the global batch (contiguous, batch_size / world of them)."""
        if batch_size % self.world:
            raise DiffloError(f"train.batch_size={batch_size} is not divisible by the {self.world} processes of "
                              f"this torchrun job; choose a multiple of {self.world} (the global batch is split)")
        n = batch_size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def micro_batches(self, batch_size: int, k: int) -> list[slice]:
        """This rank's rows split into k equal contiguous micro-batches (train.grad_accum = k)."""
        rows = self.rows(batch_size)
        n = rows.stop - rows.start
        if k < 1:
            raise DiffloError(f"train.grad_accum={k} must be >= 1 (1: no accumulation; K: the batch split into K "
                              f"micro-batches)")
        if n % k:
            share = f"the {n} images per process (train.batch_size={batch_size} over {self.world} processes)" \
                if self.active else f"train.batch_size={batch_size}"
            raise DiffloError(f"train.grad_accum={k} must be a divisor of {share} (the batch is split into "
                              f"grad_accum equal micro-batches)")
        m = n // k
        return [slice(rows.start + i * m, rows.start + (i + 1) * m) for i in range(k)]

    def grad_sync(self, model: torch.nn.Module, sync: bool):
        """The context of one micro-batch's forward and backward: DDP all-reduces the gradients only when
        ``sync`` (the last micro-batch); before it they add up locally (``no_sync``)."""
        if self.active and not sync:
            return model.no_sync()
        return contextlib.nullcontext()

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        """The module to train: DistributedDataParallel around ``net`` when data-parallel, else ``net``."""
        if not self.active:
            return net
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over the ranks (a collective: every rank must call it)."""
        if not self.active:
            return x
        import torch.distributed as dist
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a collective), so all ranks stop together."""
        if not self.active:
            return flag
        import torch.distributed as dist
        x = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return bool(x.item())

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.owns_group = False


def setup(device: torch.device) -> Dist:
    """Join the torchrun job described by the environment, if any. ``device`` is the configured device
    (train.device); on CUDA each process takes GPU ``LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device)
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise DiffloError("WORLD_SIZE is set but RANK is not: start data-parallel training with "
                          "torchrun --nproc_per_node N -m difflo train ...") from None
    import torch.distributed as dist
    if not dist.is_available():
        raise DiffloError("this PyTorch build has no torch.distributed; train with a single process")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DiffloError(f"torchrun started {world} processes on this node but only "
                              f"{torch.cuda.device_count()} CUDA GPUs are visible; use --nproc_per_node "
                              f"{torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise DiffloError(f"data-parallel training runs on cuda or cpu, not {device.type}; set train.device")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
        owns = True
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device, backend=backend, owns_group=owns)
