"""`DraftLM`: a small external causal LM as the draft, what vLLM 0.32 serves with `method="draft_model"`.

Unlike EAGLE-3 and MTP it reads no hidden state of the target: it is an ordinary causal LM over
the target's token ids (its own embedding, decoder layers, norm and head), run by vLLM's
`DraftModelProposer` with its own KV cache. vLLM does NOT share the target's embedding or head
with it (`_maybe_share_embeddings` / `_maybe_share_lm_head` are no-ops there), so a push carries
every parameter, `model.embed_tokens` included. Names are the HF checkpoint names vLLM's
`LlamaForCausalLM.load_weights` reads, so an export is `save_pretrained` and a push is
`named_parameters()`.

Two ways to get one:
- `DraftLM.from_policy(policy, num_layers=2)`: the policy's architecture cut to its first
  `num_layers` decoder layers, starting from the policy's embedding, those layers, final norm and
  head (a "layer-truncated" draft: it already speaks the policy's language);
- `DraftLM.from_pretrained(dir)`: any HF causal LM checkpoint with the policy's vocabulary.

`check_draft_lm` refuses a draft whose vocabulary or tokenizer is not the target's before an
engine starts (vLLM's own check names neither tokenizer and runs after the target has loaded).
It does not train (`distill.py` does) and never imports vLLM.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


@dataclass(frozen=True)
class DraftLMFeatures:
    """What the feature side (adapter, capture) asks of every draft: a draft LM reads token ids
    only - no aux layers, no last hidden state - and predicts over the full target vocab."""

    vocab_size: int  # V: the target's (and the draft's) vocabulary
    hidden_size: int  # the draft's own width (it need not equal the target's)
    num_hidden_layers: int  # the draft's decoder layers

    aux_layer_ids: tuple[int, ...] = ()
    full_vocab: bool = True
    final_hidden: str | None = None

    @property
    def draft_vocab_size(self) -> int:
        return self.vocab_size

    @property
    def target_hidden_size(self) -> int:
        return self.hidden_size


class DraftLM(nn.Module):
    """An HF causal LM used as a speculative draft. `lm` is the HF model (its parameter names are
    the checkpoint's); `config` describes it to the adapter (`DraftLMFeatures`)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        arch = type(lm).__name__
        if arch not in ARCHITECTURES:
            raise ValueError(f"draft LM architecture {arch} is not supported; supported: {ARCHITECTURES}")
        self.lm = lm
        c = lm.config
        self.config = DraftLMFeatures(c.vocab_size, c.hidden_size, c.num_hidden_layers)

    @classmethod
    def from_policy(cls, policy: nn.Module, num_layers: int = 2, copy_weights: bool = True) -> "DraftLM":
        """The policy's architecture with its first `num_layers` decoder layers; embedding, those
        layers, final norm and head copied from the policy (`copy_weights=False`: random init)."""
        from transformers import AutoModelForCausalLM

        n_policy = policy.config.num_hidden_layers
        if not 1 <= num_layers <= n_policy:
            raise ValueError(f"num_layers={num_layers}; use 1..{n_policy} (the policy's layer count)")
        cfg = copy.deepcopy(policy.config)
        cfg.num_hidden_layers = num_layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = list(cfg.layer_types)[:num_layers]
        lm = AutoModelForCausalLM.from_config(cfg).to(next(policy.parameters()).dtype)
        if copy_weights:
            own = lm.state_dict()
            src = {k: v for k, v in policy.state_dict().items() if k in own}
            missing = sorted(set(own) - set(src))
            if missing:
                raise ValueError(f"policy has no tensors for draft {missing[:5]}: not a truncatable architecture")
            lm.load_state_dict(src, strict=True)
        return cls(lm.eval())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "DraftLM":
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval())

    def target_ids(self) -> torch.Tensor:
        """[V] int64: the draft vocab is the target's."""
        return torch.arange(self.config.vocab_size, device=next(self.parameters()).device)

    def hidden(self, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """input_ids, valid: [B, T] right-padded -> last hidden state [B, T, H] (post final norm)."""
        return self.lm.model(input_ids=input_ids, attention_mask=valid.long(), use_cache=False).last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., V] logits."""
        return self.lm.lm_head(hidden)

    def save(self, out_dir: str | os.PathLike, tokenizer_src: str | os.PathLike | None = None) -> Path:
        """config.json + model.safetensors (+ the tokenizer of `tokenizer_src`), written atomically."""
        from ..atomic import atomic_write_dir

        def write(tmp: Path) -> None:
            self.lm.save_pretrained(str(tmp), safe_serialization=True)
            if tokenizer_src is not None:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(str(tokenizer_src)).save_pretrained(str(tmp))

        return atomic_write_dir(out_dir, write)


def draft_lm_state_for_push(draft: DraftLM) -> dict[str, torch.Tensor]:
    """Every parameter vLLM's draft model owns, checkpoint names (tied weights once, under the
    embedding's name, as vLLM loads them); the live tensors, detached."""
    return {k: v.detach() for k, v in draft.lm.named_parameters()}


