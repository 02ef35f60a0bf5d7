"""Collectives entered by every rank: reductions over gradients when one rank holds none for a module
(a frozen module, an expert that received no tokens) complete instead of waiting forever."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tests.distributed.test_expert_parallel import REPO, free_port

pytestmark = pytest.mark.multiprocess


def test_gradient_reductions_complete_when_a_rank_has_no_gradient(tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'src'}", OMP_NUM_THREADS="1")
    worker, port = str(REPO / "tests" / "distributed" / "uneven_grads_worker.py"), str(free_port())
    procs = [subprocess.Popen([sys.executable, worker, str(rank), "2", port, str(tmp_path)], env=env,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]  # fmt: skip
    try:
        for rank, proc in enumerate(procs):
            _, err = proc.communicate(timeout=30)  # a rank left waiting in a collective ends here
            assert proc.returncode == 0, f"rank {rank}: {err[-2000:]}"
    finally:
        for proc in procs:
            proc.kill()
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0] == results[1]  # every rank computed the same values
    # the norm counts rank 0's gradients of the second Linear once: 0.5, 1.0 (rank 0 and 1), 1.5, 2.0 (rank 0)
    expected = (2 * (16 * 0.25 + 4 * 1.0) + 16 * 2.25 + 4 * 4.0) ** 0.5
    assert results[0]["norm"] == pytest.approx(expected, rel=1e-6)
    assert results[0]["small_share"] == 0.0 and results[0]["grad_norm_ratio"] > 0
