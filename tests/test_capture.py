"""Capture: features equal a plain forward's, the policy's gradients are untouched, batches validate."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

from draftadapt.capture import (MISSING_LOGPROB, FeatureCapture, RolloutBatch, default_aux_layer_ids,
                                measure_capture_overhead)

ARCHS = ["llama", "qwen2", "qwen3"]
DRAFT_IDS = torch.arange(0, 1147, 3)  # every third target id: some top tokens fall outside


def _padded_inputs(seed=0, b=3, t=12, vocab=1147):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    lens = torch.tensor([t, t - 4, t - 7])[:b]
    attn = (torch.arange(t)[None] < lens[:, None]).long()
    comp = attn.bool() & (torch.arange(t)[None] >= 3)  # prompt = first 3 tokens
    return ids, attn, comp


def _policy_step(model, ids, attn):
    """The RL loop's log-prob forward + a loss + backward; returns (loss, grads)."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss = -(logp * attn[:, 1:]).sum() / attn[:, 1:].sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_features_equal_output_hidden_states_exactly(arch):
    model = tiny_model(arch, layers=8, hidden=64)
    ids, attn, comp = _padded_inputs()
    with FeatureCapture(model, capture_final_hidden=True) as cap:
        model(input_ids=ids, attention_mask=attn, use_cache=False)
    batch = cap.rollout_batch(input_ids=ids, attention_mask=attn, completion_mask=comp)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attn, use_cache=False, output_hidden_states=True)
    sel = attn.bool()
    want_aux = torch.cat([ref.hidden_states[i][sel] for i in (2, 4, 5)], -1)
    assert cap.aux_layer_ids == (2, 4, 5) == default_aux_layer_ids(8)
    assert torch.equal(batch.aux_hidden, want_aux), "aux hidden differs from output_hidden_states[2,4,5]"
    assert torch.equal(batch.final_hidden, ref.hidden_states[-1][sel]), "final hidden differs from the post-norm state"
    want_lp = ref.logits.float().log_softmax(-1)[sel]
    torch.testing.assert_close(batch.teacher_logprobs, want_lp, rtol=0, atol=1e-5)
    assert torch.equal(batch.input_ids, ids[sel])


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_leaves_policy_loss_and_gradients_bit_identical(arch):
    model = tiny_model(arch, layers=4, hidden=64).train()
    ids, attn, _ = _padded_inputs(seed=1)
    loss_off, grads_off = _policy_step(model, ids, attn)
    with FeatureCapture(model, aux_layer_ids=(0, 2, 3), draft_vocab_ids=DRAFT_IDS, capture_final_hidden=True) as cap:
        loss_on, grads_on = _policy_step(model, ids, attn)
    batch = cap.rollout_batch(input_ids=ids, attention_mask=attn)
    assert torch.equal(loss_on, loss_off)
    assert all(torch.equal(grads_on[n], grads_off[n]) for n in grads_off), "capture changed a policy gradient"
    for name, t in vars(batch).items():
        if isinstance(t, torch.Tensor):
            assert not t.requires_grad and t.grad_fn is None, f"captured {name} is attached to the policy's graph"


def test_gradient_checkpoint_recompute_is_not_captured_twice():
    model = tiny_model("llama", layers=4, hidden=64).train()
    ids, attn, _ = _padded_inputs(seed=2)
    loss_off, grads_off = _policy_step(model, ids, attn)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attn, use_cache=False, output_hidden_states=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with FeatureCapture(model, aux_layer_ids=(1, 2, 3)) as cap:
        loss_on, grads_on = _policy_step(model, ids, attn)
    assert cap.num_pending == 1, "checkpoint recomputation in backward was recorded as another forward"
    batch = cap.rollout_batch(input_ids=ids, attention_mask=attn)
    assert torch.equal(batch.aux_hidden, torch.cat([ref.hidden_states[i][attn.bool()] for i in (1, 2, 3)], -1))
    assert torch.equal(loss_on, loss_off) and all(torch.equal(grads_on[n], grads_off[n]) for n in grads_off)


def test_loss_mask_is_next_token_completion_and_top_token_in_draft_vocab():
    model = tiny_model("qwen3", layers=4, hidden=64)
    ids, attn, comp = _padded_inputs(seed=3)
    with FeatureCapture(model, aux_layer_ids=(1, 2, 3), draft_vocab_ids=DRAFT_IDS) as cap, \
            FeatureCapture(model, aux_layer_ids=(1, 2, 3)) as full_vocab:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    batch = cap.rollout_batch(input_ids=ids, attention_mask=attn, completion_mask=comp)
    sel = attn.bool()
    next_comp = torch.zeros_like(comp)
    next_comp[:, :-1] = comp[:, 1:]  # teacher at t predicts token t+1
    full = full_vocab.rollout_batch(input_ids=ids, attention_mask=attn, completion_mask=comp)
    assert torch.equal(full.loss_mask, next_comp[sel])
    top_in = torch.isin(logits.argmax(-1), DRAFT_IDS)
    assert 0 < top_in[sel].sum() < sel.sum(), "the draft vocab should hold some top tokens, not all"
    assert torch.equal(batch.loss_mask, (next_comp & top_in)[sel])
    assert batch.seq_lens.tolist() == [12, 8, 5]
    assert batch.teacher_logprobs.shape == (25, DRAFT_IDS.numel())
    full = logits.float().log_softmax(-1)[sel][:, DRAFT_IDS]  # full-vocab log-probs, not renormalised
    torch.testing.assert_close(batch.teacher_logprobs, full, rtol=0, atol=1e-5)


