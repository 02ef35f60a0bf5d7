"""`longcat train --nproc N`: start N workers on this machine through PyTorch's elastic launcher
(`torch.distributed.run`, what `torchrun` runs), each running `python -m longcat train ...` with the
same arguments. It sits above training and distributed/ (../shared/DESIGN.md): it only decides what
must be decided once, before any worker starts.

- The layout is checked here (E divides N and the model's expert count), so a bad one fails before
  any process starts.
- The run directory is chosen once (a default name carries one timestamp, not one per rank).
- Each worker gets the machine's threads divided by the local workers (at least 1) through
  OMP_NUM_THREADS, set before the launcher runs: torchrun would otherwise give each worker 1.
- A worker that fails (an exception, or kill -9) ends the job; the launcher names the rank.
"""

from __future__ import annotations

import os
import sys

from .config import ConfigError
from .distributed.layout import check_layout


def worker_threads(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)


def launch_train(worker_args: list[str], nproc: int, ep: int, num_experts: int, max_restarts: int = 0) -> int:
    """Run `longcat train WORKER_ARGS --ep EP` on nproc local workers; returns the job's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    check_layout(nproc, ep, num_experts)
    if max_restarts < 0:
        raise ConfigError(f"--max-restarts must be 0 or more, got {max_restarts}")
    os.environ["OMP_NUM_THREADS"] = str(worker_threads(nproc))
    launcher_args = get_args_parser().parse_args(
        [
            "--standalone",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(nproc),
            "--max-restarts",
            str(max_restarts),
            "-m",
            "longcat",
            "train",
            *worker_args,
            "--ep",
            str(ep),
        ]  # fmt: skip
    )
    try:
        run(launcher_args)
    except ChildFailedError as err:
        for rank, failure in sorted(err.failures.items()):
            how = (
                f"killed by signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            )
            print(f"longcat: worker rank {rank} failed ({how}); the job was stopped", file=sys.stderr)
        return 1
    return 0
