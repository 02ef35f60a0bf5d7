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

Each worker's own lifecycle is here too: `restarted_worker` (torchrun restarting failed workers, which
then continue from the last complete checkpoint), `join` (the process group and meshes; a restart
before any checkpoint starts the run over) and `run_worker` (every rank's error shown, a barrier so no
rank tears its connections down while another still uses them, the process group destroyed, and an
exit that skips the interpreter's teardown).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError
from .distributed.layout import Layout, check_layout, in_torchrun


def restarted_worker() -> bool:
    """Whether this process is a worker torchrun restarted after a failure (--max-restarts)."""
    return in_torchrun() and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def join(out: Path, ep: int, device_type: str, start_over: bool) -> Layout:
    """Join the job's process group (distributed/layout.py). start_over: a restarted attempt with no
    checkpoint to resume from, so the failed attempt's metrics rows go and the run starts again."""
    import torch.distributed as dist

    from .distributed.layout import init_layout

    layout = init_layout(ep, device_type)
    if start_over:
        if layout.is_main:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        dist.barrier()
    return layout


def run_worker(layout: Layout | None, body: Callable[[], None], expected: tuple[type[BaseException], ...]) -> int:
    """Run body() as one process (layout None: errors propagate, except `expected` ones, reported) or
    as a worker of a job; returns the exit code (a worker exits the process instead)."""
    finished = False
    try:
        body()
        finished = True
    except expected as err:
        where = "" if layout is None or layout.is_main else f"rank {layout.rank}: "
        print(f"longcat: {where}{err}", file=sys.stderr)
    except BaseException:
        if layout is None:
            raise
        import traceback

        print(f"longcat: rank {layout.rank} failed:", file=sys.stderr)
        traceback.print_exc()  # every rank's error is shown, not only rank 0's
    finally:
        if layout is not None:
            import torch.distributed as dist

            if finished:
                dist.barrier()  # no rank tears its connections down while another still uses them
            dist.destroy_process_group()
            # a worker leaves without the interpreter's teardown: gloo's threads have aborted a worker
            # there ("terminate called without an active exception") after its work was done
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0 if finished else 1)
    return 0 if finished else 1


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
