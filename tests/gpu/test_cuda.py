"""CUDA checks: compiled and speculative decoding against eager, on the device. Skipped without a CUDA
device. (The static-shape MoE dispatch, the accelerator default, is checked on CPU and CUDA alike in
tests/model/test_moe.py.)"""

from __future__ import annotations

import pytest
import torch
from tests.conftest import perturb, random_tiny_config

from longcat import LongcatForCausalLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_compiled_and_speculative_decoding_match_eager() -> None:
    model = LongcatForCausalLM(random_tiny_config(5, max_position_embeddings=64), seed=5, device="cuda").eval()
    perturb(model, 5)
    prompt = [7, 1, 8, 2, 8, 1, 8]
    eager = model.generate([prompt], max_new_tokens=12, eos_token_id=[])
    assert torch.equal(model.generate([prompt], max_new_tokens=12, eos_token_id=[], compile=True), eager)
    spec = model.generate([prompt], max_new_tokens=12, eos_token_id=[], speculative="mtp", num_draft_tokens=2)
    assert torch.equal(spec, eager)
