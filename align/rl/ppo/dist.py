"""The processes of a run: `Dist` holds this process's rank and the collectives the PPO loop needs."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor


@dataclass
class Dist:
    """This process's place among the processes of a run (world 1 = no torch.distributed)."""

    rank: int = 0
    world: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: Tensor) -> Tensor:
        if self.world > 1:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def max(self, tensor: Tensor) -> Tensor:
        if self.world > 1:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return tensor

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """(rows, ...) on each process -> (world * rows, ...) in rank order; every process has the same rows."""
        if self.world == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        torch_dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def local_rows(self, tensor: Tensor) -> Tensor:
        """(world * rows, ...) in rank order, as gather_rows returns them -> this process's (rows, ...)."""
        rows = tensor.shape[0] // self.world
        return tensor[self.rank * rows:(self.rank + 1) * rows]

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()


def init_distributed() -> Dist:
    """Join the process group that `accelerate launch` (or torchrun) set up in the environment.

    Accelerate initialises NCCL on GPUs; a CPU-only `--multi_gpu` launch is left undistributed by it, so
    gloo is initialised here.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch_dist.is_initialized():
        from accelerate import PartialState

        PartialState()
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("gloo")
    rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
    world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return Dist(rank=rank, world=world, device=device)

