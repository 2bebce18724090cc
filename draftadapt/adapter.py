"""`DraftAdapter`: the callback any GRPO loop calls to keep an EAGLE-3 draft matched to its policy.
(A native MTP head, `drafts/mtp.py`, and a small external draft LM, `drafts/draft_lm.py`, are driven
the same way: pass an `MTPDraft` or a `DraftLM` as the draft.)

Three calls, at points every RL loop already has (`policy_version` = the loop's global step):

    adapter = DraftAdapter(draft, policy.get_input_embeddings(), AdapterConfig(...), sink=swapper)
    for step in range(num_steps):
        completions = generate(prompts)                  # engines serve the last pushed draft
        with adapter.capture(policy) as cap:             # the log-prob recompute the loop runs anyway
            logits = policy(input_ids=ids, attention_mask=am).logits
        adapter.on_rollouts(cap.rollout_batch(ids, am, completion_mask, policy_version=step))
        ...                                               # policy update, refit into the engines
        log(adapter.on_step_end(step).as_dict())         # drop stale, train the draft, maybe push

Pushes happen only in `on_step_end` (a step boundary), at most once per policy version.

The step budget (budget.py): capture keeps per step at most `capture_tokens` positions (default
train_steps x batch_tokens: what one step trains on, so each kept token is trained on about once
over its stay in the cache), as windows of at most `window_tokens` positions drawn uniformly over
the step's completion tokens and all its micro-batches, optionally thinned to `capture_fraction`
of them; the cache then holds at most (staleness_window + 2) x capture_tokens positions.
`AdapterStats` reports rollout vs captured vs kept vs trained tokens per step.

The seam for training off the critical path: `DraftAdapter` only decides (staleness, when to
train, when to push, acceptance tracking). Every touch of the draft, its optimizer and the
feature cache goes through a `DraftWorker`; `LocalDraftWorker` runs them in this process,
synchronously. A Ray actor (or a thread) implementing the same methods plugs in through
`DraftAdapter.with_worker(...)` and the calls above do not change: an asynchronous `train` may
return at once with the stats of the last finished run, and `state_for_push` returns the weights
of the last finished optimizer step; the push itself still happens only at the step boundary.
It does not talk to vLLM: pushes and spec-decode counters go through a `DraftSink` (e.g. the
engine swapper), and it never touches the policy's weights or gradients (capture only copies).

The draft-health watchdog (watchdog.py) is on by default (`AdapterConfig.watchdog`): around an
engine swapper sink, every push is followed by a version check of the engines, and every
`on_step_end` checks the step's counters against the training accuracy of the draft last pushed,
before this step's push. A lost draft is re-pushed; alarms and repairs are logged and reported as
`draft/watchdog_*` in `AdapterStats.as_dict()`. It draws no random numbers and generates nothing.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .budget import StepSampler, cut_windows
from .cache import _DTYPES, CacheConfig
from .capture import FeatureCapture, RolloutBatch
from .distill import TeacherCapture
from .drafts.kinds import kind_of
from .metrics import SpecCounters
from .strategy import StrategyConfig, StrategyDraftWorker, train_budget
from .trainer import TrainerConfig
from .vocab_refresh import VocabRefresher, refresh_unsupported
from .watchdog import WatchdogStep, watchdog_for
from .workers import CacheInfo, DraftWorker, FeatureSpec, LocalDraftWorker, TrainResult  # noqa: F401 (re-exported)

FORMAT = "draftadapt.adapter/1"
from .adapter_config import (AUTO_DENSE_MAX_VOCAB, AUTO_TOP_K, REFERENCES, AdapterConfig,  # noqa: E402,F401 (re-exported)
                             _UNKNOWN, AdapterStats, DraftSink, adapter_checks, budget_cache_config,
                             check_embedding)


class DraftAdapter:
    """Drop stale features, train the draft, push it at step boundaries; see the module docstring."""

    def __init__(self, draft: nn.Module, embed: nn.Embedding | torch.Tensor,
                 config: AdapterConfig = AdapterConfig(),
                 trainer_config: TrainerConfig = TrainerConfig(), cache_config: CacheConfig = CacheConfig(),
                 sink: DraftSink | None = None, target_head: nn.Module | None = None,
                 strategy: StrategyConfig = StrategyConfig(), policy: nn.Module | None = None):
        """embed: the policy's live input embedding (vLLM's drafter shares it, so the draft trains
        against the current one). target_head: the policy's lm_head, needed for teacher="final_hidden".
        strategy: loss, position weights, feature selection and budget (`strategy.py`).
        policy: the policy model, optional: the vocab refresh takes its lm_head from it when target_head
        is None (else from the first `capture(policy)`)."""
        cache_config = adapter_checks(config, cache_config, draft, embed, target_head)
        args = (draft, embed, trainer_config, cache_config, config.batch_tokens, config.seed, target_head)
        worker = StrategyDraftWorker(*args, strategy=strategy) if strategy.custom_loss else LocalDraftWorker(*args)
        self._setup(worker, config, sink, strategy, policy)

    @classmethod
    def with_worker(cls, worker: DraftWorker, config: AdapterConfig = AdapterConfig(),
                    sink: DraftSink | None = None, strategy: StrategyConfig = StrategyConfig(),
                    policy: nn.Module | None = None) -> "DraftAdapter":
        """An adapter over any DraftWorker (a Ray actor proxy, a background-thread worker); the
        strategy's loss settings are the worker's business, its selection and budget the adapter's.
        The constructor's checks run here too (`adapter_checks`: on the draft and embedding of an
        in-process worker), and a worker that exposes its `cache_config` gets the step budget's
        bounds (`use_cache_config`) before any feature is added."""
        draft, embed, head = _local_parts(worker)
        cache_config = getattr(worker, "cache_config", None)
        budgeted = adapter_checks(config, cache_config or CacheConfig(), draft, embed, head)
        if cache_config is not None and cache_config != budgeted:
            worker.use_cache_config(budgeted)
        adapter = cls.__new__(cls)
        adapter._setup(worker, config, sink, strategy, policy)
        return adapter

    def _setup(self, worker: DraftWorker, config: AdapterConfig, sink: DraftSink | None,
               strategy: StrategyConfig = StrategyConfig(), policy: nn.Module | None = None) -> None:
        self.worker, self.config, self.strategy = worker, config, strategy
        self.watchdog = watchdog_for(sink) if config.watchdog else None  # None: off, or a sink it cannot check
        self.sink = self.watchdog or sink  # pushes go through the watchdog, which records what it must serve
        self._watched = (0, 0)  # (watchdog.checks, watchdog.repairs) at the last step's end
        self.last_step_acc: tuple[float, ...] | None = None  # training accuracy of the last finished training
        self.last_acc_gain: float | None = None  # what the last training of >= 2 steps bought within itself (the
        #   hold's guard: is the draft still learning? TrainResult.acc_gain); None = none ran yet
        self.served_step_acc: tuple[float, ...] | None = None  # ... of the draft the sink last accepted
        self.features = worker.feature_spec()
        self.sampler = StepSampler(config.budget_tokens, config.capture_fraction, config.window_tokens, config.seed)
        self.last_version: int | None = None  # policy_version of the last on_step_end
        self.newest_rollout_version: int | None = None  # newest policy_version on_rollouts stored
        self.last_push_version: int | None = None  # version of the last push attempt (accepted or not)
        self.last_pushed_version: int | None = None  # version of the last push the sink accepted
        self.trained_since_push = False  # the draft has new weights the engines have not seen
        self.dropped_nonfinite = 0  # sequences refused by on_rollouts for NaN/Inf features
        self.acceptance_ema: float | None = None
        self.acceptance_after_push: float | None = None  # first acceptance length measured after a push
        self.dropped_rollouts = 0  # since the last on_step_end
        self.refresh_untrained = False  # a vocab refresh admitted rows no training has seen yet (vocab_refresh_boost)
        # the vocab refresh: counts completion tokens, re-targets the draft vocab at boundaries (LocalDraftWorker only)
        self.vocab = None
        refresh = config.vocab_refresh and not (config.vocab_refresh_auto and not config.vocab_refresh_every
                                                and refresh_unsupported(worker))
        self.teacher, self.top_k = config.resolved_teacher(self.features.draft_vocab_size, refresh)
        if refresh:
            self.vocab = VocabRefresher(config.vocab_refresh_every, config.vocab_refresh_margin, worker,
                                        config.uncovered_share, None, config.vocab_refresh_trend)
            if policy is not None:
                self._bind_head(policy)
        # Engine counters are read as deltas from here; not saved: they describe the engines, not the run.
        self._seen = sink.spec_counters() if sink is not None else None

    # 1) features ----------------------------------------------------------------------------
    def capture(self, policy_model: nn.Module, **capture_kwargs) -> FeatureCapture:
        """FeatureCapture hooks configured for this draft (aux layers, draft vocab, teacher);
        extra keyword arguments go to FeatureCapture (e.g. layers=, final_norm=, store_dtype=)."""
        fixed = {"aux_layer_ids", "draft_vocab_ids", "teacher", "top_k"} & set(capture_kwargs)
        if fixed:
            raise ValueError(f"capture() sets {sorted(fixed)} from the draft and AdapterConfig; do not pass them")
        if self.vocab is not None:  # the refresh's lm_head, when the adapter was built without one
            self._bind_head(policy_model)
        f = self.features
        kw = {"offload_to_cpu": True, "sampler": self.sampler, "store_dtype": _DTYPES[f.hidden_dtype],
              "teacher_dtype": _DTYPES[f.teacher_dtype], **capture_kwargs}
        if f.final_hidden == "prenorm":  # a native MTP draft reads the pre-norm last state
            kw["final_prenorm"] = True
        if not f.aux_layer_ids and f.final_hidden is None:  # a draft LM: the tokens and the teacher only
            return TeacherCapture(policy_model, teacher=self.teacher, top_k=self.top_k,
                                  **{"offload_to_cpu": True, **capture_kwargs})
        return FeatureCapture(policy_model, aux_layer_ids=f.aux_layer_ids, teacher=self.teacher,
                              draft_vocab_ids=f.draft_vocab_ids, top_k=self.top_k, **kw)

    def on_rollouts(self, batch: RolloutBatch, advantages: torch.Tensor | None = None) -> int:
        """Cache the features of one captured batch; returns how many windows were stored.
        advantages: [B] per sequence; with StrategyConfig.min_advantage, sequences below it are not cached.

        A batch from `capture` holds only the windows the step budget admitted; any other batch is
        cut into windows and sampled here, on the host, by the same rule.

        A batch older than the staleness window (policy_version < last on_step_end version -
        staleness_window) is DROPPED with a warning and counted in `AdapterStats.dropped_rollouts`,
        not raised: a late batch is normal in async RL and harmless, and crashing would cost the
        run. A batch that does not fit the draft raises ValueError naming the field.
        """
        self._check_batch(batch)
        v = batch.policy_version
        bad = _nonfinite_fields(batch)
        if bad:  # one NaN row in the cache would poison every training batch that samples it
            n = batch.cu_seqlens.numel() - 1
            self.dropped_nonfinite += n
            warnings.warn(f"on_rollouts: dropped {n} sequences of policy version {v} with NaN/Inf in {bad} "
                          f"({self.dropped_nonfinite} dropped so far); check the policy forward that was captured",
                          stacklevel=2)
            return 0
        old_vocab = self.vocab is not None and self.vocab.is_stale(batch)
        if old_vocab or self.last_version is not None and v < self.last_version - self.config.staleness_window:
            n = batch.cu_seqlens.numel() - 1
            self.dropped_rollouts += n
            why = (f"captured before the draft vocab was refreshed (versions <= {self.vocab.stale_through})"
                   if old_vocab else f"older than the staleness window ({self.config.staleness_window}) behind "
                   f"version {self.last_version}")
            warnings.warn(f"on_rollouts: dropped {n} sequences of policy version {v}, {why}", stacklevel=2)
            return 0
        self.newest_rollout_version = v if self.newest_rollout_version is None else max(v, self.newest_rollout_version)
        if batch.cu_seqlens.numel() < 2:  # the step budget kept no window of this micro-batch
            return 0
        if self.strategy.min_advantage is not None and advantages is not None:
            if advantages.numel() != batch.cu_seqlens.numel() - 1:
                raise ValueError(f"on_rollouts: {advantages.numel()} advantages for {batch.cu_seqlens.numel() - 1} "
                                 "sequences; StrategyConfig.min_advantage needs one advantage per captured sequence "
                                 "(capture with window_tokens >= the longest sequence so windows are sequences)")
            seqs = [s for s, a in zip(batch.sequences(), advantages.tolist()) if a >= self.strategy.min_advantage]
            if not seqs:
                return 0
            batch = RolloutBatch.concat(seqs)
        if batch.priority is None:  # not captured through adapter.capture: window and sample it here
            win = cut_windows(batch.cu_seqlens.cpu(), batch.loss_mask.cpu(), self.sampler.window)
            keep, prio = self.sampler.select(v, win)
            rows, _, lens = win.rows(keep)
            batch = batch.select_rows(rows, lens, prio[keep])
            if batch.cu_seqlens.numel() < 2:  # no window with a training target (e.g. all-masked)
                return 0
        lm = batch.loss_mask.cpu().long().cumsum(0)
        ends = batch.cu_seqlens.cpu()
        targets = torch.cat([lm.new_zeros(1), lm])[ends[1:]] - torch.cat([lm.new_zeros(1), lm])[ends[:-1]]
        self.sampler.record(v, batch.priority[targets > 0], batch.seq_lens.cpu()[targets > 0])
        if self.vocab is not None and self.vocab.head is None and self._auto_refresh_only:
            self._refresh_off("no lm_head is known (a batch not captured through adapter.capture(policy)); build "
                              "the adapter with policy= or target_head= to keep it")
        if self.vocab is not None:
            self.vocab.observe(batch)
        return self.worker.add(batch)

    def _check_batch(self, batch: RolloutBatch) -> None:
        if not isinstance(batch, RolloutBatch):
            raise ValueError(f"on_rollouts takes a RolloutBatch (from adapter.capture(...).rollout_batch), "
                             f"got {type(batch).__name__}")
        width = batch.aux_hidden.shape[-1]
        if width != self.features.aux_width:
            raise ValueError(f"RolloutBatch.aux_hidden has width {width}, the draft's fc takes {self.features.aux_width} "
                             f"(aux layers {self.features.aux_layer_ids}); capture with adapter.capture(policy)")
        if self.features.final_hidden is not None and batch.final_hidden is None:
            raise ValueError("RolloutBatch.final_hidden is missing: this draft (native MTP) reads the policy's last "
                             "hidden state; capture with adapter.capture(policy)")
        lp = batch.teacher_logprobs
        if lp is not None and lp.shape[-1] != self.features.draft_vocab_size:
            raise ValueError(f"RolloutBatch.teacher_logprobs has {lp.shape[-1]} columns, the draft vocab has "
                             f"{self.features.draft_vocab_size}; capture with adapter.capture(policy)")

    @property
    def _auto_refresh_only(self) -> bool:
        """The refresh runs only because vocab_refresh_uncovered is "auto" (no cadence asked for)."""
        return self.config.vocab_refresh_auto and not self.config.vocab_refresh_every

    def _bind_head(self, policy: nn.Module) -> None:
        try:
            self.vocab.bind(policy)
        except ValueError as e:
            if not self._auto_refresh_only:
                raise
            self._refresh_off(str(e))

    def _refresh_off(self, why: str) -> None:
        """vocab_refresh_uncovered="auto" where the refresh cannot run: off for this adapter, said once."""
        warnings.warn(f"AdapterConfig.vocab_refresh_uncovered='auto': the vocab refresh is off: {why}", stacklevel=3)
        self.vocab = None

    # 2) the step boundary -----------------------------------------------------------------------
    def on_step_end(self, policy_version: int, counters: SpecCounters | None = None) -> AdapterStats:
        """Drop stale features, train `train_steps` steps, push when due. `counters`: the
        spec-decode counters of this step's rollouts (a delta); None reads the sink's cumulative
        counters as a delta (pass them every step or never)."""
        v = self._check_order(policy_version)
        cfg = self.config
        # 1) drop features that fell out of the staleness window
        dropped = self.worker.drop_stale(v, cfg.staleness_window)
        # 2) train on what is left (more when this step's acceptance fell, if the strategy says so)
        spec = self._measure(counters)
        if self.watchdog is not None and spec is not None:  # the served draft's health, before this step pushes
            self.watchdog.check_step(spec, self.served_step_acc)
        al = spec.acceptance_length if spec is not None and spec.drafts > 0 else None
        ref = self.acceptance_ema if cfg.acceptance_reference == "ema" else self.acceptance_after_push
        budget = train_budget(cfg.train_steps, self.strategy, al, ref, self.last_acc_gain)
        if self.refresh_untrained:  # the first training on features of the re-targeted vocab: its new rows start cold
            budget = max(budget, int(round(cfg.train_steps * cfg.vocab_refresh_boost)))
        burst = cfg.vocab_refresh_lr if self.refresh_untrained else 1.0  # (the refresh runs on local workers only)
        tokens, train, skipped = self.worker.cache_info().tokens, None, None
        if cfg.train_steps == 0:
            skipped = "AdapterConfig.train_steps=0"
        elif tokens < cfg.min_tokens:
            skipped = f"the cache holds {tokens} tokens < AdapterConfig.min_tokens={cfg.min_tokens}"
        elif budget == 0:
            skipped = (f"the acceptance length {al:.3f} held at or above the {cfg.acceptance_reference} {ref:.3f}: "
                       f"StrategyConfig.hold_factor={self.strategy.hold_factor} leaves no step")
        else:
            with self.worker.trainer.lr_burst(budget, burst) if burst != 1 else nullcontext():
                train = self.worker.train(budget)
            if train.steps == 0:  # a background worker whose first run has not finished yet
                train, skipped = None, "no draft training has finished yet (background worker)"
            else:
                self.trained_since_push, self.last_step_acc = True, tuple(train.step_acc)
                if not math.isnan(train.acc_gain):  # a 1-step training (the hold's) cannot tell; keep the last that could
                    self.last_acc_gain = train.acc_gain
                self.refresh_untrained = False
        # 3) the vocab refresh, when due: the push below then carries the new d2t
        refresh = self.vocab.maybe_refresh(v) if self.vocab is not None else None
        if refresh is not None:
            self.features, self.trained_since_push = self.worker.feature_spec(), True
            self.refresh_untrained = True
        # 4) the push, judged on this step's acceptance (served by the draft pushed before)
        pushed, reason, seconds, nbytes, result = self._maybe_push(v, al, ref)
        self._track_acceptance(al, pushed)
        stats = AdapterStats(policy_version=v, train=train, train_skipped_reason=skipped, pushed=pushed,
                             push_reason=reason, push_seconds=seconds, push_bytes=nbytes, push_result=result,
                             last_pushed_version=self.last_pushed_version, cache=self.worker.cache_info(),
                             dropped_stale=dropped, dropped_rollouts=self.dropped_rollouts, spec=spec,
                             acceptance_reference=ref, budget=self.sampler.end_step(v, cfg.staleness_window),
                             vocab=refresh, watchdog=self._watchdog_step())
        self.last_version, self.dropped_rollouts = v, 0
        return stats

    def _watchdog_step(self) -> WatchdogStep | None:
        """The watchdog's alarms and repairs since the previous step's end (None: no watchdog)."""
        wd = self.watchdog
        if wd is None:
            return None
        (seen, repairs), self._watched = self._watched, (wd.checks, wd.repairs)
        new = list(wd.history)[len(wd.history) - min(wd.checks - seen, len(wd.history)):]  # the checks since then
        expected = next((h.expected_acceptance_length for h in reversed(new) if h.expected_acceptance_length), None)
        return WatchdogStep([a for h in new for a in h.alarms], wd.repairs - repairs, expected)

    def _check_order(self, policy_version: int) -> int:
        if not isinstance(policy_version, int) or isinstance(policy_version, bool) or policy_version < 0:
            raise ValueError(f"on_step_end: policy_version={policy_version!r}; pass the RL loop's step (an int >= 0)")
        if self.last_version is not None and policy_version < self.last_version:
            raise RuntimeError(f"on_step_end(policy_version={policy_version}) after on_step_end(policy_version="
                               f"{self.last_version}): versions must not go back; pass the loop's global step, or "
                               "call load_state_dict() first to rewind to a checkpoint")
        if self.newest_rollout_version is not None and policy_version < self.newest_rollout_version:
            raise RuntimeError(f"on_step_end(policy_version={policy_version}) but on_rollouts already stored features "
                               f"of version {self.newest_rollout_version}; call on_step_end with the version of the "
                               "policy that produced this step's rollouts")
        return policy_version

    def _measure(self, counters: SpecCounters | None) -> SpecCounters | None:
        if counters is not None or self.sink is None:
            return counters
        now = self.sink.spec_counters()
        prev, self._seen = self._seen, now
        delta = now - prev
        fields = (delta.drafts, delta.draft_tokens, delta.accepted, *delta.accepted_per_pos)
        return now if min(fields) < 0 else delta  # counters went back: the engines restarted from 0

    def _maybe_push(self, v: int, al: float | None, ref: float | None) -> tuple[bool, str, float, int, Any]:
        """(pushed, reason, seconds, bytes, sink result): the push decision and, if due, the push."""
        cfg = self.config
        if self.last_push_version == v:
            return False, f"version {v} was already pushed once", 0.0, 0, None
        if self.sink is None:
            return False, "no sink", 0.0, 0, None
        last = self.last_pushed_version
        if cfg.push_every and (last is None or v - last >= cfg.push_every):
            why = "cadence"
        elif cfg.acceptance_drop is not None and al is not None and ref is not None and al < ref - cfg.acceptance_drop:
            why = f"acceptance length {al:.3f} < {cfg.acceptance_reference} {ref:.3f} - {cfg.acceptance_drop}"
        else:
            nxt = f"; next cadence push at version {last + cfg.push_every}" if cfg.push_every else ""
            return False, f"not due{nxt}", 0.0, 0, None
        if not self.trained_since_push:
            return False, f"{why} but the draft has not trained since the last push", 0.0, 0, None
        # 5) push: the only place weights leave the adapter
        start = time.perf_counter()
        state = self.worker.state_for_push()
        result = self.sink.push_draft(state, version=v)
        seconds = time.perf_counter() - start
        self.last_push_version = v
        if not result.pushed:
            return False, f"{why}; the sink refused: {result.skipped_reason}", seconds, 0, result
        self.last_pushed_version, self.trained_since_push = v, False
        self.served_step_acc = self.last_step_acc
        return True, why, seconds, sum(t.numel() * t.element_size() for t in state.values()), result

    def _track_acceptance(self, al: float | None, pushed: bool) -> None:
        if pushed:
            self.acceptance_after_push = None  # the next step measures the fresh draft
        elif al is not None and self.acceptance_after_push is None:
            self.acceptance_after_push = al
        if al is not None:
            d = self.config.ema_decay
            self.acceptance_ema = al if self.acceptance_ema is None else d * self.acceptance_ema + (1 - d) * al

    # 3) export ---------------------------------------------------------------------------------
    @property
    def draft(self) -> nn.Module:
        """The adapted draft (a background worker's once its run in flight finished; a Ray
        worker's as a copy). Train on with the adapter, not on this object."""
        return self.worker.draft

    def export(self, out_dir: str | os.PathLike, target_config=None, layout: str = "vllm") -> Path:
        """Write the adapted draft as its kind saves it (drafts/kinds.py), atomically: an EAGLE-3 draft as a
        checkpoint vLLM serves (`layout="vllm"`, what `load_eagle3` and `SpecConfig("eagle3", k, model=out_dir)`
        read) or in the `speculators` layout; a draft LM as its HF checkpoint; a native MTP draft raises (it is
        part of the policy checkpoint). target_config: the policy's config, checked against the draft when given."""
        draft = self.draft
        return kind_of(draft).export(draft, out_dir, target_config, layout)

    # 4) resume --------------------------------------------------------------------------------
    _COUNTERS = ("last_version", "newest_rollout_version", "last_push_version", "last_pushed_version",
                 "trained_since_push", "acceptance_ema", "acceptance_after_push", "dropped_rollouts",
                 "last_step_acc", "served_step_acc", "refresh_untrained", "last_acc_gain")
    _LATER = {"last_step_acc": None, "served_step_acc": None,  # states saved before the watchdog have none,
              "refresh_untrained": False, "last_acc_gain": None}  # ... before the post-refresh boost, the hold

    def state_dict(self, cache_dir: str | os.PathLike | None = None) -> dict:
        """Everything a resumed run needs: draft weights, optimizer, sampling RNG, push/acceptance
        counters, and the cache index. The cached features are written to `cache_dir` (give
        each checkpoint its own); without it the resumed cache starts empty. Tensors are live
        references: torch.save the result before training on."""
        return {"format": FORMAT, "config": asdict(self.config), "worker": self.worker.state_dict(cache_dir),
                "sampler": self.sampler.state_dict(), **{k: getattr(self, k) for k in self._COUNTERS},
                **({"vocab": self.vocab.state_dict()} if self.vocab is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != FORMAT:
            raise ValueError(f"adapter state has format {state.get('format')!r}, expected {FORMAT!r}")
        self.worker.load_state_dict(state["worker"])
        if "sampler" in state:  # states saved before the step budget existed have none
            self.sampler.load_state_dict(state["sampler"])
        for k in self._COUNTERS:
            setattr(self, k, state.get(k, self._LATER[k]) if k in self._LATER else state[k])
        if self.vocab is not None and "vocab" in state:
            self.vocab.load_state_dict(state["vocab"])
            self.features = self.worker.feature_spec()  # the draft's restored d2t


def _local_parts(worker) -> tuple[nn.Module | None, Any, Any]:
    """(draft, embedding, target head) of an in-process worker (a background worker's inner one);
    (None, None, unknown) for a worker that keeps them elsewhere (a Ray actor) or holds none."""
    inner = getattr(worker, "inner", worker)
    trainer = getattr(inner, "trainer", None)
    if trainer is None:
        return None, None, _UNKNOWN
    return trainer.draft, trainer.embed, getattr(inner, "target_head", _UNKNOWN)


def _nonfinite_fields(batch: RolloutBatch) -> list[str]:
    """Float feature fields of `batch` holding NaN or Inf (O(N H) once per captured batch).
    A teacher log-prob of -inf is a legal zero probability; NaN and +inf are not."""
    bad = []
    for name in ("aux_hidden", "final_hidden", "teacher_logprobs", "teacher_topk_logprobs"):
        t = getattr(batch, name)
        if t is None or not t.is_floating_point():
            continue
        ok = torch.isfinite(t) if name in ("aux_hidden", "final_hidden") else ~(torch.isnan(t) | (t == float("inf")))
        if not bool(ok.all()):
            bad.append(name)
    return bad

