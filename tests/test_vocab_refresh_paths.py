"""The vocab refresh (vocab_refresh.py) through every way an adapter is built, with no explicit target_head: the
policy's lm_head (or its input embedding when tied) is taken; and the refresh that fires on uncovered tokens."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_vocab_refresh import TASK, VD, V, generic_vocab, task_batch

from draftadapt.adapter import AdapterConfig, DraftAdapter
from draftadapt.cache import CacheConfig
from draftadapt.drafts.eagle3 import Eagle3Draft
from draftadapt.drafts.vocab import build_draft_vocab
from draftadapt.trainer import TrainerConfig
from draftadapt.vocab_refresh import head_of
from draftadapt.workers import LocalDraftWorker

H, B, PROMPT, COMP = 64, 4, 6, 48
CFG = dict(train_steps=0, batch_tokens=B * (PROMPT + COMP), min_tokens=1, acceptance_drop=None,
           vocab_refresh_uncovered=0.1)


def policy_of(arch: str, tied: bool, seed: int = 0):
    """A tiny random Qwen2/Qwen3 built from code; tied: one [V, H] weight for embedding and lm_head."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, layers=4, hidden=H)
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_config(config).eval()
    assert (policy.lm_head.weight is policy.get_input_embeddings().weight) == tied
    return policy


def draft_for(policy, vocab=None):
    torch.manual_seed(1)
    return Eagle3Draft.from_target(policy.config, draft_vocab=vocab or generic_vocab(), aux_layer_ids=(0, 1, 2))


