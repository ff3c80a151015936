"""What `heal` trains, and how: which tensors (the projections of the sites a rewrite changed,
or of every site), in full or as low-rank adapters merged back at the end.

Training never edits a program's tensors: `Trainable` holds fp32 master copies (or adapters)
and hands out the current weights by name; `merged()` gives the tensors to write into a new
program, in the original dtypes and shapes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rewriter.ir.graph import fetch_attr

ROLES = ("q", "k", "v", "o")


def _attrs(site) -> tuple:
    return (site.num_heads, site.num_kv_heads, site.head_dim, site.sparsity, site.kv_source,
            site.attn_source, site.softcap, site.scale)


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def rewritten_sites(program, teacher) -> list[int]:
    """Sites whose attributes (heads, masks, sharing) or projection weights differ from the
    teacher's, and for each teacher site the program dropped (drop-attn) the next site left
    (the last one before it at the end): the attention that now sees the changed stream."""
    before = {s.index: s for s in teacher.sites}
    changed = {s.index for s in program.sites
               if _site_changed(program, s, teacher, before.get(s.index))}
    left = sorted(s.index for s in program.sites)
    for index in set(before) - set(left):
        later = [i for i in left if i > index]
        earlier = [i for i in left if i < index]
        if later or earlier:
            changed.add(later[0] if later else earlier[-1])
    return sorted(changed)


def _site_changed(program, site, teacher, old) -> bool:
    if old is None or _attrs(site) != _attrs(old):
        return True
    for role in ROLES:
        proj, old_proj = getattr(site, f"{role}_proj"), getattr(old, f"{role}_proj")
        if (proj is None) != (old_proj is None):
            return True
        if proj is not None and not _same_tensor(fetch_attr(program.module, proj.weight),
                                                 fetch_attr(teacher.module, old_proj.weight)):
            return True
    return False


def projection_tensors(program, sites: list[int], biases: bool = True) -> list[str]:
    """Weight (and bias) names of the q/k/v/o projections of ``sites``, each once."""
    chosen = set(sites)
    names: dict[str, None] = {}
    for site in program.sites:
        if site.index not in chosen:
            continue
        for role in ROLES:
            proj = getattr(site, f"{role}_proj")
            if proj is None:
                continue
            names[proj.weight] = None
            if biases and proj.bias:
                names[proj.bias] = None
    return list(names)


class Trainable:
    """The tensors being trained. ``rank`` None: each in full (an fp32 master copy); else a
    rank-``rank`` adapter W + B @ A per 2-D weight (B starts at zero, so training starts from
    the rewritten program exactly)."""

    def __init__(self, module: torch.nn.Module, names: list[str], rank: int | None = None,
                 generator: torch.Generator | None = None):
        self.base = {n: fetch_attr(module, n).detach() for n in names}
        self.rank = rank
        self.full: dict[str, torch.nn.Parameter] = {}
        self.adapters: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        for name, w in self.base.items():
            if rank is None:
                self.full[name] = torch.nn.Parameter(w.float().clone())
            elif w.dim() == 2:
                a = torch.randn(rank, w.shape[1], generator=generator) / math.sqrt(w.shape[1])
                b = torch.zeros(w.shape[0], rank)
                self.adapters[name] = (torch.nn.Parameter(a), torch.nn.Parameter(b))

    @property
    def names(self) -> list[str]:
        return list(self.full) + list(self.adapters)

    def parameters(self, names: set[str] | None = None) -> list[torch.nn.Parameter]:
        out = []
        for name in self.names:
            if names is None or name in names:
                out.extend([self.full[name]] if name in self.full else self.adapters[name])
        return out

    def count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def weight(self, name: str) -> Tensor | None:
        """The current value of a trained tensor (None for one not trained)."""
        if name in self.full:
            return self.full[name].to(self.base[name].dtype)
        if name in self.adapters:
            a, b = self.adapters[name]
            return (self.base[name].float() + b @ a).to(self.base[name].dtype)
        return None

    def merged(self) -> dict[str, Tensor]:
        with torch.no_grad():
            return {name: self.weight(name).detach().clone() for name in self.names}
