"""Your own model, end to end: a first EAGLE-3 draft for it, served by vLLM, kept matched online.

The policy here is a tiny Qwen2-architecture model with TIED input/output embeddings and a
tokenizer of its own, built from a config and taught a counting task in a few seconds (it stands
in for your checkpoint). Everything after step 1 is what you run for a real model:

  1) the policy and its tokenizer (the tokenizer in a directory of its own: see the caveat below)
  2) a first draft from the policy's own samples, in one call (`train_from_own_samples`: picks the
     draft vocabulary, builds the draft from the policy's config, trains it, exports it)
  3) serve it: vLLM with the draft as an EAGLE-3 drafter
  4) adapt it online during RL: capture the log-prob recompute, refit the policy, train + push
  5) export the adapted draft

The first draft sees only "count up" prompts; the RL prompts also count down, so the served
draft's acceptance length (AL) rises as it adapts. Run (about a minute on 2 CPU cores):

    python examples/own_model.py [--out DIR] [--steps 6]

Tokenizer caveat: transformers loads a custom tokenizer saved beside a `model_type: qwen2`
config as `Qwen2Tokenizer`, which mis-encodes it (vLLM then sees empty prompts). Keep such a
tokenizer in its own directory and pass it as `EngineConfig(tokenizer=...)`.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from draftadapt.adapter import AdapterConfig, DraftAdapter
from draftadapt.checkpoint import load_eagle3
from draftadapt.engine.swap import EngineSwapper
from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
from draftadapt.grpo.loop import collate, collect_rollouts
from draftadapt.grpo.objective import group_advantages, grpo_loss, token_logprobs
from draftadapt.offline import train_from_own_samples
from draftadapt.trainer import TrainerConfig

SPECIALS, WORDS, NUMBERS = ["<pad>", "<bos>", "<eos>", "<unk>"], ["count", "up", "down", "from", ":"], 64
ANSWER = 6  # numbers per answer


# 1) the policy and its tokenizer ------------------------------------------------------------------
def save_tokenizer(out: Path):
    """A word-level tokenizer of our own (specials, words, numbers 0..63)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + [str(n) for n in range(NUMBERS)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer, core.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                  pad_token="<pad>")
    tok.save_pretrained(str(out))
    return tok


def problem(rng: random.Random, directions=("up", "down")) -> tuple[str, str]:
    way = rng.choice(directions)
    start = rng.randrange(0, NUMBERS - ANSWER) if way == "up" else rng.randrange(ANSWER, NUMBERS)
    step = 1 if way == "up" else -1
    return f"count {way} from {start} :", " ".join(str(start + step * k) for k in range(1, ANSWER + 1))


def encode(tok, text: str) -> list[int]:
    return [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]


