"""Training-time test (TTT): unroll K EAGLE-3 draft steps exactly as vLLM runs them, score each
step against the target.

vLLM's proposer runs step 1 over every context position (KV cache filled from the target's aux
states), then steps 2..K for the last position only, feeding the layer's own pre-norm output
back as the hidden state, one position further each step. At step k a query from base position i
therefore sees the step-1 keys at 0..i of its sequence plus the keys of steps 2..k from the same
base. `unroll_hidden` runs that for every base i at once: step 1 through SDPA's causal kernel,
steps 2..K as chunked causal scores merged with the per-query diagonal keys (`drafts/attention.py`).
Inputs at later steps are the ground-truth tokens. Gradients reach only the draft: the target
embedding is read detached.

Sizes that matter (T tokens in the batch, H hidden, Hq query heads, Vd draft vocab, K steps):
- `unroll_hidden`: memory O(K T H + B Hq c T) with c = ATTN_CHUNK_ELEMENTS / (B Hq T), i.e. O(T)
  (`drafts/attention.py`; 2^22 score elements per chunk on CPU, 2^26 on CUDA);
  time O(K T^2 Hq D / 2) attention + O(K T H^2) layer.
- `ttt_loss`: head, log-softmax, KL/TV and their gradient over chunks of n = LOSS_CHUNK_ELEMENTS / Vd
  positions, the gradient computed with the logits (`head_loss.py`): memory O(n Vd + K T H + Vd H),
  never K x [T, Vd]. The teacher is read per chunk (`batch.teacher_dense`): a top-k teacher
  (`DraftBatch.teacher_topk_*`, O(T k)) is densified n rows at a time, never to [B, T, Vd].
- `unroll_dense` (the former implementation, kept as the test oracle): O(K T^2) masks and scores.

The native MTP draft (`drafts/mtp.py`) runs the same way in vLLM (its layer 0 at every step, its
own output fed back), so the same unroll trains it: step 1 reads the target's pre-norm last
hidden state instead of fused aux states.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .allocator import limit_heap_growth
from .batch import DraftBatch, teacher_dense
from .drafts.attention import causal_attend, layout, ttt_attend
from .drafts.eagle3 import Eagle3Draft, attend
from .drafts.kinds import kind_of
from .drafts.mtp import MTPDraft
from .head_loss import LOSS_CHUNK_ELEMENTS, LOSSES, head_loss


class TTTResult(NamedTuple):
    loss: torch.Tensor  # []: sum_k decay^(k-1) * step_loss[k], differentiable
    step_loss: torch.Tensor  # [K] float: mean training objective (kl, tv or kl + w*tv) per step
    step_acc: torch.Tensor  # [K] float: draft top-1 == teacher top-1, per step
    step_tokens: torch.Tensor  # [K] int64: positions scored at each step
    step_kl: torch.Tensor | None = None  # [K] float: mean KL(teacher || draft) over the draft vocab
    step_tv: torch.Tensor | None = None  # [K] float: mean total variation 0.5 * sum |p - q|


def shift(x: torch.Tensor, k: int) -> torch.Tensor:
    """x[:, k:] padded back to length T with zeros: position i holds x[i+k]. x: [B, T, ...]."""
    return torch.cat([x[:, k:], x.new_zeros((x.shape[0], min(k, x.shape[1]), *x.shape[2:]))], dim=1)


def _embed_weight(embed: nn.Embedding | torch.Tensor) -> torch.Tensor:
    return (embed.weight if isinstance(embed, nn.Module) else embed).detach()  # [V, H] frozen


def _tokens(weight: torch.Tensor, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Embedding rows of ids [B, T], gathered where the embedding lives, moved to `like`."""
    return F.embedding(ids.to(weight.device), weight).to(device=like.device, dtype=like.dtype)


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")


def step1_features(draft, batch: DraftBatch) -> torch.Tensor:
    """What step 1 fuses, as the draft kind says: aux states [B, T, n*H_t] (EAGLE-3) or the pre-norm last state [B, T, H_t] (MTP)."""
    field = kind_of(draft).features
    if field is None:
        raise ValueError(f"{type(draft).__name__} reads no hidden state: the TTT unroll trains EAGLE-3 / MTP heads; "
                         "train it with its kind's loss (DraftTrainer's default)")
    return getattr(batch, field)


LAYER_CHUNK_ELEMENTS = 1 << 20  # positions x hidden per recomputed chunk of the layer's position-wise parts


def _by_positions(fn, recompute: bool, c: int, *xs: torch.Tensor) -> list[torch.Tensor]:
    """fn over chunks of c positions (dim 1 of every x [B, T, ...]); outputs concatenated along T
    (dim 2 for [B, heads, T, D], dim 1 otherwise). With recompute, each chunk keeps only its inputs
    for backward and reruns in backward."""
    if not recompute:
        return list(fn(*xs))
    parts = [checkpoint(fn, *chunk, use_reentrant=False, preserve_rng_state=False)
             for chunk in zip(*(x.split(c, 1) for x in xs))]
    return [torch.cat(p, 2 if p[0].dim() == 4 else 1) for p in zip(*parts)]


