"""Data-parallel calibration statistics under ``torchrun`` (torch.distributed).

When a process group is initialized (``torchrun --nproc-per-node N script.py`` with
``torch.distributed.init_process_group("gloo")`` on CPUs, ``"nccl"`` on GPUs), a pass that opts
in runs only this process's share of the calibration batches (`shard`: batch i goes to rank
i mod N) and sums its statistics over all processes (`all_sum`, one all_reduce per tensor in a
fixed order), so every process makes the same choices and writes the same weights as one
process would, to rounding. Without a process group everything is local and unchanged.

Every calibrated pass opts in:
- prune-heads (gradient, activation, mean head outputs for compensation), sparse heads=auto,
  drop-attn (cosine, gradient scores) and share layers=auto sum per-batch statistics;
- gqa fit runs each layer on this process's batches and `gather`s the activations the fit
  reads, so every process fits the same maps;
- heal trains under DistributedDataParallel (`distributed`): a step's windows are split over
  the processes and DDP averages the gradients, so a step is the same step at any world size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batches: Sequence[T]) -> list[T]:
    """This process's calibration batches: every N-th, starting at its rank."""
    rank, size = world()
    return list(batches[rank::size])


def all_sum(stats: dict, counts: dict | None = None) -> None:
    """Sum, in place and over all processes, every value (tensor or number) in ``stats`` and
    ``counts`` (keys visited in sorted order, so all processes issue the same all_reduce
    calls). Every process must hold the same keys."""
    if world()[1] == 1:
        return
    dist = torch.distributed
    for table in (stats, counts or {}):
        for key in sorted(table):
            value = table[key]
            if isinstance(value, torch.Tensor):
                dist.all_reduce(value, op=dist.ReduceOp.SUM)
            else:  # a Python number: summed in float64, given back as a number
                total = torch.tensor(float(value), dtype=torch.float64)
                dist.all_reduce(total, op=dist.ReduceOp.SUM)
                table[key] = total.item()


def gather(items: list) -> list:
    """Every process's ``items``, concatenated in rank order (``all_gather_object``)."""
    size = world()[1]
    if size == 1:
        return list(items)
    parts: list = [None] * size
    torch.distributed.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def any_rank(flag: bool) -> bool:
    """True on every process when it is true on any: decisions that end a loop (a deadline)
    must agree, or the processes wait on each other's collectives forever."""
    if world()[1] == 1:
        return flag
    value = torch.tensor(int(flag))
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


class _Objective(torch.nn.Module):
    """A loss function as a module that owns the parameters it trains (what DDP wraps)."""

    def __init__(self, params: list[torch.nn.Parameter], loss: Callable[..., torch.Tensor]):
        super().__init__()
        self.trained = torch.nn.ParameterList(params)
        self.loss = loss

    def forward(self, *args):
        return self.loss(*args)


def distributed(params: list[torch.nn.Parameter], loss: Callable[..., torch.Tensor]
                ) -> Callable[..., torch.Tensor]:
    """``loss`` whose backward averages the gradients of ``params`` over the processes
    (DistributedDataParallel; gloo on CPUs, NCCL on GPUs); ``loss`` itself without a process
    group. Every process must call it once per step."""
    if world()[1] == 1:
        return loss
    return DistributedDataParallel(_Objective(params, loss), find_unused_parameters=True)
