"""Draft vocabulary: the Vd most frequent target tokens of a corpus, as EAGLE-3's d2t/t2d maps.

Draft ids are the kept target ids in increasing order, so d2t[d] = target_id(d) - d >= 0 and a
full vocabulary (Vd == V) gives d2t == 0 everywhere. Knows nothing about models or checkpoints.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch


class DraftVocab(NamedTuple):
    d2t: torch.Tensor  # [Vd] int64: target_id = draft_id + d2t[draft_id]
    t2d: torch.Tensor  # [V] bool: the target token is in the draft vocab
    counts: torch.Tensor  # [V] int64: corpus frequency of every target token

    @property
    def target_ids(self) -> torch.Tensor:
        """[Vd] int64: target id of every draft id (increasing)."""
        return torch.arange(len(self.d2t)) + self.d2t

    def coverage(self) -> float:
        """Share of corpus tokens that the draft vocab contains."""
        total = int(self.counts.sum())
        return float(self.counts[self.t2d].sum()) / total if total else 0.0


def token_counts(sequences: Iterable[Sequence[int] | torch.Tensor], vocab_size: int) -> torch.Tensor:
    """[V] int64 frequency of every token id over an iterable of id sequences."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        ids = torch.as_tensor(seq, dtype=torch.long).flatten()
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"token id {int(ids.max() if ids.max() >= vocab_size else ids.min())}"
                             f" is outside the vocabulary 0..{vocab_size - 1}")
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def build_draft_vocab(sequences: Iterable[Sequence[int] | torch.Tensor], vocab_size: int,
                      draft_vocab_size: int) -> DraftVocab:
    """Keep the `draft_vocab_size` most frequent tokens; ties go to the lower token id, so the
    result depends only on the counts. Tokens never seen fill the remaining slots by id."""
    if not 0 < draft_vocab_size <= vocab_size:
        raise ValueError(f"draft_vocab_size={draft_vocab_size} must be in 1..vocab_size={vocab_size}")
    return vocab_from_counts(token_counts(sequences, vocab_size), draft_vocab_size)


def vocab_from_counts(counts: torch.Tensor, draft_vocab_size: int) -> DraftVocab:
    """The vocab of the `draft_vocab_size` most frequent ids of `counts` [V] (ties: lower id first)."""
    if not 0 < draft_vocab_size <= len(counts):
        raise ValueError(f"draft_vocab_size={draft_vocab_size} must be in 1..vocab_size={len(counts)}")
    order = torch.sort(-counts, stable=True).indices  # by count descending, then id ascending
    kept = order[:draft_vocab_size].sort().values
    t2d = torch.zeros(len(counts), dtype=torch.bool)
    t2d[kept] = True
    return DraftVocab(d2t=kept - torch.arange(draft_vocab_size), t2d=t2d, counts=counts)


def full_vocab(vocab_size: int) -> DraftVocab:
    """The identity map: Vd == V, d2t all zeros (vLLM then has no d2t parameter at all)."""
    return DraftVocab(d2t=torch.zeros(vocab_size, dtype=torch.long), t2d=torch.ones(vocab_size, dtype=torch.bool),
                      counts=torch.zeros(vocab_size, dtype=torch.long))
