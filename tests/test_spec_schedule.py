"""k by batch size: SpecConfig validation (fast) and a schedule changed on a running engine (slow)."""
import pytest

from draftadapt.engine.vllm import SpecConfig


def test_spec_config_passes_schedule_and_methods_to_vllm():
    spec = SpecConfig("ngram", 5, num_speculative_tokens_per_batch_size=((1, 4, 5), (5, 64, 0)),
                      rejection_sample_method="block", draft_sample_method="probabilistic")
    out = spec.to_vllm()
    assert out["num_speculative_tokens_per_batch_size"] == [[1, 4, 5], [5, 64, 0]]
    assert out["rejection_sample_method"] == "block" and out["draft_sample_method"] == "probabilistic"
    assert "rejection_sample_method" not in SpecConfig("ngram", 3).to_vllm()  # defaults stay vLLM's


@pytest.mark.parametrize("bad", [((2, 8, 3),), ((1, 4, 3), (6, 8, 2)), ((1, 8, 9),), ((1, 8, -1),), ()])
def test_bad_schedule_names_the_fix(bad):
    with pytest.raises(ValueError, match="schedule"):
        SpecConfig("ngram", 5, num_speculative_tokens_per_batch_size=bad)


@pytest.mark.slow
def test_schedule_changes_on_a_running_engine_and_k0_turns_speculation_off(tmp_path):
    from conftest import save_tiny
    from draftadapt.engine.vllm import Engine, EngineConfig

    md, td = save_tiny("llama", tmp_path, layers=4, hidden=128)
    spec = SpecConfig("ngram", 5, num_speculative_tokens_per_batch_size=((1, 64, 5),))
    prompts = [[5, 6, 7, 8, 9, 10 + i] for i in range(4)]
    with Engine(EngineConfig(model=str(md), tokenizer=str(td), spec=spec, max_num_seqs=8, worker_extension=None)) as eng:
        seen = {}
        for sched in [((1, 64, 5),), ((1, 64, 1),), ((1, 64, 0),), ((1, 3, 0), (4, 64, 2))]:
            eng.set_spec_schedule(sched)
            before = eng.spec_counters()
            outs = eng.generate(prompts, temperature=0.0, max_tokens=40, logprobs=False)
            d = eng.spec_counters() - before
            seen[sched] = ([o[0].token_ids for o in outs], d)
    toks = [v[0] for v in seen.values()]
    assert all(t == toks[0] for t in toks), "greedy outputs must not depend on k"
    d5, d1, d0, d_sched = (v[1] for v in seen.values())
    assert d5.drafts > 0 and d0.drafts == 0, "k=0 must turn speculation off"
    assert d1.draft_tokens == d1.drafts, "k=1: one proposed token per draft at most (n-gram may propose fewer)"
    assert d5.draft_tokens > d5.drafts  # the range with k=5 proposed more than one token
    assert 0 < d_sched.draft_tokens <= 2 * d_sched.drafts  # batch of 4 falls in the k=2 range
