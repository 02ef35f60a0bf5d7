"""`longcat sweep`: grid parsing, a sweep with a diverging point, --resume, the best point."""

from __future__ import annotations

import json

import pytest
from tests.conftest import TINY_TRAIN_MODEL

from longcat import LongcatForCausalLM
from longcat.config import ConfigError
from longcat.scaling.sweep import best_point, outcome, parse_grid, points, run_sweep
from longcat.scaling.transfer import transferred_config
from longcat.training.config import TrainConfig
from longcat.training.trainer import train


def test_grid_and_points() -> None:
    grid = parse_grid(["lr=3e-4,1e-3", "model.hidden_size=32,64"])
    assert grid == {"lr": [3e-4, 1e-3], "model.hidden_size": [32, 64]}
    assert [p.values for p in points(grid, 1)][:2] == [{"lr": 3e-4, "model.hidden_size": 32},
                                                        {"lr": 3e-4, "model.hidden_size": 64}]  # fmt: skip
    assert len(points(grid, 3)) == 12 and points(grid, 2)[1].seed == 1
    assert points(grid, 1)[0].name == "lr=0.0003,model.hidden_size=32,seed=0"
    for bad in (["lr"], ["lr="], ["lr=1", "lr=2"], []):
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_outcome_marks_divergence(tmp_path) -> None:
    rows = [{"step": 1, "loss": 6.0}, {"step": 2, "loss": 7.5}, {"step": 2, "val_loss": 7.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = outcome(tmp_path, 0, "")
    assert result["diverged"] and result["status"] == "finished" and result["val_loss"] == 7.4
    result = outcome(tmp_path, 1, "longcat: 3 steps in a row had a non-finite loss or gradient\n")
    assert result["diverged"] and result["status"] == "diverged" and "non-finite" in result["error"]


@pytest.mark.slow
def test_sweep_with_a_diverging_point_then_transfer(small_data, tmp_path) -> None:
    out = tmp_path / "sweep"
    base = ["--data", str(small_data), "--set", "seq_len=32", "--set", "batch_size=4", "--set", "eval_every=4",
            "--set", "log_every=1", "--set", "eval_batches=1", "--set", "warmup_steps=1"]  # fmt: skip
    for key, value in TINY_TRAIN_MODEL.items():
        base += ["--set", f"model.{key}={json.dumps(value)}"]
    grid = {"lr": [3e-3, 1e6]}  # 1e6: the loss leaves every finite value within a few steps
    results = run_sweep(out, grid, seeds=1, max_steps=4, base=base, progress=False)
    by_lr = {r["point"]["lr"]: r for r in results}
    assert not by_lr[3e-3]["diverged"] and by_lr[3e-3]["status"] == "finished"
    assert by_lr[3e-3]["val_loss"] < by_lr[3e-3]["first_loss"]
    assert by_lr[1e6]["diverged"]
    saved = json.loads((out / "sweep.json").read_text())
    assert len(saved["results"]) == 2 and saved["spec"]["grid"] == grid
    assert (out / "sweep_lr.png").is_file()
    assert best_point(out)["point"] == {"lr": 3e-3}
    # --resume runs only what is missing (nothing here); another sweep into the same place is refused
    again = run_sweep(out, grid, seeds=1, max_steps=4, base=base, resume=True, progress=False)
    assert sorted(r["seconds"] for r in again) == sorted(r["seconds"] for r in results)
    with pytest.raises(ConfigError, match="already holds a sweep"):
        run_sweep(out, grid, seeds=1, max_steps=4, base=base, progress=False)
    with pytest.raises(ConfigError, match="different sweep"):
        run_sweep(out, {"lr": [1e-3]}, seeds=1, max_steps=4, base=base, resume=True, progress=False)
    _transfer_from(out, tmp_path)


def _transfer_from(sweep_dir, tmp_path) -> None:
    """Width transfer from the sweep above to twice the proxy's width, and a few steps of training there."""
    proxy = TrainConfig.from_file(tmp_path / "sweep" / "runs" / "lr=0.003,seed=0" / "train_config.json")
    width = 2 * TINY_TRAIN_MODEL["hidden_size"]
    cfg = transferred_config(sweep_dir, width, ["lr_groups.router=1e-4", "max_steps=3", "eval_every=3"])
    assert cfg.model["hidden_size"] == width and cfg.model["ffn_hidden_size"] == 2 * TINY_TRAIN_MODEL["ffn_hidden_size"]
    assert cfg.model["num_attention_heads"] == 2 * TINY_TRAIN_MODEL["num_attention_heads"]
    assert cfg.init_std["embedding"] == proxy.init_std["embedding"]
    assert cfg.init_std["hidden"] == pytest.approx(proxy.init_std["hidden"] / 2**0.5)
    assert cfg.lr_groups["hidden"] == pytest.approx(proxy.lr_groups["hidden"] / 2)
    assert cfg.lr_groups["unembedding"] == pytest.approx(proxy.lr_groups["unembedding"] / 2)
    assert cfg.lr_groups["embedding"] == proxy.lr_groups["embedding"] == 3e-3
    assert cfg.lr_groups["router"] == 1e-4  # the explicit value wins, and the record says so
    assert cfg.transfer["explicit_overrides"] == ["lr_groups.router"] and cfg.transfer["s"] == 2
    assert cfg.transfer["proxy_point"] == {"lr": 3e-3}
    by_set = transferred_config(sweep_dir, None, [f"model.hidden_size={width}", "max_steps=3"])
    assert (
        by_set.init_std == transferred_config(sweep_dir, width, ["max_steps=3"]).init_std and by_set.transfer["s"] == 2
    )
    with pytest.raises(ConfigError, match="needs the target width"):
        transferred_config(sweep_dir, None, [])
    with pytest.raises(ConfigError, match="num_layers as the proxy's"):
        transferred_config(sweep_dir, width, ["model.num_layers=2"])
    with pytest.raises(ConfigError, match="batch_size as the proxy's"):
        transferred_config(sweep_dir, width, ["batch_size=8"])
    run = tmp_path / "wide"
    train(cfg, run, progress=False)
    saved = TrainConfig.from_file(run / "train_config.json")
    assert saved.transfer == cfg.transfer and saved.init_std == cfg.init_std
    assert LongcatForCausalLM.from_pretrained(run / "final").config.hidden_size == width
