"""Distillation of a `DraftLM` (a small external draft LM) from the policy's captured log-probs:
the loss, the trainer step, the teacher-only capture, and offline training.

The draft LM reads token ids only, so from the policy's log-prob recompute it needs nothing but
the teacher: `TeacherCapture` keeps the policy's next-token log-probs and no hidden state. The
teacher choice (`default_teacher`):
- full vocabulary (`teacher="draft_vocab"`, the draft vocab being the full vocab) while V is
  small: 4 V bytes/token in fp32 (toy V=1,147: 4.6 KB/token);
- top-k (`teacher="topk"`, k=64) at large vocabularies: k x (8 + 4) = 768 bytes/token (a full
  fp32 teacher at V=151,936 would be 608 KB/token). The KL is then over the k kept ids,
  renormalised: the mass outside them is dropped (at k=64 it is typically < 1% of the mass).

Teacher-forced on the policy's own rollouts: position i predicts token i+1, scored against the
policy's distribution there (what vLLM's rejection sampler compares the draft with). No unroll:
unlike EAGLE-3 the draft LM feeds back tokens, not its own hidden states, so its k-th draft step
is the same computation as its first on a longer prefix.

It does not know about engines; `DistillLoss` is what `DraftTrainer` steps a DraftLM with (drafts/kinds.py).
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch
from torch import nn

from .batch import DraftBatch, teacher_dense
from .capture import FeatureCapture
from .drafts.draft_lm import DraftLM
from .head_loss import LOSS_CHUNK_ELEMENTS, head_loss
from .trainer import DraftTrainer, TrainerConfig, TrainStats
from .ttt import TTTResult

FULL_TEACHER_MAX_VOCAB = 8192  # above this, a full fp32 teacher costs > 32 KB/token: use top-k
DEFAULT_TOP_K = 64


class DistillResult(NamedTuple):
    loss: torch.Tensor  # []: mean KL(teacher || draft) over scored positions, differentiable
    acc: torch.Tensor  # []: draft top-1 == teacher top-1
    tokens: int  # positions scored


def default_teacher(vocab_size: int, top_k: int = DEFAULT_TOP_K) -> tuple[str, int]:
    """(teacher, top_k) for AdapterConfig / FeatureCapture: the full vocab while it is small, else top-k."""
    return ("draft_vocab", 0) if vocab_size <= FULL_TEACHER_MAX_VOCAB else ("topk", top_k)


def teacher_bytes_per_token(vocab_size: int, teacher: str, top_k: int = 0) -> int:
    """Bytes one position's teacher occupies in the cache (fp32 log-probs, int64 ids)."""
    return 4 * vocab_size if teacher == "draft_vocab" else 12 * top_k


def distill_loss(draft: DraftLM, batch: DraftBatch, chunk_elements: int = LOSS_CHUNK_ELEMENTS) -> DistillResult:
    """Forward KL from the teacher (renormalised over the ids it kept) to the draft LM, mean over
    positions where loss_mask & valid. Memory: the draft's [B, T, H] hidden states plus one chunk of
    n = chunk_elements // V positions' logits at a time: `head_loss` computes the head's gradient
    with each chunk's logits, so no [N, V] tensor is kept for backward; the teacher (densified from
    top-k when it is one) is read per chunk too."""
    scored = batch.loss_mask & batch.valid  # [B, T]
    hidden = draft.hidden(batch.input_ids, batch.valid)[scored]  # [N, H]
    rows, cols = scored.nonzero(as_tuple=True)  # [N]: the teacher is read per chunk (dense or top-k)
    n = hidden.shape[0]
    if n == 0:
        zero = hidden.sum() * 0.0
        return DistillResult(zero, zero.detach(), 0)
    head = draft.lm.lm_head
    assert getattr(head, "bias", None) is None, "head_loss takes a bias-free linear head"
    teacher = lambda r, c: teacher_dense(batch, r, c)  # noqa: E731 - [n, V] per chunk, dense or top-k
    loss, sums = head_loss(hidden, head.weight, teacher, rows, cols, torch.zeros_like(rows),
                           torch.full((n,), 1.0 / n, device=hidden.device), 1, "kl", chunk_elements=chunk_elements)
    return DistillResult(loss, sums[0, 2] / n, n)


