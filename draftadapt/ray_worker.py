"""`RayDraftWorker`: the `DraftWorker` whose draft, optimizer and feature cache live in a Ray actor.

`DraftAdapter.with_worker(RayDraftWorker(...), config, sink=...)` drives it with the same calls
as the in-process `LocalDraftWorker` (which the actor runs). Two modes:
- synchronous: every call waits for the actor; the driver is exposed to all of training.
- `asynchronous=True`: `train` starts the run in the actor and returns at once with the stats of
  the previous run (an empty result the first time); `state_for_push` returns the weights of the
  last finished optimizer step. The actor serves `add`/`cache_info`/`state_for_push` between
  optimizer steps of a running train (a lock per step), so features keep flowing in. A second
  `train` waits for the first: the draft is at most one train call behind.

The drafter in vLLM reads the policy's live embedding; the actor holds a copy. It is refreshed
when the policy version given to `drop_stale` changes (`DraftAdapter.on_step_end` calls it just
before `train`), with the policy's lm_head for teacher="final_hidden". It does not talk to vLLM.
"""
from __future__ import annotations

import copy
import os
import threading
import time
from typing import Any

import torch
from torch import nn

from .workers import CacheInfo, FeatureSpec, LocalDraftWorker, TrainResult
from .cache import CacheConfig
from .capture import RolloutBatch
from .drafts.eagle3 import Eagle3Draft
from .ray_utils import RayConfig, actor_options, import_ray, init_ray, wait_started
from .trainer import TrainerConfig


class _DraftServer:
    """The actor body: a LocalDraftWorker whose cache and draft are locked separately, so features
    are added (and weights read) between the optimizer steps of a running train."""

    def __init__(self, draft: Eagle3Draft, embed: torch.Tensor, trainer_config: TrainerConfig,
                 cache_config: CacheConfig, batch_tokens: int, seed: int, target_head: nn.Module | None, threads: int):
        torch.set_num_threads(threads)
        # the draft's device: a GPU when the actor was given one (RayConfig.actor_gpus > 0), else CPU;
        # the embedding copy and the draft's batches live there too
        device = trainer_config.resolve_device(torch.device("cpu"))
        self.embed = embed.to(device, copy=True)  # [V, H]: refreshed in place, the trainer keeps this tensor
        if target_head is not None:
            target_head = target_head.to(device)
        self.cache_lock = threading.Lock()  # the feature cache and its sampling generator
        self.draft_lock = threading.Lock()  # the draft, its optimizer, the policy parts
        self.worker = LocalDraftWorker(draft, self.embed, trainer_config, cache_config, batch_tokens, seed, target_head)
        self.target_ids = draft.target_ids().cpu()  # [Vd] int64

    def cache_call(self, method: str, *args) -> Any:
        with self.cache_lock:
            return getattr(self.worker, method)(*args)

    def whole_call(self, method: str, *args) -> Any:
        with self.cache_lock, self.draft_lock:
            return getattr(self.worker, method)(*args)

    def train(self, num_steps: int, policy_parts: tuple[torch.Tensor, dict | None] | None) -> TrainResult:
        """LocalDraftWorker.train, one lock per phase of each step; `policy_parts` = the policy's
        new (embedding [V, H], lm_head state) when its version changed, else None."""
        start, w, hist = time.perf_counter(), self.worker, []
        if policy_parts is not None:  # passed with the call: a threaded actor keeps no call order
            with self.cache_lock, self.draft_lock, torch.no_grad():
                self.embed.copy_(policy_parts[0])
                if policy_parts[1] is not None:
                    w.target_head.load_state_dict(policy_parts[1])
        for _ in range(num_steps):
            with self.cache_lock:
                batch = w.cache.sample(num_tokens=w.batch_tokens, generator=w.generator,
                                       draft_vocab_ids=self.target_ids, target_head=w.target_head, sparse_teacher=True)
            with self.draft_lock:
                hist.append(w.trainer.step(batch))
        return TrainResult.of(hist, time.perf_counter() - start)

    def state_for_push(self) -> dict[str, torch.Tensor]:
        with self.draft_lock:  # a copy: the live tensors change with the next step
            return {k: v.to("cpu", copy=True) for k, v in self.worker.state_for_push().items()}  # host copies

    def draft(self) -> Eagle3Draft:
        with self.draft_lock:
            return copy.deepcopy(self.worker.draft).cpu()

    def pid(self) -> int:
        return os.getpid()

    def device(self) -> str:
        return str(self.worker.trainer.device)


_EMPTY = TrainResult(0, float("nan"), (), 0, float("nan"), 0.0)


