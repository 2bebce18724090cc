"""Attention for the TTT unroll in O(T) memory: no T x T mask or score matrix is ever alive.

Rows of a `DraftBatch` hold one right-padded sequence each, or several sequences back to back
("packed", told apart by their positions, `Layout`). Two kinds of attention run over them:

- `causal_attend` (draft step 1): every query sees the keys of its own sequence up to itself.
  It is SDPA's causal kernel (`is_causal=True`, GQA through `enable_gqa`, no mask): one call
  for right-padded rows, one call per sequence otherwise. Memory O(T H).
- `ttt_attend` (draft steps k >= 2): the query at base i sees the step-1 keys of its sequence
  up to i AND the keys of steps 2..k at the SAME base i (a diagonal: one extra key per step).
  It runs over query chunks of c positions with explicit scores [B, Hq, c, <=T] for the
  causal part, the k-1 diagonal scores as elementwise dot products [B, Hq, c], and one softmax
  over both: a log-sum-exp merge of the causal and the diagonal part. Each chunk sits under
  `torch.utils.checkpoint`, so backward recomputes its scores instead of keeping them.
  Memory O(B Hq c T + K T H) with c = chunk_elements / (B Hq T); time O(T^2 Hq D / 2) per step.

GQA never repeats keys: queries are viewed as [B, Hkv, group, T, D] (query head h uses KV head
h // group, as vLLM's and transformers' `repeat_interleave` do).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

# Elements of one query chunk's score tensor [B, Hq, c, keys]: 2^22 fp32 = 16 MiB on CPU (a few copies
# alive); 16x that on CUDA, where per-chunk launch overhead, not memory, is what a small chunk costs.
ATTN_CHUNK_ELEMENTS = 1 << 22
ATTN_CHUNK_ELEMENTS_CUDA = 1 << 26


def chunk_budget(device: torch.device, chunk_elements: int | None) -> int:
    if chunk_elements is not None:
        return chunk_elements
    return ATTN_CHUNK_ELEMENTS_CUDA if device.type == "cuda" else ATTN_CHUNK_ELEMENTS


class Layout(NamedTuple):
    """Where the sequences of a padded/packed batch are. Built once per batch by `layout`."""

    positions: torch.Tensor  # [B, T] int64: RoPE position of each token (pads: anything)
    segment: torch.Tensor  # [B, T] int64: index of the token's sequence in its row, -1 at pads
    seg_start: torch.Tensor  # [B, T] int64: column where the token's sequence starts (pads: own column)
    spans: list[tuple[int, int, int]]  # (row, start, end) of every sequence, end exclusive
    right_padded: bool  # one sequence per row, starting at column 0


def layout(valid: torch.Tensor, positions: torch.Tensor | None = None) -> Layout:
    """valid: [B, T] bool; positions: [B, T] int64 or None (= 0, 1, 2, ... over each row's valid tokens).

    A sequence is a run of valid tokens whose positions go up by one; a new one starts where a
    token is valid and its left neighbour is padding or not its position minus one. Without
    positions a row is ONE sequence, so its valid tokens must be contiguous (left or right padding).
    """
    b, t = valid.shape
    if positions is None:
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    else:
        if tuple(positions.shape) != (b, t):
            raise ValueError(f"positions has shape {tuple(positions.shape)}, valid has {(b, t)}; pass one per token")
        pos = positions.long()
    prev_valid = F.pad(valid[:, :-1], (1, 0), value=False)
    prev_pos = F.pad(pos[:, :-1], (1, 0), value=-2)
    starts = valid & (~prev_valid | (pos != prev_pos + 1))  # [B, T]
    counts = starts.sum(1)
    if positions is None and bool((counts > 1).any()):
        row = int((counts > 1).nonzero()[0, 0])
        raise ValueError(f"DraftBatch row {row} has padding between valid tokens; pad on one side only, or pack "
                         "several sequences in a row by passing DraftBatch.positions (restarting per sequence)")
    segment = torch.where(valid, starts.long().cumsum(1) - 1, -1)
    col = torch.arange(t, device=valid.device).expand(b, t)
    seg_start = torch.where(starts | ~valid, col, 0).cummax(1).values
    next_valid = F.pad(valid[:, 1:], (0, 1), value=False)
    next_start = F.pad(starts[:, 1:], (0, 1), value=False)
    ends = valid & (~next_valid | next_start)
    spans = [(r, s, e + 1) for (r, s), (_, e) in zip(starts.nonzero().tolist(), ends.nonzero().tolist())]
    right_padded = bool((counts <= 1).all()) and not bool(starts[:, 1:].any())
    return Layout(pos, segment, seg_start, spans, right_padded)


def _sdpa_ok(q: torch.Tensor) -> bool:
    """SDPA's causal kernel runs GQA in O(T) memory on CPU, and on CUDA in fp16/bf16 (flash);
    fp32 on CUDA would fall back to the math kernel (T x T), so it takes the chunked path."""
    return q.device.type == "cpu" or q.dtype in (torch.float16, torch.bfloat16)


def causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: Layout,
                  chunk_elements: int | None = None) -> torch.Tensor:
    """Step-1 attention: each query over the keys of its own sequence up to itself.

    q: [B, Hq, T, D]; k, v: [B, Hkv, T, D]. Returns [B, T, Hq*D] (zeros at padding when rows
    are not right-padded). Memory O(T H): SDPA's causal kernel, no mask.
    """
    if not _sdpa_ok(q):
        return ttt_attend(q, k, v, [], [], lay, chunk_elements)
    sdpa = lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)  # noqa: E731
    if lay.right_padded:  # a valid query at i sees keys 0..i, all valid
        return rearrange(sdpa(q, k, v), "b h t d -> b t (h d)")
    b, heads, t, d = q.shape
    rows: list[list[torch.Tensor]] = [[] for _ in range(b)]
    ends = [0] * b
    for r, s, e in lay.spans:
        if s > ends[r]:
            rows[r].append(q.new_zeros(heads, s - ends[r], d))
        rows[r].append(sdpa(q[r:r + 1, :, s:e], k[r:r + 1, :, s:e], v[r:r + 1, :, s:e])[0])
        ends[r] = e
    for r in range(b):
        if ends[r] < t:
            rows[r].append(q.new_zeros(heads, t - ends[r], d))
    return rearrange(torch.stack([torch.cat(parts, 1) for parts in rows]), "b h t d -> b t (h d)")


def _chunk(qc: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, segment: torch.Tensor, s: int, lo: int,
           ek: torch.Tensor | None, ev: torch.Tensor | None) -> torch.Tensor:
    """Queries s..s+c-1 over step-1 keys lo..s+c-1 (causal, same sequence) and their diagonal keys.

    qc: [B, h, g, c, D]; k1, v1: [B, h, T, D]; segment: [B, T]; ek, ev: [J, B, h, c, D] or None.
    Returns [B, h, g, c, D].
    """
    e = s + qc.shape[3]
    scale = qc.shape[-1] ** -0.5
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qc, k1[:, :, lo:e]).float() * scale  # [B, h, g, c, e-lo]
    qi = torch.arange(s, e, device=qc.device)
    ki = torch.arange(lo, e, device=qc.device)
    seg_q, seg_k = segment[:, s:e, None], segment[:, None, lo:e]
    causal = ki[None, None, :] <= qi[None, :, None]
    allowed = (seg_q == seg_k) & (seg_k >= 0) & causal  # [B, c, e-lo]
    allowed |= (seg_q < 0) & (ki[None, None, :] == qi[None, :, None])  # a pad query sees itself: no empty row
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    if ek is not None:
        diag = torch.einsum("bhgqd,jbhqd->bhgqj", qc, ek).float() * scale  # [B, h, g, c, J]
        scores = torch.cat([scores, diag], -1)
    probs = scores.softmax(-1).to(v1.dtype)  # one softmax = log-sum-exp merge of both parts
    n = e - lo
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs[..., :n], v1[:, :, lo:e])
    if ev is not None:
        out = out + torch.einsum("bhgqj,jbhqd->bhgqd", probs[..., n:], ev)
    return out


def ttt_attend(q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, extra_k: list[torch.Tensor],
               extra_v: list[torch.Tensor], lay: Layout, chunk_elements: int | None = None) -> torch.Tensor:
    """Draft step k = len(extra_k) + 1: causal step-1 keys of the query's sequence plus the
    diagonal keys of steps 2..k at the same base.

    q: [B, Hq, T, D]; k1, v1: [B, Hkv, T, D] step-1 keys/values; extra_k, extra_v: k-1 tensors
    [B, Hkv, T, D] (steps 2..k). Returns [B, T, Hq*D]; a padding query (segment -1) sees its
    own key only. Memory O(B Hq c T + K T H), c = chunk_elements // (B Hq T) (chunk_elements
    None = ATTN_CHUNK_ELEMENTS, or ATTN_CHUNK_ELEMENTS_CUDA on CUDA).
    """
    b, heads, t, d = q.shape
    groups = heads // k1.shape[1]
    c = max(1, min(t, chunk_budget(q.device, chunk_elements) // max(1, b * heads * t)))
    qg = rearrange(q, "b (h g) t d -> b h g t d", g=groups)
    ek = torch.stack(extra_k) if extra_k else None  # [J, B, h, T, D]
    ev = torch.stack(extra_v) if extra_v else None
    starts = list(range(0, t, c))
    los = lay.seg_start[:, starts].min(0).values.tolist()  # first key any query of the chunk may see
    pieces = zip(qg.split(c, 3), *(x.split(c, 3) for x in (ek, ev) if x is not None))
    outs = []
    for s, lo, (qc, *extra) in zip(starts, los, pieces):
        eks, evs = (extra[0], extra[1]) if extra else (None, None)
        args = (qc, k1, v1, lay.segment, s, lo, eks, evs)
        if torch.is_grad_enabled():
            outs.append(checkpoint(_chunk, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            outs.append(_chunk(*args))
    return rearrange(torch.cat(outs, 3), "b h g t d -> b t (h g d)")
