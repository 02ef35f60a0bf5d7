"""The machine-tuned thresholds that choose between equivalent code paths, in one place.

Every path on either side of a threshold computes the same function (the tests hold each fast path
against a slow reference); only speed changes. The CPU values were measured on the project's 2-core CPU
machines; the MoE dispatch thresholds are per device type (`for_device`: an accelerator other than
CUDA takes CUDA's), reasoned for an H200 until measured there. They are plain module values that the
code reads at each call, so a user on other hardware can change them
(`longcat.model.tuning.GATHER_SLOTS["cpu"] = 128`); the measurements behind them are in
docs/benchmarks.md ("Decode", "Fused CPU kernel").

MoE dispatch (model/moe.py), for a call with T tokens, K slots per token and N FFN experts:
- ACCELERATOR_PATH: None chooses by device (the accelerator path, static shapes with no host read
  and no fused CPU kernel, on accelerators and under torch.compile); True forces that path on the CPU
  too, so the CPU suite runs what a GPU runs; False forces the CPU's dynamic path.
- T <= ALL_EXPERTS_TOKENS and 3 * T * K >= N: every expert runs on every token (one GEMM over all
  stacked experts), static shapes, no sort, no host read. Gathering each slot's expert weights reads,
  writes and re-reads T * K weight sets; running all experts reads N sets once, so it is cheaper
  while 3 T K >= N, and its compute grows as T * N, hence the cap on T: 8 on the CPU (measured); 256
  on CUDA, since an H200 reads 4.8 TB/s and multiplies ~990 bf16 TFLOP/s, so a GEMM over all experts
  (T flops per weight byte) stays bound by reading the weights up to about 200 tokens, which covers
  every decode bucket (64 rows x (k + 1) tokens with k <= 3).
- Otherwise T * K <= GATHER_SLOTS: each slot's expert weights gathered, static shapes, no sort and no
  host sync (64 on the CPU; 16 on CUDA, where copying weight sets is rarely cheaper than sorting).
  Under torch.compile in inference (compiled decoding) every device gathers here whatever T * K: the
  sorted dispatch has data-dependent shapes that break a whole-graph capture. Above it, the sorted
  grouped dispatch (or the fused CPU kernel), whose sort and per-expert GEMMs cost a fixed overhead
  that only pays off on many slots.

Fused CPU kernel (model/cpu_kernels.py):
- FUSED_BUFFER_LIMIT bytes: each thread past the first adds into its own [T, H] output buffer and
  each thread has a scratch of a few rows per token; above this the grouped path runs instead, so a
  long prefill does not allocate gigabytes of per-thread buffers.

Decoding on the CPU (inference/steps.py, inference/compiled.py):
- A step of TRANSPOSED_HEAD_ROWS = (low, high) rows (a speculative verify) computes its LM head as
  W @ x^T instead of x @ W^T: MKL's small-M GEMM is faster in that orientation for a wide head.
- Decode steps of at most FEW_ROWS tokens (a plain step, or a speculative verify of up to
  FEW_ROWS - 1 drafts) compute their GEMMs as Inductor's fused multiply-and-sum loops instead of
  library calls, over linear weights stored transposed ([in, out] contiguous): the library's small-M
  GEMM costs a fixed few microseconds a call and about T times its one-row cost.
"""

from __future__ import annotations

import torch

ACCELERATOR_PATH: bool | None = None
GATHER_SLOTS = {"cpu": 64, "cuda": 16}
ALL_EXPERTS_TOKENS = {"cpu": 8, "cuda": 256}
FUSED_BUFFER_LIMIT = 256 << 20
FEW_ROWS = 4
TRANSPOSED_HEAD_ROWS = (2, 8)


def for_device(table: dict, device: torch.device) -> int | bool:
    """A per-device threshold: the entry for device.type, CUDA's for another accelerator."""
    return table.get(device.type, table["cpu" if device.type == "cpu" else "cuda"])
