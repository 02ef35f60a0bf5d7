"""The adam-eps study's rounding-drift pair: the nudge is one ulp, the unnudged pair is the exact control."""

from __future__ import annotations

import torch

from longcat.studies.drift import nudge_one_ulp, rounding_drift


def test_nudge_moves_every_element_to_its_neighbour() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    before = [p.detach().clone() for p in model.parameters()]
    nudge_one_ulp(model, seed=3)
    ups = 0
    for old, new in zip(before, model.parameters(), strict=True):
        assert (new != old).all()
        # no float32 lies strictly between the old and the new value: a step of exactly one ulp
        assert torch.equal(torch.nextafter(old, new.detach()), new.detach())
        ups += int((new > old).sum())
    total = sum(p.numel() for p in before)
    assert 0.3 * total < ups < 0.7 * total  # both directions, chosen at random


def test_control_pair_is_identical_and_the_nudged_pair_drifts(small_data, tmp_path) -> None:
    from tests.conftest import tiny_train_config

    cfg = tiny_train_config(small_data, max_steps=6, adam_eps=1e-16)
    control = rounding_drift(cfg, tmp_path, steps=4, nudge=False)
    assert control["drift_max"] == 0.0 and control["drift_loss"] == 0.0
    nudged = rounding_drift(cfg, tmp_path, steps=4)
    assert nudged["drift_steps"] == 4
    assert 0.0 < nudged["drift_median"] <= nudged["drift_max"]
    assert nudged["drift_worst_tensor"] in dict(_meta_model(cfg).named_parameters())
    assert not (tmp_path / "drift-a").exists() and not (tmp_path / "drift-b").exists()


def _meta_model(cfg):
    from longcat.model.lm import LongcatForCausalLM

    return LongcatForCausalLM(cfg.model_config(), device="meta")
