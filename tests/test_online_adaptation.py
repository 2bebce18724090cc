"""[C] proof on the real engine: a weak draft in a RUNNING engine is adapted online from the
captured features of that engine's own rollouts, pushed, and acceptance rises in the same engine."""
import pytest
import torch

from conftest import plain_outputs

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_online_adaptation_lifts_acceptance_in_the_same_engine(toy_policy_dir, toy_draft_dir, toy_tokenizer):
    from transformers import AutoModelForCausalLM

    from draftadapt.adapter import AdapterConfig, DraftAdapter
    from draftadapt.checkpoint import draft_state_for_push, load_eagle3, save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.grpo.objective import token_logprobs
    from draftadapt.grpo.loop import collate, collect_rollouts
    from draftadapt.toy.draft import domain_prompts
    from draftadapt.trainer import TrainerConfig

    policy = AutoModelForCausalLM.from_pretrained(toy_policy_dir).eval()
    like = load_eagle3(toy_draft_dir)  # same shape and draft vocab as a real first draft
    torch.manual_seed(0)
    weak = Eagle3Draft(like.config)
    weak.set_vocab(like.d2t.clone())
    weak_dir = save_eagle3(weak, toy_policy_dir.parent / "test-weak-eagle3", policy.config)
    train_prompts = domain_prompts(toy_tokenizer, "task", 2000, seed=31)
    heldout = domain_prompts(toy_tokenizer, "task", 100, seed=999)
    greedy_ref = plain_outputs(toy_policy_dir, heldout[:32], temperature=0.0, max_tokens=96, stop_token_ids=[2])

    cfg = EngineConfig(model=str(toy_policy_dir), max_num_seqs=64, spec=SpecConfig("eagle3", 3, model=str(weak_dir)))
    with Engine(cfg) as eng:
        swapper = EngineSwapper(eng)

        def acceptance():
            # seeded requests: the same draft gives the same samples, so AL is compared exactly
            c0 = swapper.spec_counters()
            eng.generate(heldout, n=2, temperature=1.0, max_tokens=96, stop_token_ids=[2], seed=777)
            return (swapper.spec_counters() - c0).acceptance_length

        al_before = acceptance()
        adapter = DraftAdapter(load_eagle3(weak_dir), policy.get_input_embeddings(),
                               AdapterConfig(train_steps=50, batch_tokens=2048, min_tokens=512, acceptance_drop=None),
                               TrainerConfig(lr=2e-3, ttt_steps=3, warmup_steps=10), sink=swapper)
        for version in range(1, 4):
            # the engine's own rollouts -> the log-prob recompute the RL loop runs anyway, captured
            prompts = train_prompts[(version - 1) * 128: version * 128]
            r = collect_rollouts(eng, prompts, lambda i, t: 0.0, toy_tokenizer.decode, 2, 1.0, 96, [2], version - 1)
            b = collate(r, toy_tokenizer.pad_token_id)
            with adapter.capture(policy) as cap, torch.no_grad():
                token_logprobs(policy(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.input_ids)
            adapter.on_rollouts(cap.rollout_batch(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                                  completion_mask=b.completion_mask, policy_version=version - 1))
            stats = adapter.on_step_end(version)
            assert stats.pushed, stats.push_reason
        al_after = acceptance()
        print(f"online adaptation, same engine: AL {al_before:.2f} -> {al_after:.2f} (k=3, T=1, held-out); "
              f"last push {stats.push_seconds * 1e3:.0f} ms, {stats.push_bytes / 1e6:.2f} MB")
        assert al_before < 1.2 and al_after >= 2.0

        # greedy outputs with the adapted draft equal plain decoding
        spec = eng.generate(heldout[:32], temperature=0.0, max_tokens=96, stop_token_ids=[2])
        assert [s[0].token_ids for s in spec] == [g[0].token_ids for g in greedy_ref]

        # a second push of the same version does nothing
        again = swapper.push_draft(draft_state_for_push(adapter.worker.draft), 3)
        assert not again.pushed and "already" in again.skipped_reason

        # a corrupted push (wrong shape) is refused and the engine keeps serving the adapted draft
        bad = dict(draft_state_for_push(adapter.worker.draft))
        bad["fc.weight"] = bad["fc.weight"][:, :-1]
        with pytest.raises(ValueError, match="fc.weight"):
            swapper.push_draft(bad, 4)
        al_after_bad = acceptance()
        assert swapper.draft_version == 3
        assert al_after_bad == al_after, (al_after, al_after_bad)
