"""Model growth by layer stacking: every tensor and AdamW moment of the grown run, and the first step
of the run resumed from it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import tiny_train_config

from longcat.config import LongcatConfig
from longcat.distributed.checkpoint import checkpoint_state, init_optimizer_state
from longcat.distributed.checkpoint import load as dcp_load
from longcat.model.lm import LongcatForCausalLM
from longcat.scaling.growth import grow, source_name
from longcat.training.checkpointing import SHARDS_DIR, list_checkpoints, load_trainer_state
from longcat.training.config import TrainConfig
from longcat.training.optim import build_optimizer
from longcat.training.trainer import Trainer, train


def _load(directory):
    state = load_trainer_state(directory)
    cfg = TrainConfig.from_dict(state["train_config"])
    model = LongcatForCausalLM(LongcatConfig.from_json_file(directory / "config.json"), device="cpu", seed=0)
    optimizer = build_optimizer(model, cfg)
    init_optimizer_state(optimizer)
    dcp_load(directory / SHARDS_DIR, checkpoint_state(model, optimizer))
    return model, optimizer, state


def _assert_same_state(mine, theirs, where: str) -> None:  # noqa: ANN001 - nested dicts of tensors and numbers
    assert type(mine) is type(theirs), where
    if isinstance(mine, dict):
        assert mine.keys() == theirs.keys(), where
        for key in mine:
            _assert_same_state(mine[key], theirs[key], f"{where}.{key}")
    elif isinstance(mine, (list, tuple)):
        assert len(mine) == len(theirs), where
        for i, (a, b) in enumerate(zip(mine, theirs)):
            _assert_same_state(a, b, f"{where}[{i}]")
    elif isinstance(mine, torch.Tensor):
        assert torch.equal(mine, theirs), where
    else:
        assert mine == theirs, where


@pytest.fixture(scope="module")
def source_run(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("small_run")
    cfg = tiny_train_config(small_data, max_steps=6, save_every=6, eval_every=6, seq_len=32, mtp_start_step=2)
    train(cfg, out, progress=False)
    return out


def test_source_name() -> None:
    assert (
        source_name("model.layers.3.mlp.router.classifier.weight", 2) == "model.layers.1.mlp.router.classifier.weight"
    )
    assert source_name("model.embed_tokens.weight", 2) == "model.embed_tokens.weight"
    assert source_name("model.mtp.layers.0.eh_proj.weight", 2) == "model.mtp.layers.0.eh_proj.weight"


def test_grown_layers_and_moments_copy_the_source(source_run, tmp_path) -> None:
    out = grow(source_run, tmp_path / "grown", factor=3, progress=False)
    (_, src_dir), (_, dst_dir) = (
        list_checkpoints(source_run / "checkpoints")[-1],
        list_checkpoints(out / "checkpoints")[-1],
    )
    src, src_opt, src_state = _load(src_dir)
    dst, dst_opt, dst_state = _load(dst_dir)
    L = src.config.num_layers
    assert dst.config.num_layers == 3 * L
    src_state_dict, src_params = src.state_dict(), dict(src.named_parameters())
    for name, tensor in dst.state_dict().items():  # buffers too: the controller's selection biases
        assert torch.equal(tensor, src_state_dict[source_name(name, L)]), name
    for name, param in dst.named_parameters():
        mine, theirs = dst_opt.state[param], src_opt.state[src_params[source_name(name, L)]]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(mine[key], theirs[key]), (name, key)
    assert any(torch.count_nonzero(dst_opt.state[p]["exp_avg"]) for p in dst.parameters())
    for key in ("step", "tokens_seen", "loader", "skipped"):
        assert dst_state[key] == src_state[key], key
    assert set(dst_state["rng"]) == set(src_state["rng"]) >= {"torch", "numpy", "python"}
    for key in src_state["rng"]:
        _assert_same_state(dst_state["rng"][key], src_state["rng"][key], f"rng.{key}")
    cfg = TrainConfig.from_file(out / "train_config.json")
    source_cfg = TrainConfig.from_file(source_run / "train_config.json")
    assert cfg.model["num_layers"] == 3 * L and cfg.mtp_start_step == 2
    assert cfg.decay_steps == round(source_cfg.max_steps * source_cfg.decay_fraction)
    assert cfg.bias_decay_steps == source_cfg.max_steps
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["event"] == "growth" and rows[-1]["layers_after"] == 3 * L and rows[-1]["step"] == 6
    assert [r["step"] for r in rows if "loss" in r] == [r["step"] for r in _rows(source_run) if "loss" in r]
    pytest.importorskip("matplotlib")
    from longcat.training.plots import plot_run

    assert (out / "plots" / "loss.png") in plot_run(out)  # the growth row is drawn, not read as a step


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resumed_grown_run_starts_from_the_grown_model(source_run, tmp_path) -> None:
    out = grow(source_run, tmp_path / "grown", factor=2, progress=False)
    cfg = TrainConfig.from_file(out / "train_config.json")
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "max_steps": 9})  # longer: only the stable phase grows
    trainer = Trainer(cfg, out, resume=True, progress=False)
    assert trainer.step == 6 and trainer.config.num_layers == 2
    # the grown model's loss on the batch the resumed run trains on next
    batch = copy.deepcopy(trainer.loader).next_batch()
    model, _, _ = _load(list_checkpoints(out / "checkpoints")[-1][1])
    model.train()
    with torch.no_grad():
        logits = model(batch.input_ids, document_ids=batch.document_ids, position_ids=batch.position_ids).logits
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.targets.reshape(-1))
    row = trainer.train_step(monitor=True)
    assert row["loss"] == pytest.approx(float(expected), rel=1e-5, abs=1e-5)
    assert trainer.step == 7


def test_growing_a_model_directory_starts_a_fresh_optimizer(source_run, tmp_path, capsys) -> None:
    out = grow(source_run / "final", tmp_path / "from_final", factor=2, progress=False)
    assert "fresh optimizer" in capsys.readouterr().err
    state = load_trainer_state(list_checkpoints(out / "checkpoints")[-1][1])
    assert state["step"] == 0
    final = LongcatForCausalLM.from_pretrained(source_run / "final")
    grown, _, _ = _load(list_checkpoints(out / "checkpoints")[-1][1])
    assert torch.equal(
        grown.model.layers[1].mlp.router.classifier.weight, final.model.layers[0].mlp.router.classifier.weight
    )
