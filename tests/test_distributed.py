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
from draftadapt.distributed import check_policy_layout, data_parallel_trainer, full_weight
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


def _on_group_device(seen: list):
    """Wrap the tensor collectives: record every input's device and the device the group's backend
    takes (an NCCL group refuses CPU tensors; gloo here, so both must be the CPU)."""
    from draftadapt.distributed import collective_device

    def wrap(fn):
        def checked(tensor, *args, group=None, **kwargs):
            seen.append((fn.__name__, str(tensor.device), str(collective_device(group))))
            return fn(tensor, *args, group=group, **kwargs)
        return checked
    for name in ("all_reduce", "broadcast"):
        setattr(dist, name, wrap(getattr(dist, name)))


def _dp_update(rank, world):
    seen: list = []
    _on_group_device(seen)
    draft, embed = _draft_and_embed()
    if rank == 1:  # the replicas start from different weights: the trainer broadcasts the owner's
        torch.nn.init.normal_(draft.fc.weight)
    trainer = data_parallel_trainer(draft, embed, TrainerConfig(**CFG))
    stats = [trainer.step(_batch(seed=10 + rank, b=3 + rank, t=12 + 4 * rank)) for _ in range(2)]
    return {k: v.clone() for k, v in draft.state_dict().items()}, [s.loss for s in stats], seen


def _dp_nan_on_one_rank(rank, world):
    import warnings

    draft, embed = _draft_and_embed()
    trainer = data_parallel_trainer(draft, embed, TrainerConfig(**CFG))
    clean = trainer.step(_batch(seed=10 + rank, b=3, t=12))
    before = {k: v.clone() for k, v in draft.state_dict().items()}
    batch = _batch(seed=20 + rank, b=3, t=12)
    if rank == 1:  # only this rank's features are NaN: every rank must skip, or the replicas part
        batch = DraftBatch(batch.input_ids, torch.full_like(batch.aux_hidden, float("nan")), batch.teacher_logprobs,
                           batch.loss_mask, batch.valid)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        nan = trainer.step(batch)
    same = all(torch.equal(before[k], v) for k, v in draft.state_dict().items())
    return clean.skipped, nan.skipped, same, trainer.steps_done


def test_a_nan_batch_on_one_rank_skips_the_update_on_every_rank():
    for rank, (clean_skipped, nan_skipped, unchanged, steps) in enumerate(_run(_dp_nan_on_one_rank)):
        assert not clean_skipped, f"rank {rank}: the clean step must update (the check must be able to fail)"
        assert nan_skipped and unchanged and steps == 1, f"rank {rank}: a NaN on rank 1 must skip the update everywhere"


def test_collective_device_is_the_backends(monkeypatch):
    from draftadapt import distributed

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for backend, device in {"gloo": "cpu", "cpu:gloo,cuda:nccl": "cpu", "nccl": "cuda:0"}.items():
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert distributed.collective_device() == torch.device(device), backend


def test_data_parallel_update_equals_the_union_batch_update():
    (w0, loss0, seen0), (w1, loss1, seen1) = _run(_dp_update)
    for name, got, want in seen0 + seen1:
        assert got == want, f"dist.{name} got a tensor on {got}; the process group's backend takes {want}"
    assert {n for n, _, _ in seen0} == {"all_reduce", "broadcast"}, seen0
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


class _Sink:
    """Counts pushes (the owner's sink); spec counters stay at zero."""

    def __init__(self):
        self.pushes: list[int] = []

    def push_draft(self, state, version):
        from types import SimpleNamespace

        self.pushes.append(version)
        return SimpleNamespace(pushed=True, skipped_reason=None)

    def spec_counters(self):
        from draftadapt.metrics import SpecCounters

        return SpecCounters(0, 0, 0, (0, 0, 0))


