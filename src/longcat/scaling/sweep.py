"""`longcat sweep`: train every point of a hyperparameter grid (times seeds) as an ordinary run, and
collect the outcome of each in `sweep.json`, with a plot of validation loss against every swept value.

Each point is a `longcat train` process writing its own run directory under DIR/runs/, so a point
that crashes or diverges cannot take the sweep down; `jobs` processes run at once and share the
machine's threads. A point has diverged when its run stopped on non-finite losses, its last
validation loss is not finite, or its last training loss ended above its first.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

SWEEP_FILE = "sweep.json"


@dataclass
class Point:
    values: dict[str, object]  # swept key -> value (keys as --set takes them)
    seed: int

    @property
    def name(self) -> str:
        parts = [f"{key}={_short(value)}" for key, value in self.values.items()] + [f"seed={self.seed}"]
        return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts))


def _short(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else json.dumps(value)


def parse_grid(items: list[str]) -> dict[str, list]:
    """["lr=3e-4,1e-3", "model.hidden_size=64,128"] -> {"lr": [0.0003, 0.001], ...} (values as JSON)."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or not raw:
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,...")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all of its values in one --grid")
        values = []
        for text in raw.split(","):
            try:
                values.append(json.loads(text))
            except json.JSONDecodeError:
                values.append(text)
        grid[key] = values
    if not grid:
        raise ConfigError("a sweep needs at least one --grid KEY=V1,V2,...")
    return grid


def points(grid: dict[str, list], seeds: int) -> list[Point]:
    keys = list(grid)
    return [Point(dict(zip(keys, combo)), seed) for combo in itertools.product(*grid.values()) for seed in range(seeds)]


def outcome(run_dir: Path, returncode: int, stderr: str) -> dict:
    """What a finished point's run directory says: final validation loss, first and last training loss,
    and whether it diverged."""
    rows = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    train = [r["loss"] for r in rows if "loss" in r]
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    val_loss = evals[-1] if evals else None
    nonfinite = "non-finite" in stderr
    diverged = (
        nonfinite
        or (val_loss is not None and not math.isfinite(val_loss))
        or (len(train) >= 2 and not (math.isfinite(train[-1]) and train[-1] <= train[0]))
    )
    status = "finished" if returncode == 0 else ("diverged" if nonfinite else "failed")
    result = {"status": status, "val_loss": val_loss if val_loss is None or math.isfinite(val_loss) else None,
              "first_loss": train[0] if train else None, "last_loss": train[-1] if train else None,
              "diverged": diverged, "run_dir": str(run_dir)}  # fmt: skip
    if returncode != 0:
        result["error"] = stderr.strip().splitlines()[-1][-500:] if stderr.strip() else f"exit {returncode}"
    return result


def run_point(point: Point, out: Path, base: list[str], max_steps: int, threads: int) -> dict:
    run_dir = out / "runs" / point.name
    command = [sys.executable, "-m", "longcat", "train", "--out", str(run_dir), "--max-steps", str(max_steps),
               "--seed", str(point.seed), "--quiet", *base]  # fmt: skip
    for key, value in point.values.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    if run_dir.exists():  # an unfinished attempt (the sweep was stopped): start the point over
        import shutil

        shutil.rmtree(run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    result = outcome(run_dir, done.returncode, done.stderr)
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / f"{point.name}.log").write_text(done.stdout + done.stderr)
    return {"point": point.values, "seed": point.seed, "seconds": round(time.perf_counter() - start, 1), **result}