class RayDraftWorker:
    """A DraftWorker proxy to a draft-trainer actor (see the module docstring).

    >>> worker = RayDraftWorker(draft, policy.get_input_embeddings(), TrainerConfig(), CacheConfig(), 8192)
    >>> adapter = DraftAdapter.with_worker(worker, AdapterConfig(), sink=pool)
    """

    def __init__(self, draft: Eagle3Draft, embed: nn.Embedding | torch.Tensor, trainer_config: TrainerConfig,
                 cache_config: CacheConfig, batch_tokens: int, seed: int = 0, target_head: nn.Module | None = None,
                 ray_cfg: RayConfig = RayConfig(), asynchronous: bool = False):
        """embed / target_head: the policy's live modules; the actor gets copies, refreshed per version."""
        ray = init_ray(ray_cfg)
        self.asynchronous, self._embed, self._head = asynchronous, embed, target_head
        self.cache_config = cache_config  # the actor's cache bounds (use_cache_config changes both)
        self._version: int | None = None  # policy version of the latest drop_stale
        self._sent_version: int | None = None  # policy version whose embedding the actor holds
        self._pending = None  # the train call in flight (asynchronous mode)
        self.exposed_seconds = 0.0  # driver time spent waiting in train() and state_for_push()
        server = ray.remote(_DraftServer).options(max_concurrency=4, max_restarts=0, **actor_options(ray_cfg))
        self.actor = server.remote(
            draft, self._embed_weight(), trainer_config, cache_config, batch_tokens, seed, target_head,
            ray_cfg.omp_threads)
        wait_started(self.actor.pid.remote(), "the draft-trainer actor", ray_cfg)

    def use_cache_config(self, cache_config: CacheConfig) -> None:
        """New bounds for the actor's (empty) cache: the adapter's step budget (adapter_config.adapter_checks)."""
        self._get(self.actor.whole_call.remote("use_cache_config", cache_config))
        self.cache_config = cache_config

    def _embed_weight(self) -> torch.Tensor:
        return (self._embed.weight if isinstance(self._embed, nn.Module) else self._embed).detach().cpu()

    def _get(self, ref):
        ray = import_ray()
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"the draft-trainer actor died ({type(exc).__name__}); its draft, optimizer and cache "
                               "are gone. Start a new RayDraftWorker and restore the run's last adapter checkpoint "
                               "with DraftAdapter.load_state_dict(...); the engines keep serving the last pushed "
                               "draft meanwhile") from exc

    def feature_spec(self) -> FeatureSpec:
        return self._get(self.actor.whole_call.remote("feature_spec"))

    def add(self, batch: RolloutBatch) -> int:
        return self._get(self.actor.cache_call.remote("add", batch))

    def drop_stale(self, current_version: int, window: int) -> int:
        self._version = current_version
        return self._get(self.actor.cache_call.remote("drop_stale", current_version, window))

    def cache_info(self) -> CacheInfo:
        return self._get(self.actor.cache_call.remote("cache_info"))

    def train(self, num_steps: int) -> TrainResult:
        t0 = time.perf_counter()
        finished = self._finish()  # at most one run in flight
        parts = None
        if self._sent_version != self._version:
            head = None if self._head is None else {k: v.detach().cpu() for k, v in self._head.state_dict().items()}
            parts, self._sent_version = (self._embed_weight(), head), self._version
        self._pending = self.actor.train.remote(num_steps, parts)
        if not self.asynchronous:
            finished = self._finish()
        self.exposed_seconds += time.perf_counter() - t0
        return finished if finished is not None else _EMPTY

    def _finish(self) -> TrainResult | None:
        pending, self._pending = self._pending, None
        return None if pending is None else self._get(pending)

    def state_for_push(self) -> dict[str, torch.Tensor]:
        """Weights of the last finished optimizer step (a copy)."""
        t0 = time.perf_counter()
        state = self._get(self.actor.state_for_push.remote())
        self.exposed_seconds += time.perf_counter() - t0
        return state

    @property
    def draft(self) -> Eagle3Draft:
        """A copy of the actor's draft as it is now (for export: `save_eagle3(worker.draft, ...)`)."""
        return self._get(self.actor.draft.remote())

    def state_dict(self, cache_dir: str | os.PathLike | None = None) -> dict:
        """As LocalDraftWorker's, after the run in flight finishes; `cache_dir` is a path on the
        actor's node."""
        self._finish()
        return self._get(self.actor.whole_call.remote("state_dict", None if cache_dir is None else str(cache_dir)))

    def load_state_dict(self, state: dict) -> None:
        self._finish()
        self._get(self.actor.whole_call.remote("load_state_dict", state))

    def shutdown(self) -> None:
        import_ray().kill(self.actor)
