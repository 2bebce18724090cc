"""Lossless audit of a vLLM engine: does sampling with spec decode match sampling without it?

Samples many temperature-1 completions of a few prompts from two engines on the same target,
one plain and one speculative, and runs a chi-square homogeneity test on the token at every
position, per prompt. With `alpha` as the family-wise false-alarm rate (Bonferroni over all
prompt x position tests), a correct engine fails the audit with probability <= alpha.

    python -m draftadapt.engine.audit --model DIR --draft DIR [--method draft_model]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Sequence

from ..stats import chi2_homogeneity
from .vllm import Engine, EngineConfig, SpecConfig


@dataclass(frozen=True)
class AuditResult:
    pvalues: list[list[float]]  # [prompt][position]
    alpha: float  # family-wise false-alarm rate
    threshold: float  # per-test threshold = alpha / number of tests
    min_pvalue: float
    passed: bool  # no test rejected at the per-test threshold
    samples_per_prompt: int
    acceptance_length: float  # of the speculative engine during the audit
    cpu_fix_applied: bool


def sample_tokens(engine: Engine, prompts: Sequence[Sequence[int]], n: int, max_tokens: int) -> list[list[list[int]]]:
    outs = engine.generate(prompts, n=n, temperature=1.0, max_tokens=max_tokens, logprobs=False)
    return [[c.token_ids for c in group] for group in outs]


def audit(model: str, spec: SpecConfig, prompts: Sequence[Sequence[int]], *, samples: int = 300,
          max_tokens: int = 4, alpha: float = 1e-3, max_num_seqs: int = 64, tokenizer: str | None = None) -> AuditResult:
    """Compare per-position token distributions of a plain and a speculative engine."""
    base_cfg = EngineConfig(model=model, tokenizer=tokenizer, max_num_seqs=max_num_seqs, seed=1,
                            worker_extension=None)
    with Engine(base_cfg) as eng:
        plain = sample_tokens(eng, prompts, samples, max_tokens)
    spec_cfg = EngineConfig(model=model, tokenizer=tokenizer, max_num_seqs=max_num_seqs, seed=2,
                            spec=spec, worker_extension=None)
    with Engine(spec_cfg) as eng:
        before = eng.spec_counters()
        drafted = sample_tokens(eng, prompts, samples, max_tokens)
        al = (eng.spec_counters() - before).acceptance_length
        fixed = eng.cpu_fix_applied
    pvalues = []
    for a, b in zip(plain, drafted):
        row = []
        for pos in range(max_tokens):
            xa = [s[pos] if len(s) > pos else -1 for s in a]  # -1: the sequence had ended
            xb = [s[pos] if len(s) > pos else -1 for s in b]
            row.append(chi2_homogeneity(xa, xb).pvalue)
        pvalues.append(row)
    threshold = alpha / (len(prompts) * max_tokens)
    min_p = min(min(r) for r in pvalues)
    return AuditResult(pvalues, alpha, threshold, min_p, min_p >= threshold, samples, al, fixed)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="target checkpoint dir")
    ap.add_argument("--draft", required=True, help="draft checkpoint dir")
    ap.add_argument("--method", default="draft_model", help="eagle3 or draft_model")
    ap.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=1e-3)
    ap.add_argument("--json-out", help="write the AuditResult here")
    args = ap.parse_args(argv)
    res = audit(args.model, SpecConfig(args.method, args.k, model=args.draft), json.loads(args.prompts),
                samples=args.samples, max_tokens=args.max_tokens, alpha=args.alpha)
    print(f"{'prompt':>6} " + " ".join(f"p(pos {i})".rjust(10) for i in range(args.max_tokens)))
    for i, row in enumerate(res.pvalues):
        print(f"{i:>6} " + " ".join(f"{p:10.2e}" for p in row))
    print(f"threshold {res.threshold:.1e}  min p {res.min_pvalue:.2e}  AL {res.acceptance_length:.2f}  "
          f"cpu fix {'on' if res.cpu_fix_applied else 'OFF'}  -> {'PASS' if res.passed else 'FAIL'}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(asdict(res), f, indent=1)


if __name__ == "__main__":
    main()
