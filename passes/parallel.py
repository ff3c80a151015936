"""Data-parallel calibration statistics under ``torchrun`` (torch.distributed).

When a process group is initialized (``torchrun --nproc-per-node N script.py`` with
``torch.distributed.init_process_group("gloo")`` on CPUs, ``"nccl"`` on GPUs), a pass that opts
in runs only this process's share of the calibration batches (`shard`: batch i goes to rank
i mod N) and sums its statistics over all processes (`all_sum`, one all_reduce per tensor in a
fixed order), so every process makes the same choices and writes the same weights as one
process would, to rounding. Without a process group everything is local and unchanged.

Passes that sum per-batch statistics opt in: prune-heads (gradient, activation, mean head
outputs for compensation) and sparse heads=auto. The others (gqa fit, share layers=auto,
drop-attn scores, heal) still run every batch on every process: same result, no speed-up."""

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
    """Sum, in place and over all processes, every tensor in ``stats`` (keys visited in
    sorted order, so all processes issue the same all_reduce calls) and every number in
    ``counts``. Every process must hold the same keys."""
    if world()[1] == 1:
        return
    dist = torch.distributed
    for key in sorted(stats):
        value = stats[key]
        tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        stats[key] = tensor
    for key in sorted(counts or {}):
        total = torch.tensor(float(counts[key]), dtype=torch.float64)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        counts[key] = total.item()
