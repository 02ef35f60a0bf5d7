"""The engine's graph-ready steps (steps.decode_step, steps.speculation_round) under torch.compile.

Each step is compiled with fullgraph=True and static shapes: one graph per batch bucket (rows padded to
1, 2, 4, ... up to the engine's max_batch) and key width (the whole slot), so nothing recompiles as
sequences grow. On CUDA the graphs are captured as CUDA graphs (mode "reduce-overhead"; the cache
tensors are marked static, so a replay writes them in place); a replay's outputs are copied out before
the next one.

On the CPU three more things (their effect is measured in docs/benchmarks.md, "Decode"): Inductor
freezes the weights (constant folding) and calls its kernels from a generated C++ wrapper instead of
Python; steps of up to tuning.FEW_ROWS tokens compute their GEMMs as fused loops
(`_cpu_compile_options`); and the steps run a copy of the model whose linear weights are stored
transposed, since a one-row GEMM (x [1, in] @ W^T) streams a contiguous [in, out] matrix faster than an
[out, in] one. That copy and the frozen constants are a snapshot, so `compiled_steps` builds new steps
when any weight changes (see `weights_version`).
"""

from __future__ import annotations

import copy
import functools
import weakref

import torch

from ..model import tuning
from ..model.lm import LongcatForCausalLM
from . import steps

# buckets x (plain, sampled) x widths of every cache size a process decodes with: past torch's default of 8
RECOMPILE_LIMIT = 64

_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_version(model: torch.nn.Module) -> tuple:
    """Changes whenever any parameter or buffer is modified in place (an optimizer step, a load) or
    replaced (`model.to(dtype or device)`): steps that froze the old weights are then rebuilt."""
    return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in (*model.parameters(), *model.buffers()))


def decoding_copy(model: LongcatForCausalLM, transpose_linear: bool) -> LongcatForCausalLM:
    """A copy of `model`'s modules sharing its tensors, so that compiled steps (kept in a cache weakly
    keyed by the model) do not keep the model itself alive. With transpose_linear every nn.Linear weight
    instead holds the same values in transposed storage (a [out, in] view of a contiguous [in, out] tensor)."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)} if transpose_linear else set()
    memo = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in linear}
    shadow = copy.deepcopy(model, memo)
    if transpose_linear:
        for module in shadow.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()
    return shadow.eval()


def _cpu_compile_options() -> dict:
    """Inductor options for decoding on the CPU. Besides freezing and the C++ wrapper: the GEMMs of a
    few-row step (x [T <= tuning.FEW_ROWS, in] @ W) become Inductor's own fused multiply-and-sum loops
    instead of library calls, since a small-M library GEMM has a fixed cost per call and the loops fuse
    with their neighbours (why and how much: model/tuning.py, docs/benchmarks.md). The pass is
    Inductor's `decompose_mm_pass`, which on the CPU takes only one-row GEMMs unless its module-level
    limit is raised; that limit is read only by the pass, which runs only where it is asked for, as
    here. Torch builds without it keep the library calls."""
    options = {"freezing": True, "cpp_wrapper": True}
    try:
        from torch._inductor.fx_passes import decompose_mem_bound_mm as pass_module
    except ImportError:
        return options
    limit = getattr(pass_module, "cpu_max_first_dimension_decomposition", None)
    if isinstance(limit, int):
        pass_module.cpu_max_first_dimension_decomposition = max(limit, tuning.FEW_ROWS)
        options["post_grad_fusion_options"] = {"decompose_mm_pass": {}}
    return options


class CompiledSteps:
    """steps.decode_step and steps.speculation_round of one model, compiled (see the module docstring).
    backend: torch.compile's ("inductor"; "eager" or "aot_eager" trace the same graphs quickly, for tests)."""

    def __init__(self, model: LongcatForCausalLM, backend: str = "inductor") -> None:
        self.weights_version, self.backend = weights_version(model), backend
        on_cpu = model.device.type == "cpu"
        self.model = decoding_copy(model, transpose_linear=on_cpu and backend == "inductor")
        self.cuda_graphs = model.device.type == "cuda" and backend == "inductor"
        settings: dict = {"fullgraph": True, "dynamic": False, "backend": backend}
        if self.cuda_graphs:
            settings["mode"] = "reduce-overhead"
        elif on_cpu and backend == "inductor":
            settings["options"] = _cpu_compile_options()
        self._decode = torch.compile(functools.partial(steps.decode_step, self.model), **settings)
        self._round = torch.compile(functools.partial(steps.speculation_round, self.model), **settings)

    def mark_static(self, *tensors: torch.Tensor) -> None:
        """Cache tensors a CUDA graph writes in place: their addresses must not change between replays."""
        if self.cuda_graphs:
            for tensor in tensors:
                torch._dynamo.mark_static_address(tensor)

    def _run(self, fn, *args):  # noqa: ANN001, ANN002, ANN202
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            out = fn(*args)
        # a CUDA graph's outputs are overwritten by its next replay: hand out copies
        return torch.utils._pytree.tree_map(torch.clone, out) if self.cuda_graphs else out

    def decode(self, *args) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN002
        """steps.decode_step's arguments after the model."""
        return self._run(self._decode, *args)

    def round(self, *args) -> steps.Round:  # noqa: ANN002
        """steps.speculation_round's arguments after the model."""
        return self._run(self._round, *args)


def compiled_steps(model: LongcatForCausalLM, backend: str = "inductor") -> CompiledSteps:
    """The model's compiled steps, shared by every engine over it (generate calls, a server), rebuilt
    when its weights, dtype or device change."""
    found = _STEPS.get(model)
    if found is None or found.weights_version != weights_version(model) or found.backend != backend:
        found = _STEPS[model] = CompiledSteps(model, backend)
    return found