class DistillLoss:
    """`distill_loss` as a trainer.LossFn: the draft-LM kind's default loss (drafts/kinds.py). `embed` is
    unused (the draft LM owns its embedding); a data-parallel normaliser is not supported."""

    @classmethod
    def from_config(cls, config: TrainerConfig) -> "DistillLoss":
        return cls()

    def __call__(self, draft: DraftLM, batch: DraftBatch, embed=None, normalizer: torch.Tensor | None = None) -> TTTResult:
        if normalizer is not None:
            raise ValueError("the draft-LM distillation loss has no data-parallel form yet: train a DraftLM with "
                             "DistributedDraftAdapter(mode='owner'), not mode='data_parallel'")
        res = distill_loss(draft, batch)
        return TTTResult(res.loss, res.loss.detach().reshape(1), res.acc.reshape(1), torch.tensor([res.tokens]))


class TeacherCapture(FeatureCapture):
    """FeatureCapture that keeps only the teacher (a draft LM reads no hidden state).

    The final norm's output is recorded as a zero-width view [B, T, 0], so no hidden state is
    copied, and the packed batch carries aux_hidden [N, 0] and no final_hidden.
    """

    def __init__(self, model: nn.Module, teacher: str = "draft_vocab", top_k: int = 0, **kw) -> None:
        if teacher == "final_hidden":
            raise ValueError("a draft LM distils from logits: use teacher='draft_vocab' (full vocab) or 'topk'")
        super().__init__(model, aux_layer_ids=(), teacher=teacher, top_k=top_k, capture_final_hidden=True, **kw)

    def _grab_final(self, module, args, output) -> None:
        if self._current is not None and "final" not in self._current:
            self._current["final"] = self._ref(output[..., :0])  # a reference: rows are gathered later

    def rollout_batch(self, *args, **kwargs):
        batch = super().rollout_batch(*args, **kwargs)
        batch.final_hidden = None
        return batch


def train_draft_lm_offline(policy: nn.Module, draft: DraftLM, sequences: list[list[int]], steps: int,
                           loss_masks: list[list[bool]] | None = None, config: TrainerConfig = TrainerConfig(),
                           batch_size: int = 32, top_k: int | None = None, seed: int = 0,
                           progress: bool = True) -> list[TrainStats]:
    """Distil `draft` from the frozen `policy` on token sequences (e.g. the policy's own samples):
    teacher log-probs from a no-grad policy forward per batch, then one distillation step.
    `top_k`: None = `default_teacher(V)`. Returns the per-step stats."""
    from tqdm.auto import tqdm

    teacher, k = default_teacher(draft.config.vocab_size) if top_k is None else (("topk", top_k) if top_k else
                                                                                ("draft_vocab", 0))
    trainer = DraftTrainer(draft, None, config)  # the draft-LM kind's loss: DistillLoss
    gen = torch.Generator().manual_seed(seed)
    history: list[TrainStats] = []
    bar = tqdm(range(steps), disable=not progress, desc="draft LM")
    policy.eval()
    for _ in bar:
        idx = torch.randperm(len(sequences), generator=gen)[:batch_size].tolist()
        seqs = [sequences[i] for i in idx]
        t = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), t, dtype=torch.long)
        am = torch.zeros(len(seqs), t, dtype=torch.bool)
        cm = torch.zeros(len(seqs), t, dtype=torch.bool)
        for r, (i, s) in enumerate(zip(idx, seqs)):
            ids[r, :len(s)], am[r, :len(s)] = torch.tensor(s), True
            m = loss_masks[i] if loss_masks is not None else [True] * len(s)
            cm[r, 1:len(s)] = torch.tensor(m[:len(s) - 1])  # loss mask at n (next token) -> completion at n+1
        t0 = time.perf_counter()
        with TeacherCapture(policy, teacher=teacher, top_k=k) as cap, torch.no_grad():
            policy(input_ids=ids, attention_mask=am.long())
        batch = cap.rollout_batch(ids, am, cm).to_draft_batch(draft.target_ids().cpu(), sparse_teacher=True)
        history.append(trainer.step(batch))
        bar.set_postfix(loss=f"{history[-1].loss:.3f}", acc=f"{history[-1].step_acc[0]:.2f}",
                        s=f"{time.perf_counter() - t0:.2f}")
    return history