def captured(adapter, policy, version: int, seed: int = 0):
    """The log-prob recompute of B rollouts whose completions write TASK tokens (half outside the draft vocab)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(0, 900, (B, PROMPT), generator=g),
                     TASK[torch.randint(0, VD, (B, COMP), generator=g)]], 1)
    am, comp = torch.ones_like(ids), torch.zeros_like(ids)
    comp[:, PROMPT:] = 1
    with adapter.capture(policy) as cap, torch.no_grad():
        policy(input_ids=ids, attention_mask=am)
    return cap.rollout_batch(ids, am, comp, policy_version=version)


def check_refreshed_from(adapter, head_weight, old_ids, stats) -> None:
    """This boundary refreshed, and every admitted token's lm_head row is the given head's row."""
    assert stats.vocab is not None and stats.vocab.reason == "uncovered" and stats.vocab.admitted > 0, stats.vocab
    new_ids = adapter.draft.target_ids()
    admitted = ~torch.isin(new_ids, old_ids)
    assert int(admitted.sum()) == stats.vocab.admitted
    assert torch.equal(adapter.draft.lm_head.weight[admitted], head_weight[new_ids[admitted]].detach()), \
        "admitted rows must start from the policy's lm_head"


def build(path: str, policy):
    draft, embed = draft_for(policy), policy.get_input_embeddings()
    config, tc, cc = AdapterConfig(**CFG), TrainerConfig(lr=1e-3), CacheConfig(max_tokens=8192)
    if path == "constructor":
        return DraftAdapter(draft, embed, config, tc, cc)
    if path == "constructor_policy":
        return DraftAdapter(draft, embed, config, tc, cc, policy=policy)
    if path == "with_worker":
        return DraftAdapter.with_worker(LocalDraftWorker(draft, embed, tc, cc, config.batch_tokens), config)
    raise AssertionError(path)


@pytest.mark.parametrize("arch,tied", [("qwen2", True), ("qwen2", False), ("qwen3", True), ("qwen3", False)])
@pytest.mark.parametrize("path", ["constructor", "constructor_policy", "with_worker"])
def test_each_build_path_refreshes_from_the_policys_head_without_target_head(path, arch, tied):
    policy = policy_of(arch, tied)
    adapter = build(path, policy)
    assert (adapter.vocab.head is not None) == (path == "constructor_policy"), "policy= binds at once"
    old_ids = adapter.draft.target_ids().clone()
    assert adapter.on_rollouts(captured(adapter, policy, 0)) > 0
    want = policy.get_input_embeddings() if tied else policy.lm_head
    assert adapter.vocab.head is want, "tied: the input embedding; untied: the lm_head, never the embedding"
    check_refreshed_from(adapter, want.weight, old_ids, adapter.on_step_end(0))
    if not tied:
        assert not torch.equal(policy.lm_head.weight, policy.get_input_embeddings().weight)


def test_no_head_anywhere_is_refused_with_the_fix():
    policy = policy_of("qwen2", tied=False)
    adapter = build("constructor", policy)
    with pytest.raises(ValueError, match="adapter.capture\\(policy\\)"):  # a batch that did not come from capture
        adapter.on_rollouts(task_batch(0))

    class Headless(torch.nn.Module):  # a policy that exposes no output embedding and does not tie
        config = policy.config

        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError, match="target_head="):
        adapter.vocab.bind(Headless())
    class Sharded(Headless):  # this rank's shard of the lm_head: [7, H] of [V, H]
        def get_output_embeddings(self):
            return torch.nn.Linear(H, 7)

    with pytest.raises(ValueError, match="target_head="):
        DraftAdapter(draft_for(policy), policy.get_input_embeddings(), AdapterConfig(**CFG), policy=Sharded())
    with pytest.raises(ValueError, match="vocab_refresh_uncovered"):
        AdapterConfig(vocab_refresh_uncovered=1.0)
    assert head_of(policy) is policy.lm_head


def test_uncovered_tokens_refresh_on_the_first_step_that_crosses_the_margin():
    """Steps 0-1 write only tokens the draft vocab holds, step 2 writes 10% new ones (under the 25% margin),
    step 3 writes 40%: the refresh fires at step 3 and not before; no cadence is set. The slots the step's
    tokens leave keep the old vocab's unwritten tokens (not the lowest unseen ids)."""
    policy = policy_of("qwen3", tied=True)
    vocab = build_draft_vocab([torch.cat([torch.arange(500, 532), TASK[:32]])], V, VD)
    adapter = DraftAdapter(draft_for(policy, vocab), policy.get_input_embeddings(),
                           AdapterConfig(**{**CFG, "vocab_refresh_uncovered": 0.25}), policy=policy)
    known, new = TASK[:32], TASK[32:]  # in the generic vocab / not
    for step, share in enumerate((0.0, 0.0, 0.1, 0.4)):
        batch = task_batch(step, seed=step)
        ids = batch.input_ids.reshape(B, -1).clone()
        n = ids[:, PROMPT:].numel()
        comp = known[torch.arange(n) % 32]
        where = torch.randperm(n, generator=torch.Generator().manual_seed(step))[:round(share * n)]
        comp[where] = new[torch.arange(len(where)) % 32]
        ids[:, PROMPT:] = comp.reshape(B, -1)
        batch = dataclasses.replace(batch, input_ids=ids.reshape(-1))
        old_ids = adapter.draft.target_ids().clone()
        adapter.on_rollouts(batch)
        stats = adapter.on_step_end(step)
        if step < 3:
            assert stats.vocab is None, f"step {step} ({share:.0%} uncovered) must not refresh"
            continue
        assert stats.vocab.uncovered == pytest.approx(0.4, abs=0.01) and stats.vocab.coverage_after == 1.0
        check_refreshed_from(adapter, policy.get_input_embeddings().weight, old_ids, stats)
        assert stats.vocab.admitted == len(where) == 29, "only the written tokens may be admitted"
        assert stats.as_dict()["draft/vocab_uncovered"] == pytest.approx(0.4, abs=0.01)


def _owner_mode_refresh(rank, world):
    from draftadapt.distributed import DistributedDraftAdapter

    policy = policy_of("qwen2", tied=False)
    adapter = DistributedDraftAdapter(draft_for(policy), policy.get_input_embeddings(), AdapterConfig(**CFG),
                                      TrainerConfig(lr=1e-3), CacheConfig(max_tokens=8192), mode="owner")
    old_ids = adapter.adapter.features.draft_vocab_ids.clone()
    adapter.on_rollouts(captured(adapter, policy, 0, seed=rank))
    stats = adapter.on_step_end(0)
    if rank == 0:
        check_refreshed_from(adapter.adapter, policy.lm_head.weight, old_ids, stats)
    return stats.vocab.admitted, adapter.adapter.features.draft_vocab_ids, old_ids


