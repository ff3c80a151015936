"""Data-parallel calibration (rewriter.passes.parallel): two processes under torchrun (gloo on
CPU), each calibrating on half of the batches, write the weights one process writes, to
rounding; without a process group nothing changes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dp_worker import rewritten

from rewriter.errors import SpecError
from rewriter.passes.parallel import shard, world

WORKER = Path(__file__).parent / "dp_worker.py"


def test_single_process_is_local():
    assert world() == (0, 1)
    assert shard([1, 2, 3]) == [1, 2, 3]


def test_heal_batch_must_split_over_processes(monkeypatch):
    """batch=N windows per step split over the processes: N must be a multiple of them."""
    import rewriter.passes.heal as heal

    monkeypatch.setattr(heal, "world", lambda: (0, 2))
    with pytest.raises(SpecError, match="batch=3 .* 2 processes"):
        rewritten("gqa:kv-heads=1,merge=mean;heal:steps=1,batch=3")


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["prune-heads:ratio=0.5,score=gradient",
                                  "prune-heads:ratio=0.5,score=activation",
                                  "sparse:heads=auto,window=4,density=0.5,ctx=12",
                                  "drop-attn:ratio=0.5,score=cosine",
                                  "gqa:kv-heads=1,merge=fit,grouping=similarity",
                                  "share-kv:group=2,layers=auto",
                                  "gqa:kv-heads=1,merge=mean;heal:steps=3,batch=2",
                                  "gqa:kv-heads=1,merge=mean;heal:steps=2,batch=4,params=lora:2"])
def test_two_processes_write_the_weights_of_one(tmp_path, spec):
    from safetensors.torch import load_file

    out = tmp_path / "weights.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", str(WORKER), str(out), spec],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one = rewritten(spec)
    assert (tmp_path / "sites.txt").read_text() == \
        repr([(s.num_heads, s.sparsity) for s in one.sites])  # the same choices
    two = load_file(str(out))
    state = one.module.state_dict()
    assert two.keys() == state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
