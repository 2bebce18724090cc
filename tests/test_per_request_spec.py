"""The real engine's per-sequence verification rounds (EngineConfig.per_request_spec): every round of every
sequence is reported, their counters add up to the engine's, and the rounds account for every completion token."""
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_per_sequence_rounds_add_up_to_the_engine_counters_and_cover_every_token(
        toy_policy_dir, toy_draft_dir, toy_tokenizer):
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.metrics import SpecCounters
    from draftadapt.toy.eval import encode_prompt, eval_problems

    prompts = [encode_prompt(toy_tokenizer, p.prompt) for p in eval_problems(24, seed=11)]
    cfg = EngineConfig(model=str(toy_policy_dir), per_request_spec=True, worker_extension=None,
                       spec=SpecConfig("eagle3", 3, model=str(toy_draft_dir)))
    with Engine(cfg) as eng:
        before = eng.spec_counters()
        outs = eng.generate(prompts, n=2, temperature=1.0, max_tokens=64, seed=3,
                            stop_token_ids=[toy_tokenizer.eos_token_id])
        delta = eng.spec_counters() - before
    seqs = [c for group in outs for c in group]
    assert all(c.spec is not None for c in seqs), "per_request_spec=True but a completion has no rounds"
    total = sum((c.spec.counters for c in seqs), SpecCounters())
    assert (total.drafts, total.draft_tokens, total.accepted) == (delta.drafts, delta.draft_tokens, delta.accepted)
    assert total.accepted_per_pos == delta.accepted_per_pos
    rejected = 0
    for c in seqs:
        offsets = c.spec.rejected_offsets(len(c.token_ids))
        assert offsets is not None, (len(c.token_ids), c.spec)  # prefill token + (accepted + 1) per round
        assert offsets == sorted(set(offsets)) and all(0 < o < len(c.token_ids) for o in offsets)
        rejected += len(offsets)
    # a draft is rejected in most rounds that did not accept all 3 (the rest end at a stop token)
    partial = sum(a < d for c in seqs for a, d in zip(c.spec.accepted, c.spec.drafted))
    assert 0 < rejected <= partial and rejected >= partial - len(seqs)


def test_without_the_setting_completions_carry_no_rounds(toy_policy_dir):
    from draftadapt.engine.vllm import Engine, EngineConfig

    with Engine(EngineConfig(model=str(toy_policy_dir), worker_extension=None)) as eng:
        out = eng.generate([[1, 5, 9]], n=1, temperature=0.0, max_tokens=4)
    assert out[0][0].spec is None
