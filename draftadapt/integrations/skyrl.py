"""Plug a `DraftAdapter` into SkyRL 0.4.0's `RayPPOTrainer` (the FSDP backend): capture, training, pushes.

    trainer = RayPPOTrainer(cfg, ...); trainer.build_models(PolicyWorker, CriticWorker, RefWorker)
    adapter = DraftAdapter(load_eagle3(draft_dir), policy.get_input_embeddings(), AdapterConfig(...),
                           sink=EngineSwapper(...))          # or RemoteEngine(url) for SkyRL's vLLM servers
    callback = attach(trainer, adapter)                       # the step boundary, in the driver
    capture_policy_forward(policy_worker, adapter.on_rollouts, adapter, version)   # in the policy worker

Two seams, both found in SkyRL 0.4.0's installed source (docs/skyrl.md):
1) capture: SkyRL recomputes the rollouts' log-probs in `RayPPOTrainer.fwd_logprobs_values_reward`,
   which reaches the policy workers' `PolicyWorkerBase.forward` -> `_forward_micro_batch`
   (skyrl/backends/skyrl_train/workers/worker.py): one no-grad `HFModelWrapper.forward` per micro-batch.
   `capture_policy_forward` runs that method under `adapter.capture(worker.model.model)` and hands
   each micro-batch's `RolloutBatch` to `on_batch`. The wrapper divides the logits by the sampling
   temperature IN PLACE (`logits_BSV.div_(temperature)`), so the LM head is not hooked: the teacher is
   rebuilt from the captured final hidden state through the same head (`with_head_teacher`).
   SkyRL skips this forward for losses that never read old log-probs (`_skip_policy_forward`:
   rollout-IS style losses with rollout log-probs, no KL reward, no off-policy correction): then
   nothing is captured, and `attach` warns.
2) the step boundary: SkyRL's own `on_step_end` callback fires BEFORE the step's policy weight sync
   (`await self.dispatch.save_weights_for_sampler()`, step 10 of `RayPPOTrainer.train`); a draft
   pushed there would meet engines still serving the previous policy, and the sync that follows
   could drop it. `attach` registers a `TrainingCallback` whose `on_step_end` only records the step,
   and wraps the trainer's `dispatch.save_weights_for_sampler` (the instance, not SkyRL's class) so
   that `adapter.on_step_end(step)` runs right AFTER the sync returns.

Policy versions: the rollouts of step N come from the policy synced after step N-1, so the forward
of step N is tagged N-1; `on_step_end(N)` runs once the engines serve policy N (the initial sync
at train start is policy 0 and ends no step).
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import torch

from ..adapter import AdapterStats, DraftAdapter
from ..capture import RolloutBatch
from .trl import with_head_teacher


def _require_skyrl():
    try:
        from skyrl.train.utils.callbacks import TrainingCallback
    except ImportError as e:
        raise ImportError("draftadapt.integrations.skyrl needs SkyRL 0.4.0 (Python >= 3.12; on Python 3.11 see "
                          "docs/skyrl.md: make setup-skyrl)") from e
    return TrainingCallback


# 1) capture in the policy worker's log-prob recompute -------------------------------------------
def rollout_tensors(micro_batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequences [B, T], attention_mask [B, T], completion_mask [B, T]) of a SkyRL forward
    micro-batch: left-padded prompt + right-padded response, the response being the last
    `metadata["response_length"]` positions (what `HFModelWrapper.forward` scores)."""
    ids, am = micro_batch["sequences"], micro_batch["attention_mask"]
    comp = torch.zeros_like(am, dtype=torch.bool)
    comp[:, -int(micro_batch.metadata["response_length"]):] = True
    return ids, am, comp & am.bool()


def capture_policy_forward(worker, on_batch: Callable[[RolloutBatch], Any], adapter: DraftAdapter,
                           policy_version: Callable[[], int]) -> dict:
    """Run SkyRL's policy log-prob recompute (`worker._forward_micro_batch`, an FSDP policy worker
    of `skyrl.backends.skyrl_train.workers`) under draftadapt's capture; each micro-batch's
    `RolloutBatch` goes to `on_batch` (`adapter.on_rollouts` in-process, or a function that ships
    it to the process holding the adapter). `adapter` configures the capture (its draft's aux
    layers, vocab, teacher). `policy_version()`: the version of the policy being scored.
    Returns a tally {"tokens", "seconds", "forwards"} updated on every call."""
    if not hasattr(worker, "_forward_micro_batch") or not hasattr(getattr(worker, "model", None), "model"):
        raise ValueError(f"capture_policy_forward takes a SkyRL policy worker with its HFModelWrapper built "
                         f"(after init_model), got {type(worker).__name__}")
    f = adapter.features
    if not f.aux_layer_ids or f.final_hidden is not None:
        raise ValueError("the SkyRL adapter captures for EAGLE-3 drafts (aux layers + head teacher); MTP drafts and "
                         "draft LMs are not wired here yet")
    if getattr(worker, "_draftadapt_capture", None) is not None:
        raise RuntimeError("draftadapt already captures this worker's forward")
    own = worker._forward_micro_batch
    tally = {"tokens": 0, "seconds": 0.0, "forwards": 0}

    def _forward_micro_batch(micro_batch):
        policy = worker.model.model  # the HF model inside SkyRL's HFModelWrapper
        with adapter.capture(policy, capture_final_hidden=True, hook_logits=False) as cap:
            out = own(micro_batch)
        if cap.num_pending != 1:
            raise RuntimeError(f"SkyRL's policy forward ran {cap.num_pending} model forwards, draftadapt expects 1 "
                               "(skyrl 0.4.0's PolicyWorkerBase._forward_micro_batch); pin skyrl==0.4.0")
        t0 = time.perf_counter()
        ids, am, comp = (t.cpu() for t in rollout_tensors(micro_batch))
        batch = cap.rollout_batch(input_ids=ids, attention_mask=am, completion_mask=comp,
                                  policy_version=int(policy_version()))
        if adapter.teacher != "final_hidden":
            batch = with_head_teacher(batch, policy.get_output_embeddings(), adapter.features.draft_vocab_ids,
                                      adapter.top_k)
        on_batch(batch)
        tally["tokens"] += batch.num_tokens
        tally["seconds"] += time.perf_counter() - t0
        tally["forwards"] += 1
        return out

    worker._forward_micro_batch = _forward_micro_batch
    worker._draftadapt_capture = tally
    return tally


