"""The studies `longcat study` runs: each a question, the paper's claim, arms that differ only in the
settings they name, and the metric its verdict reads (runner.py holds the rule).

Full runs train the `tiny` preset for a few hundred steps (about 30 minutes a study on 2 CPU cores);
`--quick` trains a few steps of each arm, to test the pipeline, not to measure anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .runner import Arm, Study

FULL = {"preset": "tiny", "max_steps": 300, "batch_size": 16, "seq_len": 256, "eval_every": 100,
        "eval_batches": 8, "log_every": 10}  # fmt: skip
QUICK = {"max_steps": 3, "batch_size": 4, "seq_len": 32, "eval_every": 3, "eval_batches": 1, "log_every": 1,
         "warmup_steps": 1, "mtp_start_step": 1}  # fmt: skip


def gradient_rms(run_dir: Path) -> dict:
    """The gradient's RMS over all parameters at the last logged step: grad_norm / sqrt(parameters)."""
    config = json.loads((run_dir / "model_config.json").read_text())
    from ..accounting import model_report
    from ..config import LongcatConfig

    params = model_report(LongcatConfig.from_dict(config)).total_params
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    norms = [r["grad_norm"] for r in rows if r.get("grad_norm") is not None]
    return {"grad_rms": norms[-1] / math.sqrt(params) if norms else None}


ZERO_EXPERTS = Study(
    name="zero-experts",
    question="At the same average number of FFN experts per token, do zero-computation experts (top-K over "
    "N FFN + Z identity experts, the budget controller holding K_e) train better than vanilla top-K_e routing?",
    claim="Fig. 3a: with the same compute budget, the model with zero-computation experts reaches a lower "
    "validation loss than the vanilla MoE (no figure of the gap is given).",
    arms=[
        Arm("vanilla-top4", {"model.zero_expert_num": 0, "model.moe_topk": 4}),
        Arm("zero-experts-top6", {}),  # tiny: N = 16, Z = 8, K = 6, K_e = 4
    ],
    base=FULL,
    quick=QUICK,
    notes=[
        "Both arms run 4 FFN experts per token on average (the controller's target K_e = 6 * 16 / 24 = 4), so "
        "equal tokens are equal FLOPs up to the router's extra 8 logits."
    ],  # fmt: skip
)

Z_LOSS = Study(
    name="z-loss",
    question="Under a deliberately high learning rate, does the hidden z-loss keep the last layer's hidden "
    "states small without hurting the loss?",
    claim="Fig. 6: without the hidden z-loss, massive activations appear in the last layer's hidden states "
    "(max |h| grows by orders of magnitude); with it they stay bounded and the loss is unaffected.",
    arms=[
        Arm("no-z-loss", {"z_loss_weight": 0.0}),
        Arm("z-loss-1e-6", {"z_loss_weight": 1e-6}),
    ],
    base={**FULL, "lr": 1e-2},
    quick=QUICK,
    metric="max_hidden_max_abs",
    notes=["lr 1e-2 is about 3x the default: high enough to provoke large activations at this size."],
)

MLA_SCALE = Study(
    name="mla-scale",
    question="Do MLA's variance-alignment scales (alpha_q, alpha_kv; paper Eq. 7) improve training?",
    claim="Fig. 5a: with the scale correction the loss converges better (lower) than without.",
    arms=[
        Arm("no-scales", {"model.mla_scale_q_lora": False, "model.mla_scale_kv_lora": False}),
        Arm("scales", {}),
    ],
    base=FULL,
    quick=QUICK,
)

ADAM_EPS = Study(
    name="adam-eps",
    question="Where does Adam's epsilon start to hurt, relative to the gradient's RMS, at two widths?",
    claim="Fig. 7 / §3.1.3: an epsilon comparable to the gradient RMS degrades the loss; the paper sets it to "
    "1e-16, far below the RMS of large models' gradients.",
    arms=[
        Arm("eps-1e-16", {"adam_eps": 1e-16}),
        Arm("eps-1e-6", {"adam_eps": 1e-6}),
        Arm("eps-1e-8", {"adam_eps": 1e-8}),
        Arm("eps-1e-4", {"adam_eps": 1e-4}),
        Arm("eps-1e-16-w256", {"adam_eps": 1e-16, "model.hidden_size": 256}),
        Arm("eps-1e-6-w256", {"adam_eps": 1e-6, "model.hidden_size": 256}),
        Arm("eps-1e-4-w256", {"adam_eps": 1e-4, "model.hidden_size": 256}),
    ],
    base={**FULL, "max_steps": 150, "seq_len": 128, "eval_every": 75},
    quick=QUICK,
    claimed_sign=+1,
    compare=("eps-1e-16", "eps-1e-4"),
    measure=gradient_rms,
    minutes=35,
    notes=[
        "The verdict compares epsilon 1e-4 against 1e-16 at width 128; the other arms trace the curve "
        "(see grad_rms: the measured gradient RMS, against which epsilon matters).",
        "Not measured here: how far two runs differing only in rounding drift apart at each epsilon "
        "(the issue's second question).",
    ],  # fmt: skip
)

STUDIES = {study.name: study for study in (ZERO_EXPERTS, Z_LOSS, MLA_SCALE, ADAM_EPS)}
