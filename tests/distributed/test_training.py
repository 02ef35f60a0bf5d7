"""Training on several processes (gloo): every layout follows the one-process run step by step, the
router biases stay identical on every rank, --deterministic runs repeat bit for bit, bad layouts are
refused before any worker starts, and a killed worker ends the job with its rank named."""

from __future__ import annotations

import contextlib
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
pytestmark = pytest.mark.multiprocess
STEPS = 20
COMMON = ["--preset", "tiny", "--max-steps", str(STEPS), "--seed", "3", "--quiet",
          "--set", "batch_size=4", "seq_len=32", "log_every=1", "eval_every=10", "eval_batches=1", "warmup_steps=4",
          "lb_groups=2"]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    for key in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "MKL_CBWR"):
        env.pop(key, None)
    return env


def run_job(command: list[str], env: dict, out: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    """Run a launcher and its workers as one process session, killed whole if it outlives `timeout`.
    Under this sandbox's network stack (gVisor), gloo's first connection between two workers has hung
    in `init_process_group` about once in 30 launches (both ranks waiting in Pair::waitUntilConnected,
    past the process-group timeout): a launch that hangs before its ranks joined (nothing written to
    `out`'s environment.json since it started) is tried once more. Any other hang or failure is not."""
    for attempt in range(2):
        marker = out / "environment.json"
        before = marker.stat().st_mtime_ns if marker.exists() else None
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            joined = marker.exists() and marker.stat().st_mtime_ns != before
            if attempt or joined:
                raise
    raise AssertionError("unreachable")


def longcat(args: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    out = Path(args[args.index("--out") + 1]) if "--out" in args else Path("/nonexistent")
    return run_job([sys.executable, "-m", "longcat", *args], _env(), out, timeout)


def start_job(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "longcat", *args], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def stop_job(proc: subprocess.Popen) -> None:
    """Kill the launcher and every worker it started, whatever happened."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def final_hash(run: Path) -> str:
    return hashlib.sha256((run / "final" / "model.safetensors").read_bytes()).hexdigest()


def run_worker(name: str, data: Path, out: Path, ep: int = 2) -> Path:
    """tests/distributed/NAME on 2 processes under torchrun (gloo, EP `ep`); returns `out`, which it fills."""
    env = dict(_env(), PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'src'}", OMP_NUM_THREADS="1")
    worker = str(REPO / "tests" / "distributed" / name)
    done = run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", worker,
                    str(data), str(out), str(ep)], env, out)  # fmt: skip
    assert done.returncode == 0, done.stderr[-8000:]
    return out


@pytest.fixture(scope="module")
def one_process(small_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "one"
    done = longcat(["train", *COMMON, "--data", str(small_data), "--out", str(out)])
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize(("nproc", "ep"), [(2, 2), (2, 1), (4, 2)])
def test_layouts_follow_the_one_process_run(one_process, small_data, tmp_path, nproc: int, ep: int) -> None:
    out = tmp_path / "run"
    done = longcat(["train", "--nproc", str(nproc), "--ep", str(ep), *COMMON, "--data", str(small_data), "--out",
                    str(out)])  # fmt: skip
    assert done.returncode == 0, done.stderr[-8000:]
    ours, ref = losses(out), losses(one_process)
    assert len(ours) == len(ref) == STEPS
    for step, (a, b) in enumerate(zip(ours, ref), 1):
        assert abs(a - b) <= 1e-4 * abs(b), (step, a, b)
    record = json.loads((out / "environment.json").read_text())["reproducibility"]
    assert record["world_size"] == nproc and record["expert_parallel"] == ep
    assert (record["moe_path"].startswith("expert-parallel")) == (ep > 1)
    transformers = pytest.importorskip("transformers")  # final/ is gathered into one ordinary checkpoint
    transformers.LongcatFlashForCausalLM.from_pretrained(out / "final")


def test_the_bf16_policy_tracks_one_process_and_keeps_the_router_fp32(small_data, tmp_path) -> None:
    """The bf16 recipe under FSDP2 on gloo (parameters gathered in bf16, gradients reduced in fp32) with
    EP 2 against one process's bf16 autocast run, 20 steps; and every router sees its fp32 master."""
    bf16 = [*COMMON, "--set", "dtype=bfloat16", "--data", str(small_data)]
    single = longcat(["train", *bf16, "--out", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-8000:]
    done = longcat(["train", "--nproc", "2", "--ep", "2", *bf16, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-8000:]
    ours, ref = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(ours) == len(ref) == STEPS
    gaps = [abs(a - b) for a, b in zip(ours, ref)]
    assert max(gaps) < 0.05, [round(g, 4) for g in gaps]  # bf16 rounding, as the one-process recipe against fp32

    seen = json.loads((run_worker("router_precision_worker.py", small_data, tmp_path / "hook") /
                       "router_check.json").read_text())  # fmt: skip
    assert seen and all(s["dtype"] == "torch.float32" and s["equal"] for s in seen), seen


def test_router_biases_are_identical_on_every_rank_after_every_step(small_data, tmp_path) -> None:
    checks = json.loads((run_worker("bias_worker.py", small_data, tmp_path / "run") / "bias_check.json").read_text())
    assert [c["step"] for c in checks] == list(range(6))
    assert all(c["equal"] for c in checks) and checks[-1]["moved"]


def test_deterministic_runs_on_two_processes_are_bitwise_identical(small_data, tmp_path) -> None:
    hashes = []
    for name in ("a", "b"):
        done = longcat(["train", "--nproc", "2", "--ep", "2", *COMMON, "--max-steps", "8", "--deterministic",
                        "--data", str(small_data), "--out", str(tmp_path / name)])  # fmt: skip
        assert done.returncode == 0, done.stderr[-8000:]
        hashes.append(final_hash(tmp_path / name))
    assert hashes[0] == hashes[1]


def test_bad_layouts_are_refused_before_any_worker_starts(tmp_path) -> None:
    cases = [
        (["--nproc", "3", "--ep", "2"], "--ep 2 must divide --nproc 3"),
        (["--nproc", "3", "--ep", "3"], "must divide the model's 16 FFN experts"),
        (["--ep", "2"], "--ep needs --nproc"),
        (["--nproc", "0"], "--nproc must be at least 1"),
        (["--max-restarts", "1"], "--max-restarts needs --nproc"),
    ]
    for flags, message in cases:
        done = longcat(["train", *flags, "--out", str(tmp_path / "never")], timeout=60)
        assert done.returncode == 2 and message in done.stderr, (flags, done.stderr[-2000:])
        assert not (tmp_path / "never").exists()


def test_a_killed_worker_ends_the_job_naming_its_rank(small_data, tmp_path) -> None:
    out = tmp_path / "run"
    launcher = start_job(["train", "--nproc", "2", *COMMON, "--max-steps", "100000", "--data", str(small_data),
                          "--out", str(out)])  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists():
            assert launcher.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.1)
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[-1]), signal.SIGKILL)
        _, err = launcher.communicate(timeout=120)
    finally:
        stop_job(launcher)
    assert launcher.returncode != 0
    assert "worker rank" in err and "SIGKILL" in err, err[-3000:]
    for pid in workers:  # no worker left behind
        assert subprocess.run(["kill", "-0", pid], capture_output=True).returncode != 0


def _rows(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _cut_back_to(run: Path, step: int) -> None:
    """As if the run had died right after its step-`step` checkpoint."""
    import shutil

    for path in (run / "checkpoints").iterdir():
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    shutil.rmtree(run / "final")


TWO, FOUR = ["--nproc", "2", "--ep", "2"], ["--nproc", "4", "--ep", "2"]
# uneven expert shards: 6 experts on EP 2 x FSDP 2 (3 per EP rank, FSDP2's chunks 2 and 1); 3 experts on
# FSDP 2 (chunks 2 and 1) without expert parallelism
SIX_ON_FOUR = [*FOUR, "--set", "model.n_routed_experts=6"]
THREE_ON_TWO = ["--nproc", "2", "--set", "model.n_routed_experts=3", "lb_groups=1"]


@pytest.mark.parametrize(
    ("first", "then"), [(TWO, []), ([], TWO), (TWO, FOUR), (SIX_ON_FOUR, []), (THREE_ON_TWO, [])],
    ids=["2-1", "1-2", "2-4", "uneven-4-1", "uneven-2-1"],
)  # fmt: skip
def test_resume_at_another_world_size_follows_the_uninterrupted_run(small_data, tmp_path, first, then) -> None:
    run = tmp_path / "run"
    done = longcat(["train", *COMMON, *first, "--save-every", "10", "--data", str(small_data), "--out", str(run)])
    assert done.returncode == 0, done.stderr[-8000:]
    uninterrupted = _rows(run)
    _cut_back_to(run, 10)
    done = longcat(["train", *then, "--out", str(run), "--resume", "--quiet"])
    assert done.returncode == 0, done.stderr[-8000:]
    resumed = _rows(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    if then:  # a resume cannot change the model's shape: refused before any worker starts
        wider = longcat(["train", *then, "--out", str(run), "--resume", "--set", "model.hidden_size=64"], timeout=60)
        assert wider.returncode == 2 and "--set model.hidden_size=64 differs from the checkpoint's" in wider.stderr
    gaps = [abs(resumed[step] - uninterrupted[step]) for step in range(11, STEPS + 1)]
    assert max(gaps) <= 1e-5, gaps
    assert (run / "final" / "model.safetensors").is_file()


def _kill_a_worker_after_checkpoint(args: list[str], run: Path, which: int) -> tuple[int, str, Path]:
    """Start the job, SIGKILL one of its workers once checkpoint step_4 exists; the job's exit code,
    stderr and run directory. A job that hangs (gloo's connection, see run_job; with --max-restarts
    the restarted workers connect again) is killed whole and the scenario tried once more elsewhere."""
    for attempt in range(2):
        target = run if attempt == 0 else run.with_name(run.name + "-again")
        launcher = start_job([*args, "--save-every", "4", "--out", str(target)])
        try:
            deadline = time.time() + 90
            while not (target / "checkpoints" / "step_4").exists() and time.time() < deadline:
                assert launcher.poll() is None, launcher.communicate()[1][-8000:]
                time.sleep(0.01)
            if (target / "checkpoints" / "step_4").exists():
                workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
                os.kill(int(workers.stdout.split()[which]), signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    _, err = launcher.communicate(timeout=150)
                    return launcher.returncode, err, target
        finally:
            stop_job(launcher)
    raise AssertionError("the job hung twice")


def test_kill_9_of_a_worker_then_resume_equals_the_uninterrupted_run(small_data, tmp_path) -> None:
    args = ["train", "--nproc", "2", "--ep", "2", *COMMON, "--max-steps", "12", "--deterministic", "--data",
            str(small_data)]  # fmt: skip
    done = longcat([*args, "--out", str(tmp_path / "ref")])
    assert done.returncode == 0, done.stderr[-8000:]
    run = tmp_path / "run"
    code, _, run = _kill_a_worker_after_checkpoint(args, run, which=0)
    assert code != 0 and not (run / "final").exists()
    done = longcat(["train", "--nproc", "2", "--ep", "2", "--out", str(run), "--resume", "--quiet"])
    assert done.returncode == 0, done.stderr[-8000:]
    assert "another environment" not in done.stderr
    assert final_hash(run) == final_hash(tmp_path / "ref")
    # with --max-restarts the launcher restarts the workers, which resume by themselves
    code, err, run = _kill_a_worker_after_checkpoint([*args, "--max-restarts", "1"], tmp_path / "restarted", which=-1)
    assert code == 0, err[-8000:]
    assert final_hash(run) == final_hash(tmp_path / "ref")


def test_export_turns_a_step_checkpoint_into_a_hugging_face_directory(small_data, tmp_path) -> None:
    run = tmp_path / "run"
    done = longcat(["train", "--nproc", "2", "--ep", "2", *COMMON, "--max-steps", "4", "--data", str(small_data),
                    "--out", str(run)])  # fmt: skip
    assert done.returncode == 0, done.stderr[-8000:]
    done = longcat(["export", str(run), "--out", str(tmp_path / "hf")])
    assert done.returncode == 0, done.stderr
    from safetensors.torch import load_file

    exported, final = load_file(tmp_path / "hf" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert exported.keys() == final.keys()
    assert all(torch_equal(exported[k], final[k]) for k in final)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    # the expert-parallel run's checkpoint grows like a one-process one (its layout-independent shards)
    done = longcat(["grow", str(run), "--out", str(tmp_path / "grown")], timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    from longcat.scaling.growth import source_name
    from longcat.training.checkpointing import checkpoint_dir, load_checkpoint_model

    source = load_checkpoint_model(checkpoint_dir(run)).state_dict()
    grown = load_checkpoint_model(checkpoint_dir(tmp_path / "grown")).state_dict()
    layers = len({k.split(".")[2] for k in source if k.startswith("model.layers.")})
    assert len({k.split(".")[2] for k in grown if k.startswith("model.layers.")}) == 2 * layers
    assert all(torch_equal(v, source[source_name(k, layers)]) for k, v in grown.items())


def torch_equal(a, b) -> bool:  # noqa: ANN001
    import torch

    return torch.equal(a, b)
