"""The training loop: LongCat-Flash's recipe (paper §2-3) on a prepared corpus.

Per optimizer step: grad_accum micro-batches of LM loss + MTP loss (weight lambda, from mtp_start) +
alpha * balance loss (Eqs. 3-5, mean over layers) + hidden z-loss (Eq. 10); clip; AdamW; then the
expert-bias controller (Eq. 2) on the whole step's routing counts. A step with a non-finite loss or
gradient is skipped and counted; `max_nonfinite` in a row stop the run, the last checkpoint intact.

Run directory: environment.json (layout version; what bitwise reproducibility depends on),
train_config.json, metrics.jsonl (one JSON object per row), checkpoints/step_N/, final/ (HF format
with tokenizer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import LongcatConfig
from ..data.loader import Batch, PackedLoader, TokenStream, rank_share, sequential_batches
from ..data.prepare import copy_tokenizer, load_meta, prepare
from ..distributed import collectives
from ..distributed.checkpoint import checkpoint_state, init_optimizer_state
from ..distributed.checkpoint import load as dcp_load
from ..distributed.checkpoint import save as dcp_save
from ..distributed.layout import Layout
from ..distributed.parallelize import finish_gradients, gather_full_model, parallelize
from ..model.cpu_kernels import fused_experts_available, unavailable_reason
from ..model.lm import LongcatForCausalLM
from .balance import BudgetController, load_balance_loss
from .checkpointing import (
    RUN_FORMAT_VERSION,
    SHARDS_DIR,
    StateFileError,
    begin_checkpoint,
    checkpoint_tmp,
    finish_checkpoint,
    list_checkpoints,
    load_trainer_state,
    prune_checkpoints,
    rng_state,
    run_format,
    set_rng_state,
    truncate_metrics,
    warn_if_stubs_are_refused,
    write_environment,
)
from .config import TrainConfig
from .determinism import configure_determinism, differences, environment, moe_path_that_ran
from .loss import chunked_cross_entropy
from .optim import build_optimizer, clip_gradients, fused_step, lr_at, set_lr
from .progress import Progress, tensorboard_writer
from .stability import grad_norm_ratio, hidden_stats, hidden_z_loss, router_cosine, small_gradient_share
from .wrapping import apply_activation_checkpointing, compile_layers


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite losses, a bad run directory); the message says what to do."""


def default_data_dir() -> Path:
    root = os.environ.get("LONGCAT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "longcat"
    )
    return Path(root) / "data" / "embedded-v1"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    # from page-locked memory the copy is asynchronous: the host goes on queueing the step's kernels
    move = lambda t: None if t is None else t.pin_memory().to(device, non_blocking=True)
    return Batch(
        *(move(getattr(batch, f)) for f in ("input_ids", "targets", "document_ids", "position_ids", "next_targets"))
    )


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets)


