"""How close does online adaptation get to a draft retrained from scratch on the final policy?

For each finished GRPO recipe run (a directory with policy-final/ and result.json), trains a fresh EAGLE-3 draft
offline on the final policy's own samples (the same recipe as the initial draft: toy_draft) and measures its
acceptance length on the same held-out prompts and seeded samples the recipe used for its frozen/adapted table.
That is the ceiling the adapted draft is chasing; the frozen initial draft is the floor.

    .venv/bin/python benchmarks/draft_ceiling.py benchmarks/results/grpo_adaptation/style-adapted-s0 [...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "recipes"))
from _common import print_table, write_json  # noqa: E402


def ceiling(run_dir: Path) -> dict:
    import grpo_toy as recipe
    from transformers import AutoTokenizer

    from draftadapt.config import load_section
    from draftadapt.engine.vllm import Engine, EngineConfig, SpecConfig
    from draftadapt.toy.draft import toy_draft
    from draftadapt.toy.eval import eval_problems

    # the run's own config (read as JSON: YAML would take 1e-08 for a string)
    cfg = load_section(recipe.RecipeConfig, json.loads((run_dir / "config.json").read_text()), "config")
    policy_dir = run_dir / "policy-final"
    draft_dir = toy_draft(policy_dir, cfg.draft)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    held_out = eval_problems(cfg.run.eval_prompts, seed=4321, cfg=cfg.task)
    with Engine(EngineConfig(model=str(policy_dir), max_num_seqs=cfg.rollout.max_num_seqs, seed=cfg.run.seed,
                             spec=SpecConfig("eagle3", cfg.rollout.num_speculative_tokens, model=str(draft_dir)))) as eng:
        m = recipe.measure(eng, tok, held_out, cfg)
    res = json.loads((run_dir / "result.json").read_text())
    out = {"run": run_dir.name, "frozen": res["frozen"]["spec_acceptance_length"],
           "adapted": (res.get("adapted") or {}).get("spec_acceptance_length"),
           "retrained": m["spec_acceptance_length"], "retrained_dir": str(draft_dir)}
    (run_dir / "ceiling.json").write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--reuse", action="store_true", help="read a run's ceiling.json back instead of re-measuring")
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        c = json.loads((run / "ceiling.json").read_text()) if args.reuse and (run / "ceiling.json").exists() else ceiling(run)
        share = None
        if c["adapted"] is not None and c["retrained"] != c["frozen"]:
            share = (c["adapted"] - c["frozen"]) / (c["retrained"] - c["frozen"])
        rows.append([c["run"], c["frozen"], c["adapted"], c["retrained"], share])
    print_table(["run", "AL frozen initial", "AL adapted online", "AL retrained offline", "gap closed"],
                [[("-" if x is None else x) for x in r] for r in rows])
    write_json("draft_ceiling", {"rows": rows})


if __name__ == "__main__":
    main()
