"""The shared machinery of `longcat study`: arms x seeds of ordinary training runs (the trainer's
library API, no second loop), the verdict rule, and the report.

A study compares arms that differ only in the settings it names. Its verdict follows a rule fixed
before any run and printed in the report: with the effect measured per seed (arm B minus arm A on the
same seed), the claim is *reproduced* when every seed shows the claimed sign and the mean effect
exceeds the seeds' spread (the larger of the two arms' ranges of the metric over seeds: what a change
of seed alone moves it by), *not reproduced* when every seed shows the opposite sign under the same
condition, and *inconclusive* otherwise.
"""

from __future__ import annotations

import datetime
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..training.config import TrainConfig

PARITY_RULE = (
    "effect = arm B - arm A, per seed; the claim is no difference. Reproduced: |mean effect| <= spread (the larger "
    "of the two arms' ranges, max - min over seeds, of the metric). Not reproduced: every seed's effect has the "
    "same sign and |mean effect| > spread. Otherwise inconclusive."
)
RULE = (
    "effect = arm B - arm A, per seed. Reproduced: every seed's effect has the claimed sign and |mean effect| > "
    "spread (the larger of the two arms' ranges, max - min over seeds, of the metric). Not reproduced: every "
    "seed's effect has the opposite sign, same condition. Otherwise inconclusive."
)


@dataclass
class Arm:
    name: str
    settings: dict[str, object]  # --set style KEY: VALUE, on top of the study's base
    # how the arm trains when it is more than one run (growth: a smaller run, grown, continued):
    # (config, run directory, progress) -> None; default: train(config, run directory)
    run: Callable[[TrainConfig, Path, bool], None] | None = None


@dataclass
class Study:
    name: str
    question: str
    claim: str  # the paper's claim, figure or table cited
    arms: list[Arm]
    base: dict[str, object]  # settings every arm shares (full runs)
    quick: dict[str, object]  # what --quick changes (a few steps)
    metric: str = "val_loss"  # what the claim is about, read by `measure`
    claimed_sign: int = -1  # the sign of B - A the paper claims (-1: B lower; 0: no difference, PARITY_RULE)
    minutes: int = 30  # expected time of the full study on 2 CPU cores
    measure: Callable[[Path], dict] | None = None  # run dir -> extra metrics (default: final validation losses)
    compare: tuple[str, str] | None = None  # (A, B); default the first two arms
    choose: Callable[[dict], tuple[str, str]] | None = None  # (A, B) from the results, when they decide it
    report_extra: Callable[[dict], list[str]] | None = None  # more report lines from the results
    notes: list[str] = field(default_factory=list)


