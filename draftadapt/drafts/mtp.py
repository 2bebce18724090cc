"""`MTPDraft`: a policy's own multi-token-prediction (MTP) layers, parameter for parameter what
vLLM 0.32 serves as the draft with `method="mtp"` (MiMo: `MiMoForCausalLM` -> `MiMoMTP`).

One MTP layer (`vllm/model_executor/models/mimo_mtp.py::MiMoMultiTokenPredictorLayer`):

    e = embed(token i+1), zeroed at position 0      h = previous hidden state at i
    x = input_proj(cat(hidden_layernorm(h), token_layernorm(e)))     [H, 2H], hidden FIRST
    x = x + self_attn(input_layernorm(x))            a Qwen2 block: q/k/v biases, neox RoPE
    x = x + mlp(post_attention_layernorm(x))
    out = final_layernorm(x)  -> the policy's lm_head -> token i+2

Step 1 reads the target's last hidden state BEFORE its final norm (vLLM's `MiMoModel.forward`
returns `hidden_states + residual`; `MiMoForCausalLM.compute_logits` applies the norm), so the
capture takes the input of the policy's final norm (`FeatureCapture(final_prenorm=True)`). Later
draft steps feed back `out` (post-`final_layernorm`) as the hidden state, one position further.

Parameter names are the checkpoint names vLLM's `MiMoMTP.load_weights` reads
(`model.mtp_layers.{i}.*`, 0-based; vLLM renames them to layer `num_hidden_layers + i` and wraps
the block in `mtp_block`), so an export is `state_dict()`. The token embedding and the output
head are the POLICY's: vLLM's MTP drafter shares both modules with the target, so they are
passed in, read detached, never trained here and never pushed.

A second MTP layer (`num_nextn_predict_layers: 2`): this vLLM loads it and never runs it - the
proposer calls the model without `spec_step_idx`, so every draft step uses layer 0 (and
`MiMoMTP.forward` asserts `spec_step_idx == 0`). So layer 0 is trained for the multi-step use it
gets (its own output fed back, `ttt.unroll`); further layers are kept frozen and pushed unchanged
(the engine expects every tensor it loaded). DeepSeek-V3-style MTP (`enorm`/`hnorm`/`eh_proj`,
`shared_head`) is the same computation with other names and the post-norm target state; it is
not implemented here (on CPU its MLA target is not batch-invariant, so no exact check exists).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .eagle3 import Eagle3MLP as MTPMLP  # the same SwiGLU block and names; reads hidden/intermediate size
from .eagle3 import (SUPPORTED_ROPE_TYPES, Projected, RMSNorm, attend, project_qkv, rope_inv_freq,
                     target_rope_parameters)

ARCHITECTURES = ("MiMoForCausalLM",)  # target architectures whose MTP layers this module matches


@dataclass(frozen=True)
class MTPConfig:
    """Sizes of the MTP layers; all mirror the target (the block is one of its decoder layers)."""

    hidden_size: int  # H: the target's width
    intermediate_size: int  # MLP width of the block
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int  # V: the target vocabulary (shared embedding and head)
    num_mtp_layers: int = 1  # num_nextn_predict_layers; vLLM 0.32 runs only layer 0
    max_position_embeddings: int = 2048
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    architecture: str = "MiMoForCausalLM"  # the target architecture (one of ARCHITECTURES)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"MTPConfig.architecture={self.architecture!r}; supported: {ARCHITECTURES}")
        if self.num_mtp_layers < 1:
            raise ValueError(f"MTPConfig.num_mtp_layers={self.num_mtp_layers}; a policy with MTP has >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope_parameters.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_parameters.get('rope_type')!r}; supported: {SUPPORTED_ROPE_TYPES}")

    # What the feature side (adapter, capture) asks of every draft: MTP reads no aux layers,
    # predicts over the full target vocab, and needs the pre-norm last hidden state.
    @property
    def aux_layer_ids(self) -> tuple[int, ...]:
        return ()

    @property
    def full_vocab(self) -> bool:
        return True

    @property
    def final_hidden(self) -> str:
        return "prenorm"

    @property
    def draft_vocab_size(self) -> int:
        return self.vocab_size

    @property
    def target_hidden_size(self) -> int:
        return self.hidden_size


class MTPAttention(nn.Module):
    def __init__(self, cfg: MTPConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=True)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=True)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=True)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)


class MTPLayer(nn.Module):
    """One MiMo MTP layer, split around the attention (same `project` / `finish` contract as
    `Eagle3Layer`, so `ttt.unroll` runs both)."""

    def __init__(self, cfg: MTPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.token_layernorm = RMSNorm(h, eps)
        self.hidden_layernorm = RMSNorm(h, eps)
        self.input_proj = nn.Linear(2 * h, h, bias=False)
        self.self_attn = MTPAttention(cfg)
        self.mlp = MTPMLP(cfg)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.final_layernorm = RMSNorm(h, eps)
        self.inv_freq = rope_inv_freq(cfg)  # [head_dim/2] float32, a plain attribute (never cast)

    def project(self, tok_embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor) -> Projected:
        """tok_embeds: [B, T, H] embedding of the input token; hidden: [B, T, H] the target's
        pre-norm last state (step 1) or the previous step's output; positions: [B, T] int64."""
        tok_embeds = torch.where(positions[..., None] == 0, torch.zeros_like(tok_embeds), tok_embeds)  # as vLLM
        x = self.input_proj(torch.cat([self.hidden_layernorm(hidden), self.token_layernorm(tok_embeds)], dim=-1))
        normed = self.input_layernorm(x)
        return project_qkv(self.self_attn, normed, positions, self.inv_freq, self.cfg.head_dim, residual=x)

    def finish(self, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """attn_out: [B, T, Hq*D]; residual: [B, T, H] -> output [B, T, H] (post final_layernorm:
        what the head reads and what vLLM feeds back as the next step's hidden state)."""
        h = self.self_attn.o_proj(attn_out) + residual
        h = h + self.mlp(self.post_attention_layernorm(h))
        return self.final_layernorm(h)


class MTPDraft(nn.Module):
    """The policy's MTP layers (`model.mtp_layers.*`) with the policy's embedding and head shared.

    lm_head: the policy's output head (an `nn.Linear` [V, H], or its weight); held by reference,
    not registered, so it is neither trained, saved nor pushed, and a policy update is seen at once.
    """

    def __init__(self, cfg: MTPConfig, lm_head: nn.Module | torch.Tensor) -> None:
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.mtp_layers = nn.ModuleList(MTPLayer(cfg) for _ in range(cfg.num_mtp_layers))
        self._head = (lm_head,)  # a tuple: nn.Module does not register it
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        for layer in self.model.mtp_layers[1:]:  # vLLM 0.32 never runs them (module docstring)
            layer.requires_grad_(False)

    @classmethod
    def from_target(cls, target_config, lm_head: nn.Module | torch.Tensor, num_mtp_layers: int | None = None,
                    max_position_embeddings: int | None = None) -> "MTPDraft":
        """MTP layers sized for `target_config` (a transformers Llama/Qwen2/MiMo config)."""
        tc = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        heads = tc.num_attention_heads
        n = num_mtp_layers or getattr(tc, "num_nextn_predict_layers", None) or 1
        cfg = MTPConfig(hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size, num_attention_heads=heads,
                        num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
                        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
                        rms_norm_eps=tc.rms_norm_eps, vocab_size=tc.vocab_size, num_mtp_layers=n,
                        max_position_embeddings=max_position_embeddings or tc.max_position_embeddings,
                        rope_parameters=dict(target_rope_parameters(tc)))
        return cls(cfg, lm_head)

    @property
    def midlayer(self) -> MTPLayer:
        """The layer every vLLM draft step runs (layer 0)."""
        return self.model.mtp_layers[0]

    def head_weight(self) -> torch.Tensor:
        """[V, H] the policy's output head, detached."""
        head = self._head[0]
        return (head.weight if isinstance(head, nn.Module) else head).detach()

    def target_ids(self) -> torch.Tensor:
        """[V] int64: the draft vocab is the target's."""
        return torch.arange(self.config.vocab_size, device=self.midlayer.input_proj.weight.device)

    def fuse(self, final_hidden: torch.Tensor | None) -> torch.Tensor:
        """final_hidden: [B, T, H] the target's pre-norm last state -> the step-1 hidden state."""
        if final_hidden is None:
            raise ValueError("an MTP draft trains on the target's pre-norm last hidden state (DraftBatch.final_hidden);"
                             " capture with adapter.capture(policy) or FeatureCapture(final_prenorm=True)")
        return final_hidden.to(self.midlayer.input_proj.weight.dtype)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """out: [B, T, H] layer output (already normed) -> [B, T, V] through the shared head."""
        w = self.head_weight()
        return F.linear(out, w.to(device=out.device, dtype=out.dtype))

    def forward(self, tok_embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """Step 1 over whole sequences (no cache). tok_embeds, hidden: [B, T, H]; positions:
        [B, T]; mask: [B, T, T] bool. Returns the layer output [B, T, H]."""
        q, k, v, residual = self.midlayer.project(tok_embeds, hidden, positions)
        return self.midlayer.finish(attend(q, k, v, mask), residual)


def mtp_state_for_push(draft: MTPDraft) -> dict[str, torch.Tensor]:
    """The tensors vLLM's MTP drafter owns, checkpoint names (`model.mtp_layers.{i}.*`)."""
    return {k: v.detach() for k, v in draft.state_dict().items()}


def load_mtp_state(draft: MTPDraft, tensors: dict[str, torch.Tensor]) -> MTPDraft:
    """Fill `draft` from a checkpoint's tensors (a whole policy checkpoint is fine: only
    `model.mtp_layers.*` is read); raises listing missing tensors."""
    mine = {k: v for k, v in tensors.items() if k.startswith("model.mtp_layers.")}
    missing, unexpected = draft.load_state_dict(mine, strict=False)
    if missing or unexpected:
        raise ValueError(f"MTP tensors do not match the draft: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return draft
