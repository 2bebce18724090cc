"""[F] proof on the real engine: the toy policy's own MTP layer served by vLLM (method "mtp"),
perturbed in the running engine (acceptance drops), adapted online from captured features and
pushed (acceptance recovers), refreshed by a policy refit that carries it - greedy outputs equal
plain decoding of the original Llama policy throughout."""
import pytest
import torch

from conftest import plain_outputs

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_mtp_head_is_perturbed_adapted_and_refit_in_the_same_engine(toy_policy_dir, toy_mtp, toy_tokenizer):
    from transformers import AutoModelForCausalLM

    from draftadapt.adapter import AdapterConfig, DraftAdapter
    from draftadapt.drafts.mtp import MTPDraft, load_mtp_state, mtp_state_for_push
    from draftadapt.engine.swap import EngineSwapper, read_safetensors_dir, tensors_from_bytes
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.grpo.loop import collate, collect_rollouts
    from draftadapt.grpo.objective import token_logprobs
    from draftadapt.toy.draft import domain_prompts
    from draftadapt.trainer import TrainerConfig

    # the MiMo checkpoint loads in HF as Qwen2 (its MTP tensors are ignored there): the policy
    policy = AutoModelForCausalLM.from_pretrained(toy_mtp.model_dir).eval()
    ckpt = read_safetensors_dir(toy_mtp.model_dir)
    trained = load_mtp_state(MTPDraft.from_target(policy.config, policy.get_output_embeddings()), ckpt)
    perturbed = load_mtp_state(MTPDraft.from_target(policy.config, policy.get_output_embeddings()), ckpt)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(p.std() * torch.randn(p.shape, generator=g))
    train_prompts = domain_prompts(toy_tokenizer, "task", 2000, seed=41)
    heldout = domain_prompts(toy_tokenizer, "task", 100, seed=999)
    # plain decoding of the ORIGINAL Llama policy: the MiMo conversion must be exact too
    greedy_ref = [o[0].token_ids for o in plain_outputs(toy_policy_dir, heldout[:32], temperature=0.0,
                                                        max_tokens=96, stop_token_ids=[2])]

    cfg = EngineConfig(model=str(toy_mtp.model_dir), tokenizer=str(toy_mtp.tokenizer_dir), max_num_seqs=64,
                       spec=SpecConfig("mtp", 3))
    with Engine(cfg) as eng:
        swapper = EngineSwapper(eng)
        assert swapper.draft_method == "mtp"
        assert set(swapper.expected("draft")) == set(mtp_state_for_push(trained)), "MTPDraft names != vLLM's"

        def acceptance():
            c0 = swapper.spec_counters()  # seeded requests: same draft weights -> same samples, same AL
            eng.generate(heldout, n=2, temperature=1.0, max_tokens=96, stop_token_ids=[2], seed=777)
            return (swapper.spec_counters() - c0).acceptance_length

        def greedy():
            outs = eng.generate(heldout[:32], temperature=0.0, max_tokens=96, stop_token_ids=[2])
            return [o[0].token_ids for o in outs]

        # 1) the trained MTP layer as served from the checkpoint
        assert greedy() == greedy_ref
        al_trained = acceptance()
        # 2) perturbed in the running engine: acceptance drops
        assert swapper.push_draft(mtp_state_for_push(perturbed), 1).verified
        al_perturbed = acceptance()
        assert greedy() == greedy_ref
        # 3) adapted online from the engine's own rollouts, captured on the policy's HF forward
        adapter = DraftAdapter(perturbed, policy.get_input_embeddings(),
                               AdapterConfig(train_steps=15, batch_tokens=2048, min_tokens=512, acceptance_drop=None),
                               TrainerConfig(lr=1e-3, ttt_steps=3, warmup_steps=3), sink=swapper)
        for version in (2, 3):
            prompts = train_prompts[(version - 2) * 96: (version - 1) * 96]
            r = collect_rollouts(eng, prompts, lambda i, t: 0.0, toy_tokenizer.decode, 2, 1.0, 96, [2], version - 1)
            b = collate(r, toy_tokenizer.pad_token_id)
            with adapter.capture(policy) as cap, torch.no_grad():
                token_logprobs(policy(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.input_ids)
            batch = cap.rollout_batch(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                      completion_mask=b.completion_mask, policy_version=version - 1)
            assert batch.aux_hidden.shape[-1] == 0 and batch.final_hidden is not None  # MTP reads no aux layers
            adapter.on_rollouts(batch)
            stats = adapter.on_step_end(version)
            assert stats.pushed and stats.push_result.verified, stats.push_reason
        al_adapted = acceptance()
        assert greedy() == greedy_ref
        print(f"MTP k=3, T=1, held-out: trained {al_trained:.2f} -> perturbed {al_perturbed:.2f} -> "
              f"adapted online {al_adapted:.2f} (last push {stats.push_seconds * 1e3:.0f} ms)")
        assert al_perturbed < al_trained - 0.4 and al_adapted > al_perturbed + 0.25, \
            (al_trained, al_perturbed, al_adapted)

        # 4) a policy refit without MTP tensors warns and leaves the MTP layer as it was
        trunk = {k: v for k, v in ckpt.items() if not k.startswith("model.mtp_layers.")}
        with pytest.warns(UserWarning, match="MTP layers keep"):
            res = swapper.refit_policy(trunk, 4)
        assert res.pushed and res.mtp is None and swapper.draft_version == 3
        assert acceptance() == al_adapted
        # 5) a refit from the full checkpoint also pushes its MTP layer (reloading the target alone would not)
        res = swapper.refit_policy(toy_mtp.model_dir, 5)
        assert res.mtp is not None and res.mtp.pushed and res.mtp.verified and swapper.draft_version == 5
        served = tensors_from_bytes(eng.collective_rpc("draftadapt_state", args=("draft",))[0])
        assert all(torch.equal(served[k], v) for k, v in mtp_state_for_push(trained).items())
        assert acceptance() == al_trained
        assert greedy() == greedy_ref
