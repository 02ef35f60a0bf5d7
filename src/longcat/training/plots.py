"""`longcat plot RUN_DIR`: PNG pictures of a run's metrics.jsonl (needs matplotlib: `pip install longcat[plot]`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data.corpus import DataError


def read_metrics(run_dir: str | os.PathLike) -> tuple[list[dict], list[dict], list[dict]]:
    """(training rows, evaluation rows, events such as a growth by `longcat grow`) of a run."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir} has no metrics.jsonl: it is not a training run directory")
    train, evals, events = [], [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        (events if "event" in row else evals if "val_loss" in row else train).append(row)
    return train, evals, events


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise DataError("longcat plot needs matplotlib: pip install 'longcat[plot]'") from err
    train, evals, events = read_metrics(run_dir)
    if not train:
        raise DataError(f"{run_dir}/metrics.jsonl has no training rows yet")
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in train]
    written = []

    def save(fig, name: str) -> None:  # noqa: ANN001
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in train], label="train (LM)")
    mtp = [(r["step"], r["mtp_loss"]) for r in train if r.get("mtp_loss") is not None]
    if mtp:
        ax.plot(*zip(*mtp), label="train (MTP)", alpha=0.7)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
        for key in sorted(k for k in evals[-1] if k.startswith("val_loss_")):
            ax.plot([r["step"] for r in evals], [r.get(key) for r in evals], "--", label=key.removeprefix("val_loss_"))
    for event in events:
        if event["event"] == "growth":
            label = f"grown {event['layers_before']} -> {event['layers_after']} layers"
            ax.axvline(event["step"], color="k", ls=":", lw=1, label=label)
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="Loss")
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    layers = max(len(r["ffn_experts_per_layer"]) for r in train)  # a grown run has more layers later
    for i in range(layers):
        per_layer = [r["ffn_experts_per_layer"][i] if i < len(r["ffn_experts_per_layer"]) else None for r in train]
        ax.plot(steps, per_layer, label=f"layer {i}")
    ax.plot(steps, [r["ffn_experts_target"] for r in train], "k--", label="target K_e")
    ax.set(xlabel="step", ylabel="FFN experts per token", title="Compute per token (zero experts take the rest)")
    ax.legend()
    save(fig, "ffn_experts.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["controller_error"] for r in train], label="mean - K_e")
    ax.plot(steps, [r["max_violation"] for r in train], label="MaxVio", alpha=0.7)
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xlabel="step", title="Budget controller error and load violation")
    ax.legend()
    save(fig, "controller.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["grad_norm_ratio"] for r in train], label="R_g")
    ax.axhline(0.1, color="r", ls="--", label="0.1 (paper's ceiling)")
    ax.set(xlabel="step", ylabel="|alpha grad L_LB| / |grad L_LM|", title="Gradient-norm ratio (Eq. 9)", yscale="log")
    ax.legend()
    save(fig, "grad_norm_ratio.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["hidden_l2"] for r in train], label="mean L2 norm")
    ax.plot(steps, [r["hidden_max_abs"] for r in train], label="max |h|")
    ax.set(xlabel="step", title="Last hidden state (before the final norm)", yscale="log")
    ax.legend()
    save(fig, "hidden_state.png")
    return written
