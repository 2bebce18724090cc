"""The train-work seam of `DraftAdapter`: the `DraftWorker` protocol and two workers.

`LocalDraftWorker` runs the cache and the trainer in this process, synchronously.
`BackgroundDraftWorker` trains in a thread, off the step (a Ray actor, `ray_worker.py`, is a third).

`BackgroundDraftWorker` wraps a `LocalDraftWorker` and pipelines its training one step behind the caller:

    boundary v:  train(n)        wait for the run started at v-1 (it had a whole step), snapshot the
                                 weights it left, start the run of v in the thread, return at once
                                 with the stats of the run of v-1
                 state_for_push  the snapshot: the weights after the runs started at 0 .. v-1

So the draft the engines get at boundary v is exactly the one an inline worker pushed at v-1, and
a step pays only the snapshot (plus a wait when one run outlasts a whole step). Each run trains on
a frozen view of the cache and a copy of the policy's input embedding, both taken when it starts:
`add`/`drop_stale` keep working on the live cache and the policy keeps training, without locks,
and the weights a run produces do not depend on thread timing (a test checks them bit for bit
against the inline worker's). The run also computes with the caller's intra-op thread count: the float
results of the draft's matmuls and reductions depend on it, and a new thread takes torch's
process-wide setting, which differs from the caller's own OpenMP setting once `torch.set_num_threads`
was called from any other thread (`_pinned`). A failure in the thread is raised by the next call,
every call after it too; it is never swallowed. It knows nothing of engines or of the GRPO loop.
"""
from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import NamedTuple, Protocol

import torch
from torch import nn

from .batch import RolloutBatch
from .cache import CacheConfig, HiddenStateCache, read_manifest
from .drafts.kinds import kind_of
from .trainer import DraftTrainer, LossFn, TrainerConfig


class FeatureSpec(NamedTuple):
    """What capture must produce for this draft."""

    aux_layer_ids: tuple[int, ...]  # HF hidden_states indices of the aux layers
    draft_vocab_ids: torch.Tensor | None  # [Vd] int64 target id per draft id; None = full vocab
    aux_width: int  # 3 * H_t (0 for a native MTP draft)
    draft_vocab_size: int  # Vd
    final_hidden: str | None = None  # "prenorm": also capture the state entering the final norm (MTP)
    hidden_dtype: str = "bfloat16"  # storage dtype of hidden states (the cache's): capture casts on the device
    teacher_dtype: str = "float32"  # storage dtype of teacher log-probs (the cache's)


class CacheInfo(NamedTuple):
    tokens: int
    bytes: int
    sequences: int
    newest_version: int | None  # newest policy_version among cached features (None = empty)
    oldest_version: int | None


@dataclass(frozen=True)
class TrainResult:
    steps: int  # optimizer steps run
    loss: float  # mean weighted TTT loss over those steps
    step_acc: tuple[float, ...]  # [K] mean top-1 agreement with the teacher per TTT step
    tokens: int  # positions scored at TTT step 1, summed over the steps
    grad_norm: float  # mean pre-clip grad norm
    seconds: float  # wall time of the whole train call
    acc_gain: float = math.nan  # step-1 accuracy of the later half of these steps minus the earlier half's: what
    #   the call's own updates bought on the data it trained on (nan with < 2 steps); unlike a gain between calls it
    #   does not rise when the policy sharpens and its data grows easier (strategy.train_budget's hold guard)

    @classmethod
    def of(cls, hist: list, seconds: float) -> TrainResult:
        """The result of a call that ran the trainer steps `hist` (TrainStats) in `seconds`."""
        n, half = max(1, len(hist)), len(hist) // 2
        acc = tuple(sum(s.step_acc[k] for s in hist) / n for k in range(len(hist[0].step_acc))) if hist else ()
        gain = (sum(s.step_acc[0] for s in hist[-half:]) - sum(s.step_acc[0] for s in hist[:half])) / half \
            if half and hist[0].step_acc else math.nan
        return cls(len(hist), sum(s.loss for s in hist) / n, acc, sum(s.tokens for s in hist),
                   sum(s.grad_norm for s in hist) / n, seconds, gain)


