"""`Eagle3Draft`: the EAGLE-3 draft head, parameter for parameter what vLLM 0.32 serves.

Parameter names are the checkpoint names vLLM's `Eagle3LlamaForCausalLM.load_weights` reads
(`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`), so an export is a filtered `state_dict()`.
The forward reproduces vLLM's draft forward (`llama_eagle3.py`: `LlamaDecoderLayer.forward`
with `layer_idx == 0`, `LlamaModel.forward`, `combine_hidden_states`).

It deliberately does not own the token embedding: vLLM shares the target's `embed_tokens` with
the drafter, so the embedding is always passed in, frozen, and never exported. Nor does it know
about KV caches or training: `ttt.py` composes `project` / `attend` / `finish` into the
multi-step unroll, a test composes them into vLLM's step-by-step KV-cache decode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# RoPE variants whose cos/sin vLLM and transformers compute identically from `rope_parameters`.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class Eagle3Config:
    """Sizes of the one-layer draft; everything but the vocab and aux ids mirrors the target."""

    hidden_size: int  # H: draft width; equals the target's (the drafter shares its embedding)
    intermediate_size: int  # MLP width
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int  # V: target vocabulary (embedding rows)
    draft_vocab_size: int  # Vd: rows of lm_head
    target_hidden_size: int  # H_t: width of each aux hidden state
    aux_layer_ids: tuple[int, ...]  # HF hidden_states indices = vLLM eagle_aux_hidden_state_layer_ids
    max_position_embeddings: int = 2048
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    norm_before_residual: bool = False  # speculators variant: residual = hidden_norm(h), not h

    def __post_init__(self) -> None:
        if self.hidden_size != self.target_hidden_size:
            raise ValueError(
                f"Eagle3Config.hidden_size={self.hidden_size} != target_hidden_size={self.target_hidden_size}:"
                " the drafter shares the target's embedding, so its width must be the target's"
            )
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size={self.draft_vocab_size} must be in 1..vocab_size={self.vocab_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of"
                f" num_key_value_heads={self.num_key_value_heads}"
            )
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
        if self.rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"partial_rotary_factor={self.rope_parameters['partial_rotary_factor']} is not supported")
        check_aux_layer_ids(self.aux_layer_ids, None)

    @property
    def full_vocab(self) -> bool:
        return self.draft_vocab_size == self.vocab_size


def check_aux_layer_ids(ids: tuple[int, ...], num_layers: int | None) -> tuple[int, ...]:
    """Distinct, increasing, inside the target. vLLM crashes on duplicates at the first spec step
    and concatenates aux states in layer order whatever the config's order, so we insist on it."""
    ids = tuple(int(i) for i in ids)
    if not ids or len(set(ids)) != len(ids) or list(ids) != sorted(ids):
        raise ValueError(f"aux layer ids {ids} must be distinct and increasing (vLLM concatenates them in layer order)")
    if num_layers is not None and not all(0 <= i < num_layers for i in ids):
        # id L would be the pre-norm output in vLLM but HF's hidden_states[L] is post-norm.
        raise ValueError(f"aux layer ids {ids} must lie in 0..{num_layers - 1} for a {num_layers}-layer target")
    return ids


def default_aux_layer_ids(num_layers: int) -> tuple[int, ...]:
    """vLLM's default: hidden_states indices (2, L//2, L-3) = outputs of layers (1, L/2-1, L-4)."""
    ids = (2, num_layers // 2, num_layers - 3)
    if len(set(ids)) != 3 or list(ids) != sorted(ids) or ids[0] < 0:
        raise ValueError(
            f"the default aux layer ids {ids} for a {num_layers}-layer target are not distinct and increasing"
            " (vLLM would crash); pass aux_layer_ids=(...) explicitly"
        )
    return ids


class RMSNorm(nn.Module):
    """vLLM's RMSNorm: normalise in float32, scale by `weight`, back to the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_inv_freq(cfg: Eagle3Config) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] for cfg.rope_parameters, as transformers computes them."""
    rope_type = cfg.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        theta = float(cfg.rope_parameters.get("rope_theta", 10000.0))
        return 1.0 / theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim)
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                     head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                     rope_parameters=dict(cfg.rope_parameters))
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, None)
    assert scaling == 1.0, f"rope_type {rope_type} scales cos/sin; not supported"
    return inv_freq.float()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Neox-style (rotate-half) RoPE, as vLLM's Llama uses.

    x: [B, heads, T, D]; positions: [B, T] int64; inv_freq: [D/2].
    """
    freqs = positions[:, None, :, None].float() * inv_freq.to(x.device)  # [B, 1, T, D/2]
    cos, sin = freqs.cos(), freqs.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention with grouped KV heads.

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D]; mask: [B, Tq, Tk] bool (True = may attend; every
    query row needs at least one True). Returns [B, Tq, Hq*D].
    """
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=q.shape[-1] ** -0.5)
    return out.transpose(1, 2).flatten(2)


