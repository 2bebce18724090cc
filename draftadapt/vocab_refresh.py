"""Online vocabulary refresh: re-target an EAGLE-3 draft's reduced vocab (d2t/t2d) to the tokens
the policy now writes (`AdapterConfig.vocab_refresh_uncovered`, `vocab_refresh_every`). On by default
where it can run (`vocab_refresh_uncovered="auto"`: a reduced EAGLE-3 vocab, an in-process worker, the
policy's lm_head known); the first training after a refresh is boosted (`vocab_refresh_boost`).

A draft built on another corpus (a generic chat draft) keeps the Vd most frequent tokens of THAT
corpus; training never changes which tokens it can propose. `VocabRefresher` counts the completion
tokens of every rollout the adapter caches. At the first step boundary where more than
`vocab_refresh_uncovered` of that step's tokens are outside the draft vocab, it rebuilds the Vd-token
vocab from the tokens the NEXT step is expected to write (`vocab_refresh_trend`: each token's share of
this step plus its change since the step before, a linear extrapolation; off: this step's counts), then
the rest by their count over the run, if that covers at least `vocab_refresh_margin` more of those
expected tokens. (A drift is under way when it crosses the trigger: a Vd-slot vocab ranked on the
step's own mix keeps tokens the policy is leaving; on the letters lab's case drift, 19 of 26 upper-case
letters, against 26 of 26 with the trend.) On the cadence
(`vocab_refresh_every`) it rebuilds from the counts over the run when that raises their coverage by the
margin. The admitted tokens' rows come from the target's lm_head: `target_head`, else the policy's
(`head_of`: its output embedding, the input embedding when `config.tie_word_embeddings`), taken when
the adapter is built with `policy=` or at its first `capture(policy)`. `retarget_vocab` then remaps the
draft in place: lm_head rows of tokens in both vocabs keep their trained weights, rows of newly
admitted tokens start from the target's lm_head rows (as `Eagle3Draft.init_lm_head` does at
creation), d2t/t2d are replaced. The optimizer's per-row state (Adam moments) moves with its rows;
new rows start from zero moments. Cached features with a dense teacher over the old draft ids
(teacher="draft_vocab") were captured against the old vocab, so the cache is emptied; a top-k or
final_hidden teacher names target ids and is mapped to the draft vocab when sampled, so those features
stay (the post-refresh training then has the window's steps of features, not one step's; "auto" picks top-k
where the refresh can run).

Only the in-process worker (`LocalDraftWorker`, or `StrategyDraftWorker`) is supported: a
background, Ray or data-parallel worker holds the draft elsewhere or in replicas. Knows nothing of
engines: the next push carries the new d2t (vLLM's `draft_id_to_target_id`, read by every
`compute_logits`). Cost: O(V) per boundary to count and check, O(Vd H) to remap.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .batch import RolloutBatch
from .drafts.eagle3 import Eagle3Draft
from .drafts.kinds import kind_of
from .drafts.vocab import DraftVocab, vocab_from_counts
from .strategy import StrategyDraftWorker
from .workers import LocalDraftWorker

SUPPORTED_WORKERS = (LocalDraftWorker, StrategyDraftWorker)


class VocabRefresh(NamedTuple):
    """What one refresh did (AdapterStats.vocab)."""

    version: int  # the boundary it happened at
    stale_through: int | None  # newest rollout version counted; batches of these versions with a dense teacher
    #   over the old draft ids (teacher="draft_vocab") are refused afterwards
    coverage_before: float  # share of the counted completion tokens the old draft vocab holds
    coverage_after: float  # ... the new one holds
    admitted: int  # tokens new to the draft vocab (as many left it)
    dropped_cached: int  # cached sequences dropped (captured against the old vocab; 0 when they are kept)
    uncovered: float = 0.0  # share of the step's completion tokens outside the old draft vocab
    reason: str = "cadence"  # "uncovered" (the step crossed vocab_refresh_uncovered) or "cadence"


def completion_token_counts(batch: RolloutBatch, vocab_size: int) -> torch.Tensor:
    """[V] int64 counts of the completion tokens of a captured batch, whatever the draft vocab.

    `batch.completion` (set by capture from the completion mask) marks them. `loss_mask` cannot: it is False
    where the target's top token is not in the draft vocab, so a completion written wholly in tokens the draft
    lacks - the drift a refresh is for - has no training position before its EOS. Without `completion` (a batch
    built by hand) every token after the first training position of a row is counted, as RL completions are the
    suffix of each sequence. O(N)."""
    ids = batch.input_ids.cpu()
    if batch.completion is not None:
        return torch.bincount(ids[batch.completion.cpu()], minlength=vocab_size)
    mask = batch.loss_mask.cpu()
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


def head_of(policy: nn.Module) -> nn.Module | None:
    """The policy's lm_head as the refresh reads it: its output embedding, or its input embedding when
    `config.tie_word_embeddings` (the same weight; some models expose it only there). None if neither."""
    if getattr(getattr(policy, "config", None), "tie_word_embeddings", False):
        return policy.get_input_embeddings()
    get = getattr(policy, "get_output_embeddings", None)
    return get() if callable(get) else None


class VocabRefresher:
    """Counts completion tokens; rebuilds the draft vocab at the first boundary where more than
    `uncovered` of the step's tokens are outside it, or at every `every`-th boundary (0 = none), when
    that raises coverage by >= `margin`. Counts accumulate over the whole run; `recent` is the step's."""

    def __init__(self, every: int, margin: float, worker, uncovered: float | None = None,
                 policy: nn.Module | None = None, trend: bool = True) -> None:
        check_worker(worker)
        self.every, self.margin, self.uncovered, self.worker, self.trend = every, margin, uncovered, worker, trend
        self.head = worker.target_head  # [V, H] lm_head the admitted rows start from; else bind(policy)
        if self.head is None and policy is not None:
            self.bind(policy)
        self.counts = torch.zeros(worker.draft.config.vocab_size, dtype=torch.long)  # [V] over the run
        self.recent = torch.zeros_like(self.counts)  # [V] since the last boundary
        self.previous = torch.zeros_like(self.counts)  # [V] the step before (the trend's other point)
        self.boundaries = 0
        self.newest_seen: int | None = None  # newest policy version observed
        self.stale_through: int | None = None  # batches of versions <= this were captured against an old vocab

    def bind(self, policy: nn.Module) -> None:
        """Take the target head from `policy` (`head_of`) unless one is set; checked against the draft."""
        if self.head is not None:
            return
        head = head_of(policy)
        weight = getattr(head, "weight", None)
        want = (self.worker.draft.config.vocab_size, self.worker.draft.config.hidden_size)
        if weight is None or tuple(weight.shape) != want:
            got = "none" if weight is None else f"shape {tuple(weight.shape)}"
            raise ValueError(f"the vocab refresh starts admitted tokens from the policy's lm_head rows {want}; "
                             f"{type(policy).__name__} gives {got} (get_output_embeddings(), or the input embedding "
                             "with config.tie_word_embeddings): pass DraftAdapter(..., target_head=<the full lm_head "
                             "weight [vocab_size, hidden_size]>)")
        self.head = head

    def observe(self, batch: RolloutBatch) -> None:
        if self.head is None:
            raise ValueError("the vocab refresh starts admitted tokens from the policy's lm_head rows and has none: "
                             "capture with adapter.capture(policy), or build the adapter with policy=policy or "
                             "target_head=policy.get_output_embeddings(), or set vocab_refresh_every=0 and "
                             "vocab_refresh_uncovered=None")
        counts = completion_token_counts(batch, len(self.counts))
        self.counts += counts
        self.recent += counts
        v = batch.policy_version
        self.newest_seen = v if self.newest_seen is None else max(v, self.newest_seen)

    def is_stale(self, batch: RolloutBatch) -> bool:
        """The batch holds a dense teacher over a vocab the draft no longer has (captured for a version seen
        before a refresh; the versions after it capture with the new one). A top-k teacher is never stale."""
        return (batch.teacher_logprobs is not None and self.stale_through is not None
                and batch.policy_version <= self.stale_through)

    def maybe_refresh(self, version: int) -> VocabRefresh | None:
        """At a boundary (after training, before the push): refresh if due and worth it."""
        self.boundaries += 1
        recent, self.recent = self.recent, torch.zeros_like(self.recent)
        previous, self.previous = self.previous, recent
        draft, worker = self.worker.draft, self.worker
        uncovered = 1.0 - DraftVocab(draft.d2t.cpu(), draft.t2d.cpu(), recent).coverage() if int(recent.sum()) else 0.0
        kept = draft.t2d.cpu().long()  # ties (e.g. tokens no one wrote) keep the current vocab: no churn
        if self.uncovered is not None and uncovered > self.uncovered:
            # the next step's expected tokens first (a drift brings tokens the run's counts still rank low),
            # then the run's
            judged = expected_counts(recent, previous) if self.trend else recent
            reason, ranked = "uncovered", lexicographic(judged, self.counts, kept)
        elif self.every and self.boundaries % self.every == 0 and int(self.counts.sum()):
            reason, judged, ranked = "cadence", self.counts, lexicographic(self.counts, kept)
        else:
            return None
        new = vocab_from_counts(ranked, draft.config.draft_vocab_size)
        old_cov = DraftVocab(draft.d2t.cpu(), draft.t2d.cpu(), judged).coverage()
        new_cov = DraftVocab(new.d2t, new.t2d, judged).coverage()
        if new_cov < old_cov + self.margin:
            return None
        src = retarget_vocab(draft, new.d2t, self.head)
        remap_optimizer_rows(worker.trainer.optimizer, draft.lm_head.weight, src)
        worker._target_ids = draft.target_ids().cpu()
        dropped = 0
        if "teacher_logprobs" in (worker.cache.schema or {}):  # a dense teacher over the old draft ids: every entry
            dropped = worker.cache.drop_stale(version + 1, 0)  # was captured for the old vocab (top-k ones stay)
        self.stale_through = self.newest_seen
        return VocabRefresh(version, self.stale_through, old_cov, new_cov, int((src < 0).sum()), dropped, uncovered,
                            reason)

    def state_dict(self) -> dict:
        return {"counts": self.counts, "recent": self.recent, "previous": self.previous,
                "boundaries": self.boundaries, "newest_seen": self.newest_seen, "stale_through": self.stale_through}

    def load_state_dict(self, state: dict) -> None:
        self.counts = state["counts"].clone()
        self.recent = state["recent"].clone() if "recent" in state else torch.zeros_like(self.counts)
        self.previous = state["previous"].clone() if "previous" in state else torch.zeros_like(self.counts)
        self.boundaries, self.newest_seen, self.stale_through = (state["boundaries"], state["newest_seen"],
                                                                 state["stale_through"])


