"""Data-parallel RL around one draft, on real torch.distributed process groups (gloo, 2 CPU processes).

- a data-parallel draft update equals one process training on the union of the ranks' batches;
- "owner" mode: every rank captures, features reach the owner, exactly one push per version, and every
  rank's on_step_end returns the owner's stats;
- FSDP2 (`fully_shard`): capture hooks see the full activations on each rank, the draft trains against
  the gathered (never sharded) embedding;
- Megatron-style layouts are refused.
"""
from __future__ import annotations

import io
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_config, tiny_model

from draftadapt.batch import DraftBatch
from draftadapt.distributed import DataParallelTrainer, check_policy_layout, full_weight
from draftadapt.drafts.eagle3 import Eagle3Draft
from draftadapt.trainer import DraftTrainer, TrainerConfig

V, H = 128, 64
TOL = 1e-5  # fp32: the union and the all-reduced sums add the same terms in another order


def _run(fn, world: int = 2, *args) -> list:
    """Run fn(rank, world, *args) on `world` gloo processes; returns what each rank returned."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_entry, args=(fn, rank, world, store, queue, args)) for rank in range(world)]
        for p in procs:
            p.start()
        results = {rank: torch.load(io.BytesIO(blob), weights_only=False)
                   for rank, blob in (queue.get(timeout=240) for _ in procs)}
        for p in procs:
            p.join(timeout=60)
    errors = [r for r in results.values() if isinstance(r, str) and r.startswith("Traceback")]
    assert not errors, "\n".join(errors)
    return [results[r] for r in range(world)]


def _entry(fn, rank, world, store, queue, args):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        out = traceback.format_exc()
    buf = io.BytesIO()  # bytes, not tensors: shared-memory handles die with this process
    torch.save(out, buf)
    queue.put((rank, buf.getvalue()))


def _batch(seed: int, b: int, t: int) -> DraftBatch:
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, t - 3:] = False
    return DraftBatch(torch.randint(0, V, (b, t), generator=g), torch.randn(b, t, 3 * H, generator=g),
                      torch.randn(b, t, V, generator=g).mul(3).log_softmax(-1), valid.clone(), valid)


def _union(a: DraftBatch, b: DraftBatch) -> DraftBatch:
    t = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(x, fill):
        out = x.new_full((x.shape[0], t, *x.shape[2:]), fill)
        out[:, : x.shape[1]] = x
        return out

    cat = lambda name, fill: torch.cat([pad(getattr(a, name), fill), pad(getattr(b, name), fill)])  # noqa: E731
    return DraftBatch(cat("input_ids", 0), cat("aux_hidden", 0.0), cat("teacher_logprobs", -1e4),
                      cat("loss_mask", False), cat("valid", False))


def _draft_and_embed():
    torch.manual_seed(0)
    draft = Eagle3Draft.from_target(tiny_config("llama", layers=8, hidden=H, vocab=V))
    return draft, torch.nn.Embedding(V, H)


CFG = dict(lr=1e-3, grad_clip=0.5, ttt_steps=3)


def _dp_update(rank, world):
    draft, embed = _draft_and_embed()
    if rank == 1:  # the replicas start from different weights: the trainer broadcasts the owner's
        torch.nn.init.normal_(draft.fc.weight)
    trainer = DataParallelTrainer(draft, embed, TrainerConfig(**CFG))
    stats = [trainer.step(_batch(seed=10 + rank, b=3 + rank, t=12 + 4 * rank)) for _ in range(2)]
    return {k: v.clone() for k, v in draft.state_dict().items()}, [s.loss for s in stats]


def test_data_parallel_update_equals_the_union_batch_update():
    (w0, loss0), (w1, loss1) = _run(_dp_update)
    draft, embed = _draft_and_embed()
    single = DraftTrainer(draft, embed, TrainerConfig(**CFG))
    union = _union(_batch(seed=10, b=3, t=12), _batch(seed=11, b=4, t=16))
    losses = [single.step(union).loss for _ in range(2)]
    before = _draft_and_embed()[0].state_dict()
    moved = max(float((draft.state_dict()[k] - before[k]).abs().max()) for k in before if before[k].is_floating_point())
    assert moved > 100 * TOL, "the check must be able to fail: the update must move the weights"
    for k, v in draft.state_dict().items():
        assert torch.equal(w0[k], w1[k]), f"replicas diverged at {k}"
        if v.is_floating_point():
            assert torch.allclose(w0[k], v, atol=TOL, rtol=0), f"{k}: max diff {float((w0[k] - v).abs().max()):.2e}"
        else:
            assert torch.equal(w0[k], v), k
    assert loss0 == loss1 and abs(loss0[0] - losses[0]) < TOL and abs(loss0[1] - losses[1]) < TOL


def test_megatron_layouts_are_refused():
    class VocabParallelEmbedding(torch.nn.Embedding):
        pass

    model = tiny_model("llama", layers=4, hidden=64)
    check_policy_layout(model)  # an HF model passes
    model.model.embed_tokens = VocabParallelEmbedding(8, 64)
    with pytest.raises(ValueError, match="Megatron-style modules"):
        check_policy_layout(model)
    model = tiny_model("llama", layers=4, hidden=64)
    model.config.pipeline_model_parallel_size = 2
    with pytest.raises(ValueError, match="pipeline_model_parallel_size"):
        check_policy_layout(model)


def test_a_flat_shard_is_refused_by_full_weight():
    with pytest.raises(ValueError, match="summon_full_params"):
        full_weight(torch.zeros(0))
