"""`draftadapt` command line: the embedded demo and small utilities.

    draftadapt demo            # toy smoke run: build/reuse the toy policy, serve it, spec decode
    draftadapt toy-policy      # build (or find) the toy policy and print its directory
    draftadapt train-draft --target DIR --data seqs.jsonl --out DIR [--steps N --draft-vocab-size V]
                               # offline EAGLE-3 training: features -> TTT -> a checkpoint vLLM loads
    draftadapt preinit --config recipes/preinit_dapo.yaml [section.field=value ...] [--fresh]
                               # offline draft pre-init pipeline (recipes/preinit.py has the presets)

train-draft reads JSON lines {"input_ids": [...], "completion_start": n}: token ids of the
target's tokenizer; only positions whose next token lies at or after completion_start train
(omit it to train on every position).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Sequence


def _toy_policy(args) -> "object":
    from .toy.policy import SFTConfig, toy_policy

    cfg = SFTConfig(threads=args.threads)
    t0 = time.perf_counter()
    path = toy_policy(cfg, root=args.cache)
    sft = json.loads((path / "draftadapt_sft.json").read_text())
    took = time.perf_counter() - t0
    print(f"toy policy: {path}  (trained in {sft['train_seconds']:.0f}s on {sft['threads']} threads;"
          f" {'reused' if took < sft['train_seconds'] else 'built now'})")
    return path


def demo(args) -> None:
    """The toy smoke run: the policy, its accuracy, and spec decode on the real engine."""
    from transformers import AutoTokenizer

    from .engine.vllm import Engine, EngineConfig, SpecConfig
    from .toy.eval import encode_prompt, eval_problems, evaluate

    # 1) the toy policy (trained on first use, then cached)
    path = _toy_policy(args)
    tok = AutoTokenizer.from_pretrained(path)
    problems = eval_problems(args.problems)
    prompts = [encode_prompt(tok, p.prompt) for p in problems]
    rows = []
    # 2) plain decoding: accuracy before RL at temperature 1 and greedy
    with Engine(EngineConfig(model=str(path), max_num_seqs=64)) as eng:
        rows.append(("engine start (plain)", f"{eng.start_seconds:.1f} s"))
        for temp in (1.0, 0.0):
            t0 = time.perf_counter()
            res = evaluate(eng, tok, problems, temperature=temp)
            rows.append((f"accuracy T={temp:g}", f"{res.accuracy:.1%}  ({res.samples} problems, "
                         f"{res.mean_completion_tokens:.1f} tok/answer, {time.perf_counter() - t0:.1f} s)"))
            rows.append((f"styles T={temp:g}", ", ".join(f"{k} {v:.0%}" for k, v in res.style_shares.items())))
        plain = eng.generate(prompts, temperature=0.0, max_tokens=96)
    # 3) the same prompts with n-gram spec decode: identical greedy outputs, counters move
    with Engine(EngineConfig(model=str(path), max_num_seqs=64, spec=SpecConfig("ngram", 3))) as eng:
        rows.append(("engine start (ngram k=3)", f"{eng.start_seconds:.1f} s"))
        before = eng.spec_counters()
        spec = eng.generate(prompts, temperature=0.0, max_tokens=96)
        delta = eng.spec_counters() - before
    same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(plain, spec))
    rows.append(("greedy identical with spec", f"{same}/{len(prompts)}"))
    rows.append(("ngram acceptance length", f"{delta.acceptance_length:.2f}  per position "
                 + " ".join(f"{r:.2f}" for r in delta.acceptance_rate_per_pos())))
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def train_draft(args) -> None:
    """Offline EAGLE-3 training from a JSONL file of token sequences."""
    import torch
    from transformers import AutoModelForCausalLM

    from .offline import train_offline
    from .trainer import TrainerConfig

    seqs, masks = _read_sequences(args.data)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    warm = min(30, args.steps // 10)
    cfg = TrainerConfig(lr=args.lr, ttt_steps=args.ttt_steps, warmup_steps=warm, lr_schedule=args.lr_schedule,
                        lr_decay_steps=0 if args.lr_schedule == "constant" else max(1, args.steps - warm))
    aux = tuple(int(x) for x in args.aux_layer_ids.split(",")) if args.aux_layer_ids else None
    t0 = time.perf_counter()
    train_offline(target, seqs, args.steps, draft_vocab_size=args.draft_vocab_size, aux_layer_ids=aux, config=cfg,
                  loss_masks=masks, batch_size=args.batch_size, out_dir=args.out)
    print(f"trained {args.steps} steps on {len(seqs)} sequences in {time.perf_counter() - t0:.0f}s -> {args.out}")


def preinit(args) -> None:
    """The offline pre-init pipeline (draftadapt/preinit/) on a YAML config, resuming by default."""
    import shutil
    from pathlib import Path

    from .preinit.pipeline import format_summary, load_config, run_preinit
    from .toy import preinit_sources  # noqa: F401 (registers data.source=toy and run.target=toy)

    cfg = load_config(args.config, args.overrides)
    if args.fresh and Path(cfg.run.out_dir).exists():
        shutil.rmtree(cfg.run.out_dir)
    print(format_summary(run_preinit(cfg, progress=not args.quiet)))


def _read_sequences(path: str) -> tuple[list[list[int]], list[list[bool]]]:
    seqs, masks = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or "input_ids" not in row:
                raise ValueError(f"{path}:{n}: each line must be a JSON object with 'input_ids' (a list of token ids)")
            ids = [int(x) for x in row["input_ids"]]
            if len(ids) < 3:
                raise ValueError(f"{path}:{n}: {len(ids)} tokens; a sequence needs at least 3")
            start = int(row.get("completion_start", 0))
            seqs.append(ids)
            masks.append([i + 1 >= start for i in range(len(ids))])
    if not seqs:
        raise ValueError(f"{path} holds no sequences")
    return seqs, masks


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="draftadapt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn in (("demo", demo), ("toy-policy", _toy_policy)):
        p = sub.add_parser(name)
        p.add_argument("--cache", default=None, help="toy artefact dir (default $DRAFTADAPT_CACHE or ~/.cache/draftadapt)")
        p.add_argument("--threads", type=int, default=2, help="torch threads for toy policy training")
        p.add_argument("--problems", type=int, default=300, help="held-out problems to score")
        p.set_defaults(fn=fn)
    t = sub.add_parser("train-draft", help="offline EAGLE-3 training from token sequences")
    t.add_argument("--target", required=True, help="HF checkpoint dir of the target (policy)")
    t.add_argument("--data", required=True, help='JSONL: {"input_ids": [...], "completion_start": n}')
    t.add_argument("--out", required=True, help="output dir (a checkpoint vLLM loads with method eagle3)")
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    t.add_argument("--draft-vocab-size", type=int, default=None, help="most frequent tokens kept (default: full)")
    t.add_argument("--ttt-steps", type=int, default=3, help="training-time-test unroll K")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--lr-schedule", choices=("constant", "cosine", "linear"), default="constant",
                   help="after the warm-up: constant, or decay to lr/10 by the last step")
    t.add_argument("--aux-layer-ids", default=None, help="comma-separated HF hidden_states indices (default 2,L/2,L-3)")
    t.set_defaults(fn=train_draft)
    p = sub.add_parser("preinit", help="offline draft pre-init: data -> regeneration -> features -> TTT -> export")
    p.add_argument("--config", required=True, help="YAML with the sections of recipes/preinit_*.yaml")
    p.add_argument("--fresh", action="store_true", help="delete run.out_dir first instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.set_defaults(fn=preinit)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.fn(args)


if __name__ == "__main__":
    main()
