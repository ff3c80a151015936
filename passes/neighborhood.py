"""``sparse:neighborhood=K``: neighbourhood attention masks on vision token grids (the mask
itself, after NATTEN, is `rewriter.ir.masks.MaskSpec`; this module finds the grid and checks
each site's token count). Used by the ``sparse`` pass (passes/sparse.py).

Without ``grid=``, the grid is read from the model's patch embedding: the convolution whose
stride equals its kernel size (ViT, CLIP, VideoMAE's tubelets), its output's spatial shape
[B, C, H, W] -> HxW ([B, C, T, H, W] -> TxHxW). Without ``global=``, the global tokens are the
site's keys beyond the grid (ViT's CLS: 1).
"""

from __future__ import annotations

import math

import torch

from rewriter.errors import SpecError
from rewriter.ir.graph import canonical_nodes
from rewriter.ir.masks import MaskSpec
from rewriter.ir.specs import Spec

_CONVS = {torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default,
          torch.ops.aten.convolution.default, torch.ops.aten._convolution.default}


def patch_grids(module) -> list[tuple[int, ...]]:
    """The output grids of the patch embeddings in ``module``'s graph (distinct, in graph
    order): convolutions whose stride equals their kernel size (> 1 on some axis), 2-D or 3-D,
    with static output sizes."""
    grids: list[tuple[int, ...]] = []
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target not in _CONVS:
            continue
        weight, out = node.args[1].meta.get("val"), node.meta.get("val")
        if weight is None or out is None or weight.dim() not in (4, 5):
            continue
        kernel = tuple(weight.shape[2:])
        stride = node.args[3] if len(node.args) > 3 else node.kwargs.get("stride", 1)
        stride = tuple(stride) if isinstance(stride, (list, tuple)) else (stride,) * len(kernel)
        if len(stride) == 1:
            stride = stride * len(kernel)
        if stride != kernel or max(kernel) == 1:
            continue
        grid = tuple(out.shape[2:])
        if all(isinstance(g, int) for g in grid) and grid not in grids:
            grids.append(grid)
    return grids


def neighborhood_masks(program, spec: Spec) -> dict[int, MaskSpec]:
    """site index -> its MaskSpec, for the sites ``spec`` (sparse:neighborhood=K...) covers."""
    p = spec.params
    grid = p["grid"]
    if grid is None:
        grids = patch_grids(program.module)
        if not grids:
            raise SpecError(f"spec {spec}: no patch embedding (a convolution whose stride "
                            "equals its kernel) in the graph: give grid=HxW or grid=TxHxW")
        if len(grids) > 1:
            raise SpecError(f"spec {spec}: patch embeddings give several grids "
                            f"({', '.join(_text(g) for g in grids)}): pick one with grid=")
        grid = grids[0]
    nodes = canonical_nodes(program.module)
    masks = {}
    for site in program.sites:
        if p["layers"] is not None and site.layer not in p["layers"]:
            continue
        keys = nodes[site.node].args[1].meta["val"].shape[2]
        cells = math.prod(grid)
        if not isinstance(keys, int):  # a dynamic token count: only an explicit global=
            if p["global"] is None:
                raise SpecError(f"spec {spec}: site {site.index} has a dynamic token count; "
                                "give global=N (tokens before the grid)")
            keys = p["global"] + cells
        n = keys - cells if p["global"] is None else p["global"]
        if n < 0 or n + cells != keys:
            raise SpecError(f"spec {spec}: site {site.index} ({site.module_path}) has {keys} "
                            f"tokens, the grid {_text(grid)} has {cells}"
                            + ("" if p["global"] is None else f" plus global={n}"))
        masks[site.index] = MaskSpec(dilation=p["dilation"], neighborhood=p["neighborhood"],
                                     grid=grid, globals_=n)
    return masks


def _text(grid: tuple[int, ...]) -> str:
    return "x".join(map(str, grid))