class Projected(NamedTuple):
    q: torch.Tensor  # [B, Hq, T, D] RoPE applied
    k: torch.Tensor  # [B, Hkv, T, D] RoPE applied
    v: torch.Tensor  # [B, Hkv, T, D]
    residual: torch.Tensor  # [B, T, H]


def project_qkv(attn: nn.Module, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, head_dim: int,
            residual: torch.Tensor) -> Projected:
    """q/k/v of `attn` (q_proj, k_proj, v_proj) on x [B, T, In], RoPE on q and k at positions [B, T]."""
    b, t = x.shape[0], x.shape[1]
    q, k, v = (proj(x).view(b, t, -1, head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    return Projected(apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v, residual)


class Eagle3Attention(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(2 * h, cfg.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, cfg.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, cfg.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)


class Eagle3MLP(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3Layer(nn.Module):
    """vLLM's first (and only) EAGLE-3 decoder layer, split around the attention so that callers
    choose which keys each query sees."""

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Eagle3Attention(cfg)
        self.mlp = Eagle3MLP(cfg)
        # A plain attribute, not a buffer: `.to(bfloat16)` must not round the frequencies.
        self.inv_freq = rope_inv_freq(cfg)  # [head_dim/2] float32

    def project(self, tok_embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor) -> Projected:
        """Queries, keys, values and residual for one draft step.

        tok_embeds: [B, T, H] target embedding of the input token; hidden: [B, T, H] fused aux
        state (step 1) or the previous step's pre-norm output; positions: [B, T] int64.
        """
        normed = self.hidden_norm(hidden)
        residual = normed if self.cfg.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(tok_embeds), normed], dim=-1)  # [B, T, 2H]
        return project_qkv(self.self_attn, x, positions, self.inv_freq, self.cfg.head_dim, residual)

    def finish(self, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """attn_out: [B, T, Hq*D]; residual: [B, T, H] -> pre-norm output [B, T, H] (the state
        vLLM feeds back as the next step's hidden)."""
        h = self.self_attn.o_proj(attn_out) + residual
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Draft(nn.Module):
    """EAGLE-3 draft: fc over the concatenated aux states, one decoder layer, norm, lm_head."""

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.config = cfg
        self.fc = nn.Linear(len(cfg.aux_layer_ids) * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = Eagle3Layer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        # target_id = draft_id + d2t[draft_id]; t2d[target_id] = target token is in the draft vocab
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
        self.t2d[: cfg.draft_vocab_size] = True
        self._init_weights()

    def _init_weights(self, std: float = 0.02) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=std)

    @classmethod
    def from_target(cls, target_config, draft_vocab=None, aux_layer_ids=None, target_head: torch.Tensor | None = None,
                    max_position_embeddings: int | None = None, norm_before_residual: bool = False) -> "Eagle3Draft":
        """A draft sized for `target_config` (a transformers config: Llama, Qwen2, Qwen3, ...).

        draft_vocab: a `DraftVocab` (or a d2t tensor [Vd]); None = the full target vocab.
        aux_layer_ids: HF hidden_states indices; None = vLLM's default (2, L//2, L-3).
        target_head: the target's lm_head weight [V, H]; when given, lm_head starts from its
        rows at the draft vocab (a head that already speaks the target's language).
        """
        tc = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        num_layers = tc.num_hidden_layers
        ids = default_aux_layer_ids(num_layers) if aux_layer_ids is None else aux_layer_ids
        d2t = getattr(draft_vocab, "d2t", draft_vocab)
        heads = tc.num_attention_heads
        cfg = Eagle3Config(
            hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size, num_attention_heads=heads,
            num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads, rms_norm_eps=tc.rms_norm_eps,
            vocab_size=tc.vocab_size, draft_vocab_size=tc.vocab_size if d2t is None else len(d2t),
            target_hidden_size=tc.hidden_size, aux_layer_ids=check_aux_layer_ids(tuple(ids), num_layers),
            max_position_embeddings=max_position_embeddings or tc.max_position_embeddings,
            rope_parameters=dict(target_rope_parameters(tc)), norm_before_residual=norm_before_residual,
        )
        draft = cls(cfg)
        if d2t is not None:
            draft.set_vocab(torch.as_tensor(d2t))
        if target_head is not None:
            draft.init_lm_head(target_head)
        return draft

    @torch.no_grad()
    def set_vocab(self, d2t: torch.Tensor) -> None:
        """Install a draft vocab map d2t [Vd] (target_id = draft_id + d2t[draft_id]) and its t2d."""
        cfg = self.config
        if tuple(d2t.shape) != (cfg.draft_vocab_size,):
            raise ValueError(f"d2t has shape {tuple(d2t.shape)}, expected ({cfg.draft_vocab_size},)")
        target_ids = torch.arange(cfg.draft_vocab_size) + d2t.long().cpu()
        if target_ids.min() < 0 or target_ids.max() >= cfg.vocab_size or target_ids.unique().numel() != len(target_ids):
            raise ValueError(f"d2t maps draft ids outside 0..{cfg.vocab_size - 1} or onto one target id twice")
        self.d2t.copy_(d2t)
        self.t2d.zero_()
        self.t2d[target_ids.to(self.t2d.device)] = True

    def target_ids(self) -> torch.Tensor:
        """[Vd] int64: the target id of every draft id."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    @torch.no_grad()
    def init_lm_head(self, target_head: torch.Tensor) -> None:
        """Copy the target head's rows [V, H] at the draft vocab into lm_head [Vd, H]."""
        want = (self.config.vocab_size, self.config.hidden_size)
        if tuple(target_head.shape) != want:
            raise ValueError(f"target head has shape {tuple(target_head.shape)}, expected {want}")
        self.lm_head.weight.copy_(target_head[self.target_ids().to(target_head.device)])

    def fuse(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """aux_hidden: [B, T, n_aux*H_t] target aux states -> [B, T, H] (vLLM's combine_hidden_states)."""
        return self.fc(aux_hidden.to(self.fc.weight.dtype))

    def logits(self, prenorm: torch.Tensor) -> torch.Tensor:
        """prenorm: [B, T, H] -> draft-vocab logits [B, T, Vd]."""
        return self.lm_head(self.norm(prenorm))

    def forward(self, tok_embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """One self-contained draft pass (no cache): step 1 over whole sequences.

        tok_embeds: [B, T, H] embedding of the token after each position; hidden: [B, T, H]
        fused aux states; positions: [B, T]; mask: [B, T, T] bool. Returns pre-norm [B, T, H].
        """
        q, k, v, residual = self.midlayer.project(tok_embeds, hidden, positions)
        return self.midlayer.finish(attend(q, k, v, mask), residual)


def target_rope_parameters(tc) -> dict[str, Any]:
    """rope_parameters of a transformers config (v5: `rope_parameters`; v4: rope_theta/rope_scaling)."""
    rp = getattr(tc, "rope_parameters", None)
    if rp:
        return {k: v for k, v in dict(rp).items() if v is not None}
    rp = dict(getattr(tc, "rope_scaling", None) or {"rope_type": "default"})
    rp.setdefault("rope_type", rp.pop("type", "default"))
    rp["rope_theta"] = float(getattr(tc, "rope_theta", 10000.0))
    return rp

