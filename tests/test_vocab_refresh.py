"""Online vocabulary refresh (draftadapt/vocab_refresh.py): remap, optimizer state, coverage, cache, push."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from test_adapter import FakeSink

from draftadapt.adapter import AdapterConfig, DraftAdapter
from draftadapt.batch import RolloutBatch
from draftadapt.cache import CacheConfig
from draftadapt.drafts.eagle3 import Eagle3Draft
from draftadapt.drafts.vocab import build_draft_vocab
from draftadapt.trainer import TrainerConfig
from draftadapt.vocab_refresh import completion_token_counts, remap_optimizer_rows, retarget_vocab
from draftadapt.workers import BackgroundDraftWorker

V, VD, H = 1147, 64, 64  # tiny_model's vocab, the draft vocab, hidden
TASK = torch.arange(1000, 1000 + VD)  # the tokens the policy now writes
B, T, PROMPT = 4, 24, 6


@pytest.fixture(scope="module")
def policy():
    return tiny_model("llama", layers=8, hidden=H)


def generic_vocab():
    """A vocab holding half of TASK and 32 tokens the task never writes (coverage 0.5)."""
    corpus = [torch.cat([torch.arange(32), TASK[:32]])]
    return build_draft_vocab(corpus, V, VD)


def make_draft(policy, seed=0):
    torch.manual_seed(seed)
    return Eagle3Draft.from_target(policy.config, draft_vocab=generic_vocab(), target_head=policy.lm_head.weight)


def full_logits(draft, x):
    """[N, V] draft logits at target ids (-inf outside the draft vocab), as vLLM's compute_logits."""
    out = torch.full((x.shape[0], V), float("-inf"))
    out[:, draft.target_ids()] = draft.logits(x)
    return out


def test_retarget_keeps_kept_token_logits_and_admits_target_rows(policy):
    draft = make_draft(policy)
    with torch.no_grad():
        draft.lm_head.weight.add_(torch.randn_like(draft.lm_head.weight))  # "trained": away from the target's rows
    x = torch.randn(5, H)
    before, old_ids = full_logits(draft, x), draft.target_ids().clone()
    new = build_draft_vocab([TASK], V, VD)
    src = retarget_vocab(draft, new.d2t, policy.lm_head)
    after, new_ids = full_logits(draft, x), draft.target_ids()
    assert torch.equal(new_ids, TASK) and torch.equal(draft.t2d.nonzero().flatten(), TASK)
    kept = torch.isin(new_ids, old_ids)
    assert int(kept.sum()) == 32 and int((src < 0).sum()) == 32
    assert torch.equal(after[:, new_ids[kept]], before[:, new_ids[kept]]), "a kept token's logit changed"
    assert torch.equal(draft.lm_head.weight[~kept], policy.lm_head.weight[new_ids[~kept]].detach()), \
        "admitted tokens must start from the target head's rows"
    assert torch.isinf(after[:, torch.arange(32)]).all(), "dropped tokens must leave the draft vocab"


def test_optimizer_moments_move_with_their_rows(policy):
    draft = make_draft(policy)
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-3)
    draft.logits(torch.randn(7, H)).pow(2).sum().backward()
    opt.step()
    w = draft.lm_head.weight
    old = {k: v.clone() for k, v in opt.state[w].items() if v.shape == w.shape}
    src = retarget_vocab(draft, build_draft_vocab([TASK], V, VD).d2t, policy.lm_head)
    remap_optimizer_rows(opt, w, src)
    kept = src >= 0
    for k, t in old.items():
        assert torch.equal(opt.state[w][k][kept], t[src[kept]]), f"{k} of a kept row did not follow it"
        assert not opt.state[w][k][~kept].any(), f"{k} of an admitted row must start at zero"


