"""How far two training runs that differ only in floating-point rounding drift apart (paper §3.1.3, Fig. 7).

A tiny Adam epsilon divides each update by sqrt(v) alone, so a parameter whose gradient is near zero
gets a full-size step whose sign the gradient's last bits decide: rounding noise becomes weight
change. This measures that amplification directly: the same run twice, in memory, from the same seed,
data and schedule, one of them with every initial weight moved by one unit in the last place (ulp, a
random direction per element: what rounding the initialisation the other way would give). After
`steps` optimizer steps of the arm's own schedule it compares every parameter tensor:
||w_a - w_b||_F / ||w_a||_F, the median and the worst over tensors, and the two runs' losses.

Both runs are ordinary `Trainer`s taking `train_step` (no second training loop); the unperturbed pair
is bit-identical in one process (tests/studies checks that control), so every difference measured
comes from the one-ulp start.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import torch

from ..training.config import TrainConfig

DRIFT_FILE = "drift.json"


@torch.no_grad()
def nudge_one_ulp(model: torch.nn.Module, seed: int) -> None:
    """Move every floating-point parameter element to its neighbouring representable value, up or down at
    random (a generator seeded with `seed`, so the nudge itself is reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if not param.is_floating_point():
            continue
        up = torch.rand(param.shape, generator=generator) < 0.5
        target = torch.where(up, torch.inf, -torch.inf).to(param.device, param.dtype)
        param.copy_(torch.nextafter(param, target))


def _run_steps(cfg: TrainConfig, run_dir: Path, steps: int, nudge_seed: int | None) -> tuple[dict, float]:
    from ..training.trainer import Trainer

    trainer = Trainer(cfg, run_dir, progress=False)
    if nudge_seed is not None:
        nudge_one_ulp(trainer.model, nudge_seed)
    row = None
    for step in range(steps):
        row = trainer.train_step(monitor=step == steps - 1)
    weights = {name: p.detach().float().cpu().clone() for name, p in trainer.model.named_parameters()}
    return weights, (row or {}).get("loss", float("nan"))


def rounding_drift(cfg: TrainConfig, work_dir: Path, steps: int, nudge: bool = True) -> dict:
    """Train `steps` steps twice under `cfg` (the second nudged by one ulp unless `nudge` is False: the
    control) and report how far the weights and losses ended apart."""
    a_dir, b_dir = work_dir / "drift-a", work_dir / "drift-b"
    try:
        weights_a, loss_a = _run_steps(cfg, a_dir, steps, None)
        weights_b, loss_b = _run_steps(cfg, b_dir, steps, cfg.seed + 1 if nudge else None)
    finally:
        for path in (a_dir, b_dir):
            shutil.rmtree(path, ignore_errors=True)
    relative = {}
    for name, a in weights_a.items():
        norm = a.norm()
        relative[name] = float((a - weights_b[name]).norm() / norm) if norm > 0 else float((a - weights_b[name]).norm())
    worst = max(relative, key=relative.get)
    return {
        "drift_steps": steps,
        "drift_median": statistics.median(relative.values()),
        "drift_max": relative[worst],
        "drift_worst_tensor": worst,
        "drift_loss": abs(loss_a - loss_b),
    }


def drift_measured_arm(steps: int):
    """An arm's run: its ordinary training run, then the rounding-drift pair over its first `steps` steps
    (same settings and schedule), written to the run directory's drift.json."""

    def run(cfg: TrainConfig, run_dir: Path, progress: bool) -> None:
        from ..training.trainer import train

        train(cfg, run_dir, progress=progress)
        drift = rounding_drift(cfg, run_dir, min(steps, cfg.max_steps))
        (run_dir / DRIFT_FILE).write_text(json.dumps(drift, indent=2) + "\n")

    return run


def read_drift(run_dir: Path) -> dict:
    path = run_dir / DRIFT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
