"""What a run shows while it trains: the status line on the terminal, TensorBoard when installed."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def tensorboard_writer(path: Path):  # noqa: ANN202 - SummaryWriter | None
    """TensorBoard logging when the tensorboard package is installed; nothing otherwise."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


class Progress:
    """One status line: redrawn in place on a terminal, printed at log steps otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.tty = total, enabled, sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, step: int, row: dict | None, text: str) -> None:
        if not self.enabled or (not self.tty and row is None):
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(step, 1) * (self.total - step)
        line = f"step {step}/{self.total} | {text} | {elapsed:.0f}s elapsed, eta {eta:.0f}s"
        sys.stderr.write(("\r" + line + " " * 4) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