def _draft_step(draft, weight: torch.Tensor, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                lay, chunk_elements: int | None, recompute: bool, keys: list, values: list) -> tuple[torch.Tensor, ...]:
    """One draft step over every base: (output [B, T, H], key, value [B, Hkv, T, D]).

    keys, values: those of steps 1..k-1 (empty at step 1). The position-wise parts (embedding,
    norms, q/k/v + RoPE before the attention; o_proj, norm, MLP after it) run in position chunks
    recomputed in backward, so a step keeps ~8 [T, H]-sized tensors for backward, not ~37."""
    c = max(1, LAYER_CHUNK_ELEMENTS // (ids.shape[0] * hidden.shape[-1]))

    def before(ids_c, hidden_c, pos_c):
        return tuple(draft.midlayer.project(_tokens(weight, ids_c, hidden_c), hidden_c, pos_c))

    q, key, value, residual = _by_positions(before, recompute, c, ids, hidden, positions)
    if not keys:
        att = causal_attend(q, key, value, lay, chunk_elements)
    else:
        att = ttt_attend(q, keys[0], values[0], keys[1:] + [key], values[1:] + [value], lay, chunk_elements)
    (out,) = _by_positions(lambda a, r: (draft.midlayer.finish(a, r),), recompute, c, att, residual)
    return out, key, value


def unroll_hidden(draft: Eagle3Draft | MTPDraft, batch: DraftBatch, embed: nn.Embedding | torch.Tensor, steps: int,
                  chunk_elements: int | None = None, recompute: bool = True) -> list[torch.Tensor]:
    """The draft layer's output for steps 1..K at every base position: K tensors [B, T, H]
    (EAGLE-3: pre-norm state; MTP: post final_layernorm), what `draft.logits` reads.

    Step k at base i reads token input_ids[i+k] at RoPE position pos[i]+k-1 and predicts token
    i+k+1; pos = batch.positions, or 0, 1, ... over each row's valid tokens. Memory O(K T H) plus
    one attention chunk (module docstring); no T x T tensor. recompute: the layer's position-wise
    parts run in chunks of LAYER_CHUNK_ELEMENTS // (B H) positions recomputed in backward: ~8
    [T, H]-sized tensors kept per step instead of ~37 (norms, RoPE, MLP), ~+1/3 of the layer's FLOPs.
    """
    _check_steps(steps)
    weight = _embed_weight(embed)
    lay = layout(batch.valid, batch.positions)
    hidden = draft.fuse(step1_features(draft, batch))  # [B, T, H]
    keys, values, out = [], [], []
    recompute = recompute and torch.is_grad_enabled()
    for k in range(1, steps + 1):
        hidden, key, value = _draft_step(draft, weight, shift(batch.input_ids, k), hidden, lay.positions + (k - 1),
                                         lay, chunk_elements, recompute, keys, values)
        keys.append(key)
        values.append(value)
        out.append(hidden)
    return out


def unroll(draft: Eagle3Draft | MTPDraft, batch: DraftBatch, embed: nn.Embedding | torch.Tensor,
           steps: int) -> list[torch.Tensor]:
    """Draft logits for steps 1..K at every base position: K tensors [B, T, Vd].

    For inspection and tests: K x [B, T, Vd] is alive at once; `ttt_loss` never calls it.
    """
    return [draft.logits(h) for h in unroll_hidden(draft, batch, embed, steps)]


def unroll_dense(draft: Eagle3Draft | MTPDraft, batch: DraftBatch, embed: nn.Embedding | torch.Tensor,
                 steps: int) -> list[torch.Tensor]:
    """The former `unroll` (test oracle): dense boolean masks [B, T, k*T] over concatenated
    per-step keys, O(K T^2) memory. Same contract as `unroll`; a packed row's sequences are
    kept apart by a segment mask."""
    _check_steps(steps)
    weight = _embed_weight(embed)
    lay = layout(batch.valid, batch.positions)
    valid = batch.valid
    b, t = valid.shape
    same = (lay.segment[:, :, None] == lay.segment[:, None, :]) & valid[:, None, :]
    eye = torch.eye(t, dtype=torch.bool, device=valid.device).expand(b, t, t)
    causal = (torch.ones(t, t, dtype=torch.bool, device=valid.device).tril() & same) | eye
    hidden = draft.fuse(step1_features(draft, batch))  # [B, T, H]
    keys, values, logits = [], [], []
    for k in range(1, steps + 1):
        tok = _tokens(weight, shift(batch.input_ids, k), hidden)  # [B, T, H]
        q, key, value, residual = draft.midlayer.project(tok, hidden, lay.positions + (k - 1))
        keys.append(key)
        values.append(value)
        mask = torch.cat([causal] + [eye] * (k - 1), dim=-1)  # [B, T, k*T]
        hidden = draft.midlayer.finish(attend(q, torch.cat(keys, 2), torch.cat(values, 2), mask), residual)
        logits.append(draft.logits(hidden))
    return logits


def ttt_loss(draft: Eagle3Draft | MTPDraft, batch: DraftBatch, embed: nn.Embedding | torch.Tensor, steps: int = 3,
             decay: float = 0.8, loss: str = "kl", tv_weight: float = 1.0,
             chunk_elements: int = LOSS_CHUNK_ELEMENTS, recompute: bool = True,
             normalizer: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> TTTResult:
    """Divergence from the teacher renormalised over the draft vocab, step k weighted decay^(k-1).

    loss: "kl" forward KL(teacher || draft); "tv" total variation 0.5 * sum_d |p_d - q_d| (one
    minus the expected acceptance of a single draft token); "kl+tv" = kl + tv_weight * tv; "top1" cross-entropy
    to the teacher's argmax (matched to greedy drafting: `head_loss`).
    Step k at base i is scored against the teacher at i+k (dense or top-k) where loss_mask[i+k] and both i and
    i+k are real positions. K=1 is plain single-step training. `normalizer` ([K]): divide step k's
    sums by normalizer[k-1] instead of this batch's own count (data-parallel training passes the
    count summed over ranks, so the ranks' losses and stats add up to the union batch's). Memory:
    module docstring (chunks of chunk_elements // Vd positions; `head_loss`); recompute: see
    `unroll_hidden`. `weight` ([B, T] float per teacher position, None = 1): step k's loss is then
    the weighted mean over its scored positions (`strategy.py`'s position weights); its step_loss
    is weighted too, its step_kl / step_tv / step_acc are not.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}; choose one of {LOSSES}")
    limit_heap_growth()  # glibc: RSS linear in T (allocator.py)
    if weight is not None and normalizer is not None:
        raise ValueError("ttt_loss takes a position weight or a normalizer, not both")
    scored = batch.loss_mask & batch.valid
    hidden = unroll_hidden(draft, batch, embed, steps, recompute=recompute)
    denoms = None if normalizer is None else [float(d) for d in normalizer]
    xs, rows, cols, step, row_weight, counts = [], [], [], [], [], []
    for k, h in enumerate(hidden, start=1):
        sel = shift(scored, k) & batch.valid  # [B, T]: base i counts if i and i+k do
        r, c = sel.nonzero(as_tuple=True)
        n = r.numel()
        xs.append(h[sel])  # [n, H]
        rows.append(r)
        cols.append(c + k)  # step k at base i is scored against the teacher at i+k
        step.append(torch.full_like(r, k - 1))
        if weight is None:
            denom = max(n, 1) if denoms is None else denoms[k - 1]
            row_weight.append(torch.full(r.shape, decay ** (k - 1) / denom, device=r.device))
        else:
            w = weight[r, c + k].float()  # [n]
            row_weight.append(w * (decay ** (k - 1) / w.sum().clamp(min=1e-8)))
        counts.append(n)
    x, head = kind_of(draft).head(draft, torch.cat(xs))  # [N, H] every scored position of every step; [Vd, H]
    teacher = lambda r, c: teacher_dense(batch, r, c)  # noqa: E731 - [n, Vd] per chunk, dense or top-k
    total, sums = head_loss(x, head, teacher, torch.cat(rows), torch.cat(cols), torch.cat(step),
                            torch.cat(row_weight), steps, loss, tv_weight, chunk_elements)
    denom = torch.tensor(counts if denoms is None else denoms, device=sums.device, dtype=sums.dtype)
    per = sums[:, :3] / denom.clamp(min=1)[:, None]  # [K, 3]: kl, tv, acc means
    kl, tv = per[:, 0], per[:, 1]
    step_loss = kl if loss == "kl" else tv if loss == "tv" else kl + tv_weight * tv
    if weight is not None or loss == "top1":  # the objective's own per-step sums (weighted, or not KL/TV)
        step_loss = sums[:, 3] / torch.tensor([decay ** k for k in range(steps)], device=sums.device)
    return TTTResult(loss=total, step_loss=step_loss, step_acc=per[:, 2], step_tokens=torch.tensor(counts),
                     step_kl=kl, step_tv=tv)


@dataclass(frozen=True)
class TTTLoss:
    """`ttt_loss` as a trainer.LossFn: the EAGLE-3 / MTP kinds' default loss (drafts/kinds.py)."""

    steps: int = 3  # K draft steps unrolled
    decay: float = 0.8  # step k weighs decay^(k-1)
    loss: str = "kl"  # one of LOSSES
    tv_weight: float = 1.0  # weight of the TV term in "kl+tv"
    recompute: bool = True  # recompute the layer's position-wise parts in backward

    @classmethod
    def from_config(cls, config) -> "TTTLoss":
        return cls(config.ttt_steps, config.decay, config.loss, config.tv_weight, config.recompute)

    def __call__(self, draft, batch: DraftBatch, embed, normalizer: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None) -> TTTResult:
        return ttt_loss(draft, batch, embed, steps=self.steps, decay=self.decay, loss=self.loss,
                        tv_weight=self.tv_weight, recompute=self.recompute, normalizer=normalizer, weight=weight)
