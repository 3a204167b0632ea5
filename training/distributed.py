"""Data parallelism from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

Only ~1M parameters train, so instead of wrapping the model in DistributedDataParallel the
loop all-reduces the adapter's gradients once per optimizer step (one small collective, no
bucketing, no no_sync() juggling under gradient accumulation). Every rank reads the whole
data set and derives the same batch plan, so the loss normaliser needs no communication.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """In-place sum over ranks of tensors of any shapes, in one collective."""
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def setup(backend: str | None = None, device: str | None = None) -> DistContext:
    """Single process unless launched by torchrun; NCCL on CUDA, gloo on CPU by default."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1:
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        if backend == "nccl" and dev.type != "cuda":
            raise ValueError("--backend nccl needs CUDA devices; use --backend gloo on CPU")
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank, world, local_rank, dev)