# 2) the step boundary, after the weight sync ----------------------------------------------------
def _callback_class():
    TrainingCallback = _require_skyrl()

    class DraftAdaptCallback(TrainingCallback):
        """Records SkyRL's step ends; `after_sync` (run by the wrapped weight sync) calls
        `adapter.on_step_end(step)` with the step's spec-decode counters."""

        def __init__(self, adapter: DraftAdapter, swapper=None):
            self.adapter, self.swapper = adapter, swapper
            self.pending: int | None = None  # the step that ended; its policy is being synced
            self.history: list[AdapterStats] = []
            self._counters = swapper.spec_counters() if swapper is not None else None

        def on_step_end(self, trainer, callback_input, control) -> None:
            self.pending = int(callback_input.global_step)

        def after_sync(self) -> AdapterStats | None:
            if self.pending is None:  # the initial sync at train start (policy 0), or a sync outside a step
                return None
            version, self.pending = self.pending, None
            counters = None
            if self.swapper is not None:
                now = self.swapper.spec_counters()
                counters, self._counters = now - self._counters, now
            stats = self.adapter.on_step_end(version, counters=counters)
            self.history.append(stats)
            return stats

    return DraftAdaptCallback


def attach(trainer, adapter: DraftAdapter, swapper=None, policy_worker=None):
    """Install draftadapt on a SkyRL `RayPPOTrainer` whose models are built (`build_models`, which
    sets `trainer.dispatch`); returns the callback (`.history` holds the AdapterStats).

    swapper: the engines the adapter pushes into, read for spec-decode counters (None: the
    adapter's own sink is not read, counters None). policy_worker: an in-process SkyRL policy
    worker to capture in (tests, single-process set-ups); with Ray workers call
    `capture_policy_forward` inside the worker instead.
    """
    _require_skyrl()
    dispatch = getattr(trainer, "dispatch", None)
    if dispatch is None or not hasattr(dispatch, "save_weights_for_sampler") or not hasattr(trainer, "add_callback"):
        raise ValueError(f"attach() takes a skyrl RayPPOTrainer after trainer.build_models(...) (it sets "
                         f"trainer.dispatch), got {type(trainer).__name__} with dispatch={dispatch!r}")
    if getattr(dispatch, "_draftadapt_attached", False):
        raise RuntimeError("draftadapt is already attached to this trainer")
    callback = _callback_class()(adapter, swapper)
    trainer.add_callback(callback)
    sync = dispatch.save_weights_for_sampler

    async def save_weights_for_sampler(*args, **kwargs):
        result = await sync(*args, **kwargs)
        callback.after_sync()  # the engines now serve the new policy: train, push
        return result

    dispatch.save_weights_for_sampler = save_weights_for_sampler
    dispatch._draftadapt_attached = True
    alg = trainer.cfg.trainer.algorithm if hasattr(trainer, "cfg") else None
    if alg is not None and alg.policy_loss_type in _losses_without_old_logprobs():
        warnings.warn(f"policy_loss_type={alg.policy_loss_type!r}: SkyRL may skip the policy log-prob forward "
                      "draftadapt captures in (RayPPOTrainer._skip_policy_forward); the draft then gets no features",
                      stacklevel=2)
    if policy_worker is not None:
        callback.tally = capture_policy_forward(policy_worker, adapter.on_rollouts, adapter,
                                                lambda: trainer.global_step - 1)
    return callback


def _losses_without_old_logprobs() -> tuple:
    try:
        from skyrl.backends.skyrl_train.utils.ppo_utils import LOSSES_WITHOUT_OLD_LOGPROBS
    except ImportError:
        return ()
    return tuple(LOSSES_WITHOUT_OLD_LOGPROBS)
