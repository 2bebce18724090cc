"""The two batch types: `RolloutBatch` (captured target features, packed) and `DraftBatch` (the
padded training batch every draft trainer consumes).

They are the contract between the feature side (capture, cache) and the training side (TTT loss,
trainer): `RolloutBatch.to_draft_batch` turns one into the other. Nothing here imports a model or
an engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

TEACHERS = ("draft_vocab", "topk", "final_hidden")
# Log-prob of a draft id a top-k teacher did not keep (and of padding): exp() is exactly 0 in
# fp32, yet finite, so KL terms p * (log p - log q) give 0 and never 0 * inf = nan.
MISSING_LOGPROB = -1e4
_CHUNK_ELEMENTS = 1 << 26  # logits upcast to fp32 at most this many elements at a time (256 MiB)
# teacher="auto" (capture, offline features): the dense draft-vocab teacher up to this draft vocab (<= 32 KB/token
# in fp32), top-k above it
AUTO_DENSE_MAX_VOCAB = 8192
AUTO_TOP_K = 64  # ids kept by an automatic top-k teacher: 64 x (8 B id + 4 B log-prob) = 768 B/token
# ... where the vocab refresh may re-target a draft vocab <= AUTO_DENSE_MAX_VOCAB, "auto" keeps top-k target ids
# instead of the dense teacher (to outlive a refresh): k = the draft vocab size, at least AUTO_TOP_K and at most
# this (the toy's 512-id draft vocab: top-64 holds 96-98% of its policy's mass at T=1, top-512 99.9%)
AUTO_REFRESH_MAX_TOP_K = 1024


@dataclass
class DraftBatch:
    """Target features for B sequences (or windows of them), right-padded to T positions.

    Position t describes the target after reading tokens 0..t: its aux hidden states there and
    its distribution over token t+1. The teacher is dense (`teacher_logprobs`) or top-k
    (`teacher_topk_*`, draft ids): read it with `teacher_dense(batch, rows, cols)` either way.
    """

    input_ids: torch.Tensor  # [B, T] int64: target token ids (pad anywhere valid is False)
    aux_hidden: torch.Tensor  # [B, T, 3*H_t] float: target aux hidden states (low, mid, high)
    teacher_logprobs: torch.Tensor | None  # [B, T, Vd] float: target log p(token t+1 = draft id d),
    #   the full-vocab log-probs gathered at the draft vocab (not renormalised); None with a top-k teacher
    loss_mask: torch.Tensor  # [B, T] bool: the teacher at t is a training target
    #   (a completion position, not padding, the target's top token is in the draft vocab)
    valid: torch.Tensor  # [B, T] bool: real (non-pad) positions; attention never crosses them
    final_hidden: torch.Tensor | None = None  # [B, T, H_t] float: target last hidden state
    #   (post-norm), for native MTP heads; None when not captured
    policy_version: int = 0  # version of the policy that produced these features
    positions: torch.Tensor | None = None  # [B, T] int64: true RoPE position of each token in its sequence
    #   (a window of a long sequence starts past 0; packed sequences restart theirs); None = 0, 1, ... per row
    teacher_topk_ids: torch.Tensor | None = None  # [B, T, K] int64: draft ids of the target's top-k, -1 = outside
    teacher_topk_logprobs: torch.Tensor | None = None  # [B, T, K] float: their full-vocab log-probs
    draft_vocab_size: int = 0  # Vd, needed to densify a top-k teacher
    teacher_head: "HeadTeacher | None" = None  # the teacher from final_hidden through the frozen target head,
    #   computed per chunk of positions (`teacher_dense`); None with a stored teacher

    def __post_init__(self) -> None:
        b, t = self.input_ids.shape
        for name in ("aux_hidden", "teacher_logprobs", "loss_mask", "valid", "final_hidden", "positions",
                     "teacher_topk_ids", "teacher_topk_logprobs"):
            x = getattr(self, name)
            if x is not None and tuple(x.shape[:2]) != (b, t):
                raise ValueError(f"DraftBatch.{name} has leading shape {tuple(x.shape[:2])}, input_ids has {(b, t)}")
        if sum(x is not None for x in (self.teacher_logprobs, self.teacher_topk_ids, self.teacher_head)) != 1:
            raise ValueError("DraftBatch needs exactly one teacher: teacher_logprobs, teacher_topk_ids + "
                             "teacher_topk_logprobs (with draft_vocab_size), or teacher_head (with final_hidden)")
        if self.teacher_head is not None and self.final_hidden is None:
            raise ValueError("a DraftBatch teacher_head reads final_hidden; pass final_hidden [B, T, H_t]")
        if self.teacher_topk_ids is not None and (self.teacher_topk_logprobs is None or self.draft_vocab_size < 1):
            raise ValueError("a top-k DraftBatch teacher needs teacher_topk_logprobs and draft_vocab_size >= 1")

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())

    def to(self, device: torch.device | str) -> "DraftBatch":
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return DraftBatch(**fields)


def teacher_dense(batch: DraftBatch, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[M, Vd] fp32 teacher log-probs at positions (rows[m], cols[m]): dense, densified from top-k
    (missing ids get MISSING_LOGPROB), or from final_hidden through the target head. Call it per chunk of
    positions: memory O(M Vd) (the head: O(M V) logits), never B T Vd."""
    if batch.teacher_logprobs is not None:
        return batch.teacher_logprobs[rows, cols].float()
    if batch.teacher_head is not None:
        return batch.teacher_head(batch.final_hidden[rows, cols]).logprobs
    ids, lps = batch.teacher_topk_ids[rows, cols], batch.teacher_topk_logprobs[rows, cols].float()  # [M, K]
    out = torch.full((ids.shape[0], batch.draft_vocab_size + 1), MISSING_LOGPROB, device=ids.device)
    out.scatter_(1, torch.where(ids >= 0, ids, batch.draft_vocab_size), lps)  # column Vd collects the -1s
    return out[:, :-1]


