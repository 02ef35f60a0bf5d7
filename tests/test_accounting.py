from __future__ import annotations

import json

import pytest

from longcat import LongcatConfig
from longcat.accounting import model_report
from longcat.cli import main


def test_longcat_flash_reproduces_the_paper() -> None:
    """560B total, 18.6B-31.3B active (paper §1.7: 560.7B, 18.69B, 31.38B); 56 x 576 latent values."""
    report = model_report(LongcatConfig.from_preset("longcat-flash"))
    assert round(report.total_params / 1e9, 1) == 560.7
    assert round(report.active_params_min / 1e9, 2) == 18.69
    assert round(report.active_params_max / 1e9, 2) == 31.38
    assert round(report.active_params_avg / 1e9, 1) == 27.1  # K_e = 8, the paper's "~27B average"
    assert report.kv_cache_bytes_per_token == 56 * 576 * 2
    assert 1.1e9 < report.mtp_params < 1.3e9  # its own 0.8B embedding + one dense layer


def test_counts_match_the_built_model() -> None:
    from longcat import LongcatForCausalLM

    config = LongcatConfig.from_preset("tiny", num_nextn_predict_layers=0)
    model = LongcatForCausalLM(config, device="meta")
    report = model_report(config)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    expert = 3 * config.hidden_size * config.expert_ffn_hidden_size * config.num_layers
    assert report.active_params_max - report.active_params_min == config.moe_topk * expert


def test_flops_grow_with_context() -> None:
    config = LongcatConfig.from_preset("small")
    short, long = model_report(config, seq_len=128), model_report(config, seq_len=8192)
    assert short.flops_per_token > 2 * short.active_params_avg
    assert long.flops_per_token > short.flops_per_token


def test_cli_info_json_keys(capsys) -> None:
    assert main(["info", "longcat-flash", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("total_params", "active_params_min", "active_params_avg", "active_params_max",
                "kv_cache_bytes_per_token", "flops_per_token"):  # fmt: skip
        assert isinstance(data[key], int) and data[key] > 0


def test_cli_info_on_checkpoint_dir_and_bad_target(tmp_path, capsys) -> None:
    LongcatConfig.from_preset("tiny").to_json_file(tmp_path / "config.json")
    assert main(["info", str(tmp_path)]) == 0
    assert "total parameters" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "neither a preset" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_moe_runs_and_reports_ratios(capsys) -> None:
    pytest.importorskip("transformers")
    assert main(["bench", "moe", "--preset", "tiny", "--batch", "1", "--seq-len", "32", "--rounds", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (row,) = result["layer"]
    assert row["fwd_bwd_vs_dense"] > 0 and row["speedup_fwd_bwd_vs_transformers"] > 0
    assert result["speedup_model_fwd_bwd_vs_transformers"] > 0
    assert row["max_abs_diff_vs_transformers"] < 1e-4
