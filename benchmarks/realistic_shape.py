"""The feature path at the Qwen3-0.6B shape: time and RSS per stage.

Question: does the whole path - real engine, rollouts of thousands of tokens at vocab 151,936, capture
with the step budget, TTT at a 32k draft vocab, export, push into the running engine - run at a real
shape on this CPU, and what does each stage cost in time and memory? One run (no arms: it measures
stages, not a comparison); the machine is shared, so times are contended and the load average is
recorded. Run: nice -n 5 python benchmarks/realistic_shape.py [--layers 4 --rollouts 1 --tokens 2048]
(the defaults are the slow test's shape: 4 of the 28 layers, one 2048-token rollout, k=1, bf16 policy and engine)

Full depth, long windows (issue 28 item 3; results/realistic_full_depth.json):
  OMP_NUM_THREADS=2 nice -n 5 python benchmarks/realistic_shape.py --layers 28 --rollouts 8 --tokens 128 \
      --documents-of 8 --document-tokens 16896 --windows 8192 16384 --logprob-chunk 1024 --train-steps 1 \
      --kv-cache-gib 1 --name realistic_full_depth
A 16k-token training window needs a 16k-token captured sequence. 2k-token rollouts at 28 layers ran at ~2.6
tokens/s for 8 sequences on this shared 2-core machine (load 10-14): 16k rollout tokens would take ~100 min,
so the run generates 8 rollouts of 128 tokens (the per-token engine cost is measured, and extrapolated in
results/README.md) and captures ONE document made of them, prompt 1 + rollout 1 + prompt 2 + rollout 2 ...,
cycled to 16,896 tokens (= 8 x (64 + 2048), what 8 prompts with 2k-token rollouts give; the length of an
agentic multi-turn trajectory), completion mask on the rollouts. A random target's tokens carry nothing, so
the capture and TTT costs depend only on the length. The log-prob forward runs as RL frameworks run it at
long lengths: the policy body, then log-probs per 1024 positions through the head (no [T, 151936] tensor),
the teacher from the captured final hidden state through the frozen head (teacher "final_hidden"). One train
step per window size, each from the initial draft on the same document; the 16k one is pushed and served.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from dataclasses import asdict

import torch
from _common import RESULTS, print_table, write_json

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
    ap.add_argument("--documents-of", type=int, default=1, help="rollouts concatenated into one captured document")
    ap.add_argument("--document-tokens", type=int, default=0,
                    help="> 0: each document cycles its rollouts up to this many tokens")
    ap.add_argument("--windows", type=int, nargs="*", default=[],
                    help="train one adapter per window size (window = budget = batch) instead of --window")
    ap.add_argument("--logprob-chunk", type=int, default=0,
                    help="> 0: log-probs per chunk of positions, teacher from the final hidden (no [T, V] logits)")
    ap.add_argument("--kv-cache-gib", type=int, default=1)
    ap.add_argument("--name", default="realistic_shape", help="results/<name>.json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = RealisticConfig(layers=args.layers, rollouts=args.rollouts, completion_tokens=args.tokens, k=args.k,
                          capture_tokens=args.capture_tokens, window_tokens=args.window, batch_tokens=args.window,
                          train_steps=args.train_steps, backward=args.backward, policy_dtype=args.policy_dtype,
                          engine_dtype=args.engine_dtype, document_rollouts=args.documents_of,
                          document_tokens=args.document_tokens,
                          train_windows=tuple(args.windows), logprob_chunk=args.logprob_chunk,
                          kv_cache_gib=args.kv_cache_gib, max_model_len=max(4096, args.tokens + 128),
                          after_tokens=64)
    load_before = os.getloadavg()
    partial = lambda rows: write_json(args.name + ".partial", {"config": asdict(cfg), "stages": rows})  # noqa: E731
    with tempfile.TemporaryDirectory() as work:
        out = run_realistic(cfg, work, on_stage=partial)
    (RESULTS / f"{args.name}.partial.json").unlink(missing_ok=True)
    rows = [[name, s["seconds"], s["rss_gb"], s["stage_peak_gb"], s["peak_gb"]]
            for name, s in out["stages"].items()]
    print_table(["stage", "seconds", "rss GB", "stage peak GB", "process peak GB"], rows)
    fig = out["figures"]
    print({k: v for k, v in fig.items() if k != "cache_windows"})
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    write_json(args.name, {
        "question": "the feature path at the Qwen3-0.6B shape: time and RSS per stage", **out,
        "threads": torch.get_num_threads(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "git_dirty": dirty,
        "note": "shared 2-core machine (other sessions running): stage times are contended; a random target, so "
                "acceptance is not a quality figure"})


if __name__ == "__main__":
    main()
