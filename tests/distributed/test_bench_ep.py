"""`longcat bench ep` end to end on the tiny preset (2 worker processes twice): the report's fields."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.multiprocess


def test_bench_ep_reports_the_overlap_and_scaling(monkeypatch) -> None:
    from longcat.bench import ep

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    result = ep.run(preset="tiny", batch=2, seq_len=64, rounds=2)
    for key in ("exposed_share_overlap", "exposed_share_sequential", "exposed_share_overlap_fwd_bwd",
                "exposed_share_sequential_fwd_bwd", "real_link_exposed_share_sequential"):  # fmt: skip
        assert 0 <= result[key] < 1, (key, result[key])
    assert isinstance(result["emulated_link"], bool)
    assert result["emulated_link"] == any(r["delay_s_per_byte"] > 0 for r in result["ranks"].values())
    assert result["communication_ms"] > 0 and result["scaling_efficiency"] > 0
    text = ep.report(result)
    assert "exposed share" in text and "scaling efficiency" in text
    assert "exposed = host time blocked" in text  # the method is named: it holds on gloo only
