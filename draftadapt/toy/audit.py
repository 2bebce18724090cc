"""The lossless engine audit (`engine/audit.py`) on the toy task: its prompts and its scorer.

    python -m draftadapt.toy.audit --model DIR --drafter eagle3=DRAFT_DIR --drafter ngram \\
        --drafter draft_model=DIR2 --toy-prompts 4 --samples 1000 --alpha 0.01 \\
        --sequence-problems 500 --sequence-samples 20      # ~3-point accuracy shift detectable

The audit itself takes prompts and a `SequenceTask` as input; this module supplies the toy's, so the
engine layer never imports the workload. Exit status 1 when the audit fails.
"""
from __future__ import annotations

from typing import Sequence

from ..engine.audit import Scored, SequenceTask, parser, run_cli
from .eval import encode_prompt, eval_problems
from .task import parse_answer, style_of


def toy_task(tokenizer_dir: str, problems: int, samples_per_prompt: int, seed: int = 4321) -> SequenceTask:
    """The toy arithmetic task as a SequenceTask (accuracy from "A: n", style from the wording)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    probs = eval_problems(problems, seed=seed)

    def score(i: int, ids: list[int]) -> Scored:
        text = tok.decode(ids, skip_special_tokens=True)
        return Scored(parse_answer(text) == probs[i].answer, style_of(text))

    return SequenceTask([encode_prompt(tok, p.prompt) for p in probs], score, samples_per_prompt,
                        stop_token_ids=[tok.eos_token_id])


def main(argv: Sequence[str] | None = None) -> int:
    import json

    ap = parser()
    ap.add_argument("--prompts", help="JSON list of token-id lists for the token-level tests")
    ap.add_argument("--toy-prompts", type=int, default=0, help="or: this many toy-task prompts")
    ap.add_argument("--sequence-problems", type=int, default=0,
                    help="toy-task sequence check: problems (0 = off). 500 x 20 samples = 10k completions per arm "
                         "detect a 2.9-point accuracy shift with 80%% at --alpha 0.01 and 3 drafters (accuracy ~0.35)")
    ap.add_argument("--sequence-samples", type=int, default=20, help="completions per problem and arm")
    args = ap.parse_args(argv)
    tok_dir = args.tokenizer or args.model
    task = toy_task(tok_dir, args.sequence_problems, args.sequence_samples) if args.sequence_problems else None
    if args.prompts:
        prompts = json.loads(args.prompts)
    elif args.toy_prompts:
        prompts = list(toy_task(tok_dir, args.toy_prompts, 1, seed=7).prompts)
    else:
        ap.error("give --prompts JSON or --toy-prompts N")
    return run_cli(args, prompts, task)


if __name__ == "__main__":
    raise SystemExit(main())