def test_left_padded_and_packed_captures_match_right_padded():
    model = tiny_model("qwen2", layers=4, hidden=64)
    ids, attn, comp = _padded_inputs(seed=4)  # right-padded, lengths 12, 8, 5
    sel, lens = attn.bool(), attn.sum(1)
    left = torch.stack([torch.roll(x, 12 - int(n)) for x, n in zip(ids, lens)])
    left_attn, left_comp = attn.flip(1), torch.stack([torch.roll(x, 12 - int(n)) for x, n in zip(comp, lens)])
    flat_pos = torch.cat([torch.arange(n) for n in lens.tolist()])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    rows_ids = torch.stack([ids[0], torch.cat([ids[1, :8], torch.zeros(4, dtype=torch.long)])])  # 2 rows of 12
    rows_ids[1, 8:] = ids[2, :4]  # row 2 = seq 1 (8 tokens) + first 4 tokens of seq 2
    rows_pos = torch.stack([torch.arange(12), torch.cat([torch.arange(8), torch.arange(4)])])
    with FeatureCapture(model, aux_layer_ids=(1, 2, 3)) as cap:
        model(input_ids=ids, attention_mask=attn, use_cache=False)
        model(input_ids=left, attention_mask=left_attn, position_ids=(left_attn.cumsum(1) - 1).clamp(min=0),
              use_cache=False)
        model(input_ids=ids[sel][None], position_ids=flat_pos[None], use_cache=False)
        for _ in range(2):
            model(input_ids=rows_ids, position_ids=rows_pos, use_cache=False)
    ref = cap.rollout_batch(input_ids=ids, attention_mask=attn, completion_mask=comp)
    got = [cap.rollout_batch(input_ids=left, attention_mask=left_attn, completion_mask=left_comp),
           cap.rollout_batch(input_ids=ids[sel], cu_seqlens=cu, completion_mask=comp[sel])]
    rows = cap.rollout_batch(input_ids=rows_ids, cu_seqlens=torch.tensor([0, 12, 20, 24]))
    for b in got:
        assert torch.equal(b.cu_seqlens, ref.cu_seqlens) and torch.equal(b.loss_mask, ref.loss_mask)
        assert torch.equal(b.input_ids, ref.input_ids)
        torch.testing.assert_close(b.aux_hidden, ref.aux_hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.teacher_logprobs, ref.teacher_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.aux_hidden[:20], ref.aux_hidden[:20], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="row end"):  # the 2nd sequence would cross the end of row 1
        cap.rollout_batch(input_ids=rows_ids, cu_seqlens=torch.tensor([0, 10, 24]))


def test_logits_to_keep_masks_positions_without_a_teacher():
    model = tiny_model("llama", layers=4, hidden=64)
    ids = torch.randint(0, 1147, (2, 10))
    with FeatureCapture(model, aux_layer_ids=(1, 2, 3)) as cap:
        model(input_ids=ids, use_cache=False, logits_to_keep=4)
    batch = cap.rollout_batch(input_ids=ids)
    has = torch.arange(10) >= 6
    has[-1] = False  # last token: no next token to learn
    assert torch.equal(batch.loss_mask, has.repeat(2))


def test_topk_and_final_hidden_teachers_reproduce_draft_vocab_logprobs():
    model = tiny_model("llama", layers=4, hidden=64)
    ids, attn, comp = _padded_inputs(seed=5)
    kw = dict(aux_layer_ids=(1, 2, 3), draft_vocab_ids=DRAFT_IDS)
    with FeatureCapture(model, **kw) as full, FeatureCapture(model, teacher="topk", top_k=8, **kw) as topk, \
            FeatureCapture(model, teacher="final_hidden", **kw) as fin:
        model(input_ids=ids, attention_mask=attn, use_cache=False)
    ref = full.rollout_batch(input_ids=ids, attention_mask=attn, completion_mask=comp).to_draft_batch()
    tk = topk.rollout_batch(input_ids=ids, attention_mask=attn, completion_mask=comp).to_draft_batch(DRAFT_IDS)
    fh = fin.rollout_batch(input_ids=ids, attention_mask=attn, completion_mask=comp).to_draft_batch(
        DRAFT_IDS, target_head=model.lm_head)
    torch.testing.assert_close(fh.teacher_logprobs[ref.valid], ref.teacher_logprobs[ref.valid], rtol=0, atol=1e-5)
    assert torch.equal(fh.loss_mask, ref.loss_mask) and torch.equal(tk.loss_mask, ref.loss_mask)
    kept = tk.teacher_logprobs > MISSING_LOGPROB
    assert (kept.sum(-1)[ref.valid] <= 8).all() and kept[ref.loss_mask].any(-1).all()
    torch.testing.assert_close(tk.teacher_logprobs[kept], ref.teacher_logprobs[kept], rtol=0, atol=1e-5)


