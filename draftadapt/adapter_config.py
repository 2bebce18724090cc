"""The adapter's contracts: `AdapterConfig` (what to capture, train and push), `AdapterStats` (what a
step did, under the metric names RL users chart), the `DraftSink` protocol, and `adapter_checks`: the
checks and cache bounds that follow from the config, which every way of building an adapter goes
through (`DraftAdapter(...)`, `DraftAdapter.with_worker`, `DistributedDraftAdapter`). Split from
`adapter.py`, which drives them; nothing here trains.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import nn

from .batch import AUTO_DENSE_MAX_VOCAB, AUTO_REFRESH_MAX_TOP_K, AUTO_TOP_K  # noqa: F401 (re-exported)
from .budget import BudgetStats
from .cache import CacheConfig
from .capture import TEACHERS
from .drafts.kinds import kind_of
from .metrics import SpecCounters
from .workers import CacheInfo, TrainResult

REFERENCES = ("ema", "last_push")
AUTO_UNCOVERED = 0.05  # vocab_refresh_uncovered="auto": refresh once > 5% of a step's tokens are outside the vocab


@dataclass(frozen=True)
class AdapterConfig:
    train_steps: int = 4  # draft optimizer steps per policy step
    batch_tokens: int = 8192  # tokens per training batch sampled from the cache (whole sequences, >= 1)
    min_tokens: int = 2048  # skip training while the cache holds fewer tokens than this
    staleness_window: int = 2  # train on features of policy versions >= current - window only
    push_every: int = 1  # push once this many versions passed since the last push; 0 = never on cadence
    acceptance_drop: float | None = 0.2  # also push when the step's acceptance length is this many
    #   tokens below the reference; None = never on acceptance
    acceptance_reference: str = "ema"  # "ema" of the past steps' acceptance length, or "last_push":
    #   the first acceptance length measured after the last push (the fresh draft's)
    ema_decay: float = 0.8  # weight of the past in the acceptance EMA
    teacher: str = "auto"  # FeatureCapture teacher: "draft_vocab", "topk", "final_hidden", or "auto":
    #   draft_vocab when the draft vocab has <= AUTO_DENSE_MAX_VOCAB ids and the vocab refresh cannot re-target it,
    #   else topk (top_k, or AUTO_TOP_K when 0; where the refresh can re-target a small draft vocab, its size in
    #   [AUTO_TOP_K, AUTO_REFRESH_MAX_TOP_K]): target ids, so cached features outlive a refresh
    top_k: int = 0  # ids per position when teacher="topk" (or "auto" picks top-k)
    seed: int = 0  # seed of the cache-sampling generator and of the step budget's window priorities
    capture_tokens: int | None = None  # positions captured per step at most; None = train_steps x batch_tokens
    capture_fraction: float | None = None  # also keep only this fraction of the step's completion tokens
    window_tokens: int = 2048  # longest window a sequence is trained as (longer ones are cut, true positions kept)
    vocab_refresh_every: int = 0  # every this many boundaries, rebuild a reduced EAGLE-3 draft vocab from the
    #   completion tokens seen so far (vocab_refresh.py); 0 = never (the vocab the draft was built with stays)
    vocab_refresh_margin: float = 0.02  # ... only when that raises their coverage by at least this much
    vocab_refresh_uncovered: float | str | None = "auto"  # also checked at every boundary: rebuild it (the
    #   expected next step's tokens first) once more than this share of the step's completion tokens is outside the
    #   draft vocab, when that covers >= vocab_refresh_margin more of them; None = the cadence only. Either needs the
    #   policy's lm_head: target_head=, or taken from the policy (policy= or the first capture(policy); tied: its
    #   input embedding). "auto" (the default): AUTO_UNCOVERED where the refresh can run - a reduced EAGLE-3 vocab in
    #   an in-process worker with the policy's lm_head known - and off elsewhere (a number there is an error)
    vocab_refresh_trend: bool = True  # the uncovered refresh ranks tokens by the next step's expected counts
    #   (this step's share + its change since the step before); False: by this step's counts
    vocab_refresh_boost: float = 16.0  # the first training after a refresh (on features captured in the new vocab)
    #   runs at least train_steps x this: the admitted rows start from the policy's lm_head, untrained
    vocab_refresh_lr: float = 4.0  # ... at TrainerConfig.lr x this, falling (cosine) to 0.1 x this over the burst
    watchdog: bool = True  # around an engine-swapper sink, check the served draft after every push and every
    #   step's counters; re-push a lost draft; report draft/watchdog_* metrics (watchdog.py). False = off

    @property
    def vocab_refresh_auto(self) -> bool:
        """The uncovered trigger is "auto": on where the refresh can run, silently off elsewhere."""
        return self.vocab_refresh_uncovered == "auto"

    @property
    def uncovered_share(self) -> float | None:
        """The uncovered trigger as a share (AUTO_UNCOVERED for "auto"), None when off."""
        return AUTO_UNCOVERED if self.vocab_refresh_auto else self.vocab_refresh_uncovered

    @property
    def vocab_refresh(self) -> bool:
        """The vocab refresh runs (on the cadence, on uncovered tokens, or both)."""
        return self.vocab_refresh_every > 0 or self.vocab_refresh_uncovered is not None

    @property
    def budget_tokens(self) -> int:
        """Positions kept per step: capture_tokens, or what one step trains on."""
        return self.capture_tokens if self.capture_tokens is not None else max(1, self.train_steps) * self.batch_tokens

    def __post_init__(self) -> None:
        for name, low in (("train_steps", 0), ("batch_tokens", 1), ("min_tokens", 0), ("staleness_window", 0),
                          ("push_every", 0), ("top_k", 0), ("seed", 0), ("window_tokens", 1),
                          ("vocab_refresh_every", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"AdapterConfig.{name}={value!r}; set it to an int >= {low}")
        if self.acceptance_drop is not None and not self.acceptance_drop >= 0:
            raise ValueError(f"AdapterConfig.acceptance_drop={self.acceptance_drop!r}; use tokens >= 0 or None")
        if self.acceptance_reference not in REFERENCES:
            raise ValueError(f"AdapterConfig.acceptance_reference={self.acceptance_reference!r}; use one of {REFERENCES}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"AdapterConfig.ema_decay={self.ema_decay!r}; use a value in [0, 1)")
        if self.teacher != "auto" and (self.teacher not in TEACHERS or (self.teacher == "topk") != (self.top_k > 0)):
            raise ValueError(f"AdapterConfig.teacher={self.teacher!r} with top_k={self.top_k}; use 'auto' or one of "
                             f"{TEACHERS}, and top_k > 0 exactly when teacher='topk'")
        if self.capture_tokens is not None and (not isinstance(self.capture_tokens, int) or self.capture_tokens < 1):
            raise ValueError(f"AdapterConfig.capture_tokens={self.capture_tokens!r}; use positions >= 1 or None")
        if not 0 <= self.vocab_refresh_margin <= 1:
            raise ValueError(f"AdapterConfig.vocab_refresh_margin={self.vocab_refresh_margin!r}; use a share in [0, 1]")
        u = self.vocab_refresh_uncovered
        if u is not None and u != "auto" and (isinstance(u, (str, bool)) or not 0 <= u < 1):
            raise ValueError(f"AdapterConfig.vocab_refresh_uncovered={u!r}; use a share in [0, 1), 'auto' (on where "
                             "the refresh can run) or None (off)")
        if not self.vocab_refresh_boost >= 1:
            raise ValueError(f"AdapterConfig.vocab_refresh_boost={self.vocab_refresh_boost!r}; use a factor >= 1 "
                             "(1 = no extra steps after a refresh)")
        if not self.vocab_refresh_lr > 0:
            raise ValueError(f"AdapterConfig.vocab_refresh_lr={self.vocab_refresh_lr!r}; use a factor > 0 on "
                             "TrainerConfig.lr for the post-refresh burst (1 = the schedule's lr)")
        if not isinstance(self.watchdog, bool):
            raise ValueError(f"AdapterConfig.watchdog={self.watchdog!r}; use True (on, the default) or False (off)")
        if self.capture_fraction is not None and not 0 < self.capture_fraction <= 1:
            raise ValueError(f"AdapterConfig.capture_fraction={self.capture_fraction!r}; use a value in (0, 1] or None")

    def resolved_teacher(self, draft_vocab_size: int, refresh: bool = False) -> tuple[str, int]:
        """(teacher, top_k) with "auto" decided for a draft vocab of `draft_vocab_size` ids; `refresh`: the vocab
        refresh may re-target it, so "auto" keeps top-k target ids (the features outlive a refresh)."""
        if self.teacher != "auto":
            return self.teacher, self.top_k
        if draft_vocab_size > AUTO_DENSE_MAX_VOCAB:
            return "topk", self.top_k or AUTO_TOP_K
        if not refresh:
            return "draft_vocab", 0
        # as many ids as the dense teacher held, chosen by the teacher instead of by the draft vocab
        return "topk", self.top_k or min(max(draft_vocab_size, AUTO_TOP_K), AUTO_REFRESH_MAX_TOP_K)


def check_embedding(draft: nn.Module, embed: nn.Embedding | torch.Tensor) -> None:
    """The policy's input embedding fits the draft: [vocab_size, hidden_size] of the draft's config
    (the draft reads it for every input token; a mismatch would fail or mis-train later)."""
    weight = embed.weight if isinstance(embed, nn.Module) else embed
    want = (draft.config.vocab_size, draft.config.hidden_size)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != want:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(embed).__name__
        raise ValueError(f"DraftAdapter: the embedding has shape {got}, the draft expects (vocab_size, hidden_size) = "
                         f"{want}; pass the policy's own policy.get_input_embeddings() and a draft built from the "
                         "policy's config (Eagle3Draft.from_target(policy.config)), or load the draft that was "
                         "trained for this policy")


class DraftSink(Protocol):
    """Where drafts go and counters come from: the engine swapper, or a fake in tests."""

    def push_draft(self, state: dict[str, torch.Tensor], version: int) -> Any: ...  # has .pushed, .skipped_reason
    def spec_counters(self) -> SpecCounters: ...  # cumulative, summed over engines


@dataclass(frozen=True)
class AdapterStats:
    policy_version: int  # the version on_step_end was called with
    train: TrainResult | None  # None when training was skipped
    train_skipped_reason: str | None  # why it was skipped
    pushed: bool  # the sink accepted a push of this version
    push_reason: str  # why it pushed ("cadence", "acceptance ..."), or why not
    push_seconds: float  # wall time of state_for_push + push_draft; 0.0 without an attempt
    push_bytes: int  # bytes of the pushed tensors; 0 without an attempt
    push_result: Any  # what the sink returned, None without an attempt
    last_pushed_version: int | None  # newest version the sink accepted, this step included
    cache: CacheInfo  # after this step's drop and training
    dropped_stale: int  # cached sequences dropped this step for falling out of the window
    dropped_rollouts: int  # sequences on_rollouts refused as stale since the previous on_step_end
    spec: SpecCounters | None  # spec-decode counters of this step's rollouts (delta), when known
    acceptance_reference: float | None  # what this step's acceptance length was compared with
    budget: BudgetStats | None = None  # rollout vs captured vs kept tokens of this step
    vocab: Any = None  # a VocabRefresh when this boundary re-targeted the draft vocab (vocab_refresh.py)
    watchdog: Any = None  # a WatchdogStep: the watchdog's alarms and repairs this step (None: no watchdog)

    def as_dict(self) -> dict[str, float]:
        """Flat floats under the names RL users chart; unknown values are left out, not NaN.
        `draft/acc-step-{k}` is 0-based, like `spec_acceptance_rate-pos-{k}` it predicts."""
        c = self.cache
        out = {"draft/policy_version": float(self.policy_version), "draft/trained": float(self.train is not None),
               "draft/pushed": float(self.pushed), "draft/push_seconds": self.push_seconds,
               "draft/push_bytes": float(self.push_bytes), "draft/cache_tokens": float(c.tokens),
               "draft/cache_bytes": float(c.bytes), "draft/cache_sequences": float(c.sequences),
               "draft/dropped_stale": float(self.dropped_stale), "draft/dropped_rollouts": float(self.dropped_rollouts)}
        if self.train is not None:
            t = self.train
            out.update({"draft/loss": t.loss, "draft/train_steps": float(t.steps), "draft/train_tokens": float(t.tokens),
                        "draft/train_seconds": t.seconds, "draft/grad_norm": t.grad_norm})
            out.update({f"draft/acc-step-{k}": a for k, a in enumerate(t.step_acc)})
            if not math.isnan(t.acc_gain):  # what the training bought within itself (the budget's hold guard)
                out["draft/acc_gain"] = t.acc_gain
        if c.newest_version is not None:
            out["draft/cache_lag_newest"] = float(self.policy_version - c.newest_version)
            out["draft/cache_lag_oldest"] = float(self.policy_version - c.oldest_version)
        if self.last_pushed_version is not None:
            out["draft/pushed_version"] = float(self.last_pushed_version)
        if self.acceptance_reference is not None:
            out["draft/acceptance_reference"] = self.acceptance_reference
        if self.spec is not None and self.spec.drafts > 0:
            out.update(self.spec.as_dict())
        if self.budget is not None:
            out.update(self.budget.as_dict())
        if self.vocab is not None:
            v = self.vocab
            out.update({"draft/vocab_coverage_before": v.coverage_before, "draft/vocab_coverage": v.coverage_after,
                        "draft/vocab_admitted": float(v.admitted), "draft/vocab_uncovered": v.uncovered})
        if self.watchdog is not None:
            out.update(self.watchdog.as_dict())
        return out


def budget_cache_config(config: AdapterConfig, cache_config: CacheConfig) -> CacheConfig:
    """The cache bounds that follow from the step budget: the step reservoir (version_tokens) and at most
    (staleness_window + 2) x budget positions in all - the window's versions plus the step being captured,
    whose features arrive before on_step_end drops the oldest (less if cache_config says so)."""
    cap = config.budget_tokens
    return replace(cache_config, version_tokens=cap,
                   max_tokens=min(cache_config.max_tokens, (config.staleness_window + 2) * cap))


_UNKNOWN = object()  # adapter_checks: the worker does not say which target head it holds (a remote worker)


def adapter_checks(config: AdapterConfig, cache_config: CacheConfig, draft: nn.Module | None = None,
                   embed: nn.Embedding | torch.Tensor | None = None, target_head: Any = _UNKNOWN) -> CacheConfig:
    """The checks every way of building an adapter runs, and the cache bounds it builds with: the one place
    the per-step token budget reaches the cache. Returns `budget_cache_config(config, cache_config)`.

    Checks: the cache leaves staleness to the adapter; teacher="final_hidden" has a target head; and, when
    the draft is at hand (not in a remote worker), its kind is registered and the embedding fits it."""
    if cache_config.staleness_window is not None:
        raise ValueError(f"CacheConfig.staleness_window={cache_config.staleness_window}: the adapter drops stale "
                         "features itself, relative to on_step_end's policy_version; set "
                         "AdapterConfig.staleness_window and leave CacheConfig.staleness_window None")
    if config.teacher == "final_hidden" and target_head is None:
        raise ValueError("AdapterConfig.teacher='final_hidden' needs target_head=<the policy's lm_head>")
    if draft is not None:
        kind_of(draft)  # an unregistered draft class fails here, naming how to register one
        check_embedding(draft, embed)
    return budget_cache_config(config, cache_config)
