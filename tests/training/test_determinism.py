"""--deterministic across processes: every training here runs in its own `longcat train` process at
2 threads, on the tiny preset's widths (vocabulary 4096 included, so the LM and MTP heads' GEMMs are
split between both threads) with a small batch, and runs are compared by the SHA-256 of their
final/*.safetensors files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 12  # MTP from step 3 (a quarter into the run), as in the default recipe
COMMON = ["--preset", "tiny", "--max-steps", str(STEPS), "--seed", "5", "--deterministic", "--quiet",
          "--set", "batch_size=4", "seq_len=64", "log_every=1", "eval_every=6", "eval_batches=1", "warmup_steps=2",
          "model.vocab_size=4096"]  # fmt: skip


def _env(threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS=str(threads))
    env.pop("MKL_CBWR", None)  # the run itself must choose MKL's reproducible mode
    env.pop("LONGCAT_CPU_KERNELS", None)
    return env


def _train(args: list[str], threads: int = 2) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "longcat.cli", "train", *args], env=_env(threads),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, err
    return err


def final_hashes(run: Path) -> dict[str, str]:
    files = sorted((run / "final").glob("*.safetensors"))
    assert files, f"no safetensors in {run / 'final'}"
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory) -> Path:
    """One uninterrupted run, never checkpointed before its end."""
    out = tmp_path_factory.mktemp("determinism") / "ref"
    _finish(_train([*COMMON, "--data", str(small_data), "--out", str(out)]))
    return out


def test_two_processes_write_identical_weights(reference, small_data, tmp_path) -> None:
    _finish(_train([*COMMON, "--data", str(small_data), "--out", str(tmp_path / "b")]))
    assert final_hashes(tmp_path / "b") == final_hashes(reference)
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (reference, tmp_path / "b")]  # fmt: skip
    assert any(row.get("mtp_loss") is not None for row in rows[0])  # the MTP path ran
    for a, b in zip(*rows):
        assert {k: v for k, v in a.items() if k != "tokens_per_s"} == {
            k: v for k, v in b.items() if k != "tokens_per_s"
        }


GOLDEN = Path(__file__).with_name("golden_fp32_runs.json")
# what the bits of a deterministic fp32 CPU run depend on besides the code (determinism.py)
GOLDEN_KEY = ("torch", "cpu_model", "cpu_instruction_set", "blas", "blas_reproducibility", "threads", "moe_path")


def test_the_fp32_cpu_run_keeps_its_golden_bits(reference) -> None:
    """The CPU fp32 path's results, pinned: the final weights and the losses of the reference run
    against a record made on a machine of the same kind before the GPU-speed work (issue 21) began.
    LONGCAT_RECORD_GOLDEN=1 adds this machine's record when it has none."""
    record = json.loads((reference / "environment.json").read_text())["reproducibility"]
    key = {k: record[k] for k in GOLDEN_KEY}
    losses = [row["loss"] for row in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())
              if "loss" in row]  # fmt: skip
    observed = {"machine": key, "final_sha256": final_hashes(reference), "losses": losses}
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else []
    match = [g for g in golden if g["machine"] == key]
    if not match and os.environ.get("LONGCAT_RECORD_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps([*golden, observed], indent=2) + "\n")
        match = [observed]
    if not match:
        pytest.skip(f"no golden fp32 record for this machine ({key}); LONGCAT_RECORD_GOLDEN=1 adds one")
    assert observed["losses"] == match[0]["losses"]
    assert observed["final_sha256"] == match[0]["final_sha256"]


def test_environment_record_names_what_reproducibility_depends_on(reference) -> None:
    data = json.loads((reference / "environment.json").read_text())
    assert data["run_format_version"] == 3
    record = data["reproducibility"]
    assert record["threads"] == 2 and record["world_size"] == 1 and record["device"] == "cpu"
    assert record["moe_path"] == "fused CPU kernel"
    if record["blas"].startswith("mkl"):
        assert record["blas_reproducibility"].endswith("STRICT")
    assert record["torch"] and record["cpu_model"] and record["cpu_instruction_set"]


def test_kill_9_then_resume_equals_the_uninterrupted_run(reference, small_data, tmp_path) -> None:
    run = tmp_path / "run"
    victim = _train([*COMMON, "--data", str(small_data), "--out", str(run), "--save-every", "4"])
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_4").exists():
        assert victim.poll() is None, victim.communicate()[1]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    # the kill came mid-run: no final model yet, and training resumes from a checkpoint before the end
    assert not (run / "final").exists()
    saved = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert saved and saved[-1] < STEPS, saved
    err = _finish(_train(["--out", str(run), "--resume", "--quiet"]))
    assert "another environment" not in err
    assert final_hashes(run) == final_hashes(reference)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_steps = [json.loads(line)["step"] for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert steps == ref_steps  # no duplicated or missing rows after the resume


def test_resume_at_another_thread_count_warns_naming_both(reference, tmp_path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    err = _finish(_train(["--out", str(run), "--resume", "--quiet", "--max-steps", str(STEPS + 1)], threads=1))
    assert "threads: 2 -> 1" in err and "not be bitwise identical" in err
    data = json.loads((run / "environment.json").read_text())
    assert data["reproducibility"]["threads"] == 1
    assert data["earlier"] == [{"until_step": STEPS, "reproducibility": {**data["reproducibility"], "threads": 2}}]
