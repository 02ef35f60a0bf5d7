"""Accelerator profiles for the cost model: data, overridable field by field or read from a JSON file.

Peaks are the vendors' dense (no sparsity) figures; `attention_tflops` is the throughput the
decode attention kernel reaches (the paper's FlashMLA figure on Hopper, 660 TFLOP/s, two thirds of
the bf16 peak; scaled the same way for the H20); `all_to_all_gbs` is the per-GPU bandwidth the
expert-parallel dispatch and combine achieve over the scale-out network (the paper's DeepEP
figure, 40 GB/s of a 400 Gb/s = 50 GB/s NIC).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError


@dataclass(frozen=True)
class Hardware:
    name: str
    bf16_tflops: float  # dense peak
    fp8_tflops: float  # dense peak
    hbm_tbs: float  # HBM bandwidth, TB/s
    memory_gb: float  # HBM capacity, GB (1e9 bytes)
    scale_out_gbs: float  # NIC bandwidth per GPU, GB/s
    all_to_all_gbs: float  # what dispatch/combine achieve per GPU, GB/s
    attention_tflops: float  # achievable decode attention throughput


PROFILES = {
    "H800-80G": Hardware("H800-80G", 989.0, 1979.0, 3.35, 80.0, 50.0, 40.0, 660.0),
    "H200": Hardware("H200", 989.0, 1979.0, 4.8, 141.0, 50.0, 40.0, 660.0),
    "H20-141G": Hardware("H20-141G", 148.0, 296.0, 4.8, 141.0, 50.0, 40.0, 99.0),
    "H100-80G": Hardware("H100-80G", 989.0, 1979.0, 3.35, 80.0, 50.0, 40.0, 660.0),
}


def load_hardware(name: str = "H800-80G", overrides: list[str] | None = None) -> Hardware:
    """A profile by name (case-insensitive) or a JSON file of its fields, then FIELD=VALUE overrides."""
    by_name = {key.lower(): value for key, value in PROFILES.items()}
    if name.lower() in by_name:
        hardware = by_name[name.lower()]
    elif Path(name).is_file():
        data = json.loads(Path(name).read_text())
        fields = {f.name for f in dataclasses.fields(Hardware)}
        unknown = sorted(set(data) - fields)
        missing = sorted(fields - set(data) - {"name"})
        if unknown or missing:
            raise ConfigError(
                f"{name}: unknown hardware field(s) {unknown}, missing {missing}; fields: {sorted(fields)}"
            )
        hardware = Hardware(**{"name": Path(name).stem, **data})
    else:
        raise ConfigError(f"unknown hardware {name!r}: choose one of {sorted(PROFILES)} or give a JSON file")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        numbers = [f.name for f in dataclasses.fields(Hardware) if f.name != "name"]
        if not sep or key not in numbers:
            raise ConfigError(f"--hw {item}: expected FIELD=NUMBER, FIELD one of {', '.join(numbers)}")
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"--hw {item}: {raw!r} is not a number") from None
        if not value > 0:
            raise ConfigError(f"--hw {item}: must be positive")
        hardware = dataclasses.replace(hardware, **{key: value})
    return hardware
