"""Offline pre-init of an EAGLE-3 draft: the first draft before RL starts.

    python recipes/preinit.py --preset dapo run.target=/models/Qwen3-8B        # in-domain (DAPO-Math-17k)
    python recipes/preinit.py --preset ultrachat run.target=/models/Qwen3-8B   # generic (UltraChat-200k)
    python recipes/preinit.py --preset custom data.path=rows.parquet data.schema=ultrachat run.target=...
    python recipes/preinit.py --preset toy-task        # the toy analogues (toy policy, toy prompts)
    python recipes/preinit.py --config my.yaml [section.field=value ...] [--fresh]

Stages (draftadapt/preinit/pipeline.py): prepare (load, check, render) -> regenerate (the target's
own responses through vLLM) -> vocab -> capture (feature shards) -> train (TTT) -> export (vLLM
layout, optionally speculators) -> evaluate (acceptance length on held-out prompts through vLLM).
Rerunning the same command resumes an interrupted run; --fresh starts over.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM's INFO lines drown the progress bars
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from draftadapt.preinit.pipeline import load_config, run_preinit  # noqa: E402

PRESETS = {name: ROOT / "recipes" / f"preinit_{name.replace('-', '_')}.yaml"
           for name in ("dapo", "ultrachat", "custom", "toy-task", "toy-chat")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a YAML preset in recipes/")
    src.add_argument("--config", help="a YAML file with the same sections as the presets")
    ap.add_argument("--fresh", action="store_true", help="delete run.out_dir first instead of resuming")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("overrides", nargs="*", help="section.field=value")
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(PRESETS[args.preset] if args.preset else args.config, args.overrides)
    if args.fresh and Path(cfg.run.out_dir).exists():
        shutil.rmtree(cfg.run.out_dir)
    result = run_preinit(cfg, progress=not args.quiet)
    print_summary(result)
    return result


def print_summary(res: dict) -> None:
    def rate(stage, key="tokens_per_s"):
        v = res.get(stage, {}).get(key)
        return "-" if v is None else f"{v:,.0f}"

    ev, cap = res.get("evaluate", {}), res.get("capture", {})
    rows = [("train samples / eval prompts", f"{res['prepare']['train_samples']} / {res['prepare']['eval_prompts']}"),
            ("bad rows skipped", str(res["prepare"]["bad_rows"]["total"] + res["prepare"]["bad_render"]["total"])),
            ("regeneration tokens/s", rate("regenerate")), ("capture tokens/s", rate("capture")),
            ("disk bytes / captured token", f"{cap.get('bytes_per_token', 0):,.0f}"),
            ("training tokens/s", rate("train")),
            ("acceptance length", "-" if "spec_acceptance_length" not in ev else f"{ev['spec_acceptance_length']:.2f}")]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"draft: {res.get('export', {}).get('vllm')}")


if __name__ == "__main__":
    main()
