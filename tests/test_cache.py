"""HiddenStateCache: bounds, staleness, sampling, byte arithmetic, save/load."""
from __future__ import annotations

import json

import pytest
import torch

from draftadapt.cache import CacheConfig, HiddenStateCache, iter_shards
from draftadapt.capture import MISSING_LOGPROB, RolloutBatch

H, VD = 16, 10  # target hidden size, draft vocab size


def _batch(lens=(5, 7, 4), version=0, seed=0, teacher="logprobs", final=False) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    lens_t = torch.tensor(lens)
    kw = {}
    if teacher == "logprobs":
        kw["teacher_logprobs"] = torch.randn(n, VD, generator=g).log_softmax(-1)
    else:
        kw["teacher_topk_ids"] = torch.stack([torch.randperm(20, generator=g)[:3] for _ in range(n)])
        kw["teacher_topk_logprobs"] = torch.randn(n, 3, generator=g).sort(-1, descending=True).values
    if final:
        kw["final_hidden"] = torch.randn(n, H, generator=g)
    return RolloutBatch(input_ids=torch.randint(0, 100, (n,), generator=g),
                        cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.long), lens_t.cumsum(0)]),
                        aux_hidden=torch.randn(n, 3 * H, generator=g), loss_mask=torch.ones(n, dtype=torch.bool),
                        policy_version=version, **kw)


def test_bytes_per_token_matches_the_arithmetic():
    cache = HiddenStateCache(max_tokens=1000, teacher_dtype="float32")
    cache.add(_batch(final=True))
    want = 3 * H * 2 + VD * 4 + H * 2 + 8 + 1  # bf16 aux + fp32 teacher + bf16 final + int64 id + bool mask
    assert cache.bytes_per_token() == want
    assert cache.num_bytes == cache.num_tokens * want + 16 * len(cache)  # + one [2] int64 cu_seqlens per entry
    half = HiddenStateCache(max_tokens=1000, dtype="float16", teacher_dtype="float16")
    half.add(_batch(teacher="topk"))
    assert half.bytes_per_token() == 3 * H * 2 + 3 * (8 + 2) + 8 + 1
    assert half.num_bytes == half.num_tokens * half.bytes_per_token() + 16 * len(half)


def test_features_are_stored_in_half_precision():
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        cache = HiddenStateCache(max_tokens=100, dtype=dtype)
        batch = _batch()
        cache.add(batch)
        stored = list(cache._entries)
        assert all(e.aux_hidden.dtype == torch_dtype for e in stored)
        got = torch.cat([e.aux_hidden for e in stored])
        assert torch.equal(got, batch.aux_hidden.to(torch_dtype))


def test_oldest_sequences_are_evicted_past_max_tokens():
    cache = HiddenStateCache(max_tokens=20)
    cache.add(_batch(lens=(5, 7), version=0))
    cache.add(_batch(lens=(6, 4), version=1))  # 22 tokens: the 5-token sequence must go
    assert cache.num_tokens == 17 and [e.num_tokens for e in cache._entries] == [7, 6, 4]
    assert cache.stats["evicted"] == 1


def test_oldest_sequences_are_evicted_past_max_bytes():
    probe = HiddenStateCache()
    probe.add(_batch(lens=(4,)))
    per_seq = probe.num_bytes  # one 4-token sequence
    cache = HiddenStateCache(max_bytes=3 * per_seq)
    cache.add(_batch(lens=(4, 4, 4, 4), version=2))
    assert len(cache) == 3 and cache.num_bytes == 3 * per_seq


def test_drop_stale_keeps_only_the_window():
    cache = HiddenStateCache(max_tokens=1000)
    for v in range(5):
        cache.add(_batch(version=v, seed=v))
    assert cache.drop_stale(current_version=4, window=1) == 9  # versions 0..2, 3 sequences each
    assert {e.policy_version for e in cache._entries} == {3, 4}
    assert cache.num_tokens == 32


def test_staleness_window_is_applied_on_add_and_sample():
    cache = HiddenStateCache(max_tokens=1000, staleness_window=0)
    cache.add(_batch(version=3))
    cache.add(_batch(version=2))  # already stale
    assert {e.policy_version for e in cache._entries} == {3}
    cache.add(_batch(version=4))
    assert cache.sample(num_sequences=10).policy_version == 4


def test_sample_returns_padded_fp32_batch_of_cached_sequences():
    cache = HiddenStateCache(max_tokens=1000)
    batch = _batch(lens=(5, 7, 4), version=3)
    cache.add(batch)
    db = cache.sample(num_sequences=3, generator=torch.Generator().manual_seed(0))
    assert db.aux_hidden.dtype == torch.float32 and db.teacher_logprobs.dtype == torch.float32
    assert db.aux_hidden.shape == (3, 7, 3 * H) and db.policy_version == 3
    lens = db.valid.sum(1).tolist()
    assert sorted(lens) == [4, 5, 7]
    for row, n in enumerate(lens):  # each row is one cached sequence, bf16-rounded
        b = batch.sequences()[[5, 7, 4].index(n)]
        assert torch.equal(db.aux_hidden[row, :n], b.aux_hidden.bfloat16().float())
        assert torch.equal(db.teacher_logprobs[row, :n], b.teacher_logprobs)
        assert torch.equal(db.input_ids[row, :n], b.input_ids)


