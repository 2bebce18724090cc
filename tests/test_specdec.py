"""The reference speculative decoder is lossless: its samples follow the target distribution."""
import pytest
import torch

from conftest import tiny_model
from draftadapt.drafts.eagle3 import Eagle3Draft
from draftadapt.specdec import propose, speculative_generate, verify
from draftadapt.stats import chi2_homogeneity

ALPHA = 1e-3  # family-wise false-alarm rate of each statistical test below (Bonferroni)


def _first_token_samples(p, q, greedy_drafts, trials, gen):
    out = []
    for _ in range(trials):
        if greedy_drafts:
            t, qd = q.argmax()[None], None
        else:
            t, qd = torch.multinomial(q, 1, generator=gen), q[None]
        target = torch.stack([p, p])  # [k+1, V] with k = 1
        out.append(verify(t, qd, target, generator=gen).tokens[0])
    return out


@pytest.mark.parametrize("greedy_drafts", [False, True])
def test_verify_emits_the_target_distribution(greedy_drafts):
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    q = torch.tensor([0.1, 0.5, 0.1, 0.1, 0.1, 0.1])
    got = _first_token_samples(p, q, greedy_drafts, 6000, gen)
    ref = torch.multinomial(p, 6000, replacement=True, generator=gen).tolist()
    assert chi2_homogeneity(got, ref).pvalue > ALPHA


def test_verify_bonus_token_follows_the_target_at_temperature_1():
    """When every draft is accepted (draft = target at those positions), the extra token must be a
    sample of the target's NEXT distribution (row k), not of a drafted row."""
    gen = torch.Generator().manual_seed(1)
    p0, p1 = torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.tensor([0.1, 0.7, 0.1, 0.1])
    bonus = torch.tensor([0.05, 0.15, 0.3, 0.5])
    target = torch.stack([p0, p1, bonus])  # [k+1, V], k = 2
    got, reached = [], 0
    for _ in range(4000):
        t = torch.stack([torch.multinomial(p0, 1, generator=gen), torch.multinomial(p1, 1, generator=gen)])[:, 0]
        res = verify(t, torch.stack([p0, p1]), target, generator=gen)
        if res.accepted == 2:
            reached += 1
            got.append(res.tokens[2])
    assert reached == 4000, "a draft equal to the target is always accepted"
    ref = torch.multinomial(bonus, 4000, replacement=True, generator=gen).tolist()
    assert chi2_homogeneity(got, ref).pvalue > ALPHA
    # power: 4000 vs 4000 samples over 4 tokens detect w >= 0.05 with 80% (stats.detectable_w);
    # the bonus drawn from a drafted row (p1) instead is far beyond that
    assert chi2_homogeneity(got, torch.multinomial(p1, 4000, replacement=True, generator=gen).tolist()).pvalue < ALPHA


def test_verify_greedy_accepts_while_the_argmax_agrees():
    p = torch.eye(5)[[1, 2, 4, 0]]  # target argmax: 1, 2, 4, then bonus 0
    assert verify(torch.tensor([1, 2, 3]), None, p, greedy=True) == ([1, 2, 4], 2)
    assert verify(torch.tensor([1, 2, 4]), None, p, greedy=True) == ([1, 2, 4, 0], 3)


def _peaky_target(seed=0, vocab=24):
    target = tiny_model("llama", seed=seed, layers=4, hidden=32, vocab=vocab)
    with torch.no_grad():
        target.lm_head.weight.mul_(25.0)  # a random model is near-uniform; sharpen it
    return target


def _draft_for(target, seed=1):
    torch.manual_seed(seed)
    return Eagle3Draft.from_target(target.config, aux_layer_ids=(1, 2, 3),
                                   target_head=target.lm_head.weight.detach()).eval()


