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

from draftadapt.preinit.pipeline import format_summary, load_config, run_preinit  # noqa: E402
import draftadapt.toy.preinit_sources  # noqa: E402,F401 (registers data.source=toy and run.target=toy)

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
    print(format_summary(result))
    return result


if __name__ == "__main__":
    main()
