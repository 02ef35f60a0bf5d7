"""LongcatForCausalLM: embed -> ScMoE layers -> norm -> LM head, plus the optional MTP module.

Construction is separate from initialisation: modules are built on the meta device, materialised,
then `init_weights()` holds every init rule. Forward follows the Hugging Face convention:
`model(input_ids, labels=None)` returns an object with `.logits` and `.loss` (labels are shifted
inside; -100 is ignored).

Legend: B batch, T tokens, H hidden, V vocabulary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LongcatConfig
from .layer import DecoderLayer
from .moe import Experts, MoE
from .mtp import MTP
from .norm_rope import RMSNorm, RotaryEmbedding
from .router import Router

if TYPE_CHECKING:
    from ..inference.kv_cache import Rows

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over non-ignored labels
    hidden_states: torch.Tensor | None = None  # [B, T, H] last layer output before the final norm
    mtp_logits: torch.Tensor | None = None  # [B, T-1, V]: position i predicts token i+2
    mtp_loss: torch.Tensor | None = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in fp32: logits [B, T, V] at i predict labels [B, T] at i+1."""
    shifted = labels[:, 1:].reshape(-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted, ignore_index=IGNORE_INDEX)


def build_attention_mask(
    attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None, T: int, device: torch.device
) -> torch.Tensor | None:
    """None (plain causal) or bool [B, 1, T, T], True = may attend.

    attention_mask [B, T]: 1 for real tokens, 0 for padding. document_ids [B, T]: packed documents
    never attend across each other. Every query also sees itself, so fully padded rows stay finite."""
    if attention_mask is None and document_ids is None:
        return None
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]  # [1, 1, T, T]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
    if document_ids is not None:
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    return mask | torch.eye(T, dtype=torch.bool, device=device)


