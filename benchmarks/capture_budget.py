"""What capture costs at a real shape, with and without the step budget, and what that means at Qwen3-8B.

Question: at the Qwen3-0.6B shape (vocab 151,936, hidden 1024, 16/8 heads, head_dim 128, tied; --layers of
its 28), how much does capture add to the policy's forward+backward when it keeps every row (no budget)
versus a step budget (a fraction of the step's positions, in windows), and how many bytes per kept token
leave the forward for each teacher? Then: per-step host/device traffic and the training tokens/s a
draft trainer needs at Qwen3-8B (hidden 4096, draft vocab 32k; 512 x 16 rollouts of 8k or 32k tokens),
projected from the per-token byte formula the measurement checks.

Arms, interleaved in every round (machine load hits all alike): off (plain forward + backward), all
(capture keeps every row: the old path's volume), budget (StepSampler keeps --fraction of the positions).
Each arm runs the same micro-batches: forward, rollout_batch, backward (rollout_batch before backward,
as the adapter docs say). Run: nice -n 5 python benchmarks/capture_budget.py [--layers 4 --tokens 256]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import torch
from _common import print_table, write_json

from draftadapt.budget import StepSampler
from draftadapt.capture import FeatureCapture
from draftadapt.toy.realistic import aux_ids, peak_rss_gb, target_config

VD, TOPK = 32000, 64
QWEN3_8B = dict(hidden=4096, layers=36, prompts=512, samples=16)


def step(policy, ids, comp, arm: str, fraction: float, version: int) -> tuple[float, int, int]:
    """One policy step over the micro-batches `ids`: (seconds, tokens copied off the forward, their bytes).
    With the budget a later micro-batch may push out windows an earlier one copied: copied >= kept."""
    sampler = None
    if arm == "budget":
        total = sum(x.numel() for x in ids)
        sampler = StepSampler(tokens=max(1, int(fraction * total)), window=64, seed=0)
    kept = nbytes = 0
    policy.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for x, c in zip(ids, comp):
        cap = FeatureCapture(policy, aux_layer_ids=aux_ids(len(policy.model.layers)), teacher="topk", top_k=TOPK,
                             draft_vocab_ids=torch.arange(VD), store_dtype=torch.bfloat16, offload_to_cpu=True,
                             sampler=sampler) if arm != "off" else None
        if cap is not None:
            cap.attach()
        logits = policy(input_ids=x, use_cache=False).logits
        lp = logits[:, :-1].float().log_softmax(-1).gather(-1, x[:, 1:, None]).squeeze(-1)
        del logits
        if cap is not None:
            batch = cap.rollout_batch(input_ids=x, completion_mask=c, policy_version=version)
            cap.remove()
            kept += batch.num_tokens
            nbytes += sum(t.numel() * t.element_size() for t in vars(batch).values() if isinstance(t, torch.Tensor))
        (-(lp * c[:, 1:]).sum() / c.sum()).backward()
        del lp
    return time.perf_counter() - t0, kept, nbytes


def bytes_per_token(hidden: int, teacher: str) -> int:
    """Stored bytes per kept token: 3 bf16 aux states + teacher + int64 id + bool mask + int64 position."""
    teach = {"topk64_fp32": TOPK * (8 + 4), "dense32k_fp16": VD * 2, "dense32k_fp32": VD * 4}[teacher]
    return 3 * hidden * 2 + teach + 8 + 1 + 8


def projection(fractions=(1.0, 0.01, 0.001), step_seconds=(300, 1200)) -> list[list]:
    """Per-step bytes off the device and draft-training tokens/s needed at Qwen3-8B."""
    rows = []
    for length in (8192, 32768):
        tokens = QWEN3_8B["prompts"] * QWEN3_8B["samples"] * length
        for frac in fractions:
            kept = int(tokens * frac)
            for teacher in ("dense32k_fp32", "topk64_fp32"):
                gb = kept * bytes_per_token(QWEN3_8B["hidden"], teacher) / 1e9
                rows.append([length, tokens, frac, kept, teacher, gb] + [kept / s for s in step_seconds])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256, help="positions per micro-batch (one sequence)")
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", help="policy dtype (bf16: what RL policies train in; half the RSS)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(target_config(args.layers), dtype=getattr(torch, args.dtype)).train()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 151936, (1, args.tokens), generator=g) for _ in range(args.micro_batches)]
    comp = [torch.arange(args.tokens)[None] >= 64 for _ in ids]
    arms = ("off", "all", "budget")
    step(policy, ids[:1], comp[:1], "all", args.fraction, 0)  # warm-up
    runs = {a: [] for a in arms}
    for r in range(args.rounds):
        for a in (arms if r % 2 == 0 else arms[::-1]):
            runs[a].append(step(policy, ids, comp, a, args.fraction, r))
            print(f"round {r} {a}: {runs[a][-1][0]:.1f} s", flush=True)
    off = [s for s, _, _ in runs["off"]]
    table, results = [], {}
    for a in arms:
        ratio = [s / o for (s, _, _), o in zip(runs[a], off)]
        sec, kept, nb = runs[a][-1]
        results[a] = {"seconds": [s for s, _, _ in runs[a]], "ratio_to_off": ratio, "copied_tokens": kept,
                      "bytes_off_forward": nb, "bytes_per_copied_token": nb / kept if kept else None}
        table.append([a, statistics.median(s for s, _, _ in runs[a]), statistics.median(ratio), min(ratio),
                      max(ratio), kept, nb / 2**20, nb / kept if kept else 0.0])
    print_table(["arm", "median s", "x off", "min x", "max x", "copied tok", "MiB off fwd", "B/copied tok"], table)
    formula = bytes_per_token(1024, "topk64_fp32")
    print(f"\nbytes/token formula at hidden 1024, top-64: {formula} (ids, mask, aux, teacher, positions)")
    proj = projection()
    print("\nQwen3-8B projection (hidden 4096, draft vocab 32k, 512 x 16 rollouts per step)")
    print_table(["rollout", "tokens/step", "kept frac", "kept tok", "teacher", "GB off device/step",
                 "train tok/s @300s", "train tok/s @1200s"], proj)
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    write_json("capture_budget", {
        "question": "capture overhead with vs without the step budget at the Qwen3-0.6B shape; Qwen3-8B traffic",
        "config": vars(args), "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "git_dirty": dirty, "peak_rss_gb": peak_rss_gb(), "arms": results,
        "bytes_per_token_formula": {t: {h: bytes_per_token(h, t) for h in (1024, 4096)}
                                    for t in ("topk64_fp32", "dense32k_fp16", "dense32k_fp32")},
        "projection_columns": ["rollout", "tokens_per_step", "kept_fraction", "kept_tokens", "teacher",
                               "gb_off_device_per_step", "train_tok_s_at_300s_step", "train_tok_s_at_1200s_step"],
        "projection": proj, "note": "shared 2-core machine: ratios from interleaved rounds, not absolute times"})


if __name__ == "__main__":
    main()
