"""Online vocabulary refresh: re-target an EAGLE-3 draft's reduced vocab (d2t/t2d) to the tokens
the policy now writes (`AdapterConfig.vocab_refresh_every`).

A draft built on another corpus (a generic chat draft) keeps the Vd most frequent tokens of THAT
corpus; training never changes which tokens it can propose. `VocabRefresher` counts the completion
tokens of every rollout the adapter caches and, at a step boundary, rebuilds the Vd-token vocab from
those counts when that raises their coverage by at least a margin. `retarget_vocab` then remaps the
draft in place: lm_head rows of tokens in both vocabs keep their trained weights, rows of newly
admitted tokens start from the target's lm_head rows (as `Eagle3Draft.init_lm_head` does at
creation), d2t/t2d are replaced. The optimizer's per-row state (Adam moments) moves with its rows;
new rows start from zero moments. Cached features were captured against the old vocab (a dense
teacher over the old draft ids, a loss mask that checked the old vocab), so the cache is emptied.

Only the in-process worker (`LocalDraftWorker`, or `StrategyDraftWorker`) is supported: a
background, Ray or data-parallel worker holds the draft elsewhere or in replicas. Knows nothing of
engines: the next push carries the new d2t (vLLM's `draft_id_to_target_id`, read by every
`compute_logits`). Cost: O(V) per boundary to count, O(Vd H) to remap.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .batch import RolloutBatch
from .drafts.eagle3 import Eagle3Draft
from .drafts.vocab import DraftVocab, vocab_from_counts
from .strategy import StrategyDraftWorker
from .workers import LocalDraftWorker

SUPPORTED_WORKERS = (LocalDraftWorker, StrategyDraftWorker)


class VocabRefresh(NamedTuple):
    """What one refresh did (AdapterStats.vocab)."""

    version: int  # the boundary it happened at
    stale_through: int | None  # newest rollout version counted; batches of versions <= it are refused afterwards
    coverage_before: float  # share of the counted completion tokens the old draft vocab holds
    coverage_after: float  # ... the new one holds
    admitted: int  # tokens new to the draft vocab (as many left it)
    dropped_cached: int  # cached sequences dropped (captured against the old vocab)


def completion_token_counts(batch: RolloutBatch, vocab_size: int) -> torch.Tensor:
    """[V] int64 counts of the completion tokens of a captured batch, whatever the draft vocab.

    `loss_mask` depends on the draft vocab (it is False where the target's top token is not in it),
    so it cannot be the count: RL completions are the suffix of each sequence, so every token after
    the first training position of a row is counted (a window that starts inside a completion
    misses its first token). O(N)."""
    ids, mask = batch.input_ids.cpu(), batch.loss_mask.cpu()
    lens = batch.cu_seqlens.cpu().diff()
    row = torch.repeat_interleave(torch.arange(lens.numel()), lens)  # [N] row of each token
    pos = torch.arange(ids.numel())
    first = torch.full((lens.numel(),), ids.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, row[mask], pos[mask], "amin")  # [B] first training position per row
    return torch.bincount(ids[pos > first[row]], minlength=vocab_size)


@torch.no_grad()
def retarget_vocab(draft: Eagle3Draft, d2t: torch.Tensor, target_head: nn.Module | torch.Tensor) -> torch.Tensor:
    """Re-target `draft` (in place) to the vocab map d2t [Vd] of the same size; returns src [Vd]
    int64: the old draft id of each new draft id, -1 for a newly admitted token.
    Kept tokens keep their lm_head rows (so their logits are unchanged); admitted tokens get the
    target head's rows [V, H] at their target ids."""
    head = target_head.weight if isinstance(target_head, nn.Module) else target_head
    cfg = draft.config
    if tuple(head.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(f"target_head has shape {tuple(head.shape)}, the draft needs (vocab_size, hidden_size) = "
                         f"{(cfg.vocab_size, cfg.hidden_size)}; pass the policy's lm_head")
    old_ids = draft.target_ids().cpu()  # [Vd]
    draft.set_vocab(torch.as_tensor(d2t, dtype=torch.long).to(draft.d2t.device))  # validates d2t
    new_ids = draft.target_ids().cpu()  # [Vd]
    where = torch.full((cfg.vocab_size,), -1, dtype=torch.long)
    where[old_ids] = torch.arange(len(old_ids))
    src = where[new_ids]  # [Vd]
    w = draft.lm_head.weight  # [Vd, H]
    new_w = head[new_ids.to(head.device)].to(w)
    kept = src >= 0
    new_w[kept.to(w.device)] = w[src[kept].to(w.device)]
    w.copy_(new_w)
    return src


@torch.no_grad()
def remap_optimizer_rows(optimizer: torch.optim.Optimizer, param: nn.Parameter, src: torch.Tensor) -> None:
    """Move the per-row optimizer state of `param` [Vd, H] (e.g. Adam's exp_avg, exp_avg_sq) with
    its rows: row i takes old row src[i]; rows with src == -1 (new tokens) start from zeros."""
    kept = src >= 0
    for t in optimizer.state.get(param, {}).values():
        if isinstance(t, torch.Tensor) and t.shape == param.shape:
            new = torch.zeros_like(t)
            new[kept.to(t.device)] = t[src[kept].to(t.device)]
            t.copy_(new)


class VocabRefresher:
    """Counts completion tokens; at every `every`-th boundary rebuilds the draft vocab when coverage
    rises by >= `margin`. Counts accumulate over the whole run (a policy's vocabulary drifts slowly)."""

    def __init__(self, every: int, margin: float, worker) -> None:
        check_worker(worker)
        self.every, self.margin, self.worker = every, margin, worker
        self.counts = torch.zeros(worker.draft.config.vocab_size, dtype=torch.long)  # [V]
        self.boundaries = 0
        self.newest_seen: int | None = None  # newest policy version observed
        self.stale_through: int | None = None  # batches of versions <= this were captured against an old vocab

    def observe(self, batch: RolloutBatch) -> None:
        self.counts += completion_token_counts(batch, len(self.counts))
        v = batch.policy_version
        self.newest_seen = v if self.newest_seen is None else max(v, self.newest_seen)

    def is_stale(self, version: int) -> bool:
        """A batch of this policy version may have been captured against a vocab the draft no longer has
        (captures of the versions seen before a refresh); the versions after it capture with the new one."""
        return self.stale_through is not None and version <= self.stale_through

    def maybe_refresh(self, version: int) -> VocabRefresh | None:
        """At a boundary (after training, before the push): refresh if due and worth it."""
        self.boundaries += 1
        if self.boundaries % self.every or not int(self.counts.sum()):
            return None
        draft, worker = self.worker.draft, self.worker
        new = vocab_from_counts(self.counts.clone(), draft.config.draft_vocab_size)
        old_cov = DraftVocab(draft.d2t.cpu(), draft.t2d.cpu(), self.counts).coverage()
        if new.coverage() < old_cov + self.margin:
            return None
        src = retarget_vocab(draft, new.d2t, worker.target_head)
        remap_optimizer_rows(worker.trainer.optimizer, draft.lm_head.weight, src)
        worker._target_ids = draft.target_ids().cpu()
        dropped = worker.cache.drop_stale(version + 1, 0)  # every entry: all were captured in the old vocab
        self.stale_through = self.newest_seen
        return VocabRefresh(version, self.stale_through, old_cov, new.coverage(), int((src < 0).sum()), dropped)

    def state_dict(self) -> dict:
        return {"counts": self.counts, "boundaries": self.boundaries, "newest_seen": self.newest_seen,
                "stale_through": self.stale_through}

    def load_state_dict(self, state: dict) -> None:
        self.counts = state["counts"].clone()
        self.boundaries, self.newest_seen, self.stale_through = (state["boundaries"], state["newest_seen"],
                                                                 state["stale_through"])


def check_worker(worker) -> None:
    """The refresh edits the draft, its optimizer and the cache in this process: only the local workers."""
    if type(worker) not in SUPPORTED_WORKERS:
        raise ValueError(f"AdapterConfig.vocab_refresh_every > 0 needs an in-process LocalDraftWorker (or "
                         f"StrategyDraftWorker), got {type(worker).__name__}; use DraftAdapter(draft, ...) without "
                         "with_worker, or set vocab_refresh_every=0")
    draft = worker.draft
    if not isinstance(draft, Eagle3Draft) or draft.config.full_vocab:
        raise ValueError(f"AdapterConfig.vocab_refresh_every > 0 re-targets a reduced EAGLE-3 draft vocab; this draft "
                         f"is a {type(draft).__name__}" + (" with the full vocab" if isinstance(draft, Eagle3Draft)
                                                           else "") + ": set vocab_refresh_every=0")
    if worker.target_head is None:
        raise ValueError("AdapterConfig.vocab_refresh_every > 0 starts admitted tokens from the target's lm_head rows: "
                         "pass DraftAdapter(..., target_head=policy.get_output_embeddings())")
