"""The training loop: metrics, checkpoints, run-directory safety, non-finite steps (determinism and kill -9:
test_determinism.py)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from tests.conftest import tiny_train_config

from longcat import LongcatForCausalLM
from longcat.checkpoint import transformers_needs_zero_expert_stubs
from longcat.training.config import TrainConfig
from longcat.training.trainer import Trainer, TrainingError, train


def test_run_writes_metrics_checkpoints_and_final(small_data, tmp_path) -> None:
    summary = train(tiny_train_config(small_data, save_every=4), tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    for key in ("step", "loss", "lr", "tokens_per_s", "ffn_experts_mean", "ffn_experts_std", "ffn_experts_target",
                "max_violation", "router_cosine", "grad_norm_ratio", "hidden_max_abs"):  # fmt: skip
        assert all(r[key] is not None for r in train_rows), key
    assert {"val_loss", "val_loss_scripture", "val_loss_python_docs"} <= set(eval_rows[-1])
    assert train_rows[-1]["mtp_loss"] is not None and train_rows[0]["mtp_loss"] is None  # MTP from step 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4", "step_8"]
    model = LongcatForCausalLM.from_pretrained(tmp_path / "final")
    assert model.model.mtp is not None
    assert (tmp_path / "final" / "tokenizer.json").is_file()
    assert summary["step"] == 8
    # lb_groups None resolves to the EP size, 1 on one process, and is stored resolved, as are the
    # per-group init stds (the model's initializer_range) and peak LRs (lr) that nothing set
    std = model.config.initializer_range
    resolved = tiny_train_config(small_data, save_every=4, lb_groups=1).resolved_groups(std)
    saved = TrainConfig.from_file(tmp_path / "train_config.json")
    assert saved == resolved
    assert saved.init_std == dict.fromkeys(("embedding", "hidden", "unembedding", "router"), std)
    assert saved.lr_groups == dict.fromkeys(("embedding", "hidden", "unembedding", "router", "no_decay"), saved.lr)
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(tiny_train_config(small_data), tmp_path, progress=False)


def _zero_expert_keys(final) -> list[str]:
    from safetensors import safe_open

    config = LongcatForCausalLM.from_pretrained(final).config
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        return [k for k in f.keys() if f".mlp.experts.{config.n_routed_experts}." in k]


def test_final_checkpoint_loads_in_transformers(small_data, tmp_path) -> None:
    """final/ in the layout the installed transformers reads: the default (released) one on 4.57 and
    >= 5.25, the stub layout only where it is asked for (5.0-5.24)."""
    transformers = pytest.importorskip("transformers")
    stubs = transformers_needs_zero_expert_stubs(transformers.__version__)
    config = tiny_train_config(small_data, max_steps=2, eval_every=2)
    assert config.export_zero_expert_stubs is False  # the released layout is the default
    if stubs:
        config = dataclasses.replace(config, export_zero_expert_stubs=True)
    train(config, tmp_path, progress=False)
    assert bool(_zero_expert_keys(tmp_path / "final")) == stubs
    theirs = transformers.LongcatFlashForCausalLM.from_pretrained(tmp_path / "final").eval()
    ours = LongcatForCausalLM.from_pretrained(tmp_path / "final").eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=0, atol=1e-4)


def test_a_stub_run_warns_where_transformers_refuses_stubs(small_data, tmp_path, monkeypatch) -> None:
    """A run directory from before the released layout became the default records
    export_zero_expert_stubs=true; its final/ keeps that layout (a resume keeps the run's settings) and
    says how to get the released one when the installed transformers would refuse it."""
    import longcat.training.checkpointing as checkpointing
    import longcat.training.trainer as trainer_module

    monkeypatch.setattr(checkpointing, "installed_transformers_version", lambda: "5.25.0")
    config = tiny_train_config(small_data, max_steps=1, eval_every=1, export_zero_expert_stubs=True)
    with pytest.warns(UserWarning, match="longcat export .*final --out"):
        train(config, tmp_path, progress=False)
    assert _zero_expert_keys(tmp_path / "final")
    monkeypatch.setattr(checkpointing, "installed_transformers_version", lambda: "5.24.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer_module.Trainer(config, tmp_path, progress=False, resume=True).export_final()


def test_non_finite_steps_are_skipped_then_stop_the_run(small_data, tmp_path, monkeypatch) -> None:
    trainer = Trainer(tiny_train_config(small_data, max_steps=10, save_every=2, max_nonfinite=3), tmp_path,
                      progress=False)  # fmt: skip
    original = trainer._losses
    calls = {"n": 0}

    def flaky(batch, use_mtp):  # noqa: ANN001
        calls["n"] += 1
        total, parts, routings, out = original(batch, use_mtp)
        if calls["n"] == 3 or calls["n"] >= 6:
            total = total * float("nan")
        return total, parts, routings, out

    monkeypatch.setattr(trainer, "_losses", flaky)
    with pytest.raises(TrainingError, match="non-finite"):
        trainer.run()
    assert trainer.skipped == 4  # step 3 alone, then steps 6, 7, 8 in a row
    from longcat.training.checkpointing import load_checkpoint_model

    good = load_checkpoint_model(tmp_path / "checkpoints" / "step_4")
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_dominant_balance_loss_warns_and_grad_accum_runs(small_data, tmp_path) -> None:
    cfg = tiny_train_config(
        small_data, max_steps=2, log_every=1, lb_alpha=100.0, grad_accum=2, batch_size=2, warmup_steps=1
    )
    with pytest.warns(UserWarning, match="R_g"):
        train(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["grad_norm_ratio"] > 0.1
    assert rows[0]["tokens_seen"] == 2 * 2 * 32  # two micro-batches of two sequences


@pytest.mark.slow
def test_bench_train_reports_speedup_and_mfu(small_data, capsys) -> None:
    pytest.importorskip("transformers")
    from longcat.cli import main

    args = ["bench", "train", "--preset", "tiny", "--batch", "2", "--seq-len", "32", "--rounds", "1"]
    assert main([*args, "--data", str(small_data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["speedup_vs_transformers"] > 0 and 0 < result["mfu"] < 1


@pytest.mark.slow
def test_bench_train_in_the_bf16_recipe_with_model_overrides(small_data, capsys) -> None:
    """--dtype bfloat16 is the autocast recipe on this device, its MFU against a bf16 matmul peak; --set
    model.FIELD picks a model without a preset."""
    pytest.importorskip("transformers")
    from longcat.cli import main

    args = ["bench", "train", "--preset", "tiny", "--batch", "2", "--seq-len", "32", "--rounds", "1", "--dtype",
            "bfloat16", "--set", "model.hidden_size=48", "--set", "model.num_layers=1"]  # fmt: skip
    assert main([*args, "--data", str(small_data)]) == 0
    text = capsys.readouterr().out
    assert "bf16 autocast, fp32 master weights" in text and "model.hidden_size=48" in text
    assert "(bfloat16)" in text and "peak bf16 matmul" in text
    assert main(["bench", "serve", "--dtype", "bfloat16"]) == 2


def test_data_without_held_out_text_reports_no_validation_loss(small_data, tmp_path, capsys) -> None:
    """One plain-text file is one document: nothing is held out, and training says so instead of
    logging a validation loss of 0."""
    from longcat.data.prepare import prepare

    (tmp_path / "book.txt").write_text("In the beginning God created the heaven and the earth. " * 200)
    data = tmp_path / "data"
    meta = prepare(data, inputs=[str(tmp_path / "book.txt")], tokenizer_path=small_data / "tokenizer.json")
    assert meta["domains"]["book"]["val_docs"] == 0
    train(tiny_train_config(data, max_steps=2, eval_every=1), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any("val_loss" in row for row in rows)
    assert "no validation loss for domain(s) book" in capsys.readouterr().err


def test_fresh_run_refuses_an_old_runs_metrics_and_resume_names_changed_settings(small_data, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    train(tiny_train_config(small_data, max_steps=2, save_every=2), out, progress=False)
    (out / "checkpoints").rename(tmp_path / "elsewhere")  # as if the run died before its first checkpoint
    with pytest.raises(TrainingError, match="metrics.jsonl"):
        train(tiny_train_config(small_data, max_steps=2), out, progress=False)
    (tmp_path / "elsewhere").rename(out / "checkpoints")
    capsys.readouterr()
    train(tiny_train_config(small_data, max_steps=3, lr=5e-3), out, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "differ from the checkpoint's" in err and "lr" in err and "max_steps" in err


def _norm_at_optimizer_step(trainer: Trainer) -> tuple[float, float]:
    """(the gradient norm the step measured before clipping, the norm the optimizer then received)."""
    seen = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        grads = [p.grad.float().pow(2).sum() for p in trainer.model.parameters() if p.grad is not None]
        seen.append(float(torch.stack(grads).sum().sqrt()))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    row = trainer.train_step(monitor=True)
    return row["grad_norm"], seen[0]


@pytest.mark.parametrize("clip", [0.0, "half"])
def test_grad_clip_zero_means_no_clipping(small_data, tmp_path, clip) -> None:
    """grad_clip=0 hands the optimizer the gradients as measured; a clip below the norm scales them to it
    (the same check, so it can tell the two apart)."""
    config = tiny_train_config(small_data, max_steps=1, grad_clip=0.0)
    measured, received = _norm_at_optimizer_step(Trainer(config, tmp_path / "probe", progress=False))
    assert measured > 0
    if clip == "half":
        config = dataclasses.replace(config, grad_clip=measured / 2)
    measured_again, received = _norm_at_optimizer_step(Trainer(config, tmp_path / "run", progress=False))
    assert measured_again == pytest.approx(measured, rel=1e-6)
    assert received == pytest.approx(measured if clip == 0.0 else measured / 2, rel=1e-5)


def test_grad_norm_ratio_matches_separate_backward_passes(small_data, tmp_path) -> None:
    """R_g (Eq. 9) from one backward of the whole loss (the balance part in closed form, the LM part as
    the rest) against the slow way: the two parts' gradients on the router probabilities by separate
    backward passes. Two micro-batches, as the trainer scales the loss by 1 / grad_accum."""
    trainer = Trainer(tiny_train_config(small_data, grad_accum=2, lb_alpha=0.5), tmp_path / "run")
    batch = trainer.loader.next_batch()
    total, parts, routings, _out = trainer._losses(batch, use_mtp=False)
    probs = [routing.probs for routing, _f in routings]
    balance = trainer.cfg.lb_alpha * parts["lb"]
    g_rest = torch.autograd.grad(total - balance, probs, retain_graph=True)
    g_balance = torch.autograd.grad(balance, probs, retain_graph=True)
    ratios = [float(b.sum(0).norm() / r.sum(0).norm()) for b, r in zip(g_balance, g_rest)]
    for p in probs:
        p.retain_grad()
    (total / trainer.cfg.grad_accum).backward()
    assert trainer._grad_norm_ratio(routings) == pytest.approx(sum(ratios) / len(ratios), rel=1e-4)


def test_a_checkpoint_renamed_aside_by_a_dying_resave_is_still_found(tmp_path) -> None:
    from longcat.training.checkpointing import STATE_FILE, list_checkpoints

    root = tmp_path / "checkpoints"
    for name in ("step_3", ".step_6.old", "step_9", ".step_9.old"):
        (root / name).mkdir(parents=True)
        (root / name / STATE_FILE).write_bytes(b"")
    assert [(step, path.name) for step, path in list_checkpoints(root)] == [
        (3, "step_3"), (6, ".step_6.old"), (9, "step_9")]  # fmt: skip


class _RunsCode:
    """Unpickling this calls print() with a marker: what a tampered state file could do with any callable."""

    def __reduce__(self):  # noqa: ANN204
        return (print, ("TAMPERED STATE EXECUTED",))


def test_resume_refuses_tampered_state_and_other_layouts(small_data, tmp_path, capsys) -> None:
    """Trainer states load weights-only: a pickle that would run code is refused before anything of it runs.
    A run directory of another layout version is refused by name, not misread."""
    import shutil

    from longcat.training.checkpointing import STATE_FILE

    run = tmp_path / "run"
    train(tiny_train_config(small_data, max_steps=2, save_every=2), run, progress=False)
    state_path = run / "checkpoints" / "step_2" / STATE_FILE
    good = state_path.read_bytes()
    state = torch.load(state_path, weights_only=True)
    assert {"step", "loader", "rng", "environment"} <= set(state)
    capsys.readouterr()
    torch.save({**state, "rng": _RunsCode()}, state_path)
    with pytest.raises(TrainingError, match="not a trainer state this version can read safely"):
        Trainer(tiny_train_config(small_data, max_steps=3), run, resume=True, progress=False)
    assert "TAMPERED" not in capsys.readouterr().out
    torch.save({"step": 2}, state_path)
    with pytest.raises(TrainingError, match="lacks loader"):
        Trainer(tiny_train_config(small_data, max_steps=3), run, resume=True, progress=False)
    state_path.write_bytes(good)
    old = tmp_path / "old"  # written before run directories carried a version: no environment.json
    shutil.copytree(run, old)
    (old / "environment.json").unlink()
    with pytest.raises(TrainingError, match="layout version 1, written by an older longcat"):
        Trainer(tiny_train_config(small_data, max_steps=3), old, resume=True, progress=False)
    data = json.loads((run / "environment.json").read_text())
    (run / "environment.json").write_text(json.dumps({**data, "run_format_version": 4}))
    with pytest.raises(TrainingError, match="layout version 4, written by a newer longcat"):
        Trainer(tiny_train_config(small_data, max_steps=3), run, resume=True, progress=False)
    (run / "environment.json").write_text(json.dumps(data))
    Trainer(tiny_train_config(small_data, max_steps=3), run, resume=True, progress=False).run()


def test_set_values_are_type_checked_against_the_field(capsys) -> None:
    from longcat.cli import main
    from longcat.config import ConfigError

    cases = [
        ("lr=abc", "lr must be a number, got 'abc'"),
        ("max_steps=1.5", "max_steps must be an integer"),
        ("deterministic=1", "deterministic must be true or false"),
        ("seed=null", "seed must be an integer"),
    ]
    for value, expected in cases:
        assert main(["train", "--set", value, "--out", "unused-run-dir"]) == 2
        assert f"--set {value}: {expected}" in capsys.readouterr().err
        with pytest.raises(ConfigError, match=expected):
            TrainConfig().with_overrides([value])
    lr = TrainConfig().with_overrides(["lr=1"]).lr
    assert lr == 1.0 and isinstance(lr, float)