class Trainer:
    """One training run, in one process or as one rank of several (`layout`, from distributed/: every
    rank runs this same code; only rank 0 writes the run directory)."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | os.PathLike,
        resume: bool = False,
        progress: bool = True,
        layout: Layout | None = None,
    ):
        if cfg.validate().lb_groups is None:  # "device-level" balance: one group per expert-parallel rank
            cfg = dataclasses.replace(cfg, lb_groups=layout.ep if layout else 1)
        self.cfg = cfg
        self.out = Path(out_dir)
        self.metrics_path = self.out / "metrics.jsonl"
        self.ckpt_root = self.out / "checkpoints"
        self.layout = layout
        self.world = layout.world if layout else 1
        self.is_main = layout is None or layout.is_main
        self.progress_enabled = progress and self.is_main
        configure_determinism(cfg.deterministic)
        self.device = layout.device if layout else _device(cfg.device)
        if cfg.batch_size % self.world:
            raise TrainingError(
                f"batch_size {cfg.batch_size} (the global batch) must be divisible by the {self.world} "
                "data-parallel ranks; change batch_size or --nproc"
            )
        self.data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
        if not (self.data_dir / "meta.json").is_file():
            if cfg.data_dir:
                load_meta(self.data_dir)  # raises the clear error
            if self.is_main:  # one rank prepares, the others wait for it
                prepare(self.data_dir)
        collectives.barrier()
        self.meta = load_meta(self.data_dir)
        self.tokenizer_files = [self.data_dir / "tokenizer.json", self.data_dir / "tokenizer_config.json"]

        try:
            version = run_format(self.out)
        except StateFileError as err:
            raise TrainingError(str(err)) from err
        if version is not None and version != RUN_FORMAT_VERSION:
            age = "an older" if version < RUN_FORMAT_VERSION else "a newer"
            raise TrainingError(
                f"{self.out} is a run directory of layout version {version}, written by {age} longcat; this one "
                f"reads version {RUN_FORMAT_VERSION}. Its final/ and checkpoint models (safetensors) still load "
                "with from_pretrained; continue training in a new --out, or with the longcat that wrote it"
            )
        existing = list_checkpoints(self.ckpt_root)
        if existing and not resume:
            raise TrainingError(f"{self.out} already holds checkpoints; pass --resume or choose another --out")
        if not resume and self.metrics_path.is_file():
            raise TrainingError(
                f"{self.out} already holds a run's metrics.jsonl (a run that died before its first checkpoint?); "
                "choose another --out or delete that directory"
            )
        if resume and not existing:
            raise TrainingError(f"--resume: {self.ckpt_root} holds no complete checkpoint to resume from")
        self.step, self.skipped, self.consecutive_bad, self.tokens_seen = 0, 0, 0, 0
        torch.manual_seed(cfg.seed)
        state = None
        if resume:
            step, path = existing[-1]
            try:
                state = load_trainer_state(path)
            except StateFileError as err:
                raise TrainingError(str(err)) from err
            model_cfg = LongcatConfig.from_json_file(path / "config.json")
        else:
            special = {k: self.meta[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            model_cfg = cfg.model_config(vocab_size=self.meta["vocab_size"], special=special)
        # built the same way on every rank; a resume then overwrites every tensor from the checkpoint
        self.model = LongcatForCausalLM(model_cfg, device="meta")
        self.model.to_empty(device=self.device)
        # every group's init std and LR written out (train_config.json records them); a resume keeps its own
        cfg = self.cfg = cfg.resolved_groups(model_cfg.initializer_range)
        self.model.init_weights(
            torch.Generator(self.device).manual_seed(cfg.seed), expert_gamma=cfg.expert_gamma, init_std=cfg.init_std
        )
        self.config = self.model.config
        for moe in self.model.moe_layers():
            moe.keep_routing = True
        if (cfg.activation_checkpointing or cfg.compile) and layout is not None and layout.ep > 1:
            raise TrainingError(
                "activation_checkpointing and compile are not built for expert parallelism yet (the all-to-alls "
                "would be recomputed, and their split sizes break the graph): train with --ep 1 or without them"
            )
        if cfg.activation_checkpointing:  # the order torchtitan applies: checkpointing, compile, then FSDP
            apply_activation_checkpointing(self.model)
        if cfg.compile:
            compile_layers(self.model, cfg.compile_backend)
        moe_path = self._moe_path()
        if self.device.type != "cpu" and "loop" in moe_path and self.is_main:
            print(
                f"longcat: the experts run one GEMM per expert on {self.device.type} in {cfg.dtype} ({moe_path}): the "
                "grouped GEMM takes bf16 there; --set dtype=bfloat16 is the GPU recipe",
                file=sys.stderr,
            )
        self.comm_timer = None
        if layout is not None:
            if layout.ep > 1:
                moe_path = f"expert-parallel all-to-all over {layout.ep} ranks, local experts: {moe_path}"
            # the bf16 recipe's FSDP2 policy: parameters gathered in bf16, gradients reduced in fp32 (the
            # routers keep fp32: parallelize.py), on GPUs and, through the same code, on gloo
            param_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
            self.comm_timer = parallelize(self.model, layout, param_dtype, overlap=cfg.moe_overlap)
        self.optimizer = build_optimizer(self.model, cfg)
        self.K_e = cfg.target_ffn_experts or self.config.target_ffn_experts
        self.controller = BudgetController(
            self.config.n_routed_experts, self.config.moe_topk, self.K_e, cfg.bias_update_rate,
            cfg.bias_rate_final_ratio, cfg.bias_decay_horizon, cfg.bias_balance_rate, cfg.bias_budget_final_ratio,
        )  # fmt: skip
        stream = TokenStream(self.data_dir / "train.bin", self.meta["dtype"])
        rank = layout.rank if layout else 0
        self.loader = PackedLoader(
            stream, cfg.seq_len, cfg.batch_size // self.world, cfg.seed, cfg.doc_masking, rank, self.world
        )
        self.val_streams = {
            domain: TokenStream(self.data_dir / f"val.{domain}.bin", self.meta["dtype"])
            for domain, info in self.meta["domains"].items()
            if info.get("val_docs")
        }
        # a held-out stream shorter than one window gives no batch; say so instead of reporting 0 loss
        short = [d for d, s in self.val_streams.items() if len(s.tokens) < cfg.seq_len + 1]
        self.val_streams = {d: s for d, s in self.val_streams.items() if d not in short}
        missing = [d for d in self.meta["domains"] if d not in self.val_streams]
        if missing and self.is_main:
            print(
                f"longcat: no validation loss for domain(s) {', '.join(missing)}: they hold out no document or fewer "
                f"than seq_len + 1 = {cfg.seq_len + 1} tokens (give each domain more documents, or raise val_fraction "
                "in `longcat data prepare`)",
                file=sys.stderr,
            )
        self.environment = environment(self.device, moe_path, world_size=self.world, dtype=cfg.dtype)
        self.environment["expert_parallel"] = layout.ep if layout else 1
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if state is not None:
            saved = state.get("train_config") or {}
            changed = sorted(k for k, v in cfg.to_dict().items() if k in saved and saved[k] != v)
            if changed and self.is_main:
                print(
                    f"longcat: resuming with settings that differ from the checkpoint's: {', '.join(changed)}; "
                    "where they shape training (batch, schedule, max_steps, lr, ...) the run will not match an "
                    "uninterrupted one",
                    file=sys.stderr,
                )
            init_optimizer_state(self.optimizer)
            dcp_load(path / SHARDS_DIR, checkpoint_state(self.model, self.optimizer))
            self.loader.load_state_dict(state["loader"])
            set_rng_state(state["rng"])
            self.step, self.skipped = state["step"], state["skipped"]
            self.consecutive_bad, self.tokens_seen = state["consecutive_bad"], state["tokens_seen"]
            changed = differences(state.get("environment") or {}, self.environment)
            if self.is_main:
                truncate_metrics(self.metrics_path, self.step)
            if changed and cfg.deterministic and self.is_main:
                print(
                    f"longcat: resuming at step {self.step} under another environment than the checkpoint's "
                    f"({'; '.join(changed)}): the continuation will not be bitwise identical to an uninterrupted "
                    "run (environment.json keeps both records)",
                    file=sys.stderr,
                )
        self.tensorboard = None
        if self.is_main:
            write_environment(self.out, self.environment, self.step)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            self.config.to_json_file(self.out / "model_config.json")
            self.tensorboard = tensorboard_writer(self.out / "tensorboard")
        # the bf16 recipe: fp32 master weights, bf16 autocast, on a GPU and (slowly, but the same code) on a CPU
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if cfg.dtype == "bfloat16"
            else contextlib.nullcontext()
        )
        # fused AdamW, foreach clipping and the chunked loss (optim.fused_step); the CPU fp32 path keeps its bits
        self.fused = fused_step(list(self.model.parameters()), cfg)
        self.cross_entropy = chunked_cross_entropy if self.fused else _cross_entropy

    def _record_moe_path(self) -> None:
        """environment.json names the MoE path the first step ran; before it, the one _moe_path predicted."""
        actual = moe_path_that_ran(self.model.moe_layers(), self.environment["moe_path"])
        if actual != self.environment["moe_path"]:
            self.environment["moe_path"] = actual
            if self.is_main:
                write_environment(self.out, self.environment, self.step, amend=True)

    def _moe_path(self) -> str:
        """The MoE path training takes, checked before step 1. Under --deterministic on the CPU the fused
        kernel must build and pass its check: falling back would change the rounding mid-way through a
        series of runs. LONGCAT_CPU_KERNELS=0 chooses the grouped path deliberately."""
        if self.cfg.deterministic and self.device.type == "cpu" and not fused_experts_available():
            reason = unavailable_reason()
            if reason != "LONGCAT_CPU_KERNELS=0":
                raise TrainingError(
                    f"--deterministic: the fused CPU MoE kernel is unavailable because {reason}. Install a C++ "
                    "compiler and ninja (pip install ninja), or set LONGCAT_CPU_KERNELS=0 to train on the grouped "
                    "path (every run of the series must then use it; environment.json records the path)"
                )
        dtype = torch.bfloat16 if self.cfg.dtype == "bfloat16" else torch.float32
        experts = self.model.moe_layers()[0].experts
        tokens = self.cfg.batch_size // self.world * self.cfg.seq_len
        return experts.path(tokens, self.config.moe_topk, self.device, dtype)

    # ----- one optimizer step ----------------------------------------------------------------
    def _losses(self, batch: Batch, use_mtp: bool) -> tuple[torch.Tensor, dict, list, object]:
        cfg, config = self.cfg, self.config
        with self.autocast:
            out = self.model(
                batch.input_ids, document_ids=batch.document_ids, position_ids=batch.position_ids, return_mtp=use_mtp
            )
        V = config.vocab_size
        lm = self.cross_entropy(out.logits.reshape(-1, V), batch.targets.reshape(-1))
        parts = {"lm": lm}
        total = lm
        if use_mtp:
            parts["mtp"] = self.cross_entropy(out.mtp_logits.reshape(-1, V), batch.next_targets.reshape(-1))
            total = total + cfg.mtp_weight * parts["mtp"]
            if cfg.mtp_distill_weight > 0:
                target = out.logits[:, 1:].detach().float().log_softmax(-1)  # main's view of token i + 2
                draft = out.mtp_logits.float().log_softmax(-1)
                kl = F.kl_div(draft, target, log_target=True, reduction="none").sum(-1).mean()
                parts["mtp_distill"] = kl
                total = total + cfg.mtp_distill_weight * kl
        lb_terms, routings = [], []
        for moe in self.model.moe_layers():
            routing = moe.last_routing
            loss, f = load_balance_loss(
                routing, config.n_routed_experts, config.moe_topk, self.K_e, cfg.lb_groups, reduce=collectives.sum_
            )
            lb_terms.append(loss)
            routings.append((routing, f))
        parts["lb"] = torch.stack(lb_terms).mean()
        parts["z"] = hidden_z_loss(out.hidden_states, cfg.z_loss_weight)
        total = total + cfg.lb_alpha * parts["lb"] + parts["z"]
        return total, parts, routings, out

    def train_step(self, monitor: bool) -> dict | None:
        cfg, config = self.cfg, self.config
        lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, lr)
        use_mtp = config.num_nextn_predict_layers > 0 and self.step >= cfg.mtp_start and cfg.mtp_weight > 0
        start = time.perf_counter()
        # everything stays on the device until one sync per step (finiteness) and, on monitored
        # steps, the reads that fill the metrics row
        sums: dict[str, torch.Tensor] = {}
        layers = len(self.model.moe_layers())
        ffn_sum = torch.zeros(layers, dtype=torch.float64, device=self.device)
        ffn_sq = torch.zeros(layers, dtype=torch.float64, device=self.device)
        tokens = 0
        finite_t = torch.ones((), dtype=torch.bool, device=self.device)
        last_out, rg_inputs = None, None
        for micro in range(cfg.grad_accum):
            batch = _to(self.loader.next_batch(), self.device)
            total, parts, routings, out = self._losses(batch, use_mtp)
            if monitor and micro == cfg.grad_accum - 1:
                for routing, _f in routings:
                    routing.probs.retain_grad()
                rg_inputs, last_out = routings, out
            (total / cfg.grad_accum).backward()
            finite_t &= torch.isfinite(total.detach())
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / cfg.grad_accum
            if monitor:
                with torch.no_grad():
                    for i, (routing, _f) in enumerate(routings):
                        n = (routing.indices < config.n_routed_experts).sum(-1).double()
                        ffn_sum[i] += n.sum()
                        ffn_sq[i] += n.pow(2).sum()
            tokens += batch.num_tokens
        # grad_clip <= 0 means no clipping (the norm is still measured for the metrics)
        max_norm = cfg.grad_clip if (cfg.grad_clip or 0) > 0 else float("inf")
        if self.layout is not None:
            finish_gradients(self.model, self.layout)
        grad_norm_t = clip_gradients(list(self.model.parameters()), max_norm, foreach=self.fused)
        finite = collectives.all_true(finite_t & torch.isfinite(grad_norm_t))  # every rank skips, or none
        row = None
        if finite:
            monitor_start = time.perf_counter()
            small_share = small_gradient_share(self.model, cfg.adam_eps) if monitor else None
            rg = self._grad_norm_ratio(rg_inputs) if monitor else None
            monitor_seconds = time.perf_counter() - monitor_start  # left out of tokens_per_s
            self.optimizer.step()
            # Eq. 2 on the global batch's counts: every rank applies the same update to its bias copy
            collectives.sum_(*(moe.router.expert_counts for moe in self.model.moe_layers()))
            budget = self.controller.step(self.model.moe_layers(), self.step)
            self.consecutive_bad = 0
        else:
            for moe in self.model.moe_layers():
                moe.router.expert_counts.zero_()
            self.skipped += 1
            self.consecutive_bad += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens *= self.world  # every rank trains on an equal share of the global batch
        self.tokens_seen += tokens
        if monitor and self.device.type == "cuda":
            torch.cuda.synchronize()  # the logged tokens/s must see the step's kernels finish
        elapsed = time.perf_counter() - start - (monitor_seconds if finite else 0.0)
        if not finite:
            if self.consecutive_bad >= cfg.max_nonfinite:
                raise TrainingError(
                    f"{self.consecutive_bad} steps in a row had a non-finite loss or gradient (last at step "
                    f"{self.step}); the last good checkpoint in {self.ckpt_root} is intact. Lower lr or check the data"
                )
            return None
        if monitor:
            collectives.sum_(ffn_sum, ffn_sq)
            mean = (ffn_sum / tokens).cpu()
            std = (ffn_sq.cpu() / tokens - mean.pow(2)).clamp(min=0).sqrt()
            h_max, h_l2 = hidden_stats(last_out.hidden_states)
            h_max = float(collectives.max_(torch.tensor(h_max)))
            keys = sorted(sums)
            means = collectives.mean(torch.stack([sums[k] for k in [*keys]] + [torch.tensor(h_l2, device=self.device)]))
            value = {key: float(v) for key, v in zip(keys, means)}
            h_l2 = float(means[-1])
            if rg is not None:
                rg = float(collectives.mean(torch.tensor(rg)))
            row = {
                "step": self.step,
                "loss": value["lm"],
                "mtp_loss": value.get("mtp"),
                "mtp_distill_kl": value.get("mtp_distill"),
                "lb_loss": value["lb"],
                "z_loss": value["z"],
                "lr": lr,
                "tokens_per_s": tokens / elapsed,
                "tokens_seen": self.tokens_seen,
                "grad_norm": float(grad_norm_t),
                "ffn_experts_mean": float(mean.mean()),
                "ffn_experts_std": float(std.mean()),
                "ffn_experts_target": self.K_e,
                "ffn_experts_per_layer": [float(x) for x in mean],
                "ffn_experts_std_per_layer": [float(x) for x in std],
                "controller_error": float(mean.mean()) - self.K_e,
                "bias_update_rate": self.controller.rate_at(self.step - 1),
                "max_violation": max(float(b.max_violation) for b in budget),
                "router_cosine": router_cosine(self.model),
                "grad_norm_ratio": rg,
                "hidden_max_abs": h_max,
                "hidden_l2": h_l2,
                "small_grad_share": small_share,
                "skipped_steps": self.skipped,
            }
        return row

    def _grad_norm_ratio(self, routings: list) -> float:
        cfg = self.cfg
        return grad_norm_ratio(routings, cfg.lb_alpha, cfg.grad_accum, cfg.lb_groups, self.config.n_routed_experts)

    # ----- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg, config = self.cfg, self.config
        self.model.eval()
        row: dict = {"step": self.step}
        total_loss, total_tokens = 0.0, 0
        for domain, stream in self.val_streams.items():
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, tokens, FFN slots per layer
            for batch in sequential_batches(stream, cfg.seq_len, cfg.batch_size, cfg.eval_batches, cfg.doc_masking):
                batch, counted = rank_share(batch, self.world, self.layout.rank if self.layout else 0)
                batch = _to(batch, self.device)
                with self.autocast:
                    out = self.model(batch.input_ids, document_ids=batch.document_ids, position_ids=batch.position_ids)
                if not counted:
                    continue
                sums[0] += F.cross_entropy(
                    out.logits.reshape(-1, config.vocab_size).float(), batch.targets.reshape(-1), reduction="sum"
                ).double()
                sums[1] += batch.num_tokens
                sums[2] += sum(
                    (moe.last_routing.indices < config.n_routed_experts).sum() for moe in self.model.moe_layers()
                ) / len(self.model.moe_layers())
            collectives.sum_(sums)
            loss_sum, count, ffn = (float(x) for x in sums)
            if count:
                row[f"val_loss_{domain}"] = loss_sum / count
                row[f"val_ffn_experts_{domain}"] = ffn / count
                total_loss, total_tokens = total_loss + loss_sum, total_tokens + count
        row["val_loss"] = total_loss / max(total_tokens, 1)
        self.model.train()
        return row

    # ----- checkpoints -----------------------------------------------------------------------
    def save(self) -> Path:
        """checkpoints/step_N/: every rank writes its shards (a collective), rank 0 the rest."""
        directory = self.ckpt_root / f"step_{self.step}"
        if self.is_main:
            begin_checkpoint(directory)
        collectives.barrier()
        init_optimizer_state(self.optimizer)  # a checkpoint before the first step still holds every slot
        dcp_save(checkpoint_tmp(directory) / SHARDS_DIR, checkpoint_state(self.model, self.optimizer))
        collectives.barrier()
        state = {
            "step": self.step,
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "skipped": self.skipped,
            "consecutive_bad": self.consecutive_bad,
            "tokens_seen": self.tokens_seen,
            "train_config": self.cfg.to_dict(),
            "environment": self.environment,
        }
        if self.is_main:
            finish_checkpoint(directory, state, self.config, self.tokenizer_files)
            prune_checkpoints(self.ckpt_root, self.cfg.keep_checkpoints)
        collectives.barrier()
        return directory

    def export_final(self) -> Path:
        """final/: a Hugging Face directory. On several ranks the shards are gathered to rank 0 first."""
        final = self.out / "final"
        model = self.model
        if self.layout is not None:
            model = gather_full_model(self.model, self.layout, LongcatForCausalLM)
        if not self.is_main:
            collectives.barrier()
            return final
        tmp = self.out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if self.cfg.export_zero_expert_stubs:
            warn_if_stubs_are_refused(final)
        model.save_pretrained(tmp, zero_expert_stubs=self.cfg.export_zero_expert_stubs)
        copy_tokenizer(self.tokenizer_files, tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        collectives.barrier()
        return final

    def _warn_on_balance_dominance(self, row: dict) -> None:
        """Paper §3.1.3: keep R_g below 0.1 so the balance loss stays a regulariser. Warn on the first
        log row above it after warmup (at initialisation the LM gradient reaching the router is tiny,
        so R_g starts high in every run) and then every tenth such row."""
        rg = row.get("grad_norm_ratio")
        if rg is None or not rg > 0.1 or row["step"] <= self.cfg.warmup_steps:
            return
        self.rg_warnings = getattr(self, "rg_warnings", 0) + 1
        if self.rg_warnings % 10 == 1:
            warnings.warn(
                f"step {row['step']}: gradient-norm ratio R_g = {rg:.3f} > 0.1: the balance loss dominates the "
                f"router's gradient (paper Eq. 9); lower lb_alpha (now {self.cfg.lb_alpha:g})",
                stacklevel=2,
            )

    def _log(self, row: dict) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, row["step"])
            self.tensorboard.flush()

    # ----- the loop --------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self.model.train()
        progress = Progress(cfg.max_steps, self.progress_enabled)
        last_eval: dict = {}
        status = ""
        path_recorded = False
        try:
            while self.step < cfg.max_steps:
                monitor = (self.step + 1) % cfg.log_every == 0 or self.step == 0
                row = self.train_step(monitor)
                if not path_recorded:
                    self._record_moe_path()
                    path_recorded = True
                if row is not None:
                    self._log(row)
                    if self.is_main:
                        self._warn_on_balance_dominance(row)
                    status = (
                        f"loss {row['loss']:.3f} | {row['tokens_per_s']:,.0f} tok/s | "
                        f"FFN experts/token {row['ffn_experts_mean']:.2f} (target {row['ffn_experts_target']:g})"
                    )
                if self.val_streams and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    last_eval = self.evaluate()
                    self._log(last_eval)
                    status += f" | val {last_eval['val_loss']:.3f}"
                progress.update(self.step, row, status)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save()
        finally:
            progress.close()
        self.save()
        final = self.export_final()
        return {"step": self.step, "final": str(final), "skipped_steps": self.skipped, **last_eval}


def train(
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    layout: Layout | None = None,
) -> dict:
    return Trainer(cfg, out_dir, resume=resume, progress=progress, layout=layout).run()