def expected_counts(recent: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """[V] int64: the next step's token counts extrapolated from the last two steps' - each token's share of
    `recent` plus its change from `previous` (clamped at 0), scaled to `recent`'s total. Without a previous
    step, `recent` itself. A token on its way in ranks above one on its way out at the same count. O(V)."""
    n, m = int(recent.sum()), int(previous.sum())
    if not m or not n:
        return recent.clone()
    share = recent.double() / n
    return ((2 * share - previous.double() / m).clamp(min=0) * n).round().long()


def lexicographic(*keys: torch.Tensor) -> torch.Tensor:
    """[V] int64 scores that order ids by keys[0] descending, ties by keys[1], ... (then by id). O(V log V)."""
    order = torch.arange(len(keys[0]))
    for key in reversed(keys):  # least significant first; stable sorts keep the earlier orders within ties
        order = order[torch.sort(-key[order], stable=True).indices]
    score = torch.empty_like(order)
    score[order] = torch.arange(len(order), 0, -1)
    return score


OFF = "set vocab_refresh_every=0 and vocab_refresh_uncovered=None"


def refresh_unsupported(worker) -> str | None:
    """Why the refresh cannot run with this worker (its draft), None when it can (`check_worker` passes)."""
    try:
        check_worker(worker)
    except ValueError as e:
        return str(e)
    return None


def check_worker(worker) -> None:
    """The refresh edits the draft, its optimizer and the cache in this process: only the local workers."""
    if type(worker) not in SUPPORTED_WORKERS:
        where = ("DistributedDraftAdapter(mode='owner') refreshes on the owner; data-parallel replicas would each "
                 "re-target from their own counts" if type(worker).__name__ == "DataParallelDraftWorker" else
                 "use DraftAdapter(draft, ...), or with_worker(LocalDraftWorker(...))")
        raise ValueError(f"the vocab refresh (AdapterConfig.vocab_refresh_every / vocab_refresh_uncovered) needs an "
                         f"in-process LocalDraftWorker (or StrategyDraftWorker), got {type(worker).__name__}: {where}; "
                         f"or {OFF}")
    draft = worker.draft
    kind = kind_of(draft)
    if not kind.vocab_refresh or draft.config.full_vocab:
        raise ValueError(f"the vocab refresh re-targets a reduced EAGLE-3 draft vocab; this draft is a "
                         f"{type(draft).__name__}" + (" with the full vocab" if kind.vocab_refresh else "") + f": {OFF}")
