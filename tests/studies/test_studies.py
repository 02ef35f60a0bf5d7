"""`longcat study`: the verdict rule, and every study end to end with --quick."""

from __future__ import annotations

import json

import pytest

from longcat.cli import main
from longcat.studies.catalog import STUDIES
from longcat.studies.runner import Arm, Study, run_study, summarise, verdict, write_report


def test_verdict_rule() -> None:
    assert verdict([-0.05, -0.04, -0.06], 0.02, -1)[0] == "reproduced"
    assert verdict([0.05, 0.04], 0.02, -1)[0] == "not reproduced"
    assert verdict([-0.05, 0.01], 0.001, -1)[0] == "inconclusive"  # signs disagree
    assert verdict([-0.01, -0.02], 0.03, -1)[0] == "inconclusive"  # a change of seed moves the metric more
    assert verdict([], 0.0, -1)[0] == "inconclusive" and verdict([float("nan")], 0.0, -1)[0] == "inconclusive"
    assert verdict([-0.5], 0.0, -1)[0] == "inconclusive"  # one seed: nothing to weigh the effect against
    assert verdict([0.2, 0.3], 0.1, +1)[0] == "reproduced"
    # a claim of no difference
    assert verdict([0.01, -0.02], 0.05, 0)[0] == "reproduced"
    assert verdict([0.2, 0.3], 0.05, 0)[0] == "not reproduced"


@pytest.mark.parametrize("claimed_sign", [-1, +1, 0])
def test_summary_applies_the_rule_to_the_recorded_effects(claimed_sign: int) -> None:
    """B lower than A by 0.5 in both seeds, seeds 0.1 apart: the claim's sign decides the verdict."""
    study = Study("s", "q", "c", [Arm("A", {}), Arm("B", {})], base={}, quick={}, claimed_sign=claimed_sign)
    loss = {("A", 0): 3.0, ("A", 1): 3.1, ("B", 0): 2.5, ("B", 1): 2.6}
    results = {f"{arm}/seed{seed}": {"arm": arm, "seed": seed, "val_loss": v} for (arm, seed), v in loss.items()}
    summary = summarise(study, results)
    assert summary["compare"] == ["A", "B"] and summary["effects"] == pytest.approx([-0.5, -0.5])
    assert summary["spread"] == pytest.approx(0.1)
    assert summary["verdict"] == {-1: "reproduced", +1: "not reproduced", 0: "not reproduced"}[claimed_sign]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STUDIES))
def test_quick_study_end_to_end(name, small_data, tmp_path) -> None:
    study = STUDIES[name]
    seeds = 1 if len(study.arms) > 2 else 2
    results = run_study(study, tmp_path, seeds=seeds, quick=True, data=str(small_data), progress=False)
    assert len(results) == len(study.arms) * seeds
    report = write_report(study, tmp_path, results, "test", quick=True)
    text = report.read_text()
    assert f"# Study: {name} (--quick" in text and "## Verdict: **" in text and "Verdict rule" in text
    for arm in study.arms:
        assert f"| {arm.name} | {seeds} |" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the verdict is the rule applied to the effects the runs recorded, recomputed here from results
    a, b = summary["compare"]
    metric = {(r["arm"], r["seed"]): r[study.metric] for r in results.values()}
    run_seeds = sorted({seed for _arm, seed in metric})
    if a == b:  # one arm: the metric itself, its range over seeds the spread
        effects = [metric[(a, s)] for s in run_seeds]
        spread = max(effects) - min(effects)
    else:
        effects = [metric[(b, s)] - metric[(a, s)] for s in run_seeds]
        spread = max(max(metric[(arm, s)] for s in run_seeds) - min(metric[(arm, s)] for s in run_seeds)
                     for arm in (a, b))  # fmt: skip
    assert summary["effects"] == pytest.approx(effects) and len(effects) == seeds
    assert summary["spread"] == pytest.approx(spread)
    expected = verdict(effects, spread, study.claimed_sign)[0]
    assert summary["verdict"] == expected and f"## Verdict: **{expected}**" in text
    # --resume keeps finished runs: nothing is trained again
    again = run_study(study, tmp_path, seeds=seeds, quick=True, data=str(small_data), resume=True, progress=False)
    assert again == results


def test_compute_allocation_of_a_given_checkpoint(small_data, tmp_path, capsys) -> None:
    from tests.conftest import tiny_train_config

    from longcat.training.trainer import train

    train(tiny_train_config(small_data, max_steps=2, eval_every=2, seq_len=32), tmp_path / "run", progress=False)
    args = ["study", "compute-allocation", "--checkpoint", str(tmp_path / "run" / "final"), "--data", str(small_data),
            "--out", str(tmp_path / "study")]  # fmt: skip
    assert main(args) == 0
    assert "inconclusive" in capsys.readouterr().out  # one model: no spread over seeds
    text = (tmp_path / "study" / "report.md").read_text()
    assert "## Where the compute goes" in text and "| scripture |" in text and "Spearman" in text
    assert main(["study", "z-loss", "--checkpoint", str(tmp_path)]) == 2


def test_cli_list_and_unknown(capsys) -> None:
    assert main(["study", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in STUDIES)
    assert main(["study", "no-such-study"]) == 2
    assert "unknown study" in capsys.readouterr().err


def test_first_seed_trains_fresh_seeds(small_data, tmp_path) -> None:
    study = STUDIES["mla-scale"]
    results = run_study(study, tmp_path, seeds=1, first_seed=3, quick=True, data=str(small_data), progress=False)
    assert sorted(results) == ["no-scales/seed3", "scales/seed3"]
    assert all(r["seed"] == 3 and r["run_dir"].endswith("seed3") for r in results.values())