def test_distributed_owner_refreshes_from_the_policys_head_and_every_rank_captures_in_the_new_vocab():
    from test_distributed import _run

    (adm0, ids0, old), (adm1, ids1, _) = _run(_owner_mode_refresh, 2)
    assert adm0 == adm1 > 0 and not torch.equal(ids0, old)
    assert torch.equal(ids0, ids1), "a non-owner rank must capture in the owner's refreshed vocab"


def test_data_parallel_replicas_refuse_the_refresh_with_the_fix():
    from test_distributed import _run

    assert all("mode='owner'" in msg for msg in _run(_dp_refuses, 1)), "the error must name the fix"


def _dp_refuses(rank, world):
    from draftadapt.distributed import DistributedDraftAdapter

    policy = policy_of("qwen2", tied=True)
    try:
        DistributedDraftAdapter(draft_for(policy), policy.get_input_embeddings(), AdapterConfig(**CFG),
                                mode="data_parallel")
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_trl_callback_refreshes_from_the_tied_policys_embedding(tmp_path):
    """TRL's GRPOTrainer (HF generation, a tied tiny Qwen2): the callback's capture supplies the head."""
    pytest.importorskip("trl")
    from test_trl import build_tokenizer, grpo_args, toy_dataset
    from trl import GRPOTrainer

    from draftadapt.integrations.trl import attach

    policy = policy_of("qwen2", tied=True)
    adapter = DraftAdapter(draft_for(policy), policy.get_input_embeddings(),
                           AdapterConfig(train_steps=1, batch_tokens=512, min_tokens=1, acceptance_drop=None,
                                         vocab_refresh_uncovered=0.1), TrainerConfig(lr=1e-3),
                           CacheConfig(max_tokens=50_000))
    old_ids = adapter.draft.target_ids().clone()
    trainer = GRPOTrainer(model=policy, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                          args=grpo_args(tmp_path, 1), train_dataset=toy_dataset(16)[0],
                          processing_class=build_tokenizer())
    callback = attach(trainer, adapter)
    trainer.train()
    stats = callback.history[0]
    assert adapter.vocab.head is policy.get_input_embeddings()
    assert stats.vocab is not None and stats.vocab.reason == "uncovered" and stats.vocab.admitted > 0
    new_ids = adapter.draft.target_ids()
    admitted = ~torch.isin(new_ids, old_ids)
    assert torch.equal(adapter.draft.lm_head.weight[admitted],
                       policy.get_input_embeddings().weight[new_ids[admitted]].detach())


