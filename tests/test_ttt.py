"""TTT: the unroll reproduces vLLM's draft steps; the loss scores the right teacher positions."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from draftadapt.batch import DraftBatch
from draftadapt.drafts.eagle3 import Eagle3Draft, attend
from draftadapt.drafts.vocab import build_draft_vocab
from draftadapt.ttt import ttt_loss, unroll

V, VD, H = 200, 120, 64


@pytest.fixture
def setup():
    torch.manual_seed(0)
    cfg = tiny_config("qwen3", layers=8, hidden=H, vocab=V)
    draft = Eagle3Draft.from_target(cfg, build_draft_vocab([torch.randint(0, V, (3000,))], V, VD))
    draft._init_weights(std=0.15)
    embed = torch.nn.Embedding(V, H)
    return draft, embed


def make_batch(lengths, t=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = t or max(lengths)
    valid = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    ids = torch.randint(0, V, (len(lengths), t), generator=g) * valid
    teacher = torch.randn(len(lengths), t, VD, generator=g).mul(3).log_softmax(-1)
    loss_mask = valid & (torch.rand(len(lengths), t, generator=g) < 0.8)
    return DraftBatch(ids, torch.randn(len(lengths), t, 3 * H, generator=g), teacher, loss_mask, valid)


def kv_cache_decode(draft, embed, ids, aux, base, steps):
    """vLLM's proposer for one sequence at one base position: a first pass over positions
    0..base (cache filled), then steps 2..K one token each on the own pre-norm state, at
    positions base+1, base+2, ..., attending the whole cache. Returns K logits [Vd]."""
    w = embed.weight
    n = base + 1
    q, k, v, res = draft.midlayer.project(w[ids[1:base + 2]][None], draft.fuse(aux[None, :n]), torch.arange(n)[None])
    pre = draft.midlayer.finish(attend(q, k, v, torch.ones(n, n, dtype=torch.bool).tril()[None]), res)
    out, cache_k, cache_v, h = [draft.logits(pre[0, -1])], k, v, pre[:, -1:]
    for s in range(2, steps + 1):
        q, k, v, res = draft.midlayer.project(w[ids[base + s]][None, None], h, torch.tensor([[base + s - 1]]))
        cache_k, cache_v = torch.cat([cache_k, k], 2), torch.cat([cache_v, v], 2)
        everything = torch.ones(1, 1, cache_k.shape[2], dtype=torch.bool)
        h = draft.midlayer.finish(attend(q, cache_k, cache_v, everything), res)
        out.append(draft.logits(h[0, 0]))
    return out


@torch.no_grad()
def test_step1_logits_equal_plain_causal_forward(setup):
    draft, embed = setup
    b = make_batch([16])
    t = 15  # position 15 has no next token
    pre = draft(embed.weight[b.input_ids[:, 1:]], draft.fuse(b.aux_hidden[:, :t]), torch.arange(t)[None],
                torch.ones(t, t, dtype=torch.bool).tril()[None])
    torch.testing.assert_close(unroll(draft, b, embed, 1)[0][:, :t], draft.logits(pre))


@torch.no_grad()
def test_step_k_logits_equal_vllm_style_kv_cache_decode(setup):
    draft, embed = setup
    b = make_batch([18, 11], t=20)  # padded batch: the short row must not see the pad or the other row
    got = unroll(draft, b, embed, 4)
    for row, length in enumerate((18, 11)):
        for base in range(length - 4):
            want = kv_cache_decode(draft, embed, b.input_ids[row], b.aux_hidden[row], base, 4)
            for k in range(4):
                torch.testing.assert_close(got[k][row, base], want[k], atol=2e-5, rtol=1e-4,
                                           msg=f"row {row} base {base} step {k + 1}")


@torch.no_grad()
def test_later_steps_feed_back_the_prenorm_state(setup):
    draft, embed = setup
    b = make_batch([12])
    step2 = unroll(draft, b, embed, 2)[1]
    draft.norm.weight.mul_(1.5)  # final norm only scales the logits unless its output were fed back
    torch.testing.assert_close(unroll(draft, b, embed, 2)[1], step2 * 1.5, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_padding_and_neighbours_do_not_change_a_sequence(setup):
    draft, embed = setup
    b = make_batch([20, 9], t=24)
    alone = DraftBatch(*(getattr(b, f)[1:, :9] for f in ("input_ids", "aux_hidden", "teacher_logprobs",
                                                         "loss_mask", "valid")))
    for k, (batched, single) in enumerate(zip(unroll(draft, b, embed, 3), unroll(draft, alone, embed, 3))):
        ok = slice(0, 9 - k - 1)  # bases whose step-k input token exists
        torch.testing.assert_close(batched[1, ok], single[0, ok], atol=2e-5, rtol=1e-4)
    # left padding: the same sequence shifted right behind pads keeps its positions from 0
    pad = 5
    left = DraftBatch(*(torch.cat([torch.zeros_like(x[:, :pad]), x], 1) for x in (
        alone.input_ids, alone.aux_hidden, alone.teacher_logprobs, alone.loss_mask, alone.valid)))
    for k, (shifted, single) in enumerate(zip(unroll(draft, left, embed, 3), unroll(draft, alone, embed, 3))):
        torch.testing.assert_close(shifted[0, pad:pad + 9 - k - 1], single[0, : 9 - k - 1], atol=2e-5, rtol=1e-4)


def test_step_k_is_scored_against_teacher_at_i_plus_k_under_loss_mask(setup):
    draft, embed = setup
    b = make_batch([14, 10], t=14)
    res = ttt_loss(draft, b, embed, steps=3, decay=0.5)
    logits = unroll(draft, b, embed, 3)
    for k in range(1, 4):
        kls, hits = [], []
        for row in range(2):
            for i in range(14 - k):
                if b.valid[row, i] and b.valid[row, i + k] and b.loss_mask[row, i + k]:
                    p = b.teacher_logprobs[row, i + k].log_softmax(-1).exp()
                    logq = logits[k - 1][row, i].log_softmax(-1)
                    kls.append((p * (p.log() - logq)).sum())
                    hits.append(float(logq.argmax() == p.argmax()))
        assert res.step_tokens[k - 1] == len(kls)
        torch.testing.assert_close(res.step_loss[k - 1], torch.stack(kls).mean().detach(), atol=1e-5, rtol=1e-5)
        assert abs(res.step_acc[k - 1] - sum(hits) / len(hits)) < 1e-6
    torch.testing.assert_close(res.loss.detach(), res.step_loss[0] + 0.5 * res.step_loss[1] + 0.25 * res.step_loss[2])


@torch.no_grad()
def test_k1_loss_is_zero_for_a_draft_equal_to_its_renormalised_teacher(setup):
    draft, embed = setup
    b = make_batch([16])
    step1 = unroll(draft, b, embed, 1)[0]  # base i predicts the token the teacher at i+1 describes
    teacher = torch.cat([torch.zeros_like(step1[:, :1]), step1[:, :-1]], 1).log_softmax(-1) - 2.0  # not normalised
    res = ttt_loss(draft, DraftBatch(b.input_ids, b.aux_hidden, teacher, b.valid, b.valid), embed, steps=1)
    assert res.step_tokens.tolist() == [15]
    assert abs(float(res.loss)) < 1e-5 and float(res.step_acc[0]) == 1.0
    assert float(ttt_loss(draft, b, embed, steps=1).loss) > 0.1


def test_step1_of_a_k_step_loss_equals_single_step_training(setup):
    draft, embed = setup
    b = make_batch([16, 12])
    one, three = ttt_loss(draft, b, embed, steps=1), ttt_loss(draft, b, embed, steps=3)
    torch.testing.assert_close(one.loss.detach(), three.step_loss[0])
    assert one.step_loss.shape == (1,) and three.step_loss.shape == (3,)


def test_gradients_reach_the_draft_only(setup):
    draft, embed = setup
    b = make_batch([16, 12])
    ttt_loss(draft, b, embed, steps=3).loss.backward()
    assert embed.weight.grad is None, "the target embedding must stay frozen"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in draft.parameters())


def test_bad_step_count_is_refused(setup):
    draft, embed = setup
    with pytest.raises(ValueError, match="steps"):
        ttt_loss(draft, make_batch([8]), embed, steps=0)


# ---- the O(T) path against the dense oracle (`unroll_dense`) ----------------------------------

def mtp_setup():
    from draftadapt.drafts.mtp import MTPDraft

    torch.manual_seed(0)
    cfg = tiny_config("qwen2", layers=2, hidden=H, vocab=V)
    draft = MTPDraft.from_target(cfg, torch.nn.Linear(H, V, bias=False))
    with torch.no_grad():
        for name, p in draft.named_parameters():
            p.copy_((1.0 if name.endswith("layernorm.weight") else 0.0) + 0.15 * torch.randn(p.shape))
    return draft, torch.nn.Embedding(V, H)


def layout_batch(kind: str, vd: int, seed: int = 3) -> DraftBatch:
    """right: right-padded rows; left: left-padded; packed: several sequences per row (positions
    restart, one is a window starting at position 100), padding between and after them."""
    g = torch.Generator().manual_seed(seed)
    t = 24
    if kind == "packed":
        spans = [[(0, 7, 0), (7, 13, 0), (13, 21, 100)], [(2, 24, 0)]]  # (start, end, first position)
        valid, pos = torch.zeros(2, t, dtype=torch.bool), torch.zeros(2, t, dtype=torch.long)
        for r, row in enumerate(spans):
            for s, e, p0 in row:
                valid[r, s:e], pos[r, s:e] = True, torch.arange(p0, p0 + e - s)
    else:
        lens = torch.tensor([24, 13])
        valid = torch.arange(t)[None, :] < lens[:, None]
        valid = valid if kind == "right" else valid.flip(1)
        pos = None
    ids = torch.randint(0, V, (2, t), generator=g)
    teacher = torch.randn(2, t, vd, generator=g).mul(3).log_softmax(-1)
    return DraftBatch(ids, torch.randn(2, t, 3 * H, generator=g), teacher, valid & (torch.rand(2, t, generator=g) < 0.8),
                      valid, final_hidden=torch.randn(2, t, H, generator=g), positions=pos)


@pytest.mark.parametrize("kind", ["right", "left", "packed"])
@pytest.mark.parametrize("arch", ["eagle3", "mtp"])
def test_unroll_equals_the_dense_oracle_for_k_1_to_5_logits_and_gradients(setup, arch, kind, monkeypatch):
    import draftadapt.ttt as ttt
    from draftadapt.ttt import unroll_dense, unroll_hidden

    monkeypatch.setattr(ttt, "LAYER_CHUNK_ELEMENTS", 2 * H * 5)  # the layer recomputed in chunks of 5 positions
    draft, embed = setup if arch == "eagle3" else mtp_setup()
    b = layout_batch(kind, draft.config.draft_vocab_size)
    params = [p for p in draft.parameters() if p.requires_grad]
    for steps in range(1, 6):
        g = torch.Generator().manual_seed(steps)
        weights = [torch.randn(2, 24, draft.config.draft_vocab_size, generator=g) for _ in range(steps)]
        grads = []
        for run in ("dense", "chunked"):
            if run == "dense":
                logits = unroll_dense(draft, b, embed, steps)
            else:  # chunks of 3 query positions: chunk borders fall inside sequences
                logits = [draft.logits(h) for h in unroll_hidden(draft, b, embed, steps, chunk_elements=3 * 2 * 4 * 24)]
            grads.append(torch.autograd.grad(sum((x * w)[b.valid].sum() for x, w in zip(logits, weights)), params))
            if run == "dense":
                want = [x[b.valid].detach() for x in logits]
        for k, (x, w) in enumerate(zip(logits, want)):
            torch.testing.assert_close(x[b.valid], w, atol=2e-5, rtol=1e-4, msg=f"{arch} {kind} K={steps} step {k + 1}")
        for gd, gc in zip(*grads):
            torch.testing.assert_close(gc, gd, atol=1e-4, rtol=1e-4, msg=f"{arch} {kind} K={steps} grads")


@torch.no_grad()
def test_a_packed_row_equals_its_sequences_trained_alone(setup):
    draft, embed = setup
    b = layout_batch("packed", VD)
    packed = unroll(draft, b, embed, 3)
    for s, e in ((0, 7), (7, 13), (13, 21)):
        alone = DraftBatch(*(getattr(b, f)[:1, s:e] for f in ("input_ids", "aux_hidden", "teacher_logprobs",
                                                              "loss_mask", "valid")), positions=b.positions[:1, s:e])
        for k, single in enumerate(unroll(draft, alone, embed, 3)):
            ok = slice(0, e - s - k - 1)  # bases whose step-k input token lies inside the sequence
            torch.testing.assert_close(packed[k][0, s:e][ok], single[0, ok], atol=2e-5, rtol=1e-4)


def test_padding_between_tokens_without_positions_is_refused(setup):
    draft, embed = setup
    b = make_batch([10])
    b.valid[0, 4] = False
    with pytest.raises(ValueError, match="positions"):
        unroll(draft, b, embed, 2)


def reference_loss(draft, b, embed, steps, loss, tv_weight, decay=0.8):
    """The objective by plain autograd over whole logit tensors (what the chunked gradient must equal)."""
    total = 0.0
    scored = b.loss_mask & b.valid
    for k, logit in enumerate(unroll(draft, b, embed, steps), start=1):
        sel = torch.cat([scored[:, k:], torch.zeros_like(scored[:, :k])], 1) & b.valid
        rows, cols = sel.nonzero(as_tuple=True)
        logp = b.teacher_logprobs[rows, cols + k].log_softmax(-1)
        logq = logit[sel].log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        tv = 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
        top1 = -logq.gather(-1, logp.argmax(-1, keepdim=True)).squeeze(-1)
        obj = {"kl": kl, "tv": tv, "kl+tv": kl + tv_weight * tv, "top1": top1}[loss]
        total = total + decay ** (k - 1) * obj.mean()
    return total


@pytest.mark.parametrize("arch", ["eagle3", "mtp"])
@pytest.mark.parametrize("loss", ["kl", "tv", "kl+tv", "top1"])
def test_chunked_loss_and_gradients_equal_plain_autograd_over_whole_logits(setup, arch, loss):
    draft, embed = setup if arch == "eagle3" else mtp_setup()
    vd = draft.config.draft_vocab_size
    b = layout_batch("right", vd)
    params = [p for p in draft.parameters() if p.requires_grad]
    want = reference_loss(draft, b, embed, 3, loss, 0.7)
    g_want = torch.autograd.grad(want, params)
    results = []
    for chunk in (5 * vd, 1 << 30):  # 5 positions per chunk vs everything at once
        res = ttt_loss(draft, b, embed, steps=3, loss=loss, tv_weight=0.7, chunk_elements=chunk)
        torch.testing.assert_close(res.loss, want, atol=1e-5, rtol=1e-5)
        for got, ref in zip(torch.autograd.grad(res.loss, params), g_want):
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)
        results.append(res)
    for field in ("step_loss", "step_acc", "step_kl", "step_tv"):
        torch.testing.assert_close(getattr(results[0], field), getattr(results[1], field))


@torch.no_grad()
def test_tv_loss_is_half_the_l1_distance_between_renormalised_teacher_and_draft(setup):
    draft, embed = setup
    b = make_batch([14, 10], t=14)
    logits = unroll(draft, b, embed, 2)
    tv = ttt_loss(draft, b, embed, steps=2, loss="tv")
    kl, mix = ttt_loss(draft, b, embed, steps=2, loss="kl"), ttt_loss(draft, b, embed, steps=2, loss="kl+tv", tv_weight=0.3)
    for k in range(1, 3):
        vals = [0.5 * (b.teacher_logprobs[r, i + k].softmax(-1) - logits[k - 1][r, i].softmax(-1)).abs().sum()
                for r in range(2) for i in range(14 - k)
                if b.valid[r, i] and b.valid[r, i + k] and b.loss_mask[r, i + k]]
        torch.testing.assert_close(tv.step_loss[k - 1], torch.stack(vals).mean(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tv.step_tv, tv.step_loss)
    torch.testing.assert_close(mix.step_loss, kl.step_loss + 0.3 * tv.step_loss)
    with pytest.raises(ValueError, match="loss"):
        ttt_loss(draft, b, embed, loss="js")


@pytest.mark.parametrize("arch", ["eagle3", "mtp"])
def test_bf16_autocast_loss_tracks_fp32_and_its_gradients_reach_fp32_weights(setup, arch):
    draft, embed = setup if arch == "eagle3" else mtp_setup()
    b = layout_batch("packed", draft.config.draft_vocab_size)
    fp32 = ttt_loss(draft, b, embed, steps=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = ttt_loss(draft, b, embed, steps=3)
    bf16.loss.backward()
    assert float(bf16.loss.detach()) != float(fp32.loss.detach()), "autocast must change the arithmetic"
    torch.testing.assert_close(bf16.step_loss, fp32.step_loss, atol=0.05, rtol=0.02)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in draft.parameters() if p.requires_grad)
