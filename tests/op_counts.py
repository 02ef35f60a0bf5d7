"""Counting what a piece of code asks of the device: aten ops through a dispatch mode, and host reads.

A host read (a value copied to Python: `.item()`, `.tolist()`, `.cpu()`, `.numpy()`, or an op whose
output size depends on the data, such as `nonzero` or `bincount`) makes the host wait for the device on
an accelerator. On the CPU some of them never reach the dispatcher (`.tolist()` of a CPU tensor reads
its memory directly), so those methods are counted by patching them as well.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that read a value to the host, or size their output by the data (so wait for it on a device)
SYNCING_OPS = ("_local_scalar_dense", "bincount", "nonzero", "unique", "_unique", "_unique2", "unique_consecutive",
               "unique_dim", "masked_select", "repeat_interleave")  # fmt: skip
MATMUL_OPS = ("mm", "bmm", "addmm", "addbmm", "baddbmm", "matmul", "_grouped_mm", "linear", "einsum")


class OpCounter(TorchDispatchMode):
    """ops: Counter of aten op names (`mm`, `_to_copy`, ...); calls: (name, [argument tensors]) in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.calls: list[tuple[str, list[torch.Tensor]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        if name == "repeat_interleave" and (kwargs or {}).get("output_size") is not None:
            name = "repeat_interleave_sized"  # told its output's size: no read of the repeats
        self.ops[name] += 1
        self.calls.append((name, [a for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))

    def matmuls(self) -> int:
        return sum(self.ops[name] for name in MATMUL_OPS)

    def host_syncs(self) -> int:
        return sum(self.ops[name] for name in SYNCING_OPS)


@contextlib.contextmanager
def host_reads() -> Iterator[Counter[str]]:
    """Counter of host reads made inside: patched Tensor methods by name, plus syncing aten ops."""
    reads: Counter[str] = Counter()
    # .item() and float(t) reach aten._local_scalar_dense, counted below; these three may not
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}

    def counting(name: str):  # noqa: ANN202
        original = originals[name]

        def method(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if name != "cpu" or self.device.type != "cpu":  # .cpu() of a CPU tensor moves nothing
                reads[f"Tensor.{name}"] += 1
            return original(self, *args, **kwargs)

        return method

    for name in originals:
        setattr(torch.Tensor, name, counting(name))
    counter = OpCounter()
    try:
        with counter:
            yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for name in SYNCING_OPS:
            if counter.ops[name]:
                reads[f"aten.{name}"] += counter.ops[name]