def _check(t, name: str, shape: tuple, dtype, fix: str) -> None:
    """Raise ValueError naming `name` unless `t` has `shape` (None = any size) and `dtype`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"RolloutBatch.{name} must be a tensor, got {type(t).__name__}; {fix}")
    ok_shape = t.dim() == len(shape) and all(s is None or s == g for s, g in zip(shape, t.shape))
    ok_dtype = t.is_floating_point() if dtype == "float" else t.dtype == dtype
    if not (ok_shape and ok_dtype):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + f"] {dtype}"
        raise ValueError(f"RolloutBatch.{name} is {list(t.shape)} {t.dtype}, expected {want}; {fix}")


class Teacher(NamedTuple):
    """The target's next-token distribution in the form the draft trains on (M rows)."""

    logprobs: torch.Tensor | None  # [M, Vd] fp32: full-vocab log-probs at the draft vocab ids
    topk_ids: torch.Tensor | None  # [M, K] int64: target ids of the K most likely tokens
    topk_logprobs: torch.Tensor | None  # [M, K] fp32: their full-vocab log-probs
    top_in_draft: torch.Tensor  # [M] bool: the target's top token is in the draft vocab


@torch.no_grad()
def teacher_from_logits(logits: torch.Tensor, draft_vocab_ids: torch.Tensor | None = None,
                        top_k: int = 0, rows: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> Teacher:
    """Teacher from logits [M, V] (or from rows `rows` [M] int64 of logits [R, V]): log-probs at
    `draft_vocab_ids` (all V ids when None) or top-k, stored in `dtype` (None: fp32).

    Rows are gathered and upcast to fp32 in chunks of _CHUNK_ELEMENTS // V and written into the result, so no
    [M, V] copy exists: memory O(chunk V) plus the result (O(M k), or one O(M Vd) for a draft-vocab teacher).
    """
    v, dev = logits.shape[-1], logits.device
    ids = None if draft_vocab_ids is None else draft_vocab_ids.to(dev)
    in_draft = torch.ones(v, dtype=torch.bool, device=dev)
    if ids is not None:
        in_draft = torch.zeros_like(in_draft).index_fill_(0, ids, True)
    logits, c = logits.detach(), max(1, _CHUNK_ELEMENTS // v)
    m = logits.shape[0] if rows is None else rows.numel()
    chunks = logits.split(c) if rows is None else (logits.index_select(0, r) for r in rows.to(dev).split(c))
    dtype, top_k = dtype or torch.float32, min(top_k, v)  # a vocab smaller than k: every id, sorted
    top_ok = torch.empty(m, dtype=torch.bool, device=dev)
    if top_k:
        lp, idx = torch.empty(m, top_k, dtype=dtype, device=dev), torch.empty(m, top_k, dtype=torch.long, device=dev)
    else:
        lp, idx = torch.empty(m, v if ids is None else ids.numel(), dtype=dtype, device=dev), None
    a = 0
    for x in chunks:
        x, b = x.float(), a + x.shape[0]
        lse = x.logsumexp(-1, keepdim=True)
        top_ok[a:b] = in_draft[x.argmax(-1)]
        if top_k:
            val, idx[a:b] = x.topk(top_k, dim=-1)  # sorted: column 0 is the top token
            lp[a:b] = val - lse
        else:
            lp[a:b] = (x if ids is None else x.index_select(-1, ids)) - lse
        a = b
    return Teacher(None if top_k else lp, idx, lp if top_k else None, top_ok)


class HeadTeacher:
    """The teacher of hidden states [M, H_t] through the frozen target head, in chunks of _CHUNK_ELEMENTS // V
    rows: memory O(chunk V), never [M, V]. `__call__` returns a `Teacher` (draft-vocab log-probs, top check) on
    the hidden states' device."""

    def __init__(self, target_head: nn.Module, draft_vocab_ids: torch.Tensor | None = None, top_k: int = 0):
        self.head, self.ids, self.top_k = target_head, draft_vocab_ids, top_k  # top_k > 0: a top-k Teacher
        w = next(target_head.parameters(), None)
        self.weight = w if w is not None and w.dim() == 2 else None  # [V, H_t] of a Linear head

    def _chunks(self, hidden: torch.Tensor):
        rows = max(1, _CHUNK_ELEMENTS // self.weight.shape[0]) if self.weight is not None else 1024
        for h in hidden.split(rows):
            if self.weight is not None:
                h = h.to(device=self.weight.device, dtype=self.weight.dtype)
            yield teacher_from_logits(self.head(h), self.ids, self.top_k)

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> Teacher:
        parts = list(self._chunks(hidden))
        return Teacher(*(None if col[0] is None else torch.cat(col).to(hidden.device) for col in zip(*parts)))

    @torch.no_grad()
    def top_in_draft(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M] bool: the target's top token is in the draft vocab (no teacher kept)."""
        return torch.cat([t.top_in_draft for t in self._chunks(hidden)]).to(hidden.device)


@dataclass
class RolloutBatch:
    """Target features of B sequences packed back to back (N tokens in all).

    Position n describes the target after reading its sequence up to token n: the aux hidden
    states there and a teacher for token n+1 (draft-vocab log-probs, top-k, or the final hidden
    state for the frozen target head). `loss_mask[n]` is the EAGLE-3 training mask: token n+1 is
    a completion token and the target's top token at n is in the draft vocab (for a final_hidden
    teacher that check is applied by `to_draft_batch`, when the head gives the logits).
    """

    input_ids: torch.Tensor  # [N] int64: target token ids, sequences back to back
    cu_seqlens: torch.Tensor  # [B+1] int64: sequence b is rows cu_seqlens[b]:cu_seqlens[b+1]
    aux_hidden: torch.Tensor  # [N, 3*H_t] bf16/fp16/fp32: residual entering the 3 aux layers
    loss_mask: torch.Tensor  # [N] bool: the teacher at n is a training target
    policy_version: int = 0  # version of the policy that produced these features
    teacher_logprobs: torch.Tensor | None = None  # [N, Vd] float: log p(draft id), not renormalised
    teacher_topk_ids: torch.Tensor | None = None  # [N, K] int64: target ids of the top-k tokens
    teacher_topk_logprobs: torch.Tensor | None = None  # [N, K] float: their full-vocab log-probs
    final_hidden: torch.Tensor | None = None  # [N, H_t] float: last hidden state, post-norm (pre-norm when
    #   captured with final_prenorm=True, what a native MTP draft reads); aux_hidden is [N, 0] without aux layers
    positions: torch.Tensor | None = None  # [N] int64: position of each token in its sequence (a window of a
    #   long sequence starts past 0); None = 0, 1, ... per row
    priority: torch.Tensor | None = None  # [B] float64: step-reservoir priority of each row (budget.py);
    #   None = not drawn (a batch captured without a budget)
    completion: torch.Tensor | None = None  # [N] bool: token n is a completion token (capture sets it from the
    #   completion mask; loss_mask cannot tell, it is False where the target's top token is outside the draft vocab).
    #   The vocab refresh counts these tokens; the cache drops the field (None = counted from loss_mask)

    def __post_init__(self) -> None:
        _check(self.input_ids, "input_ids", (None,), torch.int64, "pack the sequences' ids into one [N] int64")
        n, width = self.input_ids.shape[0], getattr(self.aux_hidden, "shape", (0, 0))[-1]
        k = getattr(self.teacher_topk_ids, "shape", (0, None))[-1]
        rules = (("cu_seqlens", (None,), torch.int64, "pass [0, len_0, len_0+len_1, ..., N] as int64"),
                 ("aux_hidden", (n, None), "float", "concatenate the 3 aux states of each token"),
                 ("loss_mask", (n,), torch.bool, "pass one bool per token"),
                 ("teacher_logprobs", (n, None), "float", "one row of draft-vocab log-probs per token"),
                 ("teacher_topk_ids", (n, None), torch.int64, "one row of K target ids per token"),
                 ("teacher_topk_logprobs", (n, k), "float", "one log-prob per top-k id"),
                 ("final_hidden", (n, width // 3 or None), "float", "capture the last hidden state"),
                 ("positions", (n,), torch.int64, "pass one int64 position per token"),
                 ("priority", (self.cu_seqlens.numel() - 1,), torch.float64, "pass one float64 priority per row"),
                 ("completion", (n,), torch.bool, "pass one bool per token, True for a completion token"))
        for i, (name, shape, dtype, fix) in enumerate(rules):
            if i < 3 or getattr(self, name) is not None:
                _check(getattr(self, name), name, shape, dtype, fix)
        cu = self.cu_seqlens
        if cu.numel() < 1 or int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu.diff() <= 0).any()):
            raise ValueError(f"RolloutBatch.cu_seqlens must rise strictly from 0 to N={n}, got {cu.tolist()[:8]}"
                             "...; drop empty sequences and recompute it")
        if width % 3:
            raise ValueError(f"RolloutBatch.aux_hidden width {width} is not 3*H_t; capture exactly three aux layers")
        if (self.teacher_topk_ids is None) != (self.teacher_topk_logprobs is None):
            raise ValueError("RolloutBatch.teacher_topk_ids and teacher_topk_logprobs come together; pass both")
        if self.teacher_logprobs is None and self.teacher_topk_ids is None and self.final_hidden is None:
            raise ValueError("RolloutBatch has no teacher; pass teacher_logprobs, teacher_topk_* or final_hidden")

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_lens(self) -> torch.Tensor:  # [B] int64
        return self.cu_seqlens.diff()

    def _tensors(self) -> dict:
        """The per-token tensors ([N, ...]); cu_seqlens and the per-row priority are not among them."""
        return {k: v for k, v in vars(self).items()
                if isinstance(v, torch.Tensor) and k not in ("cu_seqlens", "priority")}

    def default_positions(self) -> torch.Tensor:  # [N] int64
        """`positions`, or 0, 1, ... inside each row when None."""
        if self.positions is not None:
            return self.positions
        lens = self.seq_lens
        return torch.arange(self.num_tokens, device=lens.device) - torch.repeat_interleave(self.cu_seqlens[:-1], lens)

    def sequences(self) -> list["RolloutBatch"]:
        """One RolloutBatch per sequence (views into this batch's tensors)."""
        cu = self.cu_seqlens.tolist()
        prio = [None] * (len(cu) - 1) if self.priority is None else self.priority.split(1)
        return [RolloutBatch(**{k: v[a:b] for k, v in self._tensors().items()},
                             cu_seqlens=torch.tensor([0, b - a], device=self.input_ids.device),
                             policy_version=self.policy_version, priority=p)
                for a, b, p in zip(cu[:-1], cu[1:], prio)]

    def select_rows(self, rows: torch.Tensor, lengths: torch.Tensor, priority: torch.Tensor | None = None
                    ) -> "RolloutBatch":
        """A new batch of the packed rows `rows` [M] (e.g. windows, `budget.Windows.rows`), cut into
        sequences of `lengths` [B']; each row keeps its position in its original sequence."""
        rows = rows.to(self.input_ids.device)
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(self.cu_seqlens.device)
        return RolloutBatch(**{k: v[rows] for k, v in self._tensors().items() if k != "positions"},
                            cu_seqlens=cu, positions=self.default_positions()[rows], priority=priority,
                            policy_version=self.policy_version)

    @classmethod
    def concat(cls, batches: list["RolloutBatch"]) -> "RolloutBatch":
        """Pack batches back to back; the result carries the OLDEST policy_version among them."""
        if not batches:
            raise ValueError("RolloutBatch.concat needs at least one batch")
        keys = set(batches[0]._tensors()) - {"positions"}
        if any(set(b._tensors()) - {"positions"} != keys for b in batches):
            raise ValueError("RolloutBatch.concat: batches carry different teacher fields; capture them alike")
        if len({b.priority is None for b in batches}) > 1:
            raise ValueError("RolloutBatch.concat: some batches carry a priority and some do not; sample them alike")
        lens = torch.cat([b.seq_lens.cpu() for b in batches])
        pos = None if all(b.positions is None for b in batches) else torch.cat([b.default_positions() for b in batches])
        return cls(**{k: torch.cat([getattr(b, k) for b in batches]) for k in keys},
                   cu_seqlens=torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(batches[0].input_ids.device),
                   policy_version=min(b.policy_version for b in batches), positions=pos,
                   priority=None if batches[0].priority is None else torch.cat([b.priority for b in batches]))

    def draft_teacher(self, draft_vocab_ids: torch.Tensor | None = None,
                      target_head: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher [N, Vd] fp32 log-probs over the draft vocab, top_in_draft [N] bool).

        Uses teacher_logprobs as stored; maps a top-k teacher through `draft_vocab_ids` (ids it
        did not keep get MISSING_LOGPROB); recomputes from final_hidden with `target_head`.
        """
        n = self.num_tokens
        if self.teacher_logprobs is not None:
            return self.teacher_logprobs.float(), torch.ones(n, dtype=torch.bool, device=self.loss_mask.device)
        if self.teacher_topk_ids is not None:
            ids, d = self.topk_draft_ids(draft_vocab_ids)
            keep = d >= 0
            rows = torch.arange(n, device=d.device)[:, None].expand_as(d)
            out = torch.full((n, ids.numel()), MISSING_LOGPROB, device=d.device)
            out[rows[keep], d[keep]] = self.teacher_topk_logprobs.float()[keep]
            return out, keep[:, 0]
        if target_head is None:
            raise ValueError("a final_hidden teacher needs target_head (the frozen target lm_head)")
        tch = HeadTeacher(target_head, draft_vocab_ids)(self.final_hidden)
        return tch.logprobs, tch.top_in_draft

    def topk_draft_ids(self, draft_vocab_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(draft_vocab_ids [Vd], teacher_topk_ids mapped to draft ids [N, K], -1 where outside the draft vocab)."""
        if draft_vocab_ids is None:
            raise ValueError("a top-k teacher needs draft_vocab_ids (target id of each draft id; "
                             "torch.arange(V) for the full vocab)")
        ids = draft_vocab_ids.to(self.teacher_topk_ids.device)
        size = int(max(ids.max(), self.teacher_topk_ids.max())) + 1
        t2d = torch.full((size,), -1, dtype=torch.long, device=ids.device)  # target id -> draft id or -1
        t2d[ids] = torch.arange(ids.numel(), device=ids.device)
        return ids, t2d[self.teacher_topk_ids]

    def pad(self, x: torch.Tensor, fill: float | bool | int) -> torch.Tensor:
        """[N, ...] packed -> [B, T, ...] right-padded with `fill`."""
        lens = self.seq_lens
        seq = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
        pos = torch.arange(self.num_tokens, device=lens.device) - self.cu_seqlens[seq]
        out = x.new_full((lens.numel(), int(lens.max()), *x.shape[1:]), fill)
        out[seq.to(x.device), pos.to(x.device)] = x
        return out

    def to_draft_batch(self, draft_vocab_ids: torch.Tensor | None = None, target_head: nn.Module | None = None,
                       dtype: torch.dtype = torch.float32, sparse_teacher: bool = False) -> DraftBatch:
        """Pad into the trainer's DraftBatch; floating fields cast to `dtype`. sparse_teacher=True keeps a
        top-k teacher as top-k (draft ids; read it with `teacher_dense`) instead of a dense [B, T, Vd] one, and
        a final_hidden teacher as final_hidden + `HeadTeacher` (the loss runs the target head per chunk)."""
        fh, kw = self.final_hidden, {}
        lazy_head = self.teacher_logprobs is None and self.teacher_topk_ids is None
        if sparse_teacher and lazy_head:
            if target_head is None:
                raise ValueError("a final_hidden teacher needs target_head (the frozen target lm_head)")
            kw = dict(teacher_logprobs=None, teacher_head=HeadTeacher(target_head, draft_vocab_ids))
            top_ok = kw["teacher_head"].top_in_draft(fh)
        elif sparse_teacher and self.teacher_topk_ids is not None:
            ids, d = self.topk_draft_ids(draft_vocab_ids)
            top_ok = d[:, 0] >= 0
            kw = dict(teacher_logprobs=None, teacher_topk_ids=self.pad(d, -1), draft_vocab_size=ids.numel(),
                      teacher_topk_logprobs=self.pad(self.teacher_topk_logprobs.to(dtype), MISSING_LOGPROB))
        else:
            teacher, top_ok = self.draft_teacher(draft_vocab_ids, target_head)
            kw["teacher_logprobs"] = self.pad(teacher.to(dtype), MISSING_LOGPROB)
        return DraftBatch(
            input_ids=self.pad(self.input_ids, 0),
            aux_hidden=self.pad(self.aux_hidden.to(dtype), 0.0),
            loss_mask=self.pad(self.loss_mask & top_ok.to(self.loss_mask.device), False),
            valid=self.pad(torch.ones_like(self.loss_mask), False),
            final_hidden=None if fh is None else self.pad(fh.to(dtype), 0.0),
            policy_version=self.policy_version,
            positions=None if self.positions is None else self.pad(self.positions, 0),
            **kw,
        )
