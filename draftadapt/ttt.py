"""Training-time test (TTT): unroll K EAGLE-3 draft steps exactly as vLLM runs them, score each
step against the target.

vLLM's proposer runs step 1 over every context position (KV cache filled from the target's aux
states), then steps 2..K for the last position only, feeding the layer's own pre-norm output
back as the hidden state, one position further each step. At step k a query from base position i
therefore sees the step-1 keys at 0..i of its sequence plus the keys of steps 2..k from the same
base. `unroll` runs that for every base i at once with a block-diagonal mask over concatenated
per-step keys (O(K T^2) memory: fine for T <= 512). Inputs at later steps are the ground-truth
tokens. Gradients reach only the draft: the target embedding is read detached.

The native MTP draft (`drafts/mtp.py`) runs the same way in vLLM (its layer 0 at every step, its
own output fed back), so the same unroll trains it: step 1 reads the target's pre-norm last
hidden state instead of fused aux states.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .batch import DraftBatch
from .drafts.eagle3 import Eagle3Draft, attend
from .drafts.mtp import MTPDraft


class TTTResult(NamedTuple):
    loss: torch.Tensor  # []: sum_k decay^(k-1) * step_loss[k], differentiable
    step_loss: torch.Tensor  # [K] float: mean KL(teacher || draft) over the draft vocab, per step
    step_acc: torch.Tensor  # [K] float: draft top-1 == teacher top-1, per step
    step_tokens: torch.Tensor  # [K] int64: positions scored at each step


def shift(x: torch.Tensor, k: int) -> torch.Tensor:
    """x[:, k:] padded back to length T with zeros: position i holds x[i+k]. x: [B, T, ...]."""
    return torch.cat([x[:, k:], x.new_zeros((x.shape[0], min(k, x.shape[1]), *x.shape[2:]))], dim=1)


def unroll(draft: Eagle3Draft | MTPDraft, batch: DraftBatch, embed: nn.Embedding | torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Draft logits for steps 1..K at every base position: K tensors [B, T, Vd].

    Step k at base i reads token input_ids[i+k] at RoPE position i+k-1 and predicts token i+k+1.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    weight = (embed.weight if isinstance(embed, nn.Module) else embed).detach()  # [V, H] frozen
    valid = batch.valid
    b, t = valid.shape
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # [B, T] position inside the sequence
    eye = torch.eye(t, dtype=torch.bool, device=valid.device).expand(b, t, t)
    causal = (torch.ones(t, t, dtype=torch.bool, device=valid.device).tril() & valid[:, None, :]) | eye
    hidden = draft.fuse(batch.final_hidden if isinstance(draft, MTPDraft) else batch.aux_hidden)  # [B, T, H]
    keys, values, logits = [], [], []
    for k in range(1, steps + 1):
        tok = F.embedding(shift(batch.input_ids, k), weight).to(hidden.dtype)  # [B, T, H]
        q, key, value, residual = draft.midlayer.project(tok, hidden, pos + (k - 1))
        keys.append(key)
        values.append(value)
        mask = torch.cat([causal] + [eye] * (k - 1), dim=-1)  # [B, T, k*T]
        hidden = draft.midlayer.finish(attend(q, torch.cat(keys, 2), torch.cat(values, 2), mask), residual)
        logits.append(draft.logits(hidden))
    return logits


def ttt_loss(draft: Eagle3Draft | MTPDraft, batch: DraftBatch, embed: nn.Embedding | torch.Tensor, steps: int = 3,
             decay: float = 0.8) -> TTTResult:
    """Forward KL to the teacher renormalised over the draft vocab, step k weighted decay^(k-1).

    Step k at base i is scored against teacher_logprobs[i+k] where loss_mask[i+k] and both i and
    i+k are real positions. K=1 is plain single-step training.
    """
    losses, accs, counts = [], [], []
    scored = batch.loss_mask & batch.valid
    for k, logit in enumerate(unroll(draft, batch, embed, steps), start=1):
        sel = shift(scored, k) & batch.valid  # [B, T]: base i counts if i and i+k do
        rows, cols = sel.nonzero(as_tuple=True)
        teacher = batch.teacher_logprobs[rows, cols + k].float().log_softmax(-1)  # [N, Vd] renormalised
        logq = logit[sel].float().log_softmax(-1)  # [N, Vd]
        p = teacher.exp()
        kl = -(p * logq).sum(-1) - torch.special.entr(p).sum(-1)  # [N]
        n = int(sel.sum())
        losses.append(kl.sum() / max(n, 1))
        accs.append((logq.argmax(-1) == teacher.argmax(-1)).float().sum() / max(n, 1))
        counts.append(n)
    loss = sum(decay ** (k - 1) * step for k, step in enumerate(losses, start=1))
    return TTTResult(loss=loss, step_loss=torch.stack(losses).detach(), step_acc=torch.stack(accs).detach(),
                     step_tokens=torch.tensor(counts))
