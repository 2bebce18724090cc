"""Data-parallel RL around one draft: every rank captures, ONE draft owner trains and pushes.

A policy trained on W data-parallel ranks (DDP, FSDP2, ZeRO-3) sees 1/W of the step's rollouts on
each rank. `DistributedDraftAdapter` gives every rank the `DraftAdapter` calls it already knows
(`capture`, `on_rollouts`, `on_step_end`) and joins the ranks to one draft, in one of two modes:

- "owner": ranks keep their captured (already budgeted) batches until the step boundary;
  `on_step_end` gathers them to the owner rank, which caches, trains (inline, in a thread or in a
  Ray actor: any DraftWorker) and pushes. The other ranks hold no draft, no cache, no optimizer.
- "data_parallel": every rank caches its own features and trains a replica of the draft
  (`DataParallelDraftWorker`): each optimizer step all-reduces the gradients and the token counts
  the loss is normalised by, so the replicas stay identical and one update equals a single
  process training on the union of the ranks' batches. Features never cross the process group.

In both, only the owner holds a sink, so exactly one push per version reaches the engines, and
every rank's `on_step_end` returns the owner's `AdapterStats` (version, pushed, reason, ...).
`on_step_end` is a collective: every rank calls it once per step, in the same order.

Sharded policies: the draft trains against a full, detached copy of the input embedding (and MTP
head), gathered once per policy version by `full_weight` (FSDP2 DTensor, FSDP1 / ZeRO-3 through
their gather contexts), never a shard. `check_policy_layout` refuses layouts whose hooks would
capture the wrong thing (Megatron's vocab-parallel logits, [s, b, h] activations, pipeline
stages, sequence / context parallelism).

It knows nothing of vLLM: the owner's sink pushes. Memory: "owner" moves the step's captured
bytes (the capture budget) to the owner once; "data_parallel" all-reduces one gradient buffer the
size of the draft (fp32, 4 x params bytes) per optimizer step.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .adapter import AdapterConfig, AdapterStats, DraftAdapter, DraftSink
from .adapter_config import adapter_checks
from .batch import DraftBatch, RolloutBatch
from .cache import CacheConfig
from .trainer import DraftTrainer, TrainerConfig
from .ttt import TTTResult, shift
from .workers import CacheInfo, FeatureSpec, LocalDraftWorker, TrainResult, feature_spec_of

MODES = ("owner", "data_parallel")
# Module class names of layouts whose activations or logits a forward hook would read wrongly.
_MEGATRON = ("VocabParallelEmbedding", "ColumnParallelLinear", "RowParallelLinear", "TransformerBlock",
             "GPTModel", "MegatronModule")


# 1) sharded parameters and layouts ------------------------------------------------------------------
def full_weight(param: torch.Tensor | nn.Module) -> torch.Tensor:
    """A full, detached tensor of a parameter that may be sharded across the data-parallel group.

    FSDP2 (`fully_shard`): the parameter is a DTensor; `.full_tensor()` all-gathers it (a
    collective: call it on every rank). ZeRO-3: DeepSpeed's `GatheredParameters`. A plain tensor
    is returned detached, not copied (the live weight). An FSDP1 flat parameter or an empty shard
    raises, naming the fix (gather inside `FSDP.summon_full_params(model)`).
    """
    w = param.weight if isinstance(param, nn.Module) else param
    if hasattr(w, "full_tensor"):  # DTensor (FSDP2, tensor parallel)
        return w.full_tensor().detach()
    if hasattr(w, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
        import deepspeed  # noqa: PLC0415 - only present where ZeRO-3 made this parameter

        with deepspeed.zero.GatheredParameters([w], modifier_rank=None):
            return w.detach().clone()
    if type(w).__name__ == "FlatParameter" or w.numel() == 0 or w.dim() < 2:
        raise ValueError(f"the embedding handed to the draft is a shard ({type(w).__name__}, shape {tuple(w.shape)}), "
                         "not the full [V, H] weight; with FSDP1 pass it from inside "
                         "`FullyShardedDataParallel.summon_full_params(model)`, or use FSDP2 (fully_shard)")
    return w.detach()


def is_sharded(param: torch.Tensor | nn.Module) -> bool:
    w = param.weight if isinstance(param, nn.Module) else param
    return hasattr(w, "full_tensor") or hasattr(w, "ds_id")


def check_policy_layout(model: nn.Module) -> None:
    """Refuse policies whose forward a capture hook cannot read as [B, T, H] activations of the
    whole model with full-vocabulary logits: Megatron-style layouts (vocab-parallel logits,
    [s, b, h] activations, pipeline stages, sequence / context parallelism)."""
    names = {type(m).__name__ for m in model.modules()}
    found = sorted(n for n in names if n in _MEGATRON)
    if found:
        raise ValueError(f"the policy uses Megatron-style modules {found}: draftadapt captures HF-style [B, T, H] "
                         "activations and full-vocabulary logits and does not support vocab-parallel logits, "
                         "[s, b, h] layouts or pipeline stages; capture from an HF export of the policy, or a DP/FSDP "
                         "replica")
    cfg = getattr(model, "config", None)
    for attr, bad in (("pipeline_model_parallel_size", 1), ("context_parallel_size", 1),
                      ("sequence_parallel", False)):
        value = getattr(cfg, attr, None)
        if value not in (None, bad) and value != bad:
            raise ValueError(f"policy config {attr}={value!r} is not supported: a pipeline stage holds only some layers "
                             "(default aux layer ids would be computed from its local layer count) and sequence / "
                             "context parallelism splits T across ranks; capture on a layout without it")


# 2) data-parallel draft training ---------------------------------------------------------------------
def collective_device(group=None) -> torch.device:
    """The device `group`'s tensor collectives take inputs on: the CPU for gloo / mpi (or a group
    with a "cpu:" backend), else the current accelerator - NCCL refuses CPU tensors."""
    backend = str(dist.get_backend(group))
    if backend in ("gloo", "mpi") or "cpu:" in backend:
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        raise RuntimeError(f"process group backend {backend!r} needs an accelerator and this process sees none")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def step_token_counts(batch: DraftBatch, steps: int) -> torch.Tensor:
    """[K] int64: positions TTT step k scores in `batch` (what ttt_loss divides step k's sum by)."""
    scored = batch.loss_mask & batch.valid
    return torch.stack([(shift(scored, k) & batch.valid).sum() for k in range(1, steps + 1)])


class GradAllReduce:
    """The collective that makes `DraftTrainer.step` data-parallel over `group` (trainer.Collective).

    Each rank scores its own batch; the loss of step k is divided by the token count of step k
    summed over ranks (`normalizer`), and the gradients are summed (`reduce`), so the update equals one
    process training on the union of the ranks' batches (same AdamW, same clipping: the summed gradient
    is identical on every rank). A rank with nothing to train on contributes zeros; a rank whose loss is
    NaN/Inf contributes it to the summed loss, so every rank skips the update together.
    """

    def __init__(self, steps: int, group=None):
        self.steps, self.group, self.device = steps, group, collective_device(group)
        self.total: torch.Tensor | None = None  # [K] float64: this step's token counts over all ranks

    def normalizer(self, batch: DraftBatch | None, device: torch.device) -> torch.Tensor:
        """[K] on `device`: step k's scored positions summed over ranks (>= 1)."""
        k = self.steps
        local = step_token_counts(batch, k) if batch is not None else torch.zeros(k, dtype=torch.long)
        self.total = local.to(self.device, torch.float64, copy=True)
        dist.all_reduce(self.total, group=self.group)
        return self.total.clamp(min=1).to(device)

    def reduce(self, params: list[nn.Parameter], result: TTTResult | None, device: torch.device) -> TTTResult:
        """One flat all-reduce of the gradients, with the (already globally normalised) stats riding along;
        the gradients are replaced by the sums, the stats returned."""
        k = self.steps
        if result is not None:
            parts = [result.step_loss.float(), result.step_acc.float(), result.loss.detach().float().reshape(1)]
        else:
            parts = [torch.zeros(2 * k + 1, device=device)]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [t.to(device) for t in parts])
        flat = flat.to(self.device)
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(p).to(p.device, p.dtype)
            offset += g.numel()
        return TTTResult(loss=flat[-1], step_loss=flat[offset:offset + k], step_acc=flat[offset + k:offset + 2 * k],
                         step_tokens=self.total)