class LongcatModel(nn.Module):
    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.qk_rope_head_dim, config.rope_theta)
        self.mtp = MTP(config) if config.num_nextn_predict_layers > 0 else None

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: Rows | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """input_ids [B, T] -> last hidden state before the final norm [B, T, H], and the (cos, sin)
        tables [B, T, R/2] so the MTP module can reuse them. With a cache (kv_cache.Rows), each row's T
        tokens sit at its own positions (position_ids), where the cache writes them."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn_mask, cache, index)
        return x, (cos, sin)


class LongcatForCausalLM(nn.Module):
    def __init__(
        self,
        config: LongcatConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        seed: int | None = None,
    ) -> None:
        """Build on the meta device; unless device="meta", materialise on `device` and init weights."""
        super().__init__()
        config.validate()
        self.config = config
        with torch.device("meta"):
            self.model = LongcatModel(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if dtype is not None:
            self.to(dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        target = torch.device(device) if device is not None else torch.get_default_device()
        if target.type != "meta":
            self.to_empty(device=target)
            if config.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
            generator = None if seed is None else torch.Generator(device=target).manual_seed(seed)
            self.init_weights(generator=generator)

    # ----- initialisation: every rule in one place -------------------------------------------
    @torch.no_grad()
    def init_weights(
        self, generator: torch.Generator | None = None, expert_gamma: float = 1.0, init_std: dict | None = None
    ) -> None:
        """Normal(0, std) for every matrix and embedding, ones for norms, zeros for biases and the
        selection bias. std is initializer_range, or per group with init_std (keys: embedding = both
        token embeddings, unembedding = the LM head, router = the expert classifiers, hidden = every
        other matrix, experts included; the groups width transfer scales, paper §3.1.1).

        expert_gamma: the paper's fine-grained expert variance compensation (§2.3.2, Eq. 8) applied
        at init: each expert's down projection is scaled by gamma, so an expert split m ways starts
        with the output scale of the unsplit one (gamma = m). With the released configuration the
        same compensation sits in the forward pass as routed_scaling_factor; leave gamma at 1 there.
        """
        std = {group: self.config.initializer_range for group in ("embedding", "hidden", "unembedding", "router")}
        std.update(init_std or {})
        # a router's classifier is drawn twice (by the router, then as a Linear: the order the random
        # stream has always had), both times with the router's std
        classifiers = {id(m.classifier) for m in self.modules() if isinstance(m, Router)}
        for module in self.modules():
            if isinstance(module, nn.Linear):
                group = "unembedding" if module is self.lm_head else "router" if id(module) in classifiers else "hidden"
                nn.init.normal_(module.weight, mean=0.0, std=std[group], generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std["embedding"], generator=generator)
            elif isinstance(module, Router):
                module.reset_parameters(std["router"], generator)
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_up_proj, mean=0.0, std=std["hidden"], generator=generator)
                nn.init.normal_(module.down_proj, mean=0.0, std=std["hidden"] * expert_gamma, generator=generator)
        self.init_buffers()
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Fill non-persistent buffers (RoPE frequencies, routing counters): never stored on disk."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_parameters()
            elif isinstance(module, Router):
                module.expert_counts.zero_()

    # ----- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        return_mtp: bool = False,
    ) -> CausalLMOutput:
        """input_ids [B, T]; labels [B, T] (shifted inside, -100 ignored); attention_mask [B, T]
        (1 = token, 0 = padding); document_ids [B, T] for packed sequences. With return_mtp, also the
        MTP module's logits (position i predicts token i+2) and, given labels, its loss."""
        B, T = input_ids.shape
        attn_mask = build_attention_mask(attention_mask, document_ids, T, input_ids.device)
        hidden, (cos, sin) = self.model(input_ids, position_ids, attn_mask)
        normed = self.model.norm(hidden)
        logits = self.lm_head(normed)
        out = CausalLMOutput(logits=logits, hidden_states=hidden)
        if labels is not None:
            out.loss = causal_lm_loss(logits, labels)
        if return_mtp:
            if self.model.mtp is None:
                raise ValueError("this model has no MTP module (num_nextn_predict_layers = 0)")
            mtp_mask = None if attn_mask is None else attn_mask[:, :, :-1, :-1]
            z = self.model.mtp(input_ids[:, 1:], normed[:, :-1], cos[:, :-1], sin[:, :-1], mtp_mask)
            out.mtp_logits = self.lm_head(z)
            if labels is not None:
                out.mtp_loss = causal_lm_loss(out.mtp_logits, labels[:, 1:])
        return out

    # ----- generation (inference/generate.py) ------------------------------------------------
    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:  # noqa: ANN001
        """Prompt ids followed by new tokens, as transformers returns them. Keywords: max_new_tokens,
        do_sample, temperature, top_k, top_p, eos_token_id, speculative (None | "mtp"),
        num_draft_tokens, seed, stats (a GenerationStats to fill), compile (torch.compile'd decode steps;
        the first call compiles). Prompts may be left- or right-padded (attention_mask)."""
        from ..inference.generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    def stream_generate(self, input_ids, attention_mask=None, **kwargs):  # noqa: ANN001, ANN201
        """Yields new tokens [B, n] as they are chosen; same keywords as generate()."""
        from ..inference.generate import stream_generate

        return stream_generate(self, input_ids, attention_mask, **kwargs)

    # ----- routing access for training and monitors ------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers]

    # ----- checkpoints -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = "auto",
        revision: str | None = None,
    ) -> LongcatForCausalLM:
        from ..checkpoint import load_pretrained

        return load_pretrained(cls, path, device=device, dtype=dtype, revision=revision)

    def save_pretrained(
        self, path: str | os.PathLike, max_shard_size: int | str = "5GB", zero_expert_stubs: bool = False
    ) -> None:
        """HF-format directory; zero_expert_stubs=True for transformers 5.0-5.24 only (checkpoint.save_pretrained)."""
        from ..checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, zero_expert_stubs=zero_expert_stubs)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
