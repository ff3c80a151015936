"""Data-parallel calibration statistics under ``torchrun`` (torch.distributed).

When a process group is initialized (``torchrun --nproc-per-node N script.py`` with
``torch.distributed.init_process_group("gloo")`` on CPUs, ``"nccl"`` on GPUs), a pass that opts
in runs only this process's share of the calibration batches (`shard`: batch i goes to rank
i mod N) and sums its statistics over all processes (`all_sum`, one all_reduce per tensor in a
fixed order), so every process makes the same choices and writes the same weights as one
process would, to rounding. Without a process group everything is local and unchanged.

Passes that sum per-batch statistics opt in: prune-heads (gradient, activation, mean head
outputs for compensation), sparse heads=auto and drop-attn (cosine, gradient scores). The
others (gqa fit, share layers=auto, heal) still run every batch on every process: same result,
no speed-up."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

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
