"""The step budget: windows with true positions, a reservoir over all micro-batches that is uniform,
reproducible and bounded, decided before any copy; the cache keeps exactly what it admitted."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_adapter import FakeSink, make_adapter  # noqa: F401

import draftadapt.capture as capture_mod
from draftadapt.adapter import AdapterConfig
from draftadapt.batch import DraftBatch, RolloutBatch, teacher_dense
from draftadapt.budget import StepSampler, cut_windows, reservoir_keep
from draftadapt.cache import HiddenStateCache
from draftadapt.capture import FeatureCapture


def _cu(lens):
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lens).cumsum(0)])


def test_windows_tile_each_sequence_with_true_positions():
    cu, mask = _cu([5, 12, 3]), torch.ones(20, dtype=torch.bool)
    mask[:2] = False
    w = cut_windows(cu, mask, 4)
    assert w.length.tolist() == [4, 1, 4, 4, 4, 3] and w.offset.tolist() == [0, 4, 0, 4, 8, 0]
    assert w.start.tolist() == [0, 4, 5, 9, 13, 17] and w.targets.tolist() == [2, 1, 4, 4, 4, 3]
    rows, pos, lens = w.rows(torch.tensor([False, True, False, True, False, True]))
    assert rows.tolist() == [4, 9, 10, 11, 12, 17, 18, 19] and pos.tolist() == [4, 4, 5, 6, 7, 0, 1, 2]
    assert lens.tolist() == [1, 4, 3]


def test_reservoir_over_micro_batches_equals_one_pass_and_stays_in_budget():
    g = torch.Generator().manual_seed(0)
    prio, sizes = torch.rand(60, generator=g, dtype=torch.float64), torch.randint(1, 30, (60,), generator=g)
    once, _ = reservoir_keep(prio, sizes, 200)
    kept, floor = torch.zeros(0, dtype=torch.long), -float("inf")
    for part in torch.arange(60).split(7):  # micro-batches, each merged with what survived so far
        cand = torch.cat([kept, part])
        keep, floor = reservoir_keep(prio[cand], sizes[cand], 200, floor)
        kept = cand[keep]
    assert sorted(kept.tolist()) == once.nonzero().squeeze(1).tolist()
    assert sizes[once].sum() <= 200 < sizes[once].sum() + sizes[~once][prio[~once].argmax()]


def test_every_target_token_has_the_same_chance_over_all_micro_batches():
    """Micro-batches of very different make-up (long sequences cut into windows, many short ones):
    over 400 steps (seeds) every token is kept with probability budget / tokens, wherever it sits."""
    lens = [[48, 16, 16], [32, 32], [16] * 5, [64]]  # window 16: 18 windows, 4 fit the budget of 64
    hits = [torch.zeros(sum(m)) for m in lens]
    for seed in range(400):
        s = StepSampler(tokens=64, window=16, seed=seed)
        picks = []
        for m in lens:
            w = cut_windows(_cu(m), torch.ones(sum(m), dtype=torch.bool), s.window)
            keep, prio = s.select(0, w)
            s.record(0, prio[keep], w.length[keep])
            picks.append((w, keep, prio))
        final_p = s._kept[0][0]
        for (w, keep, prio), h in zip(picks, hits):  # windows still in the reservoir at step end
            rows, _, _ = w.rows(keep & torch.isin(prio, final_p))
            h[rows] += 1
        assert int(s._kept[0][1].sum()) == 64
    per_mb = [float(h.mean() / 400) for h in hits]
    assert all(abs(p - 64 / 288) < 0.035 for p in per_mb), f"micro-batches kept unevenly: {per_mb} vs {64 / 288:.3f}"
    seq_first_last = [float(hits[0][:16].mean() / 400), float(hits[0][32:48].mean() / 400)]
    assert all(abs(p - 64 / 288) < 0.05 for p in seq_first_last), f"windows of one sequence: {seq_first_last}"


def test_priorities_are_reproducible_per_seed_and_step():
    t = torch.tensor([3, 0, 5, 2])
    a, b = StepSampler(100, seed=1).priorities(7, t), StepSampler(100, seed=1).priorities(7, t)
    assert torch.equal(a, b) and a[1] == -torch.inf, "a window without targets is never a candidate"
    assert not torch.equal(a, StepSampler(100, seed=1).priorities(8, t)), "another step draws other windows"
    thin = StepSampler(100, fraction=0.5, seed=1).priorities(7, torch.full((4000,), 3))
    assert 0.45 < float(torch.isfinite(thin).double().mean()) < 0.55


def test_capture_copies_and_builds_a_teacher_only_for_kept_windows(monkeypatch):
    model = tiny_model("qwen3", layers=4, hidden=64)
    ids = torch.randint(0, 1147, (3, 40), generator=torch.Generator().manual_seed(0))
    seen = []
    real = capture_mod.teacher_from_logits
    monkeypatch.setattr(capture_mod, "teacher_from_logits",  # the rows it builds a teacher for (rows=: gathered per chunk)
                        lambda x, *a, rows=None, **kw: seen.append(x.shape[0] if rows is None else rows.numel())
                        or real(x, *a, rows=rows, **kw))
    sampler = StepSampler(tokens=24, window=12, seed=3)
    with FeatureCapture(model, aux_layer_ids=(1, 2, 3), sampler=sampler, store_dtype=torch.bfloat16) as cap:
        model(input_ids=ids, use_cache=False)
    batch = cap.rollout_batch(input_ids=ids, policy_version=2)
    assert 0 < batch.num_tokens <= 24 and seen == [batch.num_tokens], "a teacher for the kept rows only"
    assert batch.aux_hidden.dtype == torch.bfloat16 and batch.priority.shape == (batch.seq_lens.numel(),)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    lp = ref.logits.log_softmax(-1)
    # each kept window is a slice of one sequence at its true positions: find it and compare
    for w in batch.sequences():
        row = next(r for r in range(3) if torch.equal(ids[r, w.positions], w.input_ids))
        torch.testing.assert_close(w.aux_hidden.float(), torch.cat([ref.hidden_states[i][row, w.positions]
                                                                    for i in (1, 2, 3)], -1).bfloat16().float())
        torch.testing.assert_close(w.teacher_logprobs, lp[row, w.positions], rtol=0, atol=1e-5)
    db = batch.to_draft_batch()
    assert torch.equal(db.positions[db.valid], batch.positions), "DraftBatch carries the true RoPE positions"


def test_adapter_budget_is_visible_and_the_cache_holds_what_the_sampler_kept():
    policy = tiny_model("llama", layers=8, hidden=64)
    adapter = make_adapter(policy, capture_tokens=40, window_tokens=10, train_steps=1, staleness_window=0)
    am = torch.ones(4, 24, dtype=torch.long)
    for mb in range(3):  # three micro-batches of one step
        ids = torch.randint(0, 1147, (4, 24), generator=torch.Generator().manual_seed(mb))
        with adapter.capture(policy) as cap:
            policy(input_ids=ids, attention_mask=am)
        adapter.on_rollouts(cap.rollout_batch(ids, attention_mask=am, policy_version=0))
    stats = adapter.on_step_end(0)
    b = stats.budget
    assert b.rollout_positions == 3 * 96 and b.rollout_tokens == 3 * 4 * 23
    assert b.kept_tokens == adapter.worker.cache.num_tokens <= 40 < b.captured_tokens + 1
    assert b.windowed_sequences == 12 and b.kept_windows == len(adapter.worker.cache)
    flat = stats.as_dict()
    for key in ("draft/rollout_tokens", "draft/captured_tokens", "draft/kept_tokens", "draft/train_tokens",
                "draft/budget"):
        assert key in flat, f"{key} missing from {sorted(flat)}"


def test_a_32k_token_sequence_is_windowed_not_a_crash():
    """A batch made without the adapter's capture (no priority) is cut and sampled on the host."""
    policy = tiny_model("llama", layers=8, hidden=64)
    adapter = make_adapter(policy, capture_tokens=4096, window_tokens=1024)
    n = 32768
    batch = RolloutBatch(input_ids=torch.randint(0, 1147, (n,)), cu_seqlens=torch.tensor([0, n]),
                         aux_hidden=torch.randn(n, 3 * 64, dtype=torch.bfloat16),
                         loss_mask=torch.ones(n, dtype=torch.bool), teacher_logprobs=torch.zeros(n, 1147))
    assert adapter.on_rollouts(batch) == 4
    cache = adapter.worker.cache
    assert cache.num_tokens == 4096 and all(e.num_tokens == 1024 for e in cache._entries)
    assert sorted(int(e.positions[0]) % 1024 for e in cache._entries) == [0] * 4
    assert adapter.on_step_end(0).budget.windowed_sequences == 1