def build_policy(tok, steps: int = 300, seed: int = 0):
    """A tied Qwen2 from a config, then a short supervised run on the task (your model skips this)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_config(cfg)
    opt, rng = torch.optim.AdamW(policy.parameters(), lr=3e-3), random.Random(seed)
    for _ in range(steps):  # every example has the same length: no padding
        rows = [(encode(tok, p), tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
                for p, a in (problem(rng) for _ in range(32))]
        ids = torch.tensor([p + a for p, a in rows])  # [32, T]
        target = ids[:, 1:].clone()
        target[:, : len(rows[0][0]) - 1] = -100  # loss on the answer only
        loss = F.cross_entropy(policy(input_ids=ids).logits[:, :-1].transpose(1, 2), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy.eval()


def reward(problems):
    def score(i: int, text: str) -> float:
        want, got = problems[i][1].split(), text.split()
        return sum(a == b for a, b in zip(want, got)) / len(want)
    return score


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="where the policy, tokenizer and drafts go (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=6, help="RL steps with online adaptation")
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="draftadapt-own-"))
    torch.set_num_threads(1)  # vLLM's CPU worker pins torch threads anyway; decide it before it starts
    policy_dir, tok_dir, draft_dir = out / "policy", out / "tokenizer", out / "draft"
    tok = save_tokenizer(tok_dir)
    policy = build_policy(tok)
    policy.save_pretrained(policy_dir)
    stop, rng = [tok.eos_token_id], random.Random(1)

    # 2) a first draft from the policy's own samples (only "count up" prompts) ------------------------
    first = [encode(tok, problem(rng, ("up",))[0]) for _ in range(64)]
    with Engine(EngineConfig(model=str(policy_dir), tokenizer=str(tok_dir), max_num_seqs=64,
                             worker_extension=None)) as engine:
        result = train_from_own_samples(
            engine, policy, first, steps=120, n=4, max_tokens=ANSWER + 1, stop_token_ids=stop,
            draft_vocab_size=64,  # the 64 most frequent completion tokens (of 73; vLLM maps them back with d2t)
            aux_layer_ids=(1, 2, 3),  # hidden_states the draft reads; default (2, L//2, L-3) needs L >= 7
            config=TrainerConfig(lr=3e-3, warmup_steps=10, lr_schedule="cosine", lr_decay_steps=110),
            batch_size=32, out_dir=draft_dir, progress=False)
    print(f"first draft: {len(result.sequences)} sampled sequences, TTT loss {result.history[0].loss:.2f} -> "
          f"{result.history[-1].loss:.2f}, exported to {draft_dir}")

    # 3) serve it (the drafter shares the policy's embedding; with tied weights, its output head too) ---
    spec = SpecConfig("eagle3", 3, model=str(draft_dir))
    with Engine(EngineConfig(model=str(policy_dir), tokenizer=str(tok_dir), max_num_seqs=64, spec=spec)) as engine:
        # An engine you started yourself: EngineSwapper(llm) also takes the vllm.LLM, wrapped in
        # draftadapt.engine.vllm.ExternalLLM; start it with worker_extension_cls=
        # "draftadapt.engine.swap_worker.DraftSwapExtension" and disable_log_stats=False.
        swapper = EngineSwapper(engine)
        adapter = DraftAdapter(load_eagle3(draft_dir), policy.get_input_embeddings(),
                               AdapterConfig(train_steps=30, batch_tokens=1024, min_tokens=256, staleness_window=2),
                               TrainerConfig(lr=3e-3, warmup_steps=5, lr_schedule="linear",
                                             lr_decay_steps=30 * args.steps),
                               sink=swapper)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
        als = []
        # 4) RL with online adaptation: the calls of docs/byo_loop.md -------------------------------
        for step in range(args.steps):
            problems = [problem(rng) for _ in range(16)]
            before = swapper.spec_counters()
            r = collect_rollouts(engine, [encode(tok, p) for p, _ in problems], reward(problems),
                                 lambda ids: tok.decode(ids, skip_special_tokens=True), group_size=4, temperature=1.0,
                                 max_tokens=ANSWER + 1, stop_token_ids=stop, policy_version=step,
                                 seed=step * 16 * 4)  # request seeds never overlap across steps
            counters = swapper.spec_counters() - before
            batch = collate(r, tok.pad_token_id)
            policy.train()
            with adapter.capture(policy) as cap:  # the log-prob recompute the loop runs anyway
                logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            adapter.on_rollouts(cap.rollout_batch(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                  completion_mask=batch.completion_mask, policy_version=step))
            loss = grpo_loss(token_logprobs(logits, batch.input_ids), batch.old_logprobs,
                             group_advantages(r.rewards, r.group_size), batch.completion_mask, 0.2).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            policy.eval()
            swapper.refit_policy(policy.state_dict(), step + 1)  # tied: lm_head.weight is embed_tokens.weight
            stats = adapter.on_step_end(step + 1, counters=counters)
            als.append(counters.acceptance_length)
            print(f"step {step}: reward {float(r.rewards.mean()):.2f}  AL {counters.acceptance_length:.2f}  "
                  f"draft loss {stats.train.loss if stats.train else float('nan'):.3f}  pushed {stats.pushed}")
    # 5) export the adapted draft: a checkpoint vLLM serves, like the first one
    adapted = adapter.export(out / "draft-adapted", target_config=policy.config)
    print(f"adapted draft exported to {adapted}; AL {als[0]:.2f} (first draft) -> {als[-1]:.2f}")
    summary = {"acceptance_lengths": als, "first_draft_loss": [h.loss for h in result.history],
               "policy_dir": str(policy_dir), "draft_dir": str(draft_dir), "adapted_dir": str(adapted)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