def data_parallel_trainer(draft: nn.Module, embed, config: TrainerConfig = TrainerConfig(), group=None,
                          loss=None) -> DraftTrainer:
    """A DraftTrainer replica whose every step is data-parallel over `group` (`GradAllReduce`); the
    replicas start equal: the owner's (rank 0 of the group) weights are broadcast. A rank with nothing to
    train on calls `step(None)`."""
    trainer = DraftTrainer(draft, embed, config, loss, collective=GradAllReduce(config.ttt_steps, group))
    c = trainer.collective.device
    for p in draft.parameters():
        buf = p.data.to(c)
        dist.broadcast(buf, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        p.data.copy_(buf)
    return trainer


class DataParallelDraftWorker(LocalDraftWorker):
    """A LocalDraftWorker whose trainer is a `data_parallel_trainer` replica on `group`.

    Each rank samples `batch_tokens / world_size` tokens of its own cache per step. `cache_info`
    reports the group's totals (a collective), so every rank's adapter takes the same train/skip
    decision and the collectives of `train` line up.
    """

    def __init__(self, draft, embed, trainer_config: TrainerConfig, cache_config: CacheConfig, batch_tokens: int,
                 seed: int = 0, target_head: nn.Module | None = None, group=None):
        world = dist.get_world_size(group)
        super().__init__(draft, embed, trainer_config, cache_config, max(1, batch_tokens // world),
                         seed + dist.get_rank(group), target_head)
        self.group = group
        self.trainer = data_parallel_trainer(draft, embed, trainer_config, group)

    def cache_info(self) -> CacheInfo:
        local = super().cache_info()
        t = torch.tensor([local.tokens, local.bytes, local.sequences], dtype=torch.float64,
                         device=collective_device(self.group))
        dist.all_reduce(t, group=self.group)
        versions = [v for v in (local.newest_version, local.oldest_version) if v is not None]
        gathered: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, versions, group=self.group)
        every = [v for vs in gathered for v in vs]
        return CacheInfo(int(t[0]), int(t[1]), int(t[2]), max(every, default=None), min(every, default=None))

    def train(self, num_steps: int) -> TrainResult:
        start, hist = time.perf_counter(), []
        for _ in range(num_steps):
            batch = None
            if self.cache.num_tokens > 0:
                batch = self.cache.sample(num_tokens=self.batch_tokens, generator=self.generator,
                                          draft_vocab_ids=self._target_ids, target_head=self.target_head,
                                          sparse_teacher=True)
            hist.append(self.trainer.step(batch))
        return TrainResult.of(hist, time.perf_counter() - start)


# 3) one adapter view per rank ---------------------------------------------------------------------
class _HoldingWorker:
    """The worker of a non-owner rank in "owner" mode: it holds captured batches until the step
    boundary hands them to the owner; it never trains."""

    def __init__(self, spec: FeatureSpec):
        self.spec, self.held = spec, []

    def feature_spec(self) -> FeatureSpec:
        return self.spec

    def add(self, batch: RolloutBatch) -> int:
        self.held.append(batch)
        return batch.cu_seqlens.numel() - 1

    def take(self) -> list[RolloutBatch]:
        held, self.held = self.held, []
        return held


class DistributedDraftAdapter:
    """The DraftAdapter calls for one data-parallel rank; see the module docstring.

    >>> adapter = DistributedDraftAdapter(draft, policy.get_input_embeddings(), cfg,
    ...                                   sink=swapper if rank == 0 else None, mode="owner")
    >>> with adapter.capture(policy) as cap: ...           # every rank, its own micro-batches
    >>> adapter.on_rollouts(cap.rollout_batch(...))       # every rank
    >>> stats = adapter.on_step_end(step)                  # every rank: the owner's stats

    `draft` matters on the owner ("owner" mode) or on every rank ("data_parallel"); other ranks may
    pass the same draft (it is only read for its feature spec). `worker` (owner mode, owner rank):
    any DraftWorker to train in (a BackgroundDraftWorker, a RayDraftWorker); default inline.
    """

    def __init__(self, draft: nn.Module, embed: nn.Module | torch.Tensor,
                 config: AdapterConfig = AdapterConfig(), trainer_config: TrainerConfig = TrainerConfig(),
                 cache_config: CacheConfig = CacheConfig(), sink: DraftSink | None = None, mode: str = "owner",
                 group=None, owner: int = 0, worker=None, target_head: nn.Module | None = None,
                 policy: nn.Module | None = None):
        if mode not in MODES:
            raise ValueError(f"DistributedDraftAdapter mode={mode!r}; choose one of {MODES}")
        if not dist.is_initialized():
            raise RuntimeError("DistributedDraftAdapter needs torch.distributed: call "
                               "torch.distributed.init_process_group(...) first (one DraftAdapter serves a single process)")
        self.mode, self.group, self.rank = mode, group, dist.get_rank(group)
        self.owner = owner  # rank inside `group`
        self.is_owner = self.rank == owner
        if sink is not None and not self.is_owner:
            raise ValueError(f"rank {self.rank} got a sink: only the owner (rank {owner}) pushes; pass sink=None "
                             "on the other ranks")
        self._policy_embed = embed
        # the draft trains against a full, detached copy when the policy's weight is sharded
        self._embed = full_weight(embed).clone() if is_sharded(embed) else embed
        # the adapter's checks and the step budget's cache bounds, as DraftAdapter(...) runs them
        cache_config = adapter_checks(config, cache_config, draft, self._embed, target_head)
        # each rank its own window priorities (the step sampler's seed); the workers seed their caches themselves
        cfg = replace(config, seed=config.seed + self.rank)
        if mode == "data_parallel":
            w = DataParallelDraftWorker(draft, self._embed, trainer_config, cache_config, cfg.batch_tokens,
                                        config.seed, target_head, group)
            self.adapter = DraftAdapter.with_worker(w, cfg, sink if self.is_owner else None, policy=policy)
        elif self.is_owner:
            if worker is None:
                worker = LocalDraftWorker(draft, self._embed, trainer_config, cache_config, cfg.batch_tokens,
                                          config.seed, target_head)
            self.adapter = DraftAdapter.with_worker(worker, cfg, sink, policy=policy)
        if mode == "owner":  # every rank captures with the owner's teacher ("auto" depends on the owner's refresh)
            box = [(self.adapter.teacher, self.adapter.top_k) if self.is_owner else None]
            dist.broadcast_object_list(box, src=dist.get_global_rank(group, owner) if group else owner, group=group)
            if not self.is_owner:  # the owner refreshes the draft vocab and tells this rank the new one (on_step_end)
                teacher, top_k = box[0]
                held = replace(cfg, vocab_refresh_every=0, vocab_refresh_uncovered=None, teacher=teacher, top_k=top_k)
                self.adapter = DraftAdapter.with_worker(_HoldingWorker(feature_spec_of(draft)), held, None)

    @property
    def config(self) -> AdapterConfig:
        return self.adapter.config

    @property
    def worker(self):
        return self.adapter.worker

    def capture(self, policy_model: nn.Module, **capture_kwargs):
        """adapter.capture on this rank's policy; a DDP wrapper is looked through (its forward runs
        the wrapped module's, so the hooks fire; the logits head is the wrapped module's)."""
        if isinstance(policy_model, nn.parallel.DistributedDataParallel):
            policy_model = policy_model.module
        check_policy_layout(policy_model)
        return self.adapter.capture(policy_model, **capture_kwargs)

    def on_rollouts(self, batch: RolloutBatch) -> int:
        return self.adapter.on_rollouts(batch)

    def on_step_end(self, policy_version: int, counters=None) -> AdapterStats:
        """Collective. Refresh the embedding copy, hand held features to the owner ("owner"
        mode), run the owner's step, return the owner's AdapterStats on every rank."""
        # 1) the embedding the draft trains against: the policy's, gathered once per version
        if self._embed is not self._policy_embed:
            full = full_weight(self._policy_embed)  # collective under FSDP2 / ZeRO-3
            if self._trains_here():
                self._embed.copy_(full)
        # 2) features to the owner
        if self.mode == "owner":
            held = self.worker.take() if not self.is_owner else []
            gathered: list[Any] | None = [None] * dist.get_world_size(self.group) if self.is_owner else None
            dist.gather_object(held, gathered, dst=dist.get_global_rank(self.group, self.owner) if self.group else self.owner,
                               group=self.group)
            if self.is_owner:
                for batches in gathered:
                    for b in batches:
                        self.adapter.on_rollouts(b)
        # 3) the step: on the owner (or on every replica, in lockstep)
        stats = self.adapter.on_step_end(policy_version, counters) if self._trains_here() else None
        if self.mode == "owner" and not self.is_owner:
            self.adapter.last_version = policy_version  # on_rollouts' staleness check, as on the owner
        # 4) every rank reports what the owner did, and captures in the owner's draft vocab after a refresh
        box = [(_portable(stats), self.adapter.features if stats.vocab is not None else None) if self.is_owner
               else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, self.owner) if self.group else self.owner,
                                   group=self.group)
        stats, refreshed = box[0]
        if refreshed is not None and not self.is_owner:
            self.worker.spec = self.adapter.features = refreshed
        return stats

    def _trains_here(self) -> bool:
        return self.is_owner or self.mode == "data_parallel"

    def state_dict(self, cache_dir=None) -> dict:
        return self.adapter.state_dict(cache_dir) if self._trains_here() else {"rank": self.rank, "holds": "nothing"}

    def load_state_dict(self, state: dict) -> None:
        if self._trains_here():
            self.adapter.load_state_dict(state)


def _portable(stats: AdapterStats | None) -> AdapterStats | None:
    """The stats without the sink's own result object (engine handles do not cross processes)."""
    return None if stats is None else replace(stats, push_result=None)
