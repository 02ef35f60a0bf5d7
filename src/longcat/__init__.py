"""longcat: LongCat-Flash (zero-computation experts, ScMoE, MLA, MTP) in PyTorch."""

from __future__ import annotations

from .checkpoint import CheckpointError
from .config import ConfigError, LongcatConfig
from .model.lm import CausalLMOutput, LongcatForCausalLM

__all__ = ["CausalLMOutput", "CheckpointError", "ConfigError", "LongcatConfig", "LongcatForCausalLM"]
__version__ = "0.1.0"
