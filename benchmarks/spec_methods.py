"""Block verification and probabilistic drafting vs standard rejection sampling: acceptance, speed, losslessness.

Toy policy + its EAGLE-3 draft (a trained policy: temperature 1 is meaningful here, unlike a random
target), k=3, temperature 1, held-out task prompts. Arms: rejection_sample_method standard | block x
draft_sample_method greedy | probabilistic. Each arm needs its own engine (both are engine settings);
arms run in shuffled order within each round, one engine at a time. tok/s are per CPU-second of this
process (vLLM in-process, one thread: robust on a shared machine), wall tok/s beside them. Then a lossless audit of each
non-standard arm through the engine: draftadapt.engine.audit's per-position chi-square against plain
sampling (Bonferroni family-wise alpha).

    nice -n 5 python benchmarks/spec_methods.py [--rounds 2] [--prompts 64] [--audit-samples 300]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

ARMS = {"standard": ("standard", "greedy"), "block": ("block", "greedy"),
        "probabilistic": ("standard", "probabilistic"), "block+probabilistic": ("block", "probabilistic")}


def spec_for(arm: str, draft: str, k: int):
    from draftadapt.engine.vllm import SpecConfig

    rej, drf = ARMS[arm]
    return SpecConfig("eagle3", k, model=draft, rejection_sample_method=rej, draft_sample_method=drf)


def measure(policy, spec, prompts, n, max_tokens, seed):
    from draftadapt.engine.vllm import Engine, EngineConfig

    with Engine(EngineConfig(model=policy, spec=spec, max_num_seqs=64, worker_extension=None, seed=seed)) as eng:
        eng.generate(prompts[:4], n=1, max_tokens=8, logprobs=False)  # warm-up
        c0, t0, p0 = eng.spec_counters(), time.perf_counter(), time.process_time()
        outs = eng.generate(prompts, n=n, temperature=1.0, max_tokens=max_tokens, logprobs=False, seed=seed,
                            stop_token_ids=[2])
        dt, cpu = time.perf_counter() - t0, time.process_time() - p0
        d = eng.spec_counters() - c0
    toks = sum(len(c.token_ids) for g in outs for c in g)
    return {"tok_s": toks / cpu, "wall_tok_s": toks / dt, "seconds": dt, "cpu_seconds": cpu, "tokens": toks, "al": d.acceptance_length,
            "rates": d.acceptance_rate_per_pos(), "load1": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=2, help="T=1 completions per prompt in the speed runs")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--audit-prompts", type=int, default=3)
    ap.add_argument("--audit-samples", type=int, default=300)
    ap.add_argument("--audit-tokens", type=int, default=4)
    ap.add_argument("--arms", default=",".join(ARMS))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from draftadapt.engine.audit import audit
    from draftadapt.toy.draft import ToyDraftConfig, domain_prompts, toy_draft
    from draftadapt.toy.policy import toy_policy

    t_start = time.time()
    policy = str(toy_policy())
    draft = str(toy_draft(policy, ToyDraftConfig()))
    tok = AutoTokenizer.from_pretrained(policy)
    prompts = domain_prompts(tok, "task", args.prompts, seed=999)
    arms = args.arms.split(",")
    runs = {a: [] for a in ["none"] + arms}
    for r in range(args.rounds):
        order = ["none"] + arms
        random.Random(r).shuffle(order)
        for a in order:
            spec = None if a == "none" else spec_for(a, draft, args.k)
            runs[a].append(measure(policy, spec, prompts, args.samples, 96, seed=17 + r))
            print(f"  r{r} {a}: {runs[a][-1]['tok_s']:.0f} tok/s AL {runs[a][-1]['al']:.2f}", flush=True)
    audits = {}
    audit_prompts = domain_prompts(tok, "task", args.audit_prompts, seed=31337)
    for a in arms:
        res = audit(policy, spec_for(a, draft, args.k), audit_prompts, samples=args.audit_samples,
                    max_tokens=args.audit_tokens)
        audits[a] = {"passed": res.passed, "min_pvalue": res.min_pvalue, "threshold": res.threshold,
                     "acceptance_length": res.acceptance_length, "pvalues": res.pvalues,
                     "cpu_fix_applied": res.cpu_fix_applied}
        print(f"  audit {a}: min p {res.min_pvalue:.2e} (threshold {res.threshold:.1e}) -> "
              f"{'PASS' if res.passed else 'FAIL'}", flush=True)
    rows = []
    for a in ["none"] + arms:
        ratios = [x["tok_s"] / n["tok_s"] for x, n in zip(runs[a], runs["none"])]
        als = [x["al"] for x in runs[a]]
        rows.append([a, statistics.median(x["tok_s"] for x in runs[a]), statistics.median(ratios),
                     f"[{min(ratios):.2f}, {max(ratios):.2f}]", "-" if a == "none" else statistics.mean(als),
                     "-" if a == "none" else " ".join(f"{v:.2f}" for v in runs[a][-1]["rates"]),
                     "-" if a not in audits else f"{audits[a]['min_pvalue']:.1e} {'PASS' if audits[a]['passed'] else 'FAIL'}"])
    print_table(["arm", "tok/cpu-s", "vs none", "range", "AL (T=1)", "per-pos (last round)", "audit min p"], rows)
    print(f"wall {time.time() - t_start:.0f}s, load average {os.getloadavg()}; machine shared with other sessions")
    write_json("spec_methods", {"args": vars(args), "runs": runs, "audits": audits, "policy": policy, "draft": draft,
                                "threads": os.environ.get("OMP_NUM_THREADS"), "load_end": os.getloadavg()})


if __name__ == "__main__":
    main()
