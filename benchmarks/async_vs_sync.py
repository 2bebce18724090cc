"""How much of a GRPO step do async rollouts (policy lag 1) and a background draft trainer hide?

Runs the toy GRPO recipe four times with the same settings, switching only `run.async_lag`
(0 = sync, 1 = one-step off-policy) and `run.draft_worker` (inline / thread), and reports per step
(mean over the steps after the first, which also pays start-up and, in async mode, the first
batch): step time, generation wall time and the part of it the loop waited for (exposed), the
policy update, and the draft's exposed time (the adapter's step-boundary call) beside its own
training time. All threads share this process's cores: torch runs 1 intra-op thread per thread
(OMP_NUM_THREADS=1, and vLLM pins torch to 1 thread in-process), so overlap comes from two or three
Python threads releasing the GIL inside torch ops. The load average of the machine is recorded
with every arm: figures taken on a shared machine are ratios within one run, nothing more.

    .venv/bin/python benchmarks/async_vs_sync.py [--steps 6] [--rounds 1] [overrides ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo_toy.py"
ARMS = {"sync/inline": ["run.async_lag=0", "run.draft_worker=inline"],
        "async/inline": ["run.async_lag=1", "run.draft_worker=inline"],
        "sync/thread": ["run.async_lag=0", "run.draft_worker=thread"],
        "async/thread": ["run.async_lag=1", "run.draft_worker=thread"]}
KEYS = ("time/step", "time/generation", "time/generation_exposed", "time/policy_train", "time/refit", "time/draft",
        "draft/train_seconds")


def run_arm(out: Path, steps: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, str(RECIPE), f"run.out_dir={out}", f"run.steps={steps}", "run.checkpoint_every=0",
           "run.eval_prompts=16", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    load_before = os.getloadavg()[0]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "load_before": load_before, "load_after": os.getloadavg()[0]}


def per_step(rows: list[dict]) -> dict[str, float]:
    """Means over the steps after the first; a key missing in a row counts as 0 (nothing happened)."""
    body = rows[1:] or rows
    out = {k: sum(r.get(k) or 0.0 for r in body) / len(body) for k in KEYS}
    out["rollout_lag"] = sum(r.get("version/rollout_lag", 0) for r in body) / len(body)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the four arms, interleaved")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for every arm, e.g. rollout.prompts_per_step=16")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="async_vs_sync-") as tmp:
        for rnd in range(args.rounds):
            for arm, ov in ARMS.items():
                out = Path(tmp) / f"{arm.replace('/', '-')}-{rnd}"
                runs[arm].append(run_arm(out, args.steps, [*ov, *args.overrides]))
    summary = {arm: {k: sum(per_step(r["rows"])[k] for r in rs) / len(rs) for k in (*KEYS, "rollout_lag")}
               for arm, rs in runs.items()}
    table = []
    for arm, s in summary.items():
        table.append([arm, s["time/step"], s["time/generation"], s["time/generation_exposed"],
                      s["time/policy_train"], s["time/refit"], s["time/draft"], s["draft/train_seconds"],
                      s["rollout_lag"], ",".join(f"{r['load_before']:.1f}" for r in runs[arm])])
    print(f"\nper step, mean of steps 2..{args.steps} ({args.rounds} round(s)); seconds")
    print_table(["arm", "step", "generation", "gen exposed", "policy update", "refit", "draft exposed",
                 "draft train", "rollout lag", "load avg"], table)
    base = summary["sync/inline"]
    ratios = {"async_vs_sync_step_time": summary["async/inline"]["time/step"] / base["time/step"],
              "async_vs_sync_exposed_generation": summary["async/inline"]["time/generation_exposed"]
              / base["time/generation_exposed"],
              "thread_vs_inline_draft_exposed": summary["sync/thread"]["time/draft"] / base["time/draft"],
              "async_thread_vs_sync_inline_step_time": summary["async/thread"]["time/step"] / base["time/step"]}
    print("\n" + "\n".join(f"{k}: {v:.3f}" for k, v in ratios.items()))
    write_json("async_vs_sync", {"args": vars(args), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                                 "note": "shared 2-core machine (load average per arm in 'load'); ratios within "
                                         "this run only", "summary": summary, "ratios": ratios,
                                 "load": {a: [(r["load_before"], r["load_after"]) for r in rs] for a, rs in runs.items()},
                                 "rows": {a: [r["rows"] for r in rs] for a, rs in runs.items()}})


if __name__ == "__main__":
    main()
