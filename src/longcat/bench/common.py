"""Shared benchmark plumbing: interleaved timing, machine description, and the transformers twin."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch


def machine() -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns within every round so
    that drift in machine speed hits them all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_index in range(rounds):
        # the order rotates every round, so no function always follows the same one (caches, allocator)
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            _sync()
            start = time.perf_counter()
            fns[name]()
            _sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def transformers_experts_choice(config, dtype: torch.dtype) -> dict:  # noqa: ANN001 - LongcatConfig
    """{"experts_implementation": "eager"} where transformers' default expert path cannot run these widths.

    transformers >= 5.25 runs its experts through torch._grouped_mm, whose CPU kernel (torch 2.13)
    refuses rows that are not a multiple of 16 bytes ("strides should be multiple of 16 bytes"), and
    falls back to its per-expert loop only for misaligned pointers. For such widths (the tests' small
    random configs) the anchor uses that loop; the presets' widths keep transformers' default path."""
    import transformers

    size = torch.empty((), dtype=dtype).element_size()
    widths = (config.hidden_size, config.expert_ffn_hidden_size, 2 * config.expert_ffn_hidden_size)
    if all(width * size % 16 == 0 for width in widths):
        return {}
    if not hasattr(transformers.PreTrainedModel, "set_experts_implementation"):
        return {}  # a transformers with one expert path only
    return {"experts_implementation": "eager"}


def transformers_twin(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' LongcatFlashForCausalLM holding exactly `model`'s weights (through a checkpoint),
    in the layout that transformers reads (checkpoint.transformers_needs_zero_expert_stubs)."""
    import transformers
    from transformers import LongcatFlashForCausalLM

    from ..checkpoint import transformers_needs_zero_expert_stubs

    choice = transformers_experts_choice(model.config, model.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, zero_expert_stubs=transformers_needs_zero_expert_stubs(transformers.__version__))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            twin = LongcatFlashForCausalLM.from_pretrained(tmp, dtype=model.dtype, **choice)
    return twin.to(model.device).train(model.training)