def test_auto_teacher_is_top_k_above_8192_draft_ids_and_teacher_dense_reads_it():
    assert AdapterConfig().resolved_teacher(1147) == ("draft_vocab", 0)
    assert AdapterConfig().resolved_teacher(32000) == ("topk", 64)
    assert AdapterConfig(top_k=16).resolved_teacher(32000) == ("topk", 16)
    g = torch.Generator().manual_seed(0)
    n, vd = 9, 20
    batch = RolloutBatch(input_ids=torch.zeros(n, dtype=torch.long), cu_seqlens=torch.tensor([0, 4, 9]),
                         aux_hidden=torch.zeros(n, 6), loss_mask=torch.ones(n, dtype=torch.bool),
                         teacher_topk_ids=torch.stack([torch.randperm(40, generator=g)[:5] for _ in range(n)]),
                         teacher_topk_logprobs=-torch.rand(n, 5, generator=g).sort(-1).values)
    draft_ids = torch.arange(0, 40, 2)  # even target ids
    dense, sparse = batch.to_draft_batch(draft_ids), batch.to_draft_batch(draft_ids, sparse_teacher=True)
    assert sparse.teacher_logprobs is None and sparse.teacher_topk_ids.shape == (2, 5, 5)
    assert torch.equal(dense.loss_mask, sparse.loss_mask)
    rows, cols = dense.valid.nonzero(as_tuple=True)
    assert torch.equal(teacher_dense(sparse, rows, cols), teacher_dense(dense, rows, cols))
    with pytest.raises(ValueError, match="exactly one teacher"):
        DraftBatch(dense.input_ids, dense.aux_hidden, None, dense.loss_mask, dense.valid)


def test_cache_reservoir_needs_priorities():
    cache = HiddenStateCache(version_tokens=10)
    batch = RolloutBatch(input_ids=torch.zeros(4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4]),
                         aux_hidden=torch.zeros(4, 6), loss_mask=torch.ones(4, dtype=torch.bool),
                         teacher_logprobs=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="priority"):
        cache.add(batch)
