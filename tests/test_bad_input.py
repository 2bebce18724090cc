"""Bad input: each is refused or skipped with a message naming the fix, and nothing good is lost.

Covered elsewhere (not repeated): a draft for another target (tests/test_checkpoint.py
test_wrong_target_is_refused; pushes of wrong shapes, names, dtypes: tests/test_swap.py), a
batch captured from another target (aux width, teacher vocab: tests/test_adapter.py), unknown
config keys (tests/test_config.py), lossy engine settings (tests/test_guard.py).
"""
import dataclasses
import warnings

import pytest
import torch

from conftest import tiny_config, tiny_model
from test_adapter import add_rollouts, make_adapter


@pytest.fixture(scope="module")
def policy():
    model = tiny_model("llama", layers=8, hidden=64)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def _weights(adapter):
    return {k: v.clone() for k, v in adapter.worker.draft.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("field, value", [("aux_hidden", float("nan")), ("aux_hidden", float("inf")),
                                          ("teacher_logprobs", float("nan"))])
def test_nonfinite_features_are_dropped_at_entry_counted_and_the_draft_is_kept(policy, field, value):
    adapter = make_adapter(policy)
    _, batch = add_rollouts(adapter, policy, 0)
    adapter.on_step_end(0)
    good = _weights(adapter)
    t = getattr(batch, field)
    if t is None:
        pytest.skip(f"this capture has no {field}")
    poisoned = t.clone()
    poisoned[3] = value
    with pytest.warns(UserWarning, match=f"NaN/Inf in \\['{field}'\\]"):
        stored = adapter.on_rollouts(dataclasses.replace(batch, **{field: poisoned}, policy_version=1))
    assert stored == 0 and adapter.dropped_nonfinite == batch.cu_seqlens.numel() - 1
    adapter.on_step_end(1)  # trains on the good cached features only
    assert all(torch.isfinite(v).all() for v in adapter.worker.draft.state_dict().values())
    assert not _same(_weights(adapter), good), "training continued on the good features"


def test_a_nonfinite_loss_skips_the_update_keeps_the_last_good_weights_and_counts(policy):
    _, batch = add_rollouts(make_adapter(policy), policy, 0)
    nan = dataclasses.replace(batch, aux_hidden=torch.full_like(batch.aux_hidden, float("nan")))
    fresh = make_adapter(policy)
    good = _weights(fresh)
    fresh.worker.add(nan)  # past the entry check: a NaN that appears inside the loss
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = fresh.on_step_end(0)
    trainer = fresh.worker.trainer
    assert trainer.skipped_nonfinite == fresh.config.train_steps and trainer.steps_done == 0
    assert _same(_weights(fresh), good), "a NaN update reached the weights"
    assert any("update skipped, weights kept" in str(w.message) for w in caught)
    assert stats.train is not None and stats.train.loss != stats.train.loss  # reported as NaN, not hidden


def test_empty_and_all_masked_batches(policy):
    adapter = make_adapter(policy)
    _, batch = add_rollouts(adapter, policy, 0)
    # an empty batch (every window of a micro-batch left out by the step budget) is valid and stores nothing
    empty = dataclasses.replace(batch, input_ids=batch.input_ids[:0], cu_seqlens=torch.zeros(1, dtype=torch.long),
                                aux_hidden=batch.aux_hidden[:0], loss_mask=batch.loss_mask[:0],
                                teacher_logprobs=None if batch.teacher_logprobs is None else batch.teacher_logprobs[:0],
                                teacher_topk_ids=None if batch.teacher_topk_ids is None else batch.teacher_topk_ids[:0],
                                teacher_topk_logprobs=None if batch.teacher_topk_logprobs is None
                                else batch.teacher_topk_logprobs[:0],
                                positions=None if batch.positions is None else batch.positions[:0],
                                completion=None if batch.completion is None else batch.completion[:0],
                                priority=None if batch.priority is None else batch.priority[:0])
    assert make_adapter(policy).on_rollouts(empty) == 0
    with pytest.raises(ValueError, match="drop empty sequences"):  # an empty sequence inside a batch is refused
        dataclasses.replace(batch, cu_seqlens=torch.cat([batch.cu_seqlens[:1], batch.cu_seqlens]), priority=None)
    fresh = make_adapter(policy)
    good = _weights(fresh)
    assert fresh.on_rollouts(dataclasses.replace(batch, loss_mask=torch.zeros_like(batch.loss_mask))) == 0
    stats = fresh.on_step_end(0)
    assert stats.train is None and "min_tokens" in stats.train_skipped_reason and _same(_weights(fresh), good)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_truncated_or_corrupt_checkpoint_names_the_file_and_the_fix(tmp_path, damage):
    from draftadapt.checkpoint import load_eagle3, save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft

    cfg = tiny_config("llama", layers=8, hidden=64)
    out = save_eagle3(Eagle3Draft.from_target(cfg), tmp_path / "draft", cfg)
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file.*export the draft again"):
        load_eagle3(out)