def task_batch(version, seed=0, drop_mask_every=3):
    """B sequences: PROMPT prompt tokens, then completion tokens: every TASK token, some twice; the loss mask is
    False at every `drop_mask_every`-th completion position (where a real target's top token left the draft vocab)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(0, 900, (B, PROMPT), generator=g),
                     TASK[torch.randperm(B * (T - PROMPT), generator=g) % VD].reshape(B, T - PROMPT)], 1).reshape(-1)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, PROMPT - 1:T - 1] = True
    mask[:, PROMPT + 1::drop_mask_every] = False
    return RolloutBatch(input_ids=ids, cu_seqlens=torch.arange(B + 1) * T, aux_hidden=torch.randn(B * T, 3 * H),
                        loss_mask=mask.reshape(-1), policy_version=version,
                        teacher_logprobs=torch.randn(B * T, VD).log_softmax(-1))


def test_counts_are_every_completion_token_whatever_the_loss_mask():
    batch = task_batch(0)
    counts = completion_token_counts(batch, V)
    want = torch.bincount(batch.input_ids.reshape(B, T)[:, PROMPT:].reshape(-1), minlength=V)
    assert torch.equal(counts, want)


def make_adapter(policy, sink=None, **cfg):
    config = AdapterConfig(**{"train_steps": 2, "batch_tokens": B * T, "min_tokens": 1, "acceptance_drop": None,
                              "vocab_refresh_every": 1, **cfg})
    return DraftAdapter(make_draft(policy), policy.get_input_embeddings(), config, TrainerConfig(lr=3e-3),
                        CacheConfig(max_tokens=8192), sink=sink, target_head=policy.lm_head)


def test_refresh_raises_coverage_empties_the_cache_and_pushes_the_new_d2t(policy):
    sink = FakeSink()
    adapter = make_adapter(policy, sink)
    old_d2t = adapter.draft.d2t.clone()
    assert adapter.on_rollouts(task_batch(0)) > 0
    st = adapter.on_step_end(0)
    assert st.vocab is not None and st.train is not None
    assert st.vocab.coverage_before == pytest.approx(0.5, abs=0.1) and st.vocab.coverage_after == 1.0
    assert st.vocab.admitted == 32 and st.vocab.dropped_cached > 0
    assert st.cache.sequences == 0, "features captured against the old vocab must leave the cache"
    assert torch.equal(adapter.features.draft_vocab_ids, TASK), "capture must use the new vocab"
    assert st.pushed and torch.equal(sink.states[-1]["d2t"], adapter.draft.d2t) and \
        not torch.equal(sink.states[-1]["d2t"], old_d2t), "the push must carry the new d2t"
    assert st.as_dict()["draft/vocab_coverage"] == 1.0
    with pytest.warns(UserWarning, match="before the draft vocab was refreshed"):
        assert adapter.on_rollouts(task_batch(0, seed=1)) == 0, "a late batch of the old vocab must be dropped"
    # the next boundary: features in the new vocab train; coverage cannot rise by the margin, no refresh
    assert adapter.on_rollouts(task_batch(1, seed=2)) > 0
    st = adapter.on_step_end(1)
    assert st.vocab is None and st.train is not None and st.cache.sequences > 0


def test_expected_counts_extrapolate_the_last_two_steps():
    from draftadapt.vocab_refresh import expected_counts

    recent, previous = torch.tensor([40, 50, 0, 10]), torch.tensor([140, 60, 0, 0])  # shares .7/.3 -> .4/.5/.1
    e = expected_counts(recent, previous)
    assert e.tolist() == [10, 70, 0, 20], "an incoming token gains its rise again; an outgoing one loses its fall"
    assert torch.equal(expected_counts(recent, torch.zeros(4, dtype=torch.long)), recent), "no previous step: recent"
    steady = torch.tensor([30, 70, 0, 0])
    assert torch.equal(expected_counts(steady, steady * 3), steady), "a steady mix extrapolates to itself"


def test_the_first_training_after_a_refresh_is_boosted_once(policy):
    adapter = make_adapter(policy, vocab_refresh_boost=3.0, vocab_refresh_lr=4.0)
    adapter.on_rollouts(task_batch(0))
    st = adapter.on_step_end(0)
    assert st.vocab is not None and st.train.steps == 2, "the refresh's own boundary trains the fixed budget"
    assert adapter.refresh_untrained
    resumed = make_adapter(policy, vocab_refresh_boost=3.0)
    with pytest.warns(UserWarning, match="holds no features"):
        resumed.load_state_dict(adapter.state_dict())
    assert resumed.refresh_untrained, "a resumed run still owes the boost"
    adapter.on_rollouts(task_batch(1, seed=2))
    st = adapter.on_step_end(1)
    assert st.vocab is None and st.train.steps == 6, "features in the new vocab: train_steps x vocab_refresh_boost"
    lr = adapter.worker.trainer.optimizer.param_groups[0]["lr"]  # the burst's last step: 4 x (0.1 + 0.9 x cos-decay)
    assert lr == pytest.approx(3e-3 * 4 * (0.1 + 0.45 * (1 + math.cos(math.pi * 5 / 6))))
    adapter.on_rollouts(task_batch(2, seed=3))
    assert adapter.on_step_end(2).train.steps == 2, "boosted once, then the fixed budget again"
    assert adapter.worker.trainer.optimizer.param_groups[0]["lr"] == 3e-3, "the burst's lr ends with the burst"


def test_refresh_is_refused_where_it_cannot_run(policy):
    adapter = make_adapter(policy, vocab_refresh_every=0)
    with pytest.raises(ValueError, match="LocalDraftWorker"):
        DraftAdapter.with_worker(BackgroundDraftWorker(adapter.worker), AdapterConfig(vocab_refresh_every=1))
    headless = DraftAdapter(make_draft(policy), policy.get_input_embeddings(), AdapterConfig(vocab_refresh_every=1))
    with pytest.raises(ValueError, match="target_head=policy.get_output_embeddings"):  # no head, no capture(policy)
        headless.on_rollouts(task_batch(0))
    with pytest.raises(ValueError, match="vocab_refresh_every"):
        AdapterConfig(vocab_refresh_every=-1)
    with pytest.raises(ValueError, match="vocab_refresh_lr=0.*factor > 0"):
        AdapterConfig(vocab_refresh_lr=0)


def test_resume_after_a_refresh_restores_the_new_vocab(policy, tmp_path):
    adapter = make_adapter(policy)
    adapter.on_rollouts(task_batch(0))
    assert adapter.on_step_end(0).vocab is not None
    state = adapter.state_dict(cache_dir=tmp_path / "cache")
    back = make_adapter(policy)  # built with the generic vocab, as a restarted run would be
    back.load_state_dict(state)
    assert torch.equal(back.draft.d2t, adapter.draft.d2t) and torch.equal(back.draft.t2d, adapter.draft.t2d)
    assert torch.equal(back.features.draft_vocab_ids, TASK) and torch.equal(back.worker._target_ids, TASK)
    assert torch.equal(back.vocab.counts, adapter.vocab.counts) and back.vocab.stale_through == 0