def save_draft_lm(draft: DraftLM, out_dir: str | os.PathLike, target_config=None) -> Path:
    """`draft.save(out_dir)`: the HF checkpoint vLLM serves with method="draft_model"; with target_config,
    the vocabularies must match (vLLM refuses a draft LM over another vocabulary)."""
    want = getattr(target_config, "vocab_size", None) if target_config is not None else None
    if want is not None and want != draft.config.vocab_size:
        raise ValueError(f"the draft LM has vocab_size {draft.config.vocab_size}, the target {want}: build it from "
                         "this policy (DraftLM.from_policy(policy)) or a checkpoint with the policy's vocabulary")
    return draft.save(out_dir)


def _vocab_size(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    if "vocab_size" not in cfg:
        raise ValueError(f"{model_dir}/config.json has no vocab_size")
    return int(cfg["vocab_size"])


def check_draft_lm(draft_dir: str | os.PathLike, target_dir: str | os.PathLike,
                   target_tokenizer: str | os.PathLike | None = None) -> None:
    """Refuse a draft LM that does not share the target's vocabulary and tokenizer (ValueError
    naming both sizes, or the first token id the two tokenizers map differently). The draft's
    tokenizer is read from `draft_dir` when it has one; a draft without one is taken to use the
    target's (vLLM runs the draft on the target's token ids)."""
    draft_dir, target_dir = Path(draft_dir), Path(target_dir)
    if not (draft_dir / "config.json").exists():
        raise ValueError(f"draft model dir {draft_dir} has no config.json: pass an HF causal LM checkpoint dir")
    v_draft, v_target = _vocab_size(draft_dir), _vocab_size(target_dir)
    if v_draft != v_target:
        raise ValueError(f"draft model vocab_size={v_draft} ({draft_dir}) != target vocab_size={v_target} "
                         f"({target_dir}): a draft_model draft must share the target's tokenizer and vocabulary; "
                         "build one with DraftLM.from_policy(policy) or pick a draft of the same model family")
    has_tok = any((draft_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    if not has_tok:
        return
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(str(draft_dir)).get_vocab()
    b = AutoTokenizer.from_pretrained(str(target_tokenizer or target_dir)).get_vocab()
    if a != b:
        ia, ib = ({i: t for t, i in v.items()} for v in (a, b))
        diff = min(i for i in set(ia) | set(ib) if ia.get(i) != ib.get(i))
        raise ValueError(f"draft model tokenizer ({len(a)} tokens, {draft_dir}) differs from the target's "
                         f"({len(b)} tokens): token id {diff} is {ia.get(diff)!r} in the draft and {ib.get(diff)!r} "
                         "in the target; a draft_model draft must use the target's tokenizer")