def test_to_draft_batch_right_pads_and_marks_valid():
    model = tiny_model("llama", layers=4, hidden=64)
    ids, attn, comp = _padded_inputs(seed=6)
    with FeatureCapture(model, aux_layer_ids=(1, 2, 3), store_dtype=torch.bfloat16) as cap:
        model(input_ids=ids, attention_mask=attn, use_cache=False)
    rb = cap.rollout_batch(input_ids=ids, attention_mask=attn, completion_mask=comp, policy_version=7)
    assert rb.aux_hidden.dtype == torch.bfloat16 and rb.teacher_logprobs.dtype == torch.float32
    db = rb.to_draft_batch()
    assert db.aux_hidden.shape == (3, 12, 3 * 64) and db.aux_hidden.dtype == torch.float32
    assert torch.equal(db.valid, attn.bool()) and db.policy_version == 7
    assert torch.equal(db.input_ids[db.valid], rb.input_ids) and not db.loss_mask[~db.valid].any()


@pytest.mark.parametrize("field, bad, match", [
    ("aux_hidden", torch.zeros(9, 12), "aux_hidden"),
    ("aux_hidden", torch.zeros(10, 13), "3\\*H_t"),
    ("loss_mask", torch.ones(10), "loss_mask"),
    ("input_ids", torch.zeros(10, dtype=torch.int32), "input_ids"),
    ("cu_seqlens", torch.tensor([0, 4, 9]), "cu_seqlens"),
    ("teacher_logprobs", torch.zeros(11, 5), "teacher_logprobs"),
    ("final_hidden", torch.zeros(10, 5), "final_hidden"),
])
def test_rollout_batch_rejects_mismatched_fields_naming_them(field, bad, match):
    good = dict(input_ids=torch.zeros(10, dtype=torch.long), cu_seqlens=torch.tensor([0, 4, 10]),
                aux_hidden=torch.zeros(10, 12), loss_mask=torch.ones(10, dtype=torch.bool),
                teacher_logprobs=torch.zeros(10, 5))
    RolloutBatch(**good)
    with pytest.raises(ValueError, match=match):
        RolloutBatch(**{**good, field: bad})


def test_bad_aux_layer_ids_and_unknown_models_raise_value_error():
    model = tiny_model("llama", layers=4, hidden=64)
    with pytest.raises(ValueError, match="distinct"):
        FeatureCapture(model)  # default (2, 2, 1) for L=4
    with pytest.raises(ValueError, match="must lie in 0..3"):
        FeatureCapture(model, aux_layer_ids=(1, 2, 4))
    with pytest.raises(ValueError, match="increasing"):
        FeatureCapture(model, aux_layer_ids=(3, 1, 2))  # vLLM concatenates in layer order: refuse, don't sort
    with pytest.raises(ValueError, match="layers="):
        FeatureCapture(torch.nn.Sequential(torch.nn.Linear(2, 2)), teacher="final_hidden")
    with pytest.raises(RuntimeError, match="inside `with FeatureCapture"):
        FeatureCapture(model, aux_layer_ids=(1, 2, 3)).rollout_batch(input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_hooks_are_removed_on_exit():
    model = tiny_model("llama", layers=4, hidden=64)
    ids = torch.randint(0, 1147, (1, 5))
    with FeatureCapture(model, aux_layer_ids=(1, 2, 3)) as cap:
        model(input_ids=ids, use_cache=False)
    model(input_ids=ids, use_cache=False)
    assert cap.num_pending == 1
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_measure_capture_overhead_returns_a_fraction_and_leaves_no_hooks(monkeypatch):
    """A fake clock: every timed step takes 0.5 s, and rollout_batch (part of the "on" arm) 0.5 s
    more, so the overhead must come out as exactly 1.0 (real timings would be flaky here)."""
    import draftadapt.capture as capture_mod

    clock = [0.0]

    def tick():  # called at the start and end of each timed step
        clock[0] += 0.5
        return clock[0]

    real_rollout_batch = capture_mod.FeatureCapture.rollout_batch

    def slow_rollout_batch(self, *a, **kw):
        clock[0] += 0.5
        return real_rollout_batch(self, *a, **kw)

    monkeypatch.setattr(capture_mod, "time", SimpleNamespace(perf_counter=tick))
    monkeypatch.setattr(capture_mod.FeatureCapture, "rollout_batch", slow_rollout_batch)
    model = tiny_model("llama", layers=4, hidden=64).train()
    frac = measure_capture_overhead(model, torch.randint(0, 1147, (2, 16)), repeats=2, aux_layer_ids=(1, 2, 3))
    assert math.isclose(frac, 1.0), f"median(on) / median(off) - 1 with on = 1.0 s, off = 0.5 s: got {frac}"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