def final_metrics(run_dir: Path) -> dict:
    """Last validation loss (overall and per domain) and the last training row's monitors."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "val_loss" in r]
    train = [r for r in rows if "loss" in r and "event" not in r]
    out = {k: v for k, v in evals[-1].items() if k.startswith("val_")} if evals else {}
    if train:
        last = train[-1]
        out.update({f"last_{k}": last[k] for k in ("loss", "hidden_max_abs", "hidden_l2") if last.get(k) is not None})
        out["max_hidden_max_abs"] = max(r["hidden_max_abs"] for r in train if r.get("hidden_max_abs") is not None)
    return out


def run_study(study: Study, out: Path, seeds: int = 2, quick: bool = False, data: str | None = None,
              resume: bool = False, progress: bool = True, first_seed: int = 0) -> dict:  # fmt: skip
    from ..training.trainer import train

    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if resume and results_path.is_file() else {}
    settings = {**study.base, **(study.quick if quick else {})}
    if data:
        settings["data_dir"] = data
    runs = [(arm, seed) for arm in study.arms for seed in range(first_seed, first_seed + seeds)]
    if progress:
        minutes = "under a minute" if quick else f"about {study.minutes} minutes"
        print(f"study {study.name}: {len(runs)} runs ({len(study.arms)} arms x {seeds} seeds), {minutes} on 2 CPU "
              "cores", file=sys.stderr)  # fmt: skip
    started, done = time.perf_counter(), 0  # done: runs trained in this call (resumed ones took no time)
    for index, (arm, seed) in enumerate(runs):
        key = f"{arm.name}/seed{seed}"
        if key in results:
            continue
        run_dir = out / "runs" / arm.name / f"seed{seed}"
        if run_dir.exists():  # an unfinished attempt
            import shutil

            shutil.rmtree(run_dir)
        cfg = TrainConfig().with_overrides(_assignments({**settings, **arm.settings, "seed": seed}))
        if progress:
            elapsed = time.perf_counter() - started
            left = f", about {elapsed / done * (len(runs) - index) / 60:.0f} min left" if done else ""
            print(f"[{index + 1}/{len(runs)}] {key} ({elapsed / 60:.1f} min so far{left})", file=sys.stderr)
        if arm.run is None:
            train(cfg, run_dir, progress=progress)
        else:  # an arm that needs the results so far (width transfer) reads them from results.json
            arm.run(cfg, run_dir, progress)
        measured = final_metrics(run_dir)
        if study.measure is not None:
            measured.update(study.measure(run_dir))
        results[key] = {"arm": arm.name, "seed": seed, "run_dir": str(run_dir), "command": command_line(), **measured}
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        done += 1
    return results


def _assignments(settings: dict) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in settings.items()]


def verdict(effects: list[float], spread: float, claimed_sign: int) -> tuple[str, str]:
    """(verdict, reason) by RULE; spread: the seeds' spread of the metric within an arm."""
    if not effects or any(not math.isfinite(e) for e in effects) or not math.isfinite(spread):
        return "inconclusive", "a seed has no finite effect"
    if len(effects) < 2:
        return "inconclusive", f"one seed (effect {effects[0]:.4g}): no spread over seeds to weigh it against"
    mean = statistics.fmean(effects)
    signs = {1 if e > 0 else -1 if e < 0 else 0 for e in effects}
    clear = abs(mean) > spread
    if claimed_sign == 0:
        if not clear:
            return "reproduced", f"|mean| {abs(mean):.4g} <= spread {spread:.4g}: no difference beyond seed noise"
        if len(signs) == 1:
            return "not reproduced", f"every seed differs the same way and |mean| {abs(mean):.4g} > spread {spread:.4g}"
        return "inconclusive", f"mean {mean:.4g}, spread {spread:.4g}, signs {sorted(signs)}"
    if signs == {claimed_sign} and clear:
        return (
            "reproduced",
            f"all {len(effects)} seeds agree with the claim and |mean| {abs(mean):.4g} > spread {spread:.4g}",
        )
    if signs == {-claimed_sign} and clear:
        return "not reproduced", (f"all {len(effects)} seeds go against the claim and |mean| {abs(mean):.4g} > spread "
                                  f"{spread:.4g}")  # fmt: skip
    return "inconclusive", f"mean {mean:.4g}, spread {spread:.4g}, signs {sorted(signs)}"


