"""No path builds a [tokens, V] or [tokens, Vd] tensor beyond one chunk of positions, at the real vocabulary
(V = 151,936): capture from the policy's logits, draft-LM distillation, offline features, the final_hidden
(MTP-style) teacher. Each test shrinks the chunk to a few rows and runs several chunks' worth of tokens, so a
path that materialises all tokens at once is caught; shapes stay small enough for CI (seconds each)."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from vocab_probe import QWEN3_VOCAB, LargestVocabTensor

import draftadapt.batch as batch_mod
from draftadapt.capture import FeatureCapture

V, H, TOKENS, CHUNK_ROWS = QWEN3_VOCAB, 64, 192, 8
LIVE_CHUNKS = 10  # vocabulary-sized rows alive at once <= this many chunks (a chunk's loss has ~7 [n, V] temporaries)


@pytest.fixture(scope="module")
def policy():
    """A 4-layer hidden-64 Qwen3 at the real vocabulary (untied head), filled directly: transformers' own
    init of two [V, H] matrices takes ~4 s here, this ~1 s."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    torch.manual_seed(0)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(tiny_config("qwen3", layers=4, hidden=H, vocab=V)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.fill_(1.0)
    return model


def test_capture_from_logits_never_gathers_every_token_over_the_vocab(policy, monkeypatch):
    """The teacher is built from the policy's logits [B, T, V] in chunks of rows gathered one chunk at a
    time (not from an [M, V] gather of all kept rows), top-k (what teacher='auto' picks at this V)."""
    monkeypatch.setattr(batch_mod, "_CHUNK_ELEMENTS", CHUNK_ROWS * V)
    ids = torch.randint(0, V, (2, TOKENS // 2), generator=torch.Generator().manual_seed(0))
    with FeatureCapture(policy, aux_layer_ids=(1, 2, 3), teacher="topk", top_k=64) as cap, torch.no_grad():
        logits = policy(input_ids=ids).logits
    with LargestVocabTensor(V) as probe:
        got = cap.rollout_batch(ids)
    assert 0 < probe.rows[V] <= CHUNK_ROWS and probe.live[V] <= LIVE_CHUNKS * CHUNK_ROWS, (
        f"capture built a [{probe.rows[V]}, {V}] tensor ({probe.live[V]} rows alive at once) from {TOKENS} tokens' "
        f"logits; one chunk is {CHUNK_ROWS} rows")
    logp = logits.reshape(-1, V).float().log_softmax(-1)  # the teacher it must still be (ids up to ties)
    torch.testing.assert_close(got.teacher_topk_logprobs, logp.topk(64, -1).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp.gather(1, got.teacher_topk_ids), got.teacher_topk_logprobs, rtol=1e-5, atol=1e-5)


def test_draft_lm_distillation_keeps_one_chunk_of_logits_and_the_same_loss_and_gradients(policy):
    """distill_loss at V = 151,936 with a top-k teacher: no [N, V] tensor for backward (the former loss kept
    every chunk's logits and log-softmax); loss, accuracy and gradients equal the plain full-logits KL."""
    from draftadapt.distill import TeacherCapture, distill_loss
    from draftadapt.drafts.draft_lm import DraftLM

    draft = DraftLM.from_policy(policy, num_layers=1)
    ids = torch.randint(0, V, (2, TOKENS // 2), generator=torch.Generator().manual_seed(1))
    with TeacherCapture(policy, teacher="topk", top_k=64) as cap, torch.no_grad():
        policy(input_ids=ids)
    batch = cap.rollout_batch(ids).to_draft_batch(draft.target_ids(), sparse_teacher=True)
    params = [p for p in draft.parameters() if p.requires_grad]
    with LargestVocabTensor(V) as probe:
        got = distill_loss(draft, batch, chunk_elements=CHUNK_ROWS * V)
        grads = torch.autograd.grad(got.loss, params)
    n = int((batch.loss_mask & batch.valid).sum())
    assert got.tokens == n > 2 * CHUNK_ROWS
    assert 0 < probe.rows[V] <= CHUNK_ROWS and probe.live[V] <= LIVE_CHUNKS * CHUNK_ROWS, (
        f"distillation kept {probe.live[V]} rows of [*, {V}] alive at once (largest tensor {probe.rows[V]} rows) "
        f"for {n} positions; one chunk is {CHUNK_ROWS} rows")
    # the plain definition, all logits at once
    scored = batch.loss_mask & batch.valid
    r, c = scored.nonzero(as_tuple=True)
    logq = draft.head(draft.hidden(batch.input_ids, batch.valid)[scored]).float().log_softmax(-1)
    logp = batch_mod.teacher_dense(batch, r, c).log_softmax(-1)
    want = (logp.exp() * (logp - logq)).sum(-1).mean()
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    assert float(got.acc) == float((logq.argmax(-1) == logp.argmax(-1)).float().mean())
    for a, b, p in zip(grads, torch.autograd.grad(want, params, allow_unused=True), params):
        torch.testing.assert_close(a, torch.zeros_like(p) if b is None else b, rtol=1e-4, atol=1e-7)


def test_offline_features_keep_a_top_k_teacher_built_one_chunk_at_a_time(policy, monkeypatch):
    """extract_features at V = 151,936, draft vocab 32k: the teacher is top-64 (not [B, T, Vd] fp32 per batch,
    128 KB/token) and nothing past the target's own logits is vocabulary-sized beyond one chunk (the former
    path made a [B, T, V] fp32 log-softmax)."""
    from draftadapt.offline import extract_features

    monkeypatch.setattr(batch_mod, "_CHUNK_ELEMENTS", CHUNK_ROWS * V)
    g = torch.Generator().manual_seed(2)
    vd, seqs = 32_000, [torch.randint(0, V, (n,), generator=g).tolist() for n in (96, 80)]
    vocab = torch.randperm(V, generator=g)[:vd]
    with LargestVocabTensor(V, vd) as probe:
        handles = probe.exempt(policy.lm_head)
        (got,) = extract_features(policy, seqs, (1, 2, 3), vocab, batch_size=2)
    for h in handles:
        h.remove()
    assert got.teacher_logprobs is None and got.teacher_topk_ids.shape == (2, 96, 64)
    assert max(probe.live.values()) <= LIVE_CHUNKS * CHUNK_ROWS, (
        f"offline features built [{probe.rows[V]}, V] / [{probe.rows[vd]}, Vd] tensors ({probe.live} rows alive at "
        f"once); one chunk is {CHUNK_ROWS} rows")
    with torch.no_grad():  # the reference: full log-softmax, top-64, mapped to draft ids (-1 outside)
        logp = policy(input_ids=got.input_ids, attention_mask=got.valid.long()).logits.float().log_softmax(-1)
    t2d = torch.full((V,), -1).index_copy_(0, vocab, torch.arange(vd))
    valid = got.valid
    torch.testing.assert_close(got.teacher_topk_logprobs[valid], logp.topk(64, -1).values[valid], rtol=1e-5, atol=1e-5)
    ids = got.teacher_topk_ids[valid]
    assert bool((ids >= -1).all()) and bool((ids >= 0).any()) and bool((ids < 0).any())
    assert torch.equal(got.loss_mask, valid & (t2d[logp.argmax(-1)] >= 0))


def test_final_hidden_teacher_runs_the_target_head_per_loss_chunk_with_the_dense_teachers_loss(monkeypatch):
    """A final_hidden teacher (no logits work at capture) at V = 151,936, draft vocab 32k: to_draft_batch with
    sparse_teacher=True (what the workers pass) keeps final_hidden + the head, and the TTT loss runs the head one
    chunk of positions at a time; the former path built the dense [N, Vd] fp32 teacher and padded it to
    [B, T, Vd]. Loss and gradients equal the dense teacher's."""
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.drafts.vocab import build_draft_vocab
    from draftadapt.ttt import ttt_loss

    monkeypatch.setattr(batch_mod, "_CHUNK_ELEMENTS", CHUNK_ROWS * V)
    g = torch.Generator().manual_seed(3)
    vd, lengths = 32_000, (100, 92)
    n = sum(lengths)
    embed, head, final = torch.randn(V, H, generator=g) * 0.05, torch.nn.Linear(H, V, bias=False), torch.randn(n, H)
    with torch.no_grad():
        head.weight.normal_(0, 0.3, generator=g)
        top = head(final[: n * 3 // 4]).argmax(-1)  # 3/4 of the positions have their top token in the draft vocab
    torch.manual_seed(3)
    vocab = build_draft_vocab([top.repeat(2), torch.randint(0, V, (20_000,), generator=g)], V, vd)
    draft = Eagle3Draft.from_target(tiny_config("qwen3", layers=8, hidden=H, vocab=V), vocab)
    draft._init_weights(std=0.15)
    rollout = batch_mod.RolloutBatch(input_ids=torch.randint(0, V, (n,), generator=g),
                                     cu_seqlens=torch.tensor([0, lengths[0], n]), aux_hidden=torch.randn(n, 3 * H),
                                     loss_mask=torch.ones(n, dtype=torch.bool), final_hidden=final)
    params = [p for p in draft.parameters() if p.requires_grad]
    with LargestVocabTensor(V, vd) as probe:
        sparse = rollout.to_draft_batch(draft.target_ids(), target_head=head, sparse_teacher=True)
        got = ttt_loss(draft, sparse, embed, steps=2, chunk_elements=CHUNK_ROWS * vd)
        grads = torch.autograd.grad(got.loss, params)
    assert sparse.teacher_logprobs is None and n > 2 * LIVE_CHUNKS * CHUNK_ROWS and int(got.step_tokens[0]) > 100
    assert max(probe.live.values()) <= LIVE_CHUNKS * CHUNK_ROWS, (
        f"the final_hidden teacher built [{probe.rows[V]}, V] / [{probe.rows[vd]}, Vd] tensors ({probe.live} rows "
        f"alive at once) for {n} positions; one chunk is {CHUNK_ROWS} rows")
    dense = rollout.to_draft_batch(draft.target_ids(), target_head=head)
    assert torch.equal(dense.loss_mask, sparse.loss_mask)
    want = ttt_loss(draft, dense, embed, steps=2, chunk_elements=CHUNK_ROWS * vd)
    # the head's logits of a row differ by ulps with the rows computed beside it (matmul blocking): not bit-equal
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0)
    for a, b in zip(grads, torch.autograd.grad(want.loss, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_capture_of_a_draft_vocab_teacher_keeps_one_copy_of_it(policy, monkeypatch):
    """teacher='draft_vocab' at V = 151,936, draft vocab 32k, fp16 storage: the [M, Vd] teacher is the product,
    written chunk by chunk in its storage dtype; the former path held the fp32 parts, their concatenation, a
    zero-filled copy and the cast at once (~4 copies)."""
    monkeypatch.setattr(batch_mod, "_CHUNK_ELEMENTS", CHUNK_ROWS * V)
    g = torch.Generator().manual_seed(4)
    vd, ids = 32_000, torch.randint(0, V, (2, TOKENS // 2), generator=g)
    vocab = torch.randperm(V, generator=g)[:vd]
    with FeatureCapture(policy, aux_layer_ids=(1, 2, 3), draft_vocab_ids=vocab, teacher_dtype=torch.float16) as cap:
        with torch.no_grad():
            logits = policy(input_ids=ids).logits
    with LargestVocabTensor(V, vd) as probe:
        got = cap.rollout_batch(ids)
    assert got.teacher_logprobs.shape == (TOKENS, vd) and got.teacher_logprobs.dtype == torch.float16
    assert probe.live[V] <= LIVE_CHUNKS * CHUNK_ROWS and probe.live[vd] <= TOKENS + LIVE_CHUNKS * CHUNK_ROWS, (
        f"capture kept {probe.live} rows of [*, V] / [*, Vd] alive at once for a [{TOKENS}, {vd}] teacher")
    want = logits.reshape(-1, V).float().log_softmax(-1)[:, vocab].half()
    torch.testing.assert_close(got.teacher_logprobs, want, rtol=2e-3, atol=2e-3)