class DraftWorker(Protocol):
    """The train-work seam: everything that touches the draft, its optimizer or the cache."""

    def feature_spec(self) -> FeatureSpec: ...
    def add(self, batch: RolloutBatch) -> int: ...
    def drop_stale(self, current_version: int, window: int) -> int: ...
    def cache_info(self) -> CacheInfo: ...
    def train(self, num_steps: int) -> TrainResult: ...
    def state_for_push(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self, cache_dir: str | os.PathLike | None = None) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def feature_spec_of(draft: nn.Module, target_ids: torch.Tensor | None = None,
                    cache_config: CacheConfig | None = None) -> FeatureSpec:
    """What capture must produce for `draft`, read from its config (every kind's config answers aux_layer_ids,
    full_vocab, target_hidden_size, draft_vocab_size and final_hidden). target_ids: [Vd] (None: the draft's)."""
    c, cc = draft.config, cache_config or CacheConfig()
    ids = None if c.full_vocab else (target_ids if target_ids is not None else draft.target_ids().cpu())
    return FeatureSpec(tuple(c.aux_layer_ids), ids, len(c.aux_layer_ids) * c.target_hidden_size, c.draft_vocab_size,
                       getattr(c, "final_hidden", None), cc.dtype, cc.teacher_dtype)


def cache_info_of(cache: HiddenStateCache) -> CacheInfo:
    versions = [v for v, _ in cache.state_dict()["entries"]]
    return CacheInfo(cache.num_tokens, cache.num_bytes, len(versions), max(versions, default=None),
                     min(versions, default=None))


class LocalDraftWorker:
    """The in-process DraftWorker: a HiddenStateCache and a DraftTrainer, run synchronously."""

    def __init__(self, draft: nn.Module, embed: nn.Embedding | torch.Tensor, trainer_config: TrainerConfig,
                 cache_config: CacheConfig, batch_tokens: int, seed: int = 0, target_head: nn.Module | None = None,
                 loss: LossFn | None = None):
        """loss: what the trainer steps with; None = the draft kind's (TTT, or distillation for a DraftLM)."""
        self.kind = kind_of(draft)  # looked up once: an unregistered draft class fails here, naming the fix
        self.draft, self.cache_config, self.batch_tokens, self.target_head = draft, cache_config, batch_tokens, target_head
        self.trainer = DraftTrainer(draft, embed, trainer_config, loss)
        self.cache = HiddenStateCache(cache_config)
        self.generator = torch.Generator().manual_seed(seed)
        self._target_ids = draft.target_ids().cpu()  # [Vd] int64

    def feature_spec(self) -> FeatureSpec:
        return feature_spec_of(self.draft, self._target_ids, self.cache_config)

    def use_cache_config(self, cache_config: CacheConfig) -> None:
        """New cache bounds (the adapter's step budget: adapter_config.adapter_checks); only while the cache is empty."""
        if self.cache.num_tokens:
            raise RuntimeError("use_cache_config: the cache already holds features; build the adapter (or call "
                               "adapter_checks) before on_rollouts adds any")
        self.cache_config, self.cache = cache_config, HiddenStateCache(cache_config)

    def add(self, batch: RolloutBatch) -> int:
        return self.cache.add(batch)

    def drop_stale(self, current_version: int, window: int) -> int:
        return self.cache.drop_stale(current_version, window)

    def cache_info(self) -> CacheInfo:
        return cache_info_of(self.cache)

    def train(self, num_steps: int) -> TrainResult:
        start = time.perf_counter()
        hist = [self.trainer.step(self.cache.sample(num_tokens=self.batch_tokens, generator=self.generator,
                                                    draft_vocab_ids=self._target_ids, target_head=self.target_head,
                                                    sparse_teacher=True))
                for _ in range(num_steps)]
        return TrainResult.of(hist, time.perf_counter() - start)

    def state_for_push(self) -> dict[str, torch.Tensor]:
        """The live weights vLLM's drafter owns (no copy): consume them before the next train()."""
        return self.kind.state_for_push(self.draft)

    def state_dict(self, cache_dir: str | os.PathLike | None = None) -> dict:
        """Trainer (draft + optimizer), sampling generator, cache index; the cache's features are
        written to `cache_dir` when given (safetensors shards), and are otherwise not saved."""
        if cache_dir is not None:
            cache_dir = str(self.cache.save(cache_dir).absolute())
        return {"trainer": self.trainer.state_dict(), "generator": self.generator.get_state(),
                "cache": self.cache.state_dict(), "cache_dir": cache_dir}

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self._target_ids = self.draft.target_ids().cpu()  # the restored d2t (a vocab refresh may have changed it)
        self.generator.set_state(state["generator"])
        cache_dir = state["cache_dir"]
        if cache_dir is None:
            warnings.warn("the adapter state holds no features (state_dict(cache_dir=None) was used): the cache starts "
                          "empty and refills from new rollouts; pass cache_dir= for an exact resume", stacklevel=3)
            self.cache = HiddenStateCache(self.cache_config)
            return
        if read_manifest(cache_dir)["entries"] != state["cache"]["entries"]:
            raise ValueError(f"the features in {cache_dir} are not the ones this state saved (a later save "
                             "overwrote them); give every checkpoint its own cache_dir")
        self.cache = HiddenStateCache.load(cache_dir, **asdict(self.cache_config))


