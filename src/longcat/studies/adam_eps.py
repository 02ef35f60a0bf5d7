"""The adam-eps study's arms and report: validation loss, the gradient's RMS and the rounding drift
(drift.py) against Adam's epsilon at two widths (paper §3.1.3, Fig. 7)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import drift
from .runner import Arm


def gradient_rms(run_dir: Path) -> dict:
    """The gradient's RMS over all parameters at the last logged step: grad_norm / sqrt(parameters)."""
    config = json.loads((run_dir / "model_config.json").read_text())
    from ..accounting import model_report
    from ..config import LongcatConfig

    params = model_report(LongcatConfig.from_dict(config)).total_params
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    norms = [r["grad_norm"] for r in rows if r.get("grad_norm") is not None]
    return {"grad_rms": norms[-1] / math.sqrt(params) if norms else None}


DRIFT_STEPS = 24  # the rounding-drift pair's length (steps of the arm's own schedule)
EPS_ARMS = ((1e-16, 128), (1e-12, 128), (1e-8, 128), (1e-6, 128), (1e-4, 128), (1e-3, 128), (1e-16, 256),
            (1e-6, 256), (1e-4, 256))  # fmt: skip


def power(eps: float) -> str:
    return f"1e{round(math.log10(eps))}"


def eps_arm(eps: float, width: int) -> Arm:
    settings = {"adam_eps": eps} if width == 128 else {"adam_eps": eps, "model.hidden_size": width}
    return Arm(f"eps-{power(eps)}" + ("" if width == 128 else f"-w{width}"), settings,
               run=drift.drift_measured_arm(DRIFT_STEPS))  # fmt: skip


def measure(run_dir: Path) -> dict:
    return {**gradient_rms(run_dir), **drift.read_drift(run_dir)}


def compare(results: dict) -> tuple[str, str]:
    """A: epsilon 1e-16; B: the width-128 arm whose epsilon is nearest (in log) the gradient RMS that A measured,
    the claim's "epsilon comparable to the gradient RMS"."""
    rms = [r["grad_rms"] for r in results.values() if r["arm"] == "eps-1e-16" and r.get("grad_rms")]
    if not rms:
        return "eps-1e-16", "eps-1e-4"
    target = math.log10(sum(rms) / len(rms))
    eps = min((e for e, width in EPS_ARMS if width == 128), key=lambda e: abs(math.log10(e) - target))
    return "eps-1e-16", f"eps-{power(eps)}"


def report_lines(results: dict) -> list[str]:
    """Loss and gradient RMS (means over seeds) and rounding drift (each seed) against epsilon, per width."""

    def mean(rows: list[dict], key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    def cell(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def per_seed(rows: list[dict], key: str) -> str:  # drift is bimodal over seeds: a mean would hide it
        return " / ".join(cell(r.get(key), ".1e") for r in sorted(rows, key=lambda r: r["seed"]))

    lines = ["## Epsilon against the gradient's RMS (means over seeds), and rounding drift (each seed)", "",
             f"Drift: the arm's first {DRIFT_STEPS} steps run twice in one process, the second with every initial "
             "weight nudged by one ulp; ||w_a - w_b|| / ||w_a|| per parameter tensor (median and worst over "
             "tensors) and the gap between the two runs' losses at that step, seed 0 / seed 1 / ...", "",
             "| width | epsilon | val_loss | grad RMS | epsilon / grad RMS | drift median | drift worst | worst tensor "
             "| loss gap |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for eps, width in EPS_ARMS:
        arm = eps_arm(eps, width).name
        rows = [r for r in results.values() if r["arm"] == arm]
        if not rows:
            continue
        rms = mean(rows, "grad_rms")
        ratio = eps / rms if rms else None
        worst = sorted({r.get("drift_worst_tensor") for r in rows if r.get("drift_worst_tensor")})
        lines.append(
            f"| {width} | {power(eps)} | {cell(mean(rows, 'val_loss'), '.4f')} | {cell(rms, '.2e')} "
            f"| {cell(ratio, '.2g')} "
            f"| {per_seed(rows, 'drift_median')} | {per_seed(rows, 'drift_max')} "
            f"| {', '.join(f'`{w}`' for w in worst) or '-'} | {per_seed(rows, 'drift_loss')} |"
        )
    plot = plot_eps(results)
    return [*lines, "", *([f"![epsilon]({plot.name})", ""] if plot else [])]


def plot_eps(results: dict) -> Path | None:
    """eps.png beside the report: validation loss (mean, error bar = std over seeds; a line per width) and
    every seed's drift median against epsilon, each width's gradient RMS marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import statistics

    if not results:
        return None
    out = Path(next(iter(results.values()))["run_dir"]).parents[2]
    fig, (loss_ax, drift_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for colour, width in enumerate(sorted({w for _, w in EPS_ARMS})):
        xs, losses, errors, rms = [], [], [], []
        for eps, w in sorted(EPS_ARMS):
            rows = [r for r in results.values() if r["arm"] == eps_arm(eps, w).name] if w == width else []
            values = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
            if not values:
                continue
            xs.append(eps)
            losses.append(statistics.fmean(values))
            errors.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            seeds = [r["drift_median"] for r in rows if r.get("drift_median") is not None]
            drift_ax.scatter(
                [eps * (1.25 if colour else 0.8)] * len(seeds),
                seeds,
                color=f"C{colour}",
                s=18,
                label=f"width {width}" if eps == min(e for e, w2 in EPS_ARMS if w2 == width) else None,
            )
            rms += [r["grad_rms"] for r in rows if r.get("grad_rms")]
        if not xs:
            continue
        loss_ax.errorbar(xs, losses, yerr=errors, marker="o", color=f"C{colour}", label=f"width {width}")
        if rms:
            for ax in (loss_ax, drift_ax):
                ax.axvline(statistics.fmean(rms), color=f"C{colour}", linestyle=":", alpha=0.7)
    loss_ax.set(xscale="log", xlabel="Adam epsilon (dotted: gradient RMS)", ylabel="validation loss")
    drift_ax.set(xscale="log", yscale="log", xlabel="Adam epsilon",
                 ylabel=f"drift median after {DRIFT_STEPS} steps (each seed)")  # fmt: skip
    loss_ax.legend()
    drift_ax.legend()
    fig.tight_layout()
    path = out / "eps.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
