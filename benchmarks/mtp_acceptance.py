"""How well is the toy policy's own MTP layer accepted in vLLM, before and after online adaptation,
beside the EAGLE-3 path on the same policy?

Policy: the toy Llama policy; for the MTP path the same weights as a MiMo checkpoint with one MTP
layer (draftadapt/toy/mtp.py: distilled on the toy SFT mixture with the trunk frozen). Draft
EAGLE-3: the cached toy draft (3-step TTT on the policy's own samples). k = 3 for both.

Arms, each in ONE running engine (vLLM acceptance length on held-out prompts at temperature 1,
seeded requests, and greedy):
  mtp        initial MTP layer -> adapted online (V versions: engine rollouts -> capture on the
             policy's HF forward -> DraftAdapter -> push)
  mtp-perturbed  the MTP layer perturbed in the engine (weights + N(0, std^2) noise) -> adapted online
  eagle3     initial toy draft -> adapted online with the same budget
Every arm also checks that greedy outputs equal plain decoding of the Llama policy.

    .venv/bin/python benchmarks/mtp_acceptance.py [--prompts 200] [--versions 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

K, MAX_TOKENS, EOS = 3, 96, 2


def measure(eng, swapper, prompts, greedy_ref) -> dict:
    """AL at T=1 (2 seeded samples per prompt) and greedy; greedy outputs compared with plain decoding."""
    c0 = swapper.spec_counters()
    eng.generate(prompts, n=2, temperature=1.0, max_tokens=MAX_TOKENS, stop_token_ids=[EOS], seed=777)
    c1 = swapper.spec_counters()
    outs = eng.generate(prompts[: len(greedy_ref)], temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[EOS])
    t1, greedy = c1 - c0, swapper.spec_counters() - c1
    return {"T1": t1.as_dict(), "greedy": greedy.as_dict(), "al_T1": t1.acceptance_length,
            "per_pos_T1": t1.acceptance_rate_per_pos(), "al_greedy": greedy.acceptance_length,
            "greedy_equals_plain": [o[0].token_ids for o in outs] == greedy_ref}


def adapt_online(eng, adapter, policy, tok, prompts, versions: int, first_version: int, per_version: int) -> list[dict]:
    """`versions` adapter steps: rollouts from the engine, capture on the policy's log-prob forward, push."""
    from draftadapt.grpo.loop import collate, collect_rollouts
    from draftadapt.grpo.objective import token_logprobs

    log = []
    for i in range(versions):
        v = first_version + i
        chunk = prompts[i * per_version: (i + 1) * per_version]
        r = collect_rollouts(eng, chunk, lambda j, t: 0.0, tok.decode, 2, 1.0, MAX_TOKENS, [EOS], v - 1)
        b = collate(r, tok.pad_token_id)
        with adapter.capture(policy) as cap, torch.no_grad():
            token_logprobs(policy(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.input_ids)
        adapter.on_rollouts(cap.rollout_batch(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                              completion_mask=b.completion_mask, policy_version=v - 1))
        stats = adapter.on_step_end(v)
        if not (stats.pushed and stats.push_result.verified):
            raise RuntimeError(f"version {v} was not pushed: {stats.push_reason}")
        log.append({"version": v, "train_seconds": stats.train.seconds, "loss": stats.train.loss,
                    "acc": stats.train.step_acc, "push_ms": stats.push_seconds * 1e3})
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=200, help="held-out prompts (x2 samples at T=1)")
    ap.add_argument("--greedy", type=int, default=32, help="held-out prompts for the greedy runs")
    ap.add_argument("--versions", type=int, default=3, help="online adaptation steps (policy versions)")
    ap.add_argument("--per-version", type=int, default=96, help="rollout prompts per version (x2 samples)")
    ap.add_argument("--train-steps", type=int, default=15, help="draft optimizer steps per version")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftadapt.adapter import AdapterConfig, DraftAdapter
    from draftadapt.checkpoint import draft_state_for_push, load_eagle3
    from draftadapt.drafts.mtp import MTPDraft, load_mtp_state, mtp_state_for_push
    from draftadapt.engine.swap import EngineSwapper, read_safetensors_dir
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.toy.draft import domain_prompts, toy_draft
    from draftadapt.toy.mtp import toy_mtp_policy
    from draftadapt.toy.policy import toy_policy
    from draftadapt.trainer import TrainerConfig

    policy_dir = toy_policy()
    mtp = toy_mtp_policy(policy_dir)
    eagle_dir = toy_draft(policy_dir)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    heldout = domain_prompts(tok, "task", args.prompts, seed=999)
    train_prompts = domain_prompts(tok, "task", args.versions * args.per_version, seed=41)
    with Engine(EngineConfig(model=str(policy_dir), max_num_seqs=64)) as eng:
        greedy_ref = [o[0].token_ids for o in eng.generate(heldout[: args.greedy], temperature=0.0,
                                                            max_tokens=MAX_TOKENS, stop_token_ids=[EOS])]
    adapter_cfg = AdapterConfig(train_steps=args.train_steps, batch_tokens=2048, min_tokens=512, acceptance_drop=None)
    trainer_cfg = TrainerConfig(lr=1e-3, ttt_steps=K, warmup_steps=3)
    records = {}

    # 1) MTP: initial -> adapted; perturbed -> adapted, one engine
    policy = AutoModelForCausalLM.from_pretrained(mtp.model_dir).eval()  # the MiMo trunk as HF Qwen2
    ckpt = read_safetensors_dir(mtp.model_dir)

    def mtp_draft() -> MTPDraft:
        return load_mtp_state(MTPDraft.from_target(policy.config, policy.get_output_embeddings()), ckpt)

    cfg = EngineConfig(model=str(mtp.model_dir), tokenizer=str(mtp.tokenizer_dir), max_num_seqs=64,
                       spec=SpecConfig("mtp", K))
    with Engine(cfg) as eng:
        sw = EngineSwapper(eng)
        rec = {"initial": measure(eng, sw, heldout, greedy_ref)}
        t0 = time.perf_counter()
        adapter = DraftAdapter(mtp_draft(), policy.get_input_embeddings(), adapter_cfg, trainer_cfg, sink=sw)
        rec["log"] = adapt_online(eng, adapter, policy, tok, train_prompts, args.versions, 1, args.per_version)
        rec["adapt_seconds"] = time.perf_counter() - t0
        rec["adapted"] = measure(eng, sw, heldout, greedy_ref)
        records["mtp"] = rec
        perturbed = mtp_draft()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in perturbed.parameters():
                p.add_(p.std() * torch.randn(p.shape, generator=g))
        sw.push_draft(mtp_state_for_push(perturbed), 100)
        rec = {"initial": measure(eng, sw, heldout, greedy_ref)}
        t0 = time.perf_counter()
        adapter = DraftAdapter(perturbed, policy.get_input_embeddings(), adapter_cfg, trainer_cfg, sink=sw)
        rec["log"] = adapt_online(eng, adapter, policy, tok, train_prompts, args.versions, 101, args.per_version)
        rec["adapt_seconds"] = time.perf_counter() - t0
        rec["adapted"] = measure(eng, sw, heldout, greedy_ref)
        records["mtp-perturbed"] = rec

    # 2) EAGLE-3 on the same policy (Llama checkpoint, same weights), same protocol
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    cfg = EngineConfig(model=str(policy_dir), max_num_seqs=64, spec=SpecConfig("eagle3", K, model=str(eagle_dir)))
    with Engine(cfg) as eng:
        sw = EngineSwapper(eng)
        rec = {"initial": measure(eng, sw, heldout, greedy_ref)}
        t0 = time.perf_counter()
        adapter = DraftAdapter(load_eagle3(eagle_dir), policy.get_input_embeddings(), adapter_cfg, trainer_cfg, sink=sw)
        rec["log"] = adapt_online(eng, adapter, policy, tok, train_prompts, args.versions, 1, args.per_version)
        rec["adapt_seconds"] = time.perf_counter() - t0
        rec["adapted"] = measure(eng, sw, heldout, greedy_ref)
        state = draft_state_for_push(adapter.worker.draft)
        rec["push_bytes"] = sum(t.numel() * t.element_size() for t in state.values())
        records["eagle3"] = rec
    records["mtp"]["push_bytes"] = sum(t.numel() * t.element_size() for t in mtp_state_for_push(perturbed).values())

    rows = []
    for name, rec in records.items():
        for phase in ("initial", "adapted"):
            m = rec[phase]
            rows.append([name, phase, m["al_T1"], " ".join(f"{r:.2f}" for r in m["per_pos_T1"]), m["al_greedy"],
                         str(m["greedy_equals_plain"])])
    print_table(["draft", "phase", "AL T=1", "per-pos T=1", "AL greedy", "greedy == plain"], rows)
    for name, rec in records.items():
        print(f"{name}: adapted {args.versions} versions x {args.train_steps} steps in {rec['adapt_seconds']:.0f}s "
              f"(rollouts + capture + training + pushes); last push {rec['log'][-1]['push_ms']:.0f} ms")
    build = json.loads((Path(mtp.model_dir) / "draftadapt_mtp.json").read_text())
    print(f"toy MTP layer build: {build['train_seconds']:.0f}s on {build['threads']} thread(s)")
    write_json("mtp_acceptance", {"k": K, "records": records, "mtp_build": build, "args": vars(args),
                                  "threads": torch.get_num_threads(), "note": "CPU shared with other jobs"})


if __name__ == "__main__":
    main()
