"""Data-parallel training under ``torchrun``: DDP.

``torchrun --nproc-per-node N -m folklm.cli.main tune ...`` starts N processes with
``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set; each joins one process group, holds a full
copy of the model (DDP, Li et al., 2020, arXiv:2006.15704) and trains on its own slice of
each global batch; gradients are averaged across processes in the backward pass.
Without those variables everything here is a no-op (world size 1).

The trainer keeps tensors on the CPU, so the backend is gloo. PyTorch's FSDP (Zhao et al.,
2023, arXiv:2304.11277) refuses to run without an accelerator ("FSDP needs a non-CPU
accelerator device"), so ``parallel=fsdp`` is refused with that reason when the recipe is
validated (in one process as under torchrun) rather than silently ignored.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from folklm.errors import FolkError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1


def context() -> Context:
    """This process's rank and the world size, joining the process group on first use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")  # tensors stay on the CPU
    return Context(dist.get_rank(), dist.get_world_size())


def wrap(module: nn.Module, recipe, ctx: Context) -> nn.Module:
    """DDP around ``module``; the module itself when not distributed."""
    if recipe.parallel != "ddp":  # Recipe.validate refuses anything else first
        raise FolkError(f"parallel={recipe.parallel!r}: only ddp is supported")
    if not ctx.active:
        return module
    return DDP(module)


def no_sync(module: nn.Module):
    """Skip the gradient all-reduce (gradient accumulation micro-batches but the last)."""
    return module.no_sync() if isinstance(module, DDP) else nullcontext()


def all_reduce_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
