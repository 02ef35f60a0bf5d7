"""Bitwise-reproducible training (paper §4.4) and the record of what it depends on.

`--deterministic` promises that two runs of the same command on the same machine, each in its own
process, write bit-identical weights, and that a run killed and resumed reaches the weights of one
never stopped. On a CPU in fp32 that rests on four things:

1. Every reduction has a fixed order for a fixed thread count. PyTorch's CPU kernels split work
   statically by thread index; the fused MoE kernel (model/cpu_kernels.py) assigns experts to
   threads once, largest first. Neither depends on scheduling, but both depend on the thread count.
2. The BLAS does too. MKL, PyTorch's CPU BLAS on x86, may choose its code path and its split of a
   GEMM between threads from the operands' memory alignment and from run-time load (its "dynamic"
   threading), and on Intel CPUs it does: two processes of the same run diverged at the first MTP
   step there. MKL's Conditional Numerical Reproducibility in strict mode fixes its GEMMs' results
   whatever the alignment and thread count (`mkl_cbwr_set(MKL_CBWR_AUTO | MKL_CBWR_STRICT)`). MKL
   accepts that only before its first computation in the process, so the `longcat` command switches
   it on before anything else runs; the environment variable MKL_CBWR=AUTO,STRICT does the same for
   any process. Its cost: docs/benchmarks.md ("Determinism").
3. The MoE path stays the same: the fused kernel and the grouped path round differently, so under
   `--deterministic` a kernel that fails to build is an error, not a silent change of path.
4. The same software and hardware: torch version, CPU instruction set, device, world size.

`environment()` writes all of this down (the run directory's environment.json); a resume that
changes any of it still runs, with a warning naming the old and the new value.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import re
import warnings
from pathlib import Path

import torch

# mkl_cbwr.h
_MKL_CBWR_ALL = -1
_MKL_CBWR_AUTO = 2
_MKL_CBWR_STRICT = 0x10000
_MKL_CBWR_ERR_MODE_CHANGE_FAILURE = -8
_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2", 9: "AVX",
             10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}  # fmt: skip


def configure_determinism(enabled: bool) -> None:
    """Deterministic algorithms in PyTorch (CUDA kernels and cuBLAS workspaces) and, on the CPU, MKL's
    strict reproducible mode where it can still be chosen."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        if not enable_blas_reproducibility() and _mkl() is not None:
            warnings.warn(
                f"MKL's reproducible mode could not be switched on ({blas_reproducibility()}): MKL had already "
                "computed in this process. Runs in separate processes may then differ in the last bits on Intel "
                "CPUs; start the process with MKL_CBWR=AUTO,STRICT, or train with the `longcat` command",
                RuntimeWarning,
                stacklevel=3,
            )
    else:
        torch.use_deterministic_algorithms(False)


@functools.cache
def _mkl() -> ctypes.CDLL | None:
    """The MKL linked into this PyTorch (statically, in libtorch_cpu, in PyTorch's own wheels), or None."""
    if not torch.backends.mkl.is_available():
        return None
    candidates = [Path(torch.__file__).parent / "lib" / "libtorch_cpu.so", None]  # None: the whole process
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path) if path else None)
        except OSError:
            continue
        for prefix in ("mkl_serv_", "mkl_"):  # the service layer's name, or mkl_rt's public one
            if hasattr(lib, prefix + "cbwr_set") and hasattr(lib, prefix + "cbwr_get"):
                lib.longcat_cbwr_set = getattr(lib, prefix + "cbwr_set")
                lib.longcat_cbwr_get = getattr(lib, prefix + "cbwr_get")
                lib.longcat_cbwr_set.argtypes = lib.longcat_cbwr_get.argtypes = [ctypes.c_int]
                lib.longcat_cbwr_set.restype = lib.longcat_cbwr_get.restype = ctypes.c_int
                return lib
    return None


def _describe_cbwr(value: int) -> str:
    branch = _BRANCHES.get(value & 0xFFFF, str(value & 0xFFFF))
    return f"{branch},STRICT" if value & _MKL_CBWR_STRICT else branch


def blas_reproducibility() -> str:
    """The BLAS's reproducibility mode as recorded in environment.json, e.g. 'mkl-cnr AUTO,STRICT'."""
    lib = _mkl()
    if lib is None:
        return "mkl absent" if not torch.backends.mkl.is_available() else "mkl (mode unreadable)"
    return f"mkl-cnr {_describe_cbwr(lib.longcat_cbwr_get(_MKL_CBWR_ALL))}"


def enable_blas_reproducibility() -> bool:
    """Switch MKL to strict conditional numerical reproducibility; True when it is on afterwards (also
    when MKL_CBWR set it already). It must come before MKL's first computation in the process: later,
    MKL refuses, and this returns False (environment.json then records the mode that is in force)."""
    lib = _mkl()
    if lib is None:
        return False
    if lib.longcat_cbwr_get(_MKL_CBWR_ALL) & _MKL_CBWR_STRICT:
        return True
    if hasattr(lib, "MKL_Set_Dynamic"):  # MKL's documented reproducibility conditions: no dynamic threads
        lib.MKL_Set_Dynamic(0)
    return lib.longcat_cbwr_set(_MKL_CBWR_AUTO | _MKL_CBWR_STRICT) == 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas_version() -> str:
    match = re.search(r"Math Kernel Library Version ([\w.]+)", torch.__config__.show())
    return f"mkl {match.group(1)}" if match else "not mkl"


def environment(device: torch.device, moe_path: str, world_size: int = 1, dtype: str = "float32") -> dict:
    """What a bitwise-reproducible continuation of a run needs to be the same: a flat dict of strings
    and numbers (environment.json's "reproducibility" entry)."""
    record = {
        "torch": str(torch.__version__),  # a str subclass that weights-only loading refuses
        "device": str(device.type) if device.type == "cpu" else f"{device.type}: {torch.cuda.get_device_name(device)}",
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "moe_path": moe_path,
        "cpu_model": cpu_model(),
        "cpu_instruction_set": torch.backends.cpu.get_cpu_capability(),
        "blas": _blas_version(),
        "blas_reproducibility": blas_reproducibility(),
        "world_size": world_size,
    }
    if device.type == "cuda":
        record["cuda"] = torch.version.cuda or "unknown"
    return record


def moe_path_that_ran(moe_layers: list, recorded: str) -> str:
    """The recorded MoE path with what the layers' last calls ran (Experts.last_path) in place of the
    prediction, keeping an expert-parallel prefix; the record as it was where nothing ran yet."""
    ran = sorted({moe.experts.last_path for moe in moe_layers if moe.experts.last_path})
    if not ran:
        return recorded
    head, marker, _ = recorded.rpartition("local experts: ")
    return head + marker + "; ".join(ran)


def differences(saved: dict, current: dict) -> list[str]:
    """'key: old -> new' for every recorded value that changed (keys only one side has count too)."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k, 'unrecorded')} -> {current.get(k, 'unrecorded')}" for k in keys
            if saved.get(k) != current.get(k)]  # fmt: skip