def run_sweep(out: Path, grid: dict[str, list], seeds: int, max_steps: int, base: list[str], jobs: int = 1,
              resume: bool = False, progress: bool = True) -> list[dict]:  # fmt: skip
    """base: the `longcat train` arguments every point shares (--preset, --set, --data, --config)."""
    if seeds < 1 or jobs < 1 or max_steps < 1:
        raise ConfigError(f"--seeds ({seeds}), --jobs ({jobs}) and --max-steps ({max_steps}) must be positive")
    out.mkdir(parents=True, exist_ok=True)
    path = out / SWEEP_FILE
    previous = json.loads(path.read_text()) if path.is_file() else None
    if previous is not None and not resume:
        raise ConfigError(f"{out} already holds a sweep; pass --resume to finish it, or choose another --out")
    spec = {"grid": grid, "seeds": seeds, "max_steps": max_steps, "base": base}
    if previous is not None and previous["spec"] != spec:
        raise ConfigError(f"--resume: {path} was a different sweep ({previous['spec']}); use the same arguments")
    done = {(json.dumps(r["point"], sort_keys=True), r["seed"]): r for r in (previous or {}).get("results", [])}
    todo = [p for p in points(grid, seeds) if (json.dumps(p.values, sort_keys=True), p.seed) not in done]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    results = list(done.values())

    def record(result: dict) -> None:
        results.append(result)
        _write(path, spec, results)
        if progress:
            loss = result["val_loss"]
            shown = "-" if loss is None else f"{loss:.4f}"
            flag = " (diverged)" if result["diverged"] else ""
            print(f"{result['point']} seed {result['seed']}: val loss {shown}{flag} [{result['status']}, "
                  f"{result['seconds']} s]", file=sys.stderr)  # fmt: skip

    _write(path, spec, results)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for result in pool.map(lambda p: run_point(p, out, base, max_steps, threads), todo):
            record(result)
    with contextlib.suppress(ImportError):  # matplotlib is optional
        plot_sweep(out, grid, results)
    return results


def _write(path: Path, spec: dict, results: list[dict]) -> None:
    ordered = sorted(results, key=lambda r: (json.dumps(r["point"], sort_keys=True), r["seed"]))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"spec": spec, "results": ordered}, indent=2) + "\n")
    os.replace(tmp, path)


def best_point(sweep_dir: Path) -> dict:
    """The point with the lowest mean final validation loss over its seeds, among points none of whose
    seeds diverged: {"point", "val_loss", "run_dir"} (run_dir: its first seed's run)."""
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        raise ConfigError(f"{sweep_dir} holds no {SWEEP_FILE}: run `longcat sweep --out {sweep_dir}` first")
    groups: dict[str, list[dict]] = {}
    for result in json.loads(path.read_text())["results"]:
        groups.setdefault(json.dumps(result["point"], sort_keys=True), []).append(result)
    usable = {
        key: rows for key, rows in groups.items()
        if all(r["status"] == "finished" and not r["diverged"] and r["val_loss"] is not None for r in rows)
    }  # fmt: skip
    if not usable:
        raise ConfigError(f"no point of {path} finished without diverging; widen the grid toward smaller values")
    key = min(usable, key=lambda k: sum(r["val_loss"] for r in usable[k]) / len(usable[k]))
    rows = sorted(usable[key], key=lambda r: r["seed"])
    return {"point": rows[0]["point"], "val_loss": sum(r["val_loss"] for r in rows) / len(rows),
            "run_dir": rows[0]["run_dir"]}  # fmt: skip


def plot_sweep(out: Path, grid: dict[str, list], results: list[dict]) -> list[Path]:
    """One PNG per swept key: final validation loss (each seed a dot, the mean a line) against its
    values, other keys fixed at each of their values (one line each); diverged points marked x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, values in grid.items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        others = sorted({json.dumps({k: v for k, v in r["point"].items() if k != key}, sort_keys=True)
                         for r in results})  # fmt: skip
        for other in others:
            fixed = json.loads(other)
            rows = [r for r in results if {k: v for k, v in r["point"].items() if k != key} == fixed]
            xs, means = [], []
            for value in values:
                losses = [r["val_loss"] for r in rows if r["point"][key] == value and not r["diverged"]
                          and r["val_loss"] is not None]  # fmt: skip
                for loss in losses:
                    ax.plot(value, loss, ".", color="0.5")
                if losses:
                    xs.append(value)
                    means.append(sum(losses) / len(losses))
                if any(r["point"][key] == value and r["diverged"] for r in rows):
                    ax.plot(value, means[-1] if losses else max(means or [0]), "x", color="red")
            ax.plot(xs, means, "-o", label=", ".join(f"{k}={v}" for k, v in fixed.items()) or None)
        if all(isinstance(v, (int, float)) and v > 0 for v in values) and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("final validation loss")
        if len(others) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"sweep_{re.sub(r'[^A-Za-z0-9_.]', '_', key)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
