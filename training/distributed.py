"""One asset on several processes (GPUs): the cameras of a step are split, the step stays the same.

Started by ``torchrun --nproc_per_node=N train.py --opt ...``. Every process holds the same
Gaussians, draws the same randomness (cameras, backgrounds, timesteps, noise of the whole batch)
and renders, encodes and scores only its rows of the camera batch (:class:`BatchShard`). The
Gaussians' gradients are summed over the processes and the densification statistics are
gathered camera by camera, so every process takes the optimizer step of the one-process run
(equal up to floating-point summation order) and the parameters stay identical everywhere.
Only rank 0 writes the run folder.

Other trainers spread extra GPUs over a larger batch, which changes the algorithm; this split
keeps it.
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from guidance.losses.base import BatchShard

log = logging.getLogger(__name__)


def import_before_joining() -> None:
    """Import what the run imports lazily and what would otherwise hold the process group past its end.

    The first torch.optim optimizer imports torch._dynamo, which imports torch.distributed._shard; imported
    while a process group exists, that keeps references to the default group (10 with torch 2.13), so
    destroy_process_group() cannot free it. Gloo's worker threads are then torn down during interpreter
    exit, where a joinable std::thread is destroyed now and then: "terminate called without an active
    exception" (SIGABRT) in a process whose run had finished. Imported before init_process_group,
    nothing refers to the group and destroy_process_group() frees it and joins its threads.
    """
    import torch._dynamo  # noqa: F401
    import torch.distributed._shard  # noqa: F401


def shard_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous rows [start, stop) of rank `rank`: the first `total % world_size` ranks get one more."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the processes training one asset (a single process: world_size 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes files, logs to TensorBoard and evaluates."""
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "ProcessGroup":
        """The group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); one process when unset."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, requested: str) -> torch.device:
        """PipelineParams.device for this process: CUDA device LOCAL_RANK when CUDA is used."""
        if requested == "cpu" or not torch.cuda.is_available():
            return torch.device("cpu")
        if self.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} CUDA devices")
        return torch.device("cuda", self.local_rank)

    def start(self, device: torch.device, timeout_s: float = 600.0) -> None:
        """Join the process group (NCCL on CUDA, gloo on a CPU); a no-op for one process."""
        if not self.distributed or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        import_before_joining()
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=self.rank, world_size=self.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        log.info("rank %d of %d joined (%s)", self.rank, self.world_size, backend)

    def barrier(self, device: torch.device | None = None) -> None:
        """Wait for every process (at the end of a run: no process tears the group down under another)."""
        if not self.distributed:
            return
        if device is not None and device.type == "cuda":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()

    def stop(self) -> None:
        """Leave the group; its backend (gloo's worker threads) must be freed here, not at interpreter exit."""
        if not (self.distributed and dist.is_initialized()):
            return
        default = weakref.ref(dist.distributed_c10d._get_default_group())
        dist.destroy_process_group()
        gc.collect()
        if default() is not None:
            log.warning("rank %d: the process group outlived destroy_process_group (%d references); the process "
                        "may abort at exit", self.rank, sys.getrefcount(default()) - 1)

    # ------------------------------------------------------------------ the step's collectives

    def shard(self, total: int) -> BatchShard | None:
        """This process's rows of a batch of `total` cameras (None for one process: the whole batch)."""
        if not self.distributed:
            return None
        if total < self.world_size:
            raise ValueError(f"GuidanceParams.C_batch_size must be >= the number of processes to split "
                             f"cameras across them, got {total} cameras for {self.world_size} processes")
        return BatchShard(*shard_bounds(total, self.rank, self.world_size), total)

    def sum_gradients(self, params: list[Tensor]) -> None:
        """Sum the .grad of `params` over all processes in place (one flat all-reduce)."""
        if not self.distributed:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p)
            offset += n

    def gather_rows(self, local: Tensor, shard: BatchShard | None) -> Tensor:
        """[shard.size, ...] rows from each process -> [total, ...] on every process, in batch order."""
        if not self.distributed:
            return local
        most = max(shard_bounds(shard.total, r, self.world_size)[1] - shard_bounds(shard.total, r, self.world_size)[0]
                   for r in range(self.world_size))
        padded = local.new_zeros((most, *local.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        rows = []
        for r, part in enumerate(parts):
            start, stop = shard_bounds(shard.total, r, self.world_size)
            rows.append(part[:stop - start])
        return torch.cat(rows)

    @torch.no_grad()
    def broadcast_tensors(self, tensors: list[Tensor]) -> None:
        """Overwrite `tensors` in place with rank 0's values (e.g. the initial Gaussians, so that a
        start from a generator whose GPU sampling may differ between processes is the same everywhere)."""
        if not self.distributed:
            return
        for tensor in tensors:
            dist.broadcast(tensor, src=0)

    def broadcast_object(self, value):
        """Rank 0's `value` on every process (e.g. the run folder's path)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