def summarise(study: Study, results: dict) -> dict:
    """The effect per seed (B - A, or with one arm the metric itself), the seeds' spread, the verdict."""
    by_arm: dict[str, list[dict]] = {}
    for row in results.values():
        by_arm.setdefault(row["arm"], []).append(row)
    value = {(r["arm"], r["seed"]): r.get(study.metric) for r in results.values()}
    if len(study.arms) == 1:
        a = b = study.arms[0].name
        seeds = sorted(r["seed"] for r in by_arm.get(a, []))
        effects = [value[(a, s)] for s in seeds if value[(a, s)] is not None]
        spread = max(effects) - min(effects) if effects else math.nan  # one arm: the metric's range over seeds
    else:
        a, b = study.choose(results) if study.choose else study.compare or (study.arms[0].name, study.arms[1].name)
        seeds = sorted({r["seed"] for r in by_arm.get(a, [])} & {r["seed"] for r in by_arm.get(b, [])})
        effects = [value[(b, s)] - value[(a, s)] for s in seeds if None not in (value[(b, s)], value[(a, s)])]
        ranges = []
        for arm in (a, b):
            values = [value[(arm, s)] for s in seeds if value[(arm, s)] is not None]
            ranges.append(max(values) - min(values) if values else math.nan)
        spread = max(ranges) if ranges else math.nan
    result, reason = verdict(effects, spread, study.claimed_sign)
    return {"compare": [a, b], "seeds": seeds, "effects": effects, "spread": spread, "verdict": result,
            "reason": reason, "by_arm": by_arm}  # fmt: skip


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def write_report(study: Study, out: Path, results: dict, command: str, quick: bool) -> Path:
    from ..bench.common import machine

    summary = summarise(study, results)
    by_arm = summary["by_arm"]
    keys = sorted({k for rows in by_arm.values() for r in rows for k in r if k.startswith("val_loss")})
    extra = [study.metric] if study.metric not in keys else []
    m = machine()
    lines = [
        f"# Study: {study.name}" + (" (--quick: a few steps per arm, not a result)" if quick else ""),
        "",
        f"Date {m['date']}, machine {m['cpu']} ({m['threads']} threads), torch {m['torch']}. Command: `{command}`"
        + "".join(
            f"; runs trained by `{c}`" for c in sorted({r.get("command") for r in results.values()} - {None, command})
        )
        + ".",
        "",
        f"**Question.** {study.question}",
        "",
        f"**The paper's claim.** {study.claim}",
        "",
        f"**Verdict rule (fixed before the runs).** Metric: `{study.metric}`, "
        + (
            "its value per seed is the effect (one arm); "
            if len(study.arms) == 1
            else f"compared as {summary['compare'][1]} minus {summary['compare'][0]}, "
        )
        + (
            f"claimed: no difference. {PARITY_RULE}"
            if study.claimed_sign == 0
            else f"claimed sign {'negative' if study.claimed_sign < 0 else 'positive'}. {RULE}"
        ),
        "",
        "## Configurations",
        "",
        f"Shared settings: `{json.dumps({**study.base, **(study.quick if quick else {})})}`",
        "",
        *[f"- **{arm.name}**: `{json.dumps(arm.settings)}`" for arm in study.arms],
        "",
        "## Results (mean ± standard deviation over seeds)",
        "",
        "| arm | seeds | " + " | ".join(extra + keys) + " |",
        "|---|---|" + "---|" * len(extra + keys),
    ]
    for arm in study.arms:
        rows = by_arm.get(arm.name, [])
        cells = [_fmt([r.get(k) for r in rows]) for k in extra + keys]
        lines.append(f"| {arm.name} | {len(rows)} | " + " | ".join(cells) + " |")
    values = ", ".join(f"{e:+.4f}" for e in summary["effects"])
    if len(study.arms) == 1:
        lines += ["", f"Value per seed (`{study.metric}`): {values}; seeds' spread (its range) "
                  f"{summary['spread']:.4f}.", ""]  # fmt: skip
    else:
        lines += ["", f"Effect per seed ({summary['compare'][1]} - {summary['compare'][0]}, `{study.metric}`): "
                  f"{values}; seeds' spread (the larger arm range) {summary['spread']:.4f}.", ""]  # fmt: skip
    if study.report_extra is not None:
        lines += study.report_extra(results)
    plots = plot_study(study, out, results)
    lines += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += [f"## Verdict: **{summary['verdict']}**", "", summary["reason"] + ".", ""]
    lines += [f"- {note}" for note in study.notes]
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "by_arm"}, indent=2) + "\n")
    return path


def plot_study(study: Study, out: Path, results: dict) -> list[Path]:
    """Validation loss against step for every run, coloured by arm."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {arm.name: f"C{i}" for i, arm in enumerate(study.arms)}
    for row in results.values():
        metrics = Path(row["run_dir"]) / "metrics.jsonl"
        if not metrics.is_file():  # a given checkpoint, not a run of this study
            continue
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        train = [r for r in rows if "loss" in r and "event" not in r]
        label = row["arm"] if row["seed"] == 0 else None
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color=colours[row["arm"]], alpha=0.7,
                label=label)  # fmt: skip
    ax.set(xlabel="step", ylabel="training loss (LM)", title=study.name)
    ax.legend()
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def command_line() -> str:
    return "longcat " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "library call"


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")
