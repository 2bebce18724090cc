"""A re-targeted draft vocab (vocab_refresh.py) pushed into a running vLLM engine is served with its new d2t."""
from __future__ import annotations

import pytest
import torch

from draftadapt.checkpoint import draft_state_for_push, load_eagle3, save_eagle3
from draftadapt.drafts.vocab import vocab_from_counts
from draftadapt.vocab_refresh import retarget_vocab

DROPPED = 8  # the toy draft's most written tokens taken out of its vocab (the task writes few distinct tokens)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_pushed_vocab_refresh_serves_like_a_freshly_loaded_checkpoint(toy_policy_dir, toy_draft_dir, toy_tokenizer,
                                                                        tmp_path):
    """Engine 1 starts with the toy draft and gets the re-targeted draft pushed; engine 2 starts from the
    re-targeted draft's checkpoint. Greedy acceptance must agree: vLLM reads its `draft_id_to_target_id`
    (our d2t) on every compute_logits, so an in-place reload of it is honoured. Were it kept, the pushed
    lm_head rows would land on the old target ids and the acceptance would differ (the control push measures it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.toy.draft import domain_prompts

    policy = AutoModelForCausalLM.from_pretrained(toy_policy_dir, dtype=torch.float32)
    draft = load_eagle3(toy_draft_dir)
    prompts = domain_prompts(toy_tokenizer, "task", 32, seed=999)
    gen = dict(temperature=0.0, max_tokens=64, stop_token_ids=[2])

    def served_al(spec_dir, pushes=()):
        with Engine(EngineConfig(model=str(toy_policy_dir), max_num_seqs=32,
                                 spec=SpecConfig("eagle3", 3, model=str(spec_dir)))) as engine:
            swapper = EngineSwapper(engine)
            c0 = swapper.spec_counters()
            outs = [o[0].token_ids for o in engine.generate(prompts, **gen)]
            al = [(swapper.spec_counters() - c0).acceptance_length]
            for version, push in enumerate(pushes, 1):
                assert swapper.push_draft(push, version).verified
                c0 = swapper.spec_counters()
                assert [o[0].token_ids for o in engine.generate(prompts, **gen)] == outs, "a push changed greedy text"
                al.append((swapper.spec_counters() - c0).acceptance_length)
            return al, outs

    # 1) the start-up draft, and what it writes: the refresh drops its most written tokens
    (al_start,), outs = served_al(toy_draft_dir)
    written = torch.bincount(torch.tensor([t for o in outs for t in o]), minlength=draft.config.vocab_size)
    ids = draft.target_ids()
    top = ids[written[ids].argsort(descending=True)[:DROPPED]]
    counts = torch.zeros(draft.config.vocab_size, dtype=torch.long)
    counts[ids], counts[top] = 1, -1  # the rest of the old vocab, then unseen tokens by id, the dropped ones last
    new = vocab_from_counts(counts, draft.config.draft_vocab_size)
    old_d2t = draft.d2t.clone()
    src = retarget_vocab(draft, new.d2t, policy.lm_head)
    assert int((src < 0).sum()) == DROPPED
    # 2) pushed into an engine serving the old vocab vs loaded fresh
    state = draft_state_for_push(draft)
    # (control: the same rows under the OLD d2t - what an engine that kept its map would serve)
    pushed, _ = served_al(toy_draft_dir, pushes=[state, {**state, "d2t": old_d2t}])
    (al_fresh,), _ = served_al(save_eagle3(draft, tmp_path / "refreshed", AutoConfig.from_pretrained(toy_policy_dir)))
    print(f"greedy AL k=3: start-up draft {al_start:.3f}, refreshed draft pushed {pushed[1]:.3f}, "
          f"loaded {al_fresh:.3f}, its rows under the old d2t {pushed[2]:.3f}")
    assert pushed[0] == pytest.approx(al_start, abs=0.02), "the same draft served twice must accept alike"
    assert al_start - al_fresh > 0.2, "dropping the most written tokens must cost acceptance (else this proves nothing)"
    assert pushed[1] == pytest.approx(al_fresh, abs=0.02), "the pushed refresh must serve like its fresh checkpoint"
    assert abs(pushed[2] - al_fresh) > 0.1, "the old map must serve differently (else this test cannot fail)"