def test_draft_step_two_feeds_back_the_prenorm_state_one_position_further():
    """propose() must agree with the TTT unroll's step 2 at the last base position."""
    from draftadapt.batch import DraftBatch
    from draftadapt.ttt import unroll

    target = _peaky_target()
    draft = _draft_for(target)
    seq = torch.tensor([1, 5, 7, 3, 9, 2])
    hs = target(input_ids=seq[None], output_hidden_states=True).hidden_states
    aux = torch.cat([hs[i][0] for i in draft.config.aux_layer_ids], -1)
    prop = propose(draft, target.get_input_embeddings(), aux[:-1], seq[:-1], k=2)
    # TTT with ground truth = the drafted tokens: base n-2 of the prefix, steps 1 and 2
    ids = torch.cat([seq[:-1], prop.tokens])
    n = ids.numel()
    aux_full = torch.cat([aux[:-1], torch.zeros(2, aux.shape[-1])])
    batch = DraftBatch(ids[None], aux_full[None], torch.zeros(1, n, draft.config.draft_vocab_size),
                       torch.ones(1, n, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool))
    with torch.no_grad():
        logits = unroll(draft, batch, target.get_input_embeddings(), steps=2)
    base = seq.numel() - 1 - 2
    assert int(logits[0][0, base].argmax()) == int(prop.tokens[0])
    assert int(logits[1][0, base].argmax()) == int(prop.tokens[1])


@pytest.mark.slow
@pytest.mark.parametrize("sample_drafts, k", [(False, 3), (True, 1)])
def test_speculative_sampling_matches_plain_sampling(sample_drafts, k):
    """8 generated tokens: the prefill token (0), then several verification rounds; with k=1 every
    accepted draft is followed by a bonus token, so bonus tokens land at positions 2-7 (a random
    draft rarely gets all of k=3 accepted). Temperature 1.
    Power (stats.detectable_w): 400 vs 400 samples per position at alpha 1e-3/8 detect a Cohen's w
    of 0.18-0.21 (3-10 dof) with 80%. ~30 CPU-s per case."""
    target, gen = _peaky_target(), torch.Generator().manual_seed(3)
    draft = _draft_for(target)
    prompt, n, steps = [1, 5, 7], 400, 8
    spec, plain, acc, drafts, bonus = [], [], 0, 0, 0
    for _ in range(n):
        out = speculative_generate(target, draft, prompt, steps, k=k, temperature=1.0,
                                   sample_drafts=sample_drafts, generator=gen)
        spec.append(out.tokens)
        acc, drafts = acc + out.counters.accepted, drafts + out.counters.drafts
        bonus += out.counters.accepted_per_pos[k - 1]  # rounds that ended with a bonus token
    with torch.no_grad():
        for _ in range(n):
            seq = list(prompt)
            for _ in range(steps):
                p = torch.softmax(target(input_ids=torch.tensor([seq])).logits[0, -1].float(), -1)
                seq.append(int(torch.multinomial(p, 1, generator=gen)))
            plain.append(seq[len(prompt):])
    assert acc >= 50, f"only {acc} acceptances: too few to exercise the accept path"
    assert k > 1 or bonus >= 50, f"only {bonus} bonus tokens: too few to exercise the all-accepted path"
    for pos in range(steps):
        res = chi2_homogeneity([s[pos] for s in spec], [s[pos] for s in plain])
        assert res.pvalue > ALPHA / steps, (pos, res)


def test_greedy_speculative_equals_greedy_target():
    target = _peaky_target(seed=4)
    draft = _draft_for(target)
    prompt = [1, 5, 7]
    out = speculative_generate(target, draft, prompt, 10, k=3, temperature=0.0)
    want = target.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert out.tokens == want[0, len(prompt):].tolist()
    # counters against an independent count: every round emits accepted + 1 tokens after the
    # prefill token (the last round may overshoot max_new_tokens), and position i is accepted
    # only when i-1 was
    c = out.counters
    assert c.drafts >= 1 and 10 <= 1 + c.drafts + c.accepted < 10 + 3 + 1, c
    assert list(c.accepted_per_pos) == sorted(c.accepted_per_pos, reverse=True), c
