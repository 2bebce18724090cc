"""The TTT objective over the draft vocabulary, in chunks of positions, gradient computed on the fly.

`head_loss` takes the head inputs of every scored position of every draft step at once (N rows),
and for each chunk of n rows computes the logits [n, Vd], their log-softmax, the divergence to the
teacher renormalised over the draft vocab (KL, TV, both, or top-1 cross-entropy) and its gradient with respect to the
logits, which it turns at once into the gradient of the head input (rows [n, H]) and of the head
weight (accumulated [Vd, H]). So no [N, Vd] tensor ever exists, logits are computed once (no
recompute in backward), and backward only scales the stored gradients.

Memory O(n Vd + N H + Vd H) with n = chunk_elements // Vd; time O(N H Vd) x 3 (logits, d input,
d weight; the weight gradient is skipped for a frozen head such as MTP's shared one).

Gradients of the logits z (q = softmax z, p the renormalised teacher, per row):
  KL(p || q) = sum p (log p - log q):    dKL/dz = q - p
  TV = 0.5 sum |p - q|, s = 0.5 sign(q - p):    dTV/dz_i = q_i (s_i - sum_j q_j s_j)
  top1 = -log q(argmax p):    dtop1/dz = q - onehot(argmax p)
"top1" is the loss matched to GREEDY drafting (vLLM's default): a greedy draft token is accepted with the target's
probability of the draft's argmax, so what counts is where q's argmax lands, not q's shape; TV is the match for a
draft that samples from q (acceptance = 1 - TV).
"""
from __future__ import annotations

from typing import Callable

import torch

TeacherReader = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows [n], cols [n]) -> [n, Vd] log-probs

LOSSES = ("kl", "tv", "kl+tv", "top1")
LOSS_CHUNK_ELEMENTS = 1 << 22  # rows x Vd per chunk: 16 MiB per fp32 [n, Vd] tensor


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, teacher, rows, cols, step, row_weight, loss, tv_weight, n_rows, steps):
        auto = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if auto else weight.dtype
        w = weight.to(device=x.device, dtype=dtype)  # [Vd, H], cast once
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if want_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if want_w else None
        stats = torch.zeros(steps, 4, dtype=torch.float32, device=x.device)  # per step sums: kl, tv, hits, obj*rw
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for a in range(0, x.shape[0], n_rows):
            b = min(a + n_rows, x.shape[0])
            xc = x[a:b].to(dtype)  # [n, H]
            logq = (xc @ w.T).float().log_softmax(-1)  # [n, Vd]
            logp = teacher(rows[a:b], cols[a:b]).float().log_softmax(-1)  # [n, Vd] renormalised
            p, q = logp.exp(), logq.exp()
            kl = -(p * logq).sum(-1) - torch.special.entr(p).sum(-1)  # [n]
            tv = 0.5 * (q - p).abs().sum(-1)  # [n]
            hits = (logq.argmax(-1) == logp.argmax(-1)).float()
            top = logp.argmax(-1, keepdim=True)  # [n, 1] the teacher's top draft id
            obj = (kl if loss == "kl" else tv if loss == "tv" else kl + tv_weight * tv if loss == "kl+tv"
                   else -logq.gather(-1, top).squeeze(-1))
            rw = row_weight[a:b]
            stats.index_add_(0, step[a:b], torch.stack([kl, tv, hits, obj * rw], 1))
            total += (obj * rw).sum()
            if not (want_x or want_w):
                continue
            if loss == "top1":
                gz = q.clone()
                gz.scatter_add_(-1, top, -torch.ones_like(top, dtype=q.dtype))
            else:
                gz = (q - p) if loss != "tv" else torch.zeros_like(q)
            if loss in ("tv", "kl+tv"):
                s = 0.5 * torch.sign(q - p)
                gz = gz + (1.0 if loss == "tv" else tv_weight) * q * (s - (q * s).sum(-1, keepdim=True))
            gz = (gz * rw[:, None]).to(dtype)  # [n, Vd]
            if want_x:
                grad_x[a:b] = (gz @ w).to(x.dtype)
            if want_w:
                grad_w += (gz.T @ xc).float()
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, g_total, g_stats):
        grad_x, grad_w = ctx.saved_tensors
        gx = None if grad_x is None else grad_x * g_total.to(grad_x.dtype)
        gw = None if grad_w is None else (grad_w * g_total).to(ctx.weight_dtype)
        return gx, gw, None, None, None, None, None, None, None, None, None


def head_loss(x: torch.Tensor, weight: torch.Tensor, teacher: torch.Tensor | TeacherReader, rows: torch.Tensor,
              cols: torch.Tensor, step: torch.Tensor, row_weight: torch.Tensor, steps: int, loss: str = "kl",
              tv_weight: float = 1.0, chunk_elements: int = LOSS_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_r row_weight[r] * objective(teacher[rows[r], cols[r]], softmax(x[r] @ weight.T)), and
    per-step sums [steps, 4] of KL, TV, top-1 hits and row_weight * objective (no grad).

    x: [N, H] head inputs (differentiable); weight: [Vd, H] the head (a parameter, or a frozen
    tensor); teacher: [B, T, Vd] log-probs, or a reader (rows, cols) -> [n, Vd] called once per
    chunk (e.g. `batch.teacher_dense` over a top-k teacher, so no [B, T, Vd] teacher ever exists);
    rows, cols, step: [N] int64; row_weight: [N] float. loss: one of LOSSES ("kl+tv" = kl + tv_weight * tv,
    "top1" = cross-entropy to the teacher's argmax over the draft vocab).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}; choose one of {LOSSES}")
    if isinstance(teacher, torch.Tensor):
        teacher = _indexer(teacher)
    n_rows = max(1, chunk_elements // weight.shape[0])
    return _HeadLoss.apply(x, weight, teacher, rows, cols, step, row_weight.float(), loss, tv_weight, n_rows, steps)


def _indexer(teacher: torch.Tensor) -> TeacherReader:
    return lambda rows, cols: teacher[rows, cols]
