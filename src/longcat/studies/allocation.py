"""Where a trained model spends its compute (paper §2.1: zero-computation experts let tokens that need
less take fewer FFN experts): FFN experts per token by domain and by kind of token, the tokens that
get the most and the least, and how compute at a position relates to the loss of the prediction made
there.

Legend: T tokens, K top-k slots, N FFN experts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("punctuation", "whitespace", "digits", "word-initial", "word-continuation", "other")


def token_kind(text: str) -> str:
    """The kind of a decoded token piece (byte-level BPE marks a leading space on word-initial pieces)."""
    if not text or not text.strip():
        return "whitespace"
    stripped = text.strip()
    if stripped.isdigit():
        return "digits"
    if all(not c.isalnum() for c in stripped):
        return "punctuation"
    if stripped[0].isalpha():
        return "word-initial" if text[0].isspace() else "word-continuation"
    return "other"


@torch.no_grad()
def measure_allocation(checkpoint: Path, data_dir: Path, windows: int = 16, seq_len: int = 256) -> dict:
    """FFN experts per token (mean over layers) and next-token loss at every position of `windows` validation
    windows per domain."""
    from ..data.loader import TokenStream
    from ..data.prepare import load_meta
    from ..inference.chat import CheckpointTokenizer
    from ..model.lm import LongcatForCausalLM

    model = LongcatForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = CheckpointTokenizer(checkpoint)
    for moe in model.moe_layers():
        moe.keep_routing = True
    meta = load_meta(data_dir)
    N = model.config.n_routed_experts
    seq_len = min(seq_len, model.config.max_position_embeddings)
    pieces: dict[int, str] = {}
    per_domain = {}
    for domain, info in meta["domains"].items():
        if not info.get("val_docs"):
            continue
        stream = TokenStream(data_dir / f"val.{domain}.bin", meta["dtype"])
        count = min(windows, stream.windows(seq_len))
        ids, compute, losses = [], [], []
        for w in range(count):
            window = torch.as_tensor(np.asarray(stream.tokens[w * seq_len : w * seq_len + seq_len + 1], dtype=np.int64))
            x, y = window[:-1][None], window[1:]
            logits = model(x).logits[0].float()
            losses.append(F.cross_entropy(logits, y, reduction="none"))
            per_layer = [(moe.last_routing.indices < N).sum(-1).float() for moe in model.moe_layers()]  # [T] each
            compute.append(torch.stack(per_layer).mean(0))
            ids.append(x[0])
        if not ids:
            continue
        ids_t, compute_t, loss_t = torch.cat(ids), torch.cat(compute), torch.cat(losses)
        for token in ids_t.unique().tolist():
            pieces.setdefault(token, tokenizer.decode([token]))
        per_domain[domain] = {"ids": ids_t.tolist(), "compute": compute_t.tolist(), "loss": loss_t.tolist()}
    return summarise_allocation(per_domain, pieces, model.config.target_ffn_experts)


def _pearson(a: list[float], b: list[float]) -> float:
    x, y = np.asarray(a), np.asarray(b)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def _spearman(a: list[float], b: list[float]) -> float:
    rank = lambda v: np.argsort(np.argsort(np.asarray(v), kind="stable"), kind="stable").astype(float)  # noqa: E731
    return _pearson(rank(a).tolist(), rank(b).tolist())


def summarise_allocation(per_domain: dict, pieces: dict[int, str], target: float, min_count: int = 20) -> dict:
    by_kind: dict[str, dict[str, list[float]]] = {}
    by_token: dict[int, list[float]] = {}
    compute_all, loss_all = [], []
    for domain, rows in per_domain.items():
        for token, c, loss in zip(rows["ids"], rows["compute"], rows["loss"]):
            by_kind.setdefault(domain, {}).setdefault(token_kind(pieces[token]), []).append(c)
            by_token.setdefault(token, []).append(c)
            compute_all.append(c)
            loss_all.append(loss)
    table = {domain: {kind: {"mean": float(np.mean(v)), "count": len(v)} for kind, v in kinds.items()}
             for domain, kinds in by_kind.items()}  # fmt: skip
    frequent = {t: float(np.mean(v)) for t, v in by_token.items() if len(v) >= min_count}
    ranked = sorted(frequent, key=frequent.get)
    return {
        "target_ffn_experts": target,
        "ffn_experts_by_domain": {d: float(np.mean(r["compute"])) for d, r in per_domain.items()},
        "ffn_experts_by_kind": table,
        "most_compute": [(pieces[t], frequent[t], len(by_token[t])) for t in ranked[::-1][:10]],
        "least_compute": [(pieces[t], frequent[t], len(by_token[t])) for t in ranked[:10]],
        "compute_loss_pearson": _pearson(compute_all, loss_all),
        "compute_loss_spearman": _spearman(compute_all, loss_all),
        "positions": len(compute_all),
    }


def measure_checkpoint(checkpoint: Path, data_dir: Path | None, out: Path) -> dict:
    """`longcat study compute-allocation --checkpoint DIR`: one trained model instead of the study's own
    runs; its validation data is `data_dir` (default: the embedded corpus, which the default runs train on)."""
    from ..config import LongcatConfig
    from ..training.trainer import default_data_dir

    seq_len = min(256, LongcatConfig.from_json_file(checkpoint / "config.json").max_position_embeddings)
    result = measure_allocation(checkpoint, data_dir or default_data_dir(), seq_len=seq_len)
    out.mkdir(parents=True, exist_ok=True)
    (out / "allocation.json").write_text(json.dumps(result, indent=2) + "\n")
    row = {"arm": "default-run", "seed": 0, "run_dir": str(out), "checkpoint": str(checkpoint),
           "compute_loss_spearman": result["compute_loss_spearman"],
           "compute_loss_pearson": result["compute_loss_pearson"]}  # fmt: skip
    return {"default-run/seed0": row}


def measure_run(run_dir: Path) -> dict:
    """A study's `measure`: the allocation of a run's final/ on its own validation data."""
    cfg = json.loads((run_dir / "train_config.json").read_text())
    from ..training.trainer import default_data_dir

    data_dir = Path(cfg["data_dir"]) if cfg.get("data_dir") else default_data_dir()
    result = measure_allocation(run_dir / "final", data_dir, seq_len=cfg["seq_len"])
    (run_dir / "allocation.json").write_text(json.dumps(result, indent=2) + "\n")
    return {"compute_loss_spearman": result["compute_loss_spearman"],
            "compute_loss_pearson": result["compute_loss_pearson"]}  # fmt: skip


def report_lines(results: dict) -> list[str]:
    """The report's extra section: the first seed's tables."""
    first = sorted(results.values(), key=lambda r: r["seed"])[0]
    data = json.loads((Path(first["run_dir"]) / "allocation.json").read_text())
    lines = ["## Where the compute goes (seed 0)", "",
             f"Target K_e = {data['target_ffn_experts']:g} FFN experts per token; {data['positions']} positions.", "",
             "| domain | " + " | ".join(KINDS) + " | all |", "|---|" + "---|" * (len(KINDS) + 1)]  # fmt: skip
    for domain, kinds in data["ffn_experts_by_kind"].items():
        cells = [f"{kinds[k]['mean']:.2f} ({kinds[k]['count']})" if k in kinds else "-" for k in KINDS]
        lines.append(f"| {domain} | " + " | ".join(cells) + f" | {data['ffn_experts_by_domain'][domain]:.2f} |")
    for title, key in (("Most compute", "most_compute"), ("Least compute", "least_compute")):
        shown = ", ".join(f"`{json.dumps(p)[1:-1]}` {m:.2f} ({n})" for p, m, n in data[key])
        lines += ["", f"{title} (tokens seen at least 20 times: mean FFN experts, count): {shown}"]
    lines += ["", f"Compute against the loss of the prediction at that position: Spearman "
              f"{data['compute_loss_spearman']:.3f}, Pearson {data['compute_loss_pearson']:.3f}.", ""]  # fmt: skip
    return lines