FORMAT = "draftadapt.background_worker/1"
NOTHING_YET = TrainResult(steps=0, loss=math.nan, step_acc=(), tokens=0, grad_norm=math.nan, seconds=0.0)


class BackgroundDraftWorker:
    """A DraftWorker that trains in a background thread; see the module docstring. Call it from
    one thread (the loop's), like any DraftWorker.

    >>> adapter = DraftAdapter(draft, policy.get_input_embeddings(), cfg, sink=swapper)
    >>> adapter = DraftAdapter.with_worker(BackgroundDraftWorker(adapter.worker), cfg, sink=swapper)
    """

    def __init__(self, inner: LocalDraftWorker):
        self.inner = inner
        self.cache = inner.cache  # the live cache; a run sees a frozen view of it as inner.cache
        self._live_embed = inner.trainer.embed  # the policy's live embedding; a run gets a copy
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draftadapt-draft")
        self._run: Future | None = None  # the run in flight (or finished and not yet collected)
        self._failure: BaseException | None = None  # sticky: raised by every call once seen
        self._push_state: dict[str, torch.Tensor] | None = None  # weights after the last collected run
        self._last: TrainResult = NOTHING_YET  # stats of the last collected run
        self.wait_seconds = 0.0  # how long the last train() waited for the previous run (exposed time)

    # 1) features: the live cache, on the caller's thread ----------------------------------------
    def feature_spec(self) -> FeatureSpec:
        return self.inner.feature_spec()

    @property
    def cache_config(self) -> CacheConfig:
        return self.inner.cache_config

    def use_cache_config(self, cache_config: CacheConfig) -> None:
        self._collect()  # no run may hold the cache
        self.inner.use_cache_config(cache_config)
        self.cache = self.inner.cache

    def add(self, batch: RolloutBatch) -> int:
        self._check()
        return self.cache.add(batch)

    def drop_stale(self, current_version: int, window: int) -> int:
        self._check()
        return self.cache.drop_stale(current_version, window)

    def cache_info(self) -> CacheInfo:
        return cache_info_of(self.cache)

    # 2) training, one step behind ------------------------------------------------------------
    def train(self, num_steps: int) -> TrainResult:
        """Collect the previous run, start a run of `num_steps` in the thread, return the
        previous run's stats (`steps == 0` before any run finished)."""
        t0 = time.perf_counter()
        self._collect()
        self.wait_seconds = time.perf_counter() - t0
        self._push_state = _snapshot(self.inner)
        # the run's inputs, fixed now: the caller keeps adding features and training the policy
        self.inner.cache = _frozen_view(self.cache)
        self.inner.trainer.embed = _weight(self._live_embed).detach().clone()  # [V, H]
        self._run = self._pool.submit(_pinned, torch.get_num_threads(), self.inner.train, num_steps)
        return self._last

    def _collect(self) -> None:
        """Wait for the run in flight; keep its stats; raise its failure (and every later call)."""
        self._check()
        run, self._run = self._run, None
        if run is None:
            return
        try:
            self._last = run.result()
        except BaseException as exc:  # noqa: B036 - re-raised below, and by every later call
            self._failure = exc
        finally:  # no run in flight: inner is the caller's again
            self.inner.cache, self.inner.trainer.embed = self.cache, self._live_embed
        self._check()

    def _check(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"background draft training failed ({type(self._failure).__name__}: {self._failure}); "
                               "the draft worker is unusable: fix the cause and resume from the last checkpoint"
                               ) from self._failure

    def state_for_push(self) -> dict[str, torch.Tensor]:
        """Weights after the last collected run (a copy the thread never writes); before the first
        train(): the current weights, once no run is in flight."""
        self._check()
        if self._push_state is None:
            self._collect()
            self._push_state = _snapshot(self.inner)
        return self._push_state

    @property
    def draft(self):
        """The draft module, once no run is in flight (e.g. to export it)."""
        self._collect()
        return self.inner.draft

    # 3) resume and shutdown ------------------------------------------------------------------
    def state_dict(self, cache_dir: str | os.PathLike | None = None) -> dict:
        """The inner worker's state once the run in flight finished, plus the push snapshot and
        the last stats, so a resumed run pushes and reports what the uninterrupted one would."""
        self._collect()
        return {"format": FORMAT, "inner": self.inner.state_dict(cache_dir), "push_state": self._push_state,
                "last": self._last}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != FORMAT:
            raise ValueError(f"worker state has format {state.get('format')!r}, expected {FORMAT!r} (a state "
                             "saved by LocalDraftWorker resumes with run.draft_worker=inline)")
        self._collect()
        self.inner.load_state_dict(state["inner"])
        self.cache = self.inner.cache
        self._push_state, self._last = state["push_state"], state["last"]

    def close(self) -> None:
        """Wait for the run in flight and stop the thread; raises that run's failure, if any."""
        try:
            self._collect()
        finally:
            self._pool.shutdown(wait=True)


def _pinned(threads: int, fn, *args):
    """fn(*args) with `threads` intra-op threads in this thread: the caller's count, so a run's float results equal
    the inline worker's. torch.get_num_threads() is per thread (OpenMP's setting of the calling thread); a new
    thread starts from torch's process-wide value, the last one set from ANY thread. torch._C's own setter: an
    in-process vLLM CPU engine replaces `torch.set_num_threads` with a no-op for the whole process."""
    if torch.get_num_threads() != threads:
        torch._C.set_num_threads(threads)
    return fn(*args)


def _weight(embed: nn.Embedding | torch.Tensor) -> torch.Tensor:
    return embed.weight if isinstance(embed, nn.Module) else embed


def _snapshot(inner: LocalDraftWorker) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in inner.state_for_push().items()}


def _frozen_view(cache):
    """A cache that shares the live one's entries but not its index: a run samples from the view
    while the caller adds and drops on the live cache. Entries are owned copies, never mutated."""
    view = copy.copy(cache)
    view._entries, view._bytes = deque(cache._entries), deque(cache._bytes)
    view.stats = dict(cache.stats)
    return view