def _fsdp2_owner_run(rank, world):
    from torch.distributed.fsdp import fully_shard

    from draftadapt.adapter import AdapterConfig
    from draftadapt.distributed import DistributedDraftAdapter

    reference = tiny_model("llama", seed=0, layers=4, hidden=64)  # the same weights on every rank
    policy = tiny_model("llama", seed=0, layers=4, hidden=64).train()
    for layer in policy.model.layers:
        fully_shard(layer)
    fully_shard(policy)
    embed = policy.get_input_embeddings()
    sharded_rows = embed.weight.to_local().shape[0]
    torch.manual_seed(0)
    draft = Eagle3Draft.from_target(reference.config, aux_layer_ids=(0, 1, 3))
    sink = _Sink() if rank == 0 else None
    adapter = DistributedDraftAdapter(draft, embed, AdapterConfig(train_steps=2, min_tokens=0, batch_tokens=256),
                                      sink=sink, mode="owner")
    gathered_ok = bool(torch.equal(adapter._embed, reference.get_input_embeddings().weight.detach()))
    stats, aux_ok = [], []
    for step in range(2):
        g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own rollouts
        ids = torch.randint(0, 1147, (2 + rank, 20), generator=g)
        with adapter.capture(policy) as cap:
            logits = policy(input_ids=ids).logits
            logits.float().logsumexp(-1).mean().backward()  # the policy's own backward runs through the hooks
        batch = cap.rollout_batch(ids, policy_version=step)
        with torch.no_grad():
            hs = reference(input_ids=ids, output_hidden_states=True).hidden_states
        want = torch.cat([hs[i] for i in adapter.adapter.features.aux_layer_ids], -1).reshape(-1, batch.aux_hidden.shape[-1])
        want = want.to(batch.aux_hidden.dtype).float()  # the capture stores its storage dtype (fp16/bf16)
        aux_ok.append(float((batch.aux_hidden.float() - want).abs().max()))
        adapter.on_rollouts(batch)
        stats.append(adapter.on_step_end(step))
    targets = torch.ones(64, dtype=torch.bool)  # the window priorities this rank's sampler draws for one step
    return {"priorities": adapter.adapter.sampler.priorities(99, targets),
            "sharded_rows": sharded_rows, "gathered_ok": gathered_ok, "aux_err": max(aux_ok),
            "pushes": None if sink is None else sink.pushes,
            "stats": [(s.policy_version, s.pushed, s.push_reason, s.cache.sequences, s.train.tokens) for s in stats]}


def test_fsdp2_ranks_feed_one_owner_that_pushes_once_per_version():
    r0, r1 = _run(_fsdp2_owner_run)
    assert r0["sharded_rows"] < 1147 and r1["sharded_rows"] < 1147, "the policy embedding must really be sharded"
    assert r0["gathered_ok"] and r1["gathered_ok"], "the draft must train against the full gathered embedding"
    # one storage-dtype ulp at most (fp32 reduction order may flip a rounding); a shard or a wrong layer is O(1) off
    assert r0["aux_err"] < 5e-3 and r1["aux_err"] < 5e-3, "capture under FSDP2 must see the full activations"
    assert r0["pushes"] == [0, 1] and r1["pushes"] is None, "exactly one pusher, one push per version"
    assert r0["stats"] == r1["stats"], "every rank reports the owner's stats"
    assert not torch.equal(r0["priorities"], r1["priorities"]), "ranks must draw their own windows (per-rank seed)"
    # the owner cached both ranks' sequences: 2 (rank 0) + 3 (rank 1) per step, within the staleness window
    assert [s[3] for s in r0["stats"]] == [5, 10] and all(s[1] for s in r0["stats"])


@pytest.mark.slow
def test_two_rank_toy_grpo_has_one_pusher_and_both_ranks_feed_it(toy_policy_dir, tmp_path):
    """recipes/grpo_toy_dp.py: 2 DDP policy ranks (gloo) + the engine and draft owner on rank 0."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(root / "recipes" / "grpo_toy_dp.py"), "--ranks", "2", "--out", str(out),
           "run.steps=3", "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_tokens=48",
           "adapter.min_tokens=0", "adapter.train_steps=2", "adapter.batch_tokens=512"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads(out.read_text())["log"]
    assert [rows[0]["pushed"] for rows in log] == [True, True, True], "the owner pushes each version once"
    for step, rows in enumerate(log):
        assert [r["rank"] for r in rows] == [0, 1]
        assert rows[0]["pushed"] == rows[1]["pushed"] and rows[0]["pushed_version"] == rows[1]["pushed_version"] == step
        assert all(r["rollout_tokens"] > 0 for r in rows), "each rank trains on its own share of the rollouts"
        assert rows[0]["owner_train_tokens"] > 0
    # after the first step the owner's cache holds every sequence of both ranks
    assert log[0][0]["owner_cache_sequences"] == sum(r["sequences"] for r in log[0]) == 16