@pytest.mark.vllm
@pytest.mark.slow
def test_grpo_recipe_refreshes_on_uncovered_tokens_and_serves_the_new_vocab(toy_policy_dir, toy_draft_dir, tmp_path):
    """The toy recipe builds its adapter without target_head; its capture supplies the policy's head; a refresh
    on uncovered tokens pushes the new d2t into the real vLLM engine (verified by the swapper) and the run goes on."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "grpo_toy.py"
    cmd = [sys.executable, str(recipe), f"run.out_dir={tmp_path}", "run.steps=2", "run.checkpoint_every=0",
           "run.eval_prompts=8", "rollout.prompts_per_step=8", "rollout.group_size=4", "adapter.min_tokens=256",
           "adapter.batch_tokens=1024", "adapter.train_steps=1", "run.final_compare=false",
           "adapter.vocab_refresh_uncovered=0.0", "adapter.vocab_refresh_margin=0.0"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    refreshed = [r for r in rows if r.get("draft/vocab_admitted")]
    assert refreshed, "the toy policy at T=1 writes tokens outside the 512-token draft vocab: a refresh must fire"
    r = refreshed[0]
    assert r["draft/vocab_uncovered"] > 0 and r["draft/vocab_coverage"] >= r["draft/vocab_coverage_before"]
    assert r["draft/pushed"] == 1.0


def test_a_completion_written_wholly_outside_the_draft_vocab_is_counted():
    """The drift a refresh is for: answers in tokens the draft vocab lacks (a new case, a new script). Their
    positions have no training target (the target's top token is outside the draft vocab), so loss_mask cannot
    mark them; capture's `completion` field does, and the cache does not keep it."""
    from draftadapt.vocab_refresh import completion_token_counts

    policy = policy_of("qwen2", tied=False)  # a dense teacher: its loss_mask checked the draft vocab at capture
    adapter = DraftAdapter(draft_for(policy), policy.get_input_embeddings(), AdapterConfig(**CFG, teacher="draft_vocab"),
                           TrainerConfig(), CacheConfig(max_tokens=8192), policy=policy)
    outside = TASK[~torch.isin(TASK, adapter.draft.target_ids())]
    g = torch.Generator().manual_seed(5)
    ids = torch.cat([torch.randint(0, 900, (B, PROMPT), generator=g),
                     outside[torch.randint(0, outside.numel(), (B, COMP), generator=g)]], 1)
    am, comp = torch.ones_like(ids), torch.zeros_like(ids)
    comp[:, PROMPT:] = 1
    with adapter.capture(policy) as cap, torch.no_grad():
        policy(input_ids=ids, attention_mask=am)
    batch = cap.rollout_batch(ids, am, comp, policy_version=0)
    want = torch.bincount(ids[:, PROMPT:].reshape(-1), minlength=V)
    assert torch.equal(completion_token_counts(batch, V), want)
    # the old count (from loss_mask) misses them: the assertion above is not one any count passes
    assert completion_token_counts(dataclasses.replace(batch, completion=None), V)[outside].sum() < want.sum()
    adapter.on_rollouts(batch)
    assert torch.equal(adapter.vocab.recent, want)
    assert all(e.completion is None for e in adapter.worker.cache._entries), "the cache stores no completion mask"


def test_a_topk_teacher_keeps_the_cache_through_a_refresh_and_trains_what_it_admitted():
    """teacher="auto" keeps top-k target ids where the refresh can run (a dense teacher otherwise): the refresh keeps
    the cached features, and a position whose top token was outside the old vocab trains once the refresh admits it
    (capture no longer cuts it from the stored loss_mask; sampling checks the top token against the vocab it has)."""
    policy = policy_of("qwen2", tied=False)
    make = lambda **cfg: DraftAdapter(draft_for(policy), policy.get_input_embeddings(), AdapterConfig(**{**CFG, **cfg}),
                                      TrainerConfig(), CacheConfig(max_tokens=8192), policy=policy)
    assert make(vocab_refresh_uncovered=None).teacher == "draft_vocab", "no refresh: the dense teacher, as before"
    adapter = make()
    assert (adapter.teacher, adapter.top_k) == ("topk", 64)  # as many ids as the 64-id draft vocab: at least 64
    auto = AdapterConfig().resolved_teacher  # ... at most 1024; a large draft vocab: top-64 with or without refresh
    assert [auto(512, True), auto(27, True), auto(4096, True), auto(32000, True), auto(512, False)] == \
        [("topk", 512), ("topk", 64), ("topk", 1024), ("topk", 64), ("draft_vocab", 0)]
    batch = captured(adapter, policy, 0)
    old_ids, top = adapter.draft.target_ids().clone(), batch.teacher_topk_ids[:, 0]
    assert (batch.loss_mask & ~torch.isin(top, old_ids)).any(), "capture must keep positions outside the draft vocab"
    adapter.on_rollouts(batch)
    stats = adapter.on_step_end(0)
    new_ids = adapter.draft.target_ids()
    assert stats.vocab is not None and stats.vocab.dropped_cached == 0 and stats.cache.sequences == B
    assert not torch.equal(torch.isin(top, old_ids), torch.isin(top, new_ids))
    sample = adapter.worker.cache.sample(num_sequences=B, draft_vocab_ids=adapter.worker._target_ids,
                                         sparse_teacher=True)
    assert int(sample.loss_mask.sum()) == int((batch.loss_mask & torch.isin(top, new_ids)).sum()), \
        "the kept features train the positions whose top token the NEW vocab holds"
    late = captured(adapter, policy, 0, seed=3)  # a late batch of the version before the refresh: top-k, kept
    assert adapter.on_rollouts(late) > 0
