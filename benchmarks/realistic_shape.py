"""The feature path at the Qwen3-0.6B shape: time and RSS per stage.

Question: does the whole path - real engine, rollouts of thousands of tokens at vocab 151,936, capture
with the step budget, TTT at a 32k draft vocab, export, push into the running engine - run at a real
shape on this CPU, and what does each stage cost in time and memory? One run (no arms: it measures
stages, not a comparison); the machine is shared, so times are contended and the load average is
recorded. Run: nice -n 5 python benchmarks/realistic_shape.py [--layers 4 --rollouts 1 --tokens 2048]
(the defaults are the slow test's shape: 4 of the 28 layers, one 2048-token rollout, k=1, bf16 policy and engine)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import torch
from _common import print_table, write_json

from draftadapt.toy.realistic import RealisticConfig, run_realistic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rollouts", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2048, help="completion tokens per rollout")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--capture-tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--train-steps", type=int, default=2)
    ap.add_argument("--policy-dtype", default="bfloat16")
    ap.add_argument("--engine-dtype", default="bfloat16")
    ap.add_argument("--backward", action="store_true", help="also run the policy backward under capture")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = RealisticConfig(layers=args.layers, rollouts=args.rollouts, completion_tokens=args.tokens, k=args.k,
                          capture_tokens=args.capture_tokens, window_tokens=args.window, batch_tokens=args.window,
                          train_steps=args.train_steps, backward=args.backward, policy_dtype=args.policy_dtype,
                          engine_dtype=args.engine_dtype,
                          after_tokens=64)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        out = run_realistic(cfg, work)
    rows = [[name, s["seconds"], s["rss_gb"], s["peak_gb"]] for name, s in out["stages"].items()]
    print_table(["stage", "seconds", "rss GB", "peak GB"], rows)
    fig = out["figures"]
    print({k: v for k, v in fig.items() if k != "cache_windows"})
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    write_json("realistic_shape", {
        "question": "the feature path at the Qwen3-0.6B shape: time and RSS per stage", **out,
        "threads": torch.get_num_threads(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "git_dirty": dirty,
        "note": "shared 2-core machine (other sessions running): stage times are contended; a random target, so "
                "acceptance is not a quality figure"})


if __name__ == "__main__":
    main()
