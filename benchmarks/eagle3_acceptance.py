"""How well do EAGLE-3 drafts for the toy policy get accepted, in vLLM and in the reference decoder?

Drafts: random, trained single-step (TTT K=1), trained with a 3-step training-time test.
For k = 1, 3, 5: vLLM acceptance length on held-out prompts at temperature 1 (the RL setting,
with the engine's lossless fix) and greedy, and the reference decoder's greedy acceptance length
on the same prompts. Also: draft training throughput and checkpoint size.

    .venv/bin/python benchmarks/eagle3_acceptance.py [--prompts 200] [--ref-prompts 40]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402


def vllm_al(policy, draft, prompts, k, temperature, n):
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig

    with Engine(EngineConfig(model=str(policy), max_num_seqs=64, spec=SpecConfig("eagle3", k, model=str(draft)))) as eng:
        before = eng.spec_counters()
        eng.generate(prompts, n=n, temperature=temperature, max_tokens=96, stop_token_ids=[2])
        return eng.spec_counters() - before


def reference_al(target, draft_dir, prompts, k):
    from draftadapt.checkpoint import load_eagle3
    from draftadapt.metrics import SpecCounters
    from draftadapt.specdec import speculative_generate

    draft, total = load_eagle3(draft_dir).eval(), SpecCounters()
    for p in prompts:
        total = total + speculative_generate(target, draft, p, 96, k=k, temperature=0.0, eos_token_id=2).counters
    return total


def random_draft(policy, like_dir, out_dir):
    from transformers import AutoConfig

    from draftadapt.checkpoint import load_eagle3, save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft

    like = load_eagle3(like_dir)
    torch.manual_seed(0)
    d = Eagle3Draft(like.config)
    d.set_vocab(like.d2t.clone())
    return save_eagle3(d, out_dir, AutoConfig.from_pretrained(policy))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=200, help="held-out prompts for the vLLM runs (x2 samples at T=1)")
    ap.add_argument("--ref-prompts", type=int, default=40, help="prompts for the vLLM-vs-reference greedy comparison")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftadapt.toy.draft import ToyDraftConfig, domain_prompts, toy_draft
    from draftadapt.toy.policy import toy_policy

    policy = toy_policy()
    tok = AutoTokenizer.from_pretrained(policy)
    cfg = ToyDraftConfig()
    drafts = {"ttt-3": toy_draft(policy, cfg),
              "single-step": toy_draft(policy, replace(cfg, trainer=replace(cfg.trainer, ttt_steps=1)))}
    drafts = {"random": random_draft(policy, drafts["ttt-3"], Path(policy).parent / "random-eagle3"), **drafts}
    heldout = domain_prompts(tok, "task", args.prompts, seed=999)
    target = AutoModelForCausalLM.from_pretrained(policy).eval()
    rows, records = [], []
    for name, d in drafts.items():
        for k in (1, 3, 5):
            t1 = vllm_al(policy, d, heldout, k, 1.0, 2)
            g = vllm_al(policy, d, heldout[: args.ref_prompts], k, 0.0, 1)
            ref = reference_al(target, d, heldout[: args.ref_prompts], k)
            pos = " ".join(f"{r:.2f}" for r in t1.acceptance_rate_per_pos())
            rows.append([name, k, t1.acceptance_length, pos, g.acceptance_length, ref.acceptance_length])
            records.append({"draft": name, "k": k, "vllm_T1": t1.as_dict(), "vllm_greedy": g.as_dict(),
                            "reference_greedy": ref.as_dict()})
    print_table(["draft", "k", "AL vLLM T=1", "per-pos T=1", "AL vLLM greedy", "AL ref greedy"], rows)
    train = {n: json.loads((Path(d) / "draftadapt_train.json").read_text()) for n, d in drafts.items() if n != "random"}
    size = (Path(drafts["ttt-3"]) / "model.safetensors").stat().st_size
    for n, t in train.items():
        print(f"{n}: trained {t['train_seconds']:.0f}s at {t['train_tokens_per_s']:.0f} tok/s "
              f"({t['feature_tokens']} feature tokens, rollouts {t['rollout_tokens']} tok in {t['rollout_seconds']:.1f}s)")
    print(f"checkpoint: {size / 1e6:.2f} MB (model.safetensors)")
    write_json("eagle3_acceptance", {"rows": records, "training": train, "checkpoint_bytes": size,
                                     "heldout_prompts": args.prompts, "ref_prompts": args.ref_prompts})


if __name__ == "__main__":
    main()
