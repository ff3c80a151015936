"""A data-parallel rewrite, run by tests/test_data_parallel.py under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dp_worker.py OUT SPECS

Every process captures the same zoo model and rewrites it with SPECS (``;``-separated, one
`rw.rewrite` call each, so a later heal trains toward the program before the first) on the
same calibration batches (each process calibrating or training on its share); rank 0 writes
the weights to OUT (safetensors)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import zoo  # noqa: E402

import rewriter as rw  # noqa: E402

CALIB = [zoo._ids(2, 12, seed=s) for s in range(10, 14)]


def rewritten(specs: str) -> rw.Program:
    torch.manual_seed(0)
    prog = rw.capture(zoo.get("llama-sdpa").build(), (zoo._ids(2, 7),), {"use_cache": False})
    for spec in specs.split(";"):
        prog = rw.rewrite(prog, spec, calibration=CALIB)
    return prog


def main() -> None:
    out, spec = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    new = rewritten(spec)
    if dist.get_rank() == 0:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in new.module.state_dict().items()}
        save_file(state, str(out))
        (out.parent / "sites.txt").write_text(repr([(s.num_heads, s.sparsity)
                                                    for s in new.sites]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
