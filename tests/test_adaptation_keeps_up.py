"""[K] on the real engine: the policy is moved in a KNOWN direction (supervised steps toward the formal style,
3% of its data before) and the draft adapted online from that policy's captured rollouts beats the same
initial draft kept frozen - on the moved policy, the same seeded held-out samples, by several standard errors.

The move is a precondition established, not assumed: SFT rounds run until the policy's own samples are at least
FORMAL_SHARE formal (any toy build gets there; a fixed step count moved one build far less than another).
The claim is a one-sided paired t-test over CHUNKS chunks of held-out prompts at alpha = 0.01
(t > T_CRIT, df = CHUNKS - 1): a draft whose adaptation did nothing passes 1% of the time. With the paired
per-chunk SD measured on the pinned toy build (0.12 AL over 32 prompts x 2 samples: gain +0.135, SE 0.029, t 4.7,
formal share 94%), the gain it detects with 80% power is ~0.10 AL."""
import math
import random

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


FORMAL_SHARE = 0.5  # the moved policy's samples are at least this share formal (3% of its SFT data)
CHUNKS, T_CRIT = 16, 2.602  # one-sided t quantile, alpha 0.01, df 15


def formal_share(model, tok, prompts: int = 64) -> float:
    from draftadapt.toy.build import TorchSampler
    from draftadapt.toy.draft import domain_prompts
    from draftadapt.toy.task import style_of

    outs = TorchSampler(model).generate(domain_prompts(tok, "task", prompts, seed=57), max_tokens=96, seed=57,
                                        stop_token_ids=[tok.eos_token_id])
    return sum(style_of(tok.decode(o[0].token_ids)) == "formal" for o in outs) / prompts


def move_toward_formal(policy_dir, out_dir, steps_per_round: int = 6, rounds: int = 8, lr: float = 1e-3):
    """A copy of the policy after rounds of packed SFT steps on formal-style solutions only, stopped at the first
    round whose samples are >= FORMAL_SHARE formal; fails naming the share reached when `rounds` do not get there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftadapt.toy.policy import SFTConfig, packed_batch
    from draftadapt.toy.task import TaskConfig

    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    cfg = SFTConfig(rows=8, chat_fraction=0.0, task=TaskConfig(style_weights=(0.0, 0.0, 0.0, 1.0)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(3)
    torch.manual_seed(3)
    shares = []
    for _ in range(rounds):
        model.train()
        for _ in range(steps_per_round):
            ids, labels = packed_batch(tok, rng, cfg)
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        shares.append(formal_share(model, tok))
        if shares[-1] >= FORMAL_SHARE:
            model.eval().save_pretrained(out_dir, safe_serialization=True)
            tok.save_pretrained(str(out_dir))
            return model
    pytest.fail(f"{rounds} x {steps_per_round} formal SFT steps moved the policy only to formal shares {shares} "
                f"(need {FORMAL_SHARE}): raise `rounds` or `lr`")


def test_adapted_draft_beats_the_frozen_one_on_a_moved_policy(toy_policy_dir, toy_draft_dir, toy_tokenizer, tmp_path):
    from draftadapt.adapter import AdapterConfig, DraftAdapter
    from draftadapt.checkpoint import draft_state_for_push, load_eagle3
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.grpo.loop import collate, collect_rollouts
    from draftadapt.replay import StepRollouts, features
    from draftadapt.toy.draft import domain_prompts
    from draftadapt.toy.task import style_of
    from draftadapt.trainer import TrainerConfig

    moved_dir = tmp_path / "moved"
    policy = move_toward_formal(toy_policy_dir, moved_dir)
    eos = toy_tokenizer.eos_token_id
    heldout = domain_prompts(toy_tokenizer, "task", 512, seed=999)
    chunks = CHUNKS
    cfg = EngineConfig(model=str(moved_dir), max_num_seqs=64, spec=SpecConfig("eagle3", 3, model=str(toy_draft_dir)))
    with Engine(cfg) as eng:
        swapper = EngineSwapper(eng)
        version = iter(range(1, 100))

        def acceptance(state):
            """AL of each held-out chunk (32 prompts x 2 seeded samples) with `state` pushed."""
            swapper.push_draft(state, next(version))
            out = []
            for j in range(chunks):
                part = heldout[j::chunks]
                c0 = swapper.spec_counters()
                eng.generate(part, n=2, temperature=1.0, max_tokens=96, stop_token_ids=[eos], seed=777 + 1000 * j)
                out.append((swapper.spec_counters() - c0).acceptance_length)
            return out

        # the moved policy's own rollouts, captured as the RL loop's log-prob recompute would
        r = collect_rollouts(eng, domain_prompts(toy_tokenizer, "task", 256, seed=31), lambda i, t: 0.0,
                             toy_tokenizer.decode, 2, 1.0, 96, [eos], 0, seed=5)
        formal = sum(style_of(toy_tokenizer.decode(c)) == "formal" for c in r.completions) / len(r.completions)
        b = collate(r, toy_tokenizer.pad_token_id)
        adapter = DraftAdapter(load_eagle3(toy_draft_dir), policy.get_input_embeddings(),
                               AdapterConfig(train_steps=60, batch_tokens=2048, min_tokens=512, acceptance_drop=None),
                               TrainerConfig(lr=1e-3, ttt_steps=3, warmup_steps=5))
        zeros = torch.zeros(b.input_ids.shape[0])
        for batch in features(policy, adapter, StepRollouts(b.input_ids, b.attention_mask, b.completion_mask, zeros,
                                                            zeros), version=0):
            adapter.on_rollouts(batch)
        assert adapter.on_step_end(1).train is not None
        frozen = acceptance(draft_state_for_push(load_eagle3(toy_draft_dir)))
        adapted = acceptance({k: v.clone() for k, v in adapter.worker.state_for_push().items()})
    diff = [a - f for a, f in zip(adapted, frozen)]
    mean = sum(diff) / chunks
    se = math.sqrt(sum((d - mean) ** 2 for d in diff) / (chunks - 1) / chunks)
    print(f"moved policy (formal share {formal:.0%}): AL frozen {sum(frozen) / chunks:.2f}, adapted "
          f"{sum(adapted) / chunks:.2f}, paired gain {mean:+.3f} +- {se:.3f} (SE over {chunks} chunks)")
    assert formal > 0.3, f"the engine's samples of the moved policy are only {formal:.0%} formal"
    assert mean > T_CRIT * se and mean > 0.05, \
        f"adapted - frozen AL = {mean:+.3f}, SE {se:.3f}: t = {mean / se:.2f} < {T_CRIT} (one-sided, alpha 0.01)"
