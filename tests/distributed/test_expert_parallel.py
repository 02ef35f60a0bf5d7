"""Expert parallelism on gloo against one process: each rank runs the whole model on its own batch with
its experts split over the ranks; logits and dense gradients must equal one process's on that batch,
and each rank's expert gradients the sum over all ranks' batches (its experts saw every rank's rows)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.distributed.ep_worker import batch, build

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.multiprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, out: Path, overlap: bool, timeout: float = 120) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'src'}", OMP_NUM_THREADS="1")
    port = str(free_port())
    worker = str(REPO / "tests" / "distributed" / "ep_worker.py")
    args = [str(world), port, str(out), str(int(overlap))]
    procs = [
        subprocess.Popen([sys.executable, worker, str(rank), *args], env=env, stderr=subprocess.PIPE, text=True)
        for rank in range(world)
    ]
    errors = []
    try:
        for rank, proc in enumerate(procs):
            _, err = proc.communicate(timeout=timeout)
            if proc.returncode:
                errors.append(f"rank {rank} exited {proc.returncode}: {err[-2000:]}")
    finally:
        for proc in procs:
            proc.kill()
    assert not errors, "\n".join(errors)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(world)]


@pytest.mark.parametrize(("world", "overlap"), [(2, True), (2, False), (4, True)])
def test_expert_parallel_equals_one_process(world: int, overlap: bool, tmp_path) -> None:
    """With the overlap, in two token chunks whose exchanges interleave; without, in sequence."""
    results = run_ranks(world, tmp_path, overlap)
    reference = build()
    per_rank_grads = []
    for rank, result in enumerate(results):
        reference.zero_grad()
        ids = batch(rank, reference.config.vocab_size)
        expected = reference(ids, labels=ids)
        expected.loss.backward()
        torch.testing.assert_close(result["logits"], expected.logits.detach(), rtol=1e-5, atol=1e-5)
        per_rank_grads.append({n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None})
        assert result["waits"] > 0
        # the split sizes are each dispatch's one host read (a device sync on an accelerator)
        layers = len(reference.moe_layers())
        assert result["dispatch_reads"] == [{"Tensor.tolist": 1}] * layers, result["dispatch_reads"]
    experts = reference.config.n_routed_experts // world
    for rank, result in enumerate(results):
        for name, grad in result["grads"].items():
            if ".experts." in name:  # this rank's slice of every rank's contribution
                want = sum(g[name][rank * experts : (rank + 1) * experts] for g in per_rank_grads)
            else:
                want = per_rank_grads[rank][name]
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        assert set(result["grads"]) == set(per_rank_grads[rank])
