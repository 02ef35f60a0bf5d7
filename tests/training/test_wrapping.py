"""Per-layer activation checkpointing and compilation (training/wrapping.py) against the plain model:
the same losses and gradients, and the routers' token counts taken once, not again on recomputation."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_train_config

from longcat.training.trainer import Trainer


def _step(small_data, tmp_path, **changes) -> tuple[Trainer, torch.Tensor, dict, list]:
    """One forward and backward of the trainer's loss; the counts before the controller reads them."""
    config = tiny_train_config(small_data, batch_size=4, seq_len=64, compile_backend="aot_eager", **changes)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    total, _parts, routings, _out = trainer._losses(trainer.loader.next_batch(), use_mtp=True)
    total.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    counts = [moe.router.expert_counts.clone() for moe in trainer.model.moe_layers()]
    kept = [moe.last_routing for moe in trainer.model.moe_layers()]
    assert all(k is r for k, (r, _f) in zip(kept, routings))  # the first forward's routing stays kept
    return trainer, total.detach(), grads, counts


@pytest.mark.parametrize(
    "changes",
    [dict(activation_checkpointing=True), dict(compile=True), dict(activation_checkpointing=True, compile=True)],
    ids=["checkpointing", "compile", "both"],
)
def test_wrapped_layers_match_the_plain_model(small_data, tmp_path, changes) -> None:
    _, loss, grads, counts = _step(small_data, tmp_path / "plain")
    trainer, loss_w, grads_w, counts_w = _step(small_data, tmp_path / "wrapped", **changes)
    torch.testing.assert_close(loss_w, loss, rtol=1e-6, atol=1e-6)
    assert grads_w.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_w[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(c.sum() > 0 for c in counts)
    for a, b in zip(counts_w, counts):  # recomputation counted nothing
        assert torch.equal(a, b)
    # and the parameter names, so the checkpoints, are unchanged
    assert not any("_orig_mod" in n or "checkpoint" in n for n in trainer.model.state_dict())