def test_sample_by_tokens_fills_the_budget_and_is_reproducible():
    cache = HiddenStateCache(max_tokens=1000)
    for v in range(4):
        cache.add(_batch(version=v, seed=v))
    a = cache.sample(num_tokens=15, generator=torch.Generator().manual_seed(1))
    b = cache.sample(num_tokens=15, generator=torch.Generator().manual_seed(1))
    assert 0 < a.num_tokens <= 15 and torch.equal(a.aux_hidden, b.aux_hidden)
    assert cache.sample(num_tokens=1).num_tokens >= 4, "a sample holds at least one sequence"


def test_topk_teacher_samples_through_the_draft_vocab_map():
    cache = HiddenStateCache(max_tokens=1000)
    batch = _batch(lens=(6,), teacher="topk")
    cache.add(batch)
    draft_ids = torch.arange(0, 20, 2)  # even target ids
    db = cache.sample(num_sequences=1, draft_vocab_ids=draft_ids)
    ids, lps = batch.teacher_topk_ids, batch.teacher_topk_logprobs
    for t in range(6):
        for tid, lp in zip(ids[t].tolist(), lps[t].tolist()):
            want = lp if tid % 2 == 0 else None
            if want is not None:
                assert db.teacher_logprobs[0, t, tid // 2] == want
        assert (db.teacher_logprobs[0, t] > MISSING_LOGPROB).sum() == (ids[t] % 2 == 0).sum()
        assert bool(db.loss_mask[0, t]) == (int(ids[t, 0]) % 2 == 0), "top token outside the draft vocab must be masked"


def test_save_and_load_reproduce_the_cache(tmp_path):
    cache = HiddenStateCache(max_tokens=1000, staleness_window=5)
    for v in range(3):
        cache.add(_batch(version=v, seed=v, final=True))
    out = cache.save(tmp_path / "c", shard_max_bytes=2 * 16 * cache.bytes_per_token())
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) > 1, "shards should be bounded by shard_max_bytes"
    assert manifest["entries"] == cache.state_dict()["entries"]
    back = HiddenStateCache.load(out)
    assert back.state_dict() == cache.state_dict()
    for e, f in zip(cache._entries, back._entries):
        assert all(torch.equal(getattr(e, k), getattr(f, k)) for k in ("input_ids", "aux_hidden", "final_hidden",
                                                                       "teacher_logprobs", "loss_mask"))
        assert e.policy_version == f.policy_version
    assert sum(1 for _ in iter_shards(out)) == len(cache)
    small = HiddenStateCache.load(out, max_tokens=20)  # tighter bounds on resume evict the oldest
    assert small.num_tokens <= 20 and small._entries[-1].policy_version == 2
    assert [e.num_tokens for e in small._entries] == [e.num_tokens for e in cache._entries][-len(small):]


def test_a_failed_save_leaves_the_previous_save_loadable(tmp_path, monkeypatch):
    cache = HiddenStateCache(max_tokens=1000)
    cache.add(_batch(version=0))
    cache.save(tmp_path, shard_max_bytes=1)
    first = cache.state_dict()
    cache.add(_batch(version=1, seed=1))
    import safetensors.torch

    def boom(tensors, path, **k):
        open(path, "wb").write(b"half a shard")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        cache.save(tmp_path, shard_max_bytes=1)
    assert not list(tmp_path.glob(".*.tmp")), "a failed write left a temp file"
    assert HiddenStateCache.load(tmp_path).state_dict() == first


@pytest.mark.parametrize("kw, match", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_bytes=-1), "max_bytes"), (dict(dtype="float32"), "dtype"),
    (dict(teacher_dtype="int8"), "teacher_dtype"), (dict(staleness_window=-1), "staleness_window"),
])
def test_bad_config_raises_value_error_naming_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        HiddenStateCache(**kw)


def test_schema_mismatch_and_misuse_are_refused():
    cache = HiddenStateCache(max_tokens=10)
    with pytest.raises(RuntimeError, match="add\\(\\)"):
        cache.sample(num_sequences=1)
    with pytest.raises(RuntimeError, match="add\\(\\)"):
        cache.bytes_per_token()
    cache.add(_batch(lens=(5,)))
    with pytest.raises(ValueError, match="final_hidden"):
        cache.add(_batch(lens=(5,), final=True))
    with pytest.warns(UserWarning, match="dropped 1 sequences of \\[11\\] tokens.*max_tokens=10"):
        assert cache.add(_batch(lens=(3, 11))) == 1, "the 3-token sequence still fits"
    assert cache.stats["dropped_oversize"] == 1 and cache.num_tokens <= 10, "an oversize sequence never crashes the step"
    with pytest.raises(ValueError, match="exactly one"):
        cache.sample(num_sequences=1, num_tokens=3)
    with pytest.raises(ValueError, match="valid: .*max_tokens"):
        HiddenStateCache(max_token=5)
    assert CacheConfig(max_tokens=5).max_tokens == 5
