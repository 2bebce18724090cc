"""A small external draft LM (vLLM `draft_model`) in a running engine: pushes change acceptance,
a wrong-architecture push is refused and the old draft keeps serving, a foreign vocab never starts."""
import pytest
import torch

from conftest import save_tiny, tiny_model

PROMPTS = [[1, 4, 50, 7, 48, 9], [1, 5, 6, 7], [1] + [(7 * i) % 1000 + 20 for i in range(40)]]
K = 3


def _greedy_al(engine, swapper):
    c0 = swapper.spec_counters()
    outs = [o[0].token_ids for o in engine.generate(PROMPTS, temperature=0.0, max_tokens=24)]
    return outs, (swapper.spec_counters() - c0).acceptance_length


@pytest.mark.vllm
def test_draft_lm_pushes_change_acceptance_and_a_wrong_architecture_is_refused(tmp_path):
    """Target: a 2-layer tiny Llama. Draft: the same architecture, random (AL ~1). Pushing the
    target's own weights as the draft makes every greedy draft token right (AL = k + 1); a push of
    a 3-layer draft is refused and the engine keeps serving the last one, bit for bit."""
    from draftadapt.drafts.draft_lm import DraftLM, draft_lm_state_for_push
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig

    target_dir, tok_dir = save_tiny("llama", tmp_path / "t", layers=2, hidden=128)
    target = tiny_model("llama", layers=2, hidden=128)
    torch.manual_seed(1)
    random_draft = DraftLM.from_policy(target, num_layers=2, copy_weights=False)
    draft_dir = random_draft.save(tmp_path / "draft", tokenizer_src=tok_dir)
    spec = SpecConfig("draft_model", K, model=str(draft_dir))
    with Engine(EngineConfig(model=str(target_dir), tokenizer=str(tok_dir), max_num_seqs=4, spec=spec)) as engine:
        swapper = EngineSwapper(engine)
        assert swapper.draft_method == "draft_model"
        expected = swapper.expected("draft")
        assert "model.embed_tokens.weight" in expected and "lm_head.weight" in expected, "a draft LM owns both"
        assert {k: tuple(v[0]) for k, v in expected.items()} == \
            {k: tuple(v.shape) for k, v in draft_lm_state_for_push(random_draft).items()}
        plain, al_random = _greedy_al(engine, swapper)
        # 1) the target's own weights as the draft: every greedy draft token is accepted
        res = swapper.push_draft(draft_lm_state_for_push(DraftLM.from_policy(target, num_layers=2)), 1)
        assert res.pushed and res.verified
        outs, al_exact = _greedy_al(engine, swapper)
        assert outs == plain, "a draft push must not change greedy outputs"
        assert al_random < 1.5 and al_exact > K + 0.9, (al_random, al_exact)
        served = engine.collective_rpc("draftadapt_state", kwargs={"kind": "draft"})[0]
        # 2) a wrong architecture (3 layers; a wider MLP) is refused before any weight moves
        deeper = tiny_model("llama", layers=3, hidden=128)
        with pytest.raises(ValueError, match=r"unknown tensors \['model.layers.2"):
            swapper.push_draft(draft_lm_state_for_push(DraftLM.from_policy(deeper, num_layers=3)), 2)
        wider = DraftLM.from_policy(tiny_model("llama", layers=2, hidden=128), 2).lm.state_dict()
        wider["model.layers.0.mlp.up_proj.weight"] = torch.zeros(512, 128)
        with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight: shape \(512, 128\), expected"):
            swapper.push_draft(dict(wider), 2)
        assert engine.collective_rpc("draftadapt_state", kwargs={"kind": "draft"})[0] == served
        assert swapper.draft_version == 1
        outs, al_after = _greedy_al(engine, swapper)
        assert outs == plain and al_after == al_exact, "the old draft must keep serving after a refused push"
        # 3) back to the random draft: acceptance falls again (the push really reaches the drafter)
        assert swapper.push_draft(draft_lm_state_for_push(random_draft), 2).verified
        assert _greedy_al(engine, swapper)[1] == pytest.approx(al_random)


@pytest.mark.vllm
def test_a_draft_lm_with_another_vocab_is_refused_before_the_engine_starts(tmp_path):
    from draftadapt.engine import vllm as engine_mod
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig

    target_dir, tok_dir = save_tiny("llama", tmp_path / "t", layers=2, hidden=128)
    draft_dir, _ = save_tiny("llama", tmp_path / "d", layers=1, hidden=128, vocab=1200)
    spec = SpecConfig("draft_model", K, model=str(draft_dir))
    with pytest.raises(ValueError, match=r"vocab_size=1200, the target's vocab_size=1147"):
        Engine(EngineConfig(model=str(target_dir), tokenizer=str(tok_dir), max_num_seqs=4, spec=spec))
    assert not len(engine_mod._live_in_process), "no engine may have started"
