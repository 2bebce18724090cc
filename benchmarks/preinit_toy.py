"""Which first draft is better for RL on the toy task: pre-initialised in-domain or on generic chat?

The toy analogue of the published comparison (DAPO-Math init AL 3.32 vs UltraChat init 2.88 at k=3):
the offline pre-init pipeline runs twice through the same code, once on toy task prompts (the
DAPO analogue, preset toy-task) and once on the generic toy chat corpus (the UltraChat analogue,
preset toy-chat), each with the toy policy's own regenerated responses. Both drafts are then
scored on the same held-out toy RL prompts. Prints per-stage time and throughput, disk bytes per
captured token, and the acceptance length of each init.

    python benchmarks/preinit_toy.py [--out-root DIR] [section.field=value ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import print_table, write_json  # noqa: E402

from draftadapt.preinit.pipeline import STAGES, load_config, run_preinit  # noqa: E402
import draftadapt.toy.preinit_sources  # noqa: E402,F401 (registers data.source=toy and run.target=toy)

ARMS = {"in-domain (toy-task, DAPO analogue)": "preinit_toy_task.yaml",
        "generic (toy-chat, UltraChat analogue)": "preinit_toy_chat.yaml"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-root", default=None, help="run directories (default: a fresh temp dir)")
    ap.add_argument("overrides", nargs="*", help="section.field=value, applied to both arms")
    args = ap.parse_intermixed_args(argv)
    root = Path(args.out_root or tempfile.mkdtemp(prefix="preinit_toy-"))
    results = {}
    for name, preset in ARMS.items():
        cfg = load_config(ROOT / "recipes" / preset, [f"run.out_dir={root / Path(preset).stem}", *args.overrides])
        results[name] = {"result": run_preinit(cfg, progress=False), "preset": preset,
                         "threads": cfg.run.threads, "overrides": args.overrides}
    stage_rows = [[name, *[round(r["result"][s].get("seconds", 0.0) or 0.0, 1) for s in STAGES if s != "export"]]
                  for name, r in results.items()]
    print("\nseconds per stage (regenerate: generation only; evaluate: generation only)")
    print_table(["init", *[s for s in STAGES if s != "export"]], stage_rows)
    rows = []
    for name, r in results.items():
        res = r["result"]
        ev = res["evaluate"]
        rows.append([name, f"{res['regenerate']['tokens_per_s']:,.0f}", f"{res['capture']['tokens_per_s']:,.0f}",
                     f"{res['train']['tokens_per_s']:,.0f}", f"{res['capture']['bytes_per_token']:,.0f}",
                     f"{res['vocab']['coverage']:.3f}", round(ev["spec_acceptance_length"], 3),
                     " ".join(f"{p:.2f}" for p in ev["acceptance_rate_per_pos"])])
    print("\nthroughput (tokens/s) and acceptance length on the toy RL prompts (k=3, T=1)")
    print_table(["init", "regen tok/s", "capture tok/s", "train tok/s", "disk B/token", "vocab cover",
                 "AL", "accept per pos"], rows)
    als = [r["result"]["evaluate"]["spec_acceptance_length"] for r in results.values()]
    print(f"\nAL in-domain / generic = {als[0]:.2f} / {als[1]:.2f} (published at k=3: 3.32 / 2.88)")
    write_json("preinit_toy", {"question": __doc__.splitlines()[0], "torch_threads_run": results[next(iter(results))]["threads"],
                               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "arms": results})
    return results


if __name__ == "__main__":
    main()
